"""Where the image fetcher may read from: a default-deny egress policy and the HTTP GET that obeys it.

Web images: ``http``/``https`` only, to public addresses. A host in any spelling (a name, a
trailing dot, IDN, decimal ``2130706433``, octal ``0177.0.0.1``, hex ``0x7f.1``, short ``127.1``,
bracketed IPv6, IPv4-mapped IPv6) becomes IP addresses first (the WHATWG IPv4 number parser for
numeric hosts, ``socket.getaddrinfo`` for names); every address is classified with ``ipaddress``
and the request connects to the address that was checked (``realsyn.net``: the Host header and
TLS SNI carry the name). Redirects are followed by hand, every hop checked again, at most
``max_redirects``. Refused: loopback, link-local (169.254/16, fe80::/10: cloud metadata),
private (10/8, 172.16/12, 192.168/16, fc00::/7, fec0::/10), CGNAT 100.64/10 ("shared"),
multicast, unspecified and every other non-global range ("reserved"); 6to4, Teredo and NAT64
addresses are judged by the IPv4 address they embed.

Local paths (and ``file://``): only under the input root, judged lexically first (nothing outside
is ever touched, so absent and present files outside answer alike), then after ``realpath`` (no
``..`` or symlink escape). Object stores (``s3://``, ``gs://``, ...): only under the allowed prefixes,
by default the input location itself.

Opt-ins for trusted corpora: ``allow_private_networks`` (private and CGNAT ranges, never
loopback, link-local or multicast), ``allowed_networks`` (CIDRs allowed whatever their range),
``allow_local_paths_outside_input``, ``local_roots``, ``object_prefixes``.

Responses whose ``X-Robots-Tag`` carries an opt-out directive (``noai``, ``noimageai``,
``noindex``, ``noimageindex``, ``none``: img2dataset's set plus ``none``, which implies
``noindex``) are not downloaded: ``FetchOptedOut``. A directive scoped to another user agent
(``otherbot: noai``) does not apply.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import ssl
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from realsyn.net import Deadline, DeadlineHTTPConnection, getaddrinfo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Statuses of an image_db row that was not fetched (see realsyn.image_db).
STATUS_FETCH_FAILED, STATUS_FETCH_REFUSED, STATUS_OPTED_OUT = "fetch_failed", "fetch_refused", "opted_out"
DEFAULT_OPT_OUT_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex", "none")
DEFAULT_MAX_REDIRECTS = 5
OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
PRIVATE_CLASSES = frozenset({"private", "shared"})  # what allow_private_networks opens
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")]
_SHARED_NET = ipaddress.ip_network("100.64.0.0/10")
_NAT64_NET = ipaddress.ip_network("64:ff9b::/96")
# Python calls these global; none is a place an image is served from.
_EXTRA_RESERVED = [ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "64:ff9b:1::/48", "::/96")]
_CHUNK = 64 * 1024
_PATH_SAFE = "!#$%&'()*+,/:;=?@[]~"  # requests.utils.requote_uri's safe set


class FetchError(Exception):
    """An image could not be obtained; ``reason`` is a short machine-readable code, ``status`` the image_db status."""

    status = STATUS_FETCH_FAILED

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FetchRefused(FetchError):
    """The fetch policy forbids this reference (reason ``refused_<why>``); nothing was sent or read."""

    status = STATUS_FETCH_REFUSED


class FetchOptedOut(FetchError):
    """The server answered with an X-Robots-Tag opt-out directive (reason ``opted_out``); the body was not read."""

    status = STATUS_OPTED_OUT


# ---------------------------------------------------------------------------------------- addresses
def address_class(ip: IPAddress) -> str | None:
    """None for a public address, else why not: ``unspecified``, ``loopback``, ``link_local``,
    ``multicast``, ``shared`` (CGNAT), ``private`` or ``reserved``. IPv4-mapped, NAT64, 6to4 and
    Teredo IPv6 addresses are judged by the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drop any %zone
        if ip.ipv4_mapped is not None:
            return address_class(ip.ipv4_mapped)
        if ip in _NAT64_NET:
            return address_class(ipaddress.IPv4Address(ip.packed[-4:]))
        if ip.sixtofour is not None:
            return address_class(ip.sixtofour)
        if ip.teredo is not None:
            server, client = ip.teredo
            return address_class(server) or address_class(client)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED_NET:
        return "shared"
    if any(ip in net for net in _PRIVATE_NETS if net.version == ip.version):
        return "private"
    if ip.is_reserved or not ip.is_global or any(ip in net for net in _EXTRA_RESERVED if net.version == ip.version):
        return "reserved"
    return None


def parse_ipv4_number_host(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host denotes, as browsers and ``inet_aton`` read it (WHATWG URL
    IPv4 parser): 1 to 4 dot-separated parts, each decimal, octal (leading 0) or hex (0x); the last
    part fills the remaining bytes (``127.1``, ``2130706433``). None when the host is a name (its
    last label is not a number). Raises ``ValueError`` for a host that ends in a number but denotes
    no address (``1.2.3.4.5``, ``a.1``, a part too large): such a host never goes to DNS."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # one trailing dot
    last_label = parts[-1]
    if not (re.fullmatch("[0-9]+", last_label) or re.fullmatch("0[xX][0-9a-fA-F]*", last_label)):
        return None  # a name: its last label is not a number
    if len(parts) > 4:
        raise ValueError(f"numeric host {host!r} has more than 4 parts")
    numbers = []
    for part in parts:
        number = _ipv4_part(part)
        if number is None:  # WHATWG: a host ending in a number must be an IPv4 address
            raise ValueError(f"numeric host {host!r} has a part that is not a number")
        numbers.append(number)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(f"numeric host {host!r} is out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ipv4_part(part: str) -> int | None:
    if not part:
        return None
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
        if not digits:
            return 0
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not re.fullmatch("[0-9a-fA-F]+" if base == 16 else "[0-7]+" if base == 8 else "[0-9]+", digits):
        return None
    return int(digits, base)


def normalize_host(host: str) -> str:
    """The ASCII form of a URL host: percent-decoded, IDNA (NFKC: fullwidth letters and digits, ideographic dots), lower case."""
    host = unquote(host).strip()
    if not host:
        raise ValueError("empty host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:  # an IPv6 literal
        return str(ipaddress.IPv6Address(host.split("%", 1)[0])) + (f"%{host.split('%', 1)[1]}" if "%" in host else "")
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    host = host.lower()
    if any(c.isspace() or ord(c) < 0x21 or c in "/\\?#@" for c in host):
        raise ValueError(f"invalid host {host!r}")
    return host


Resolver = Callable[[str, int, Deadline], list[tuple[Any, ...]]]


def resolve_host(host: str, port: int, deadline: Deadline | None = None, resolver: Resolver | None = None) -> list[IPAddress]:
    """Every address a (normalized) host denotes: an IP literal or numeric IPv4 host directly, a name via getaddrinfo."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    number = parse_ipv4_number_host(host)
    if number is not None:
        return [number]
    infos = (resolver or getaddrinfo)(host.rstrip(".") or host, port, deadline or Deadline(30.0))
    out: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


# ---------------------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class FetchPolicy:
    """Default deny: public http(s) addresses, local paths under ``local_roots``, objects under ``object_prefixes``."""

    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    local_roots: tuple[str, ...] = ()
    allow_local_paths_outside_input: bool = False
    object_prefixes: tuple[str, ...] = ()
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    opt_out_directives: tuple[str, ...] = DEFAULT_OPT_OUT_DIRECTIVES
    user_agent_token: str = "realsyn"
    _networks: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)
    _roots: tuple[tuple[str, str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allowed_networks", "local_roots", "object_prefixes", "opt_out_directives"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value or ()))
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except ValueError as e:
            raise ValueError(f"allowed_networks: {e}") from e
        object.__setattr__(self, "_networks", networks)
        roots = tuple((os.path.abspath(r), os.path.realpath(r)) for r in self.local_roots)
        object.__setattr__(self, "_roots", roots)
        object.__setattr__(self, "opt_out_directives", tuple(d.strip().lower() for d in self.opt_out_directives))
        prefixes = []
        for p in self.object_prefixes:
            scheme, sep, rest = p.partition("://")
            if not sep or scheme.lower() not in OBJECT_SCHEMES:
                raise ValueError(f"object prefix {p!r} is not an object-store URI ({', '.join(s + '://' for s in OBJECT_SCHEMES)})")
            prefixes.append(f"{_object_scheme(scheme)}://{rest.strip('/')}")
        object.__setattr__(self, "object_prefixes", tuple(prefixes))

    @classmethod
    def for_input(
        cls,
        input_uri: str | None,
        *,
        allowed_local_roots: Iterable[str] = (),
        allowed_s3_prefixes: Iterable[str] = (),
        **options: Any,
    ) -> FetchPolicy:
        """The policy of one input location: its own folder (local) or prefix (object store) is readable, plus the opt-ins."""
        roots, prefixes = list(allowed_local_roots), list(allowed_s3_prefixes)
        if input_uri:
            scheme, sep, _ = input_uri.partition("://")
            if sep and scheme.lower() != "file":
                if scheme.lower() in OBJECT_SCHEMES:
                    prefixes.append(input_uri)
            else:
                path = input_uri[len("file://") :] if sep else input_uri
                roots.append(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        return cls(local_roots=tuple(roots), object_prefixes=tuple(prefixes), **options)

    # ------------------------------------------------------------------ addresses
    def address_verdict(self, ip: IPAddress) -> str | None:
        """None when the policy lets a request go to ``ip``, else the refusal reason ``refused_<class>``."""
        plain = ipaddress.ip_address(ip.packed)
        if any(plain.version == net.version and plain in net for net in self._networks):
            return None
        cls = address_class(plain)
        if cls is None or (self.allow_private_networks and cls in PRIVATE_CLASSES):
            return None
        return f"refused_{cls}"

    def check_url(self, url: str, deadline: Deadline | None = None, resolver: Resolver | None = None) -> Target:
        """The checked target of an http(s) URL; raises ``FetchRefused`` or ``FetchError`` (invalid_url, dns)."""
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            raw_host = parts.netloc.rpartition("@")[2]
            if raw_host.startswith("["):
                raw_host = raw_host[: raw_host.index("]") + 1]
            elif ":" in raw_host:
                raw_host = raw_host.rsplit(":", 1)[0]
            port = parts.port
        except ValueError as e:
            raise FetchError("invalid_url", f"{url[:200]}: {e}") from e
        if scheme not in ("http", "https"):
            raise FetchRefused("refused_scheme", url[:80])
        try:
            host = normalize_host(raw_host)
        except (ValueError, UnicodeError) as e:
            raise FetchError("invalid_url", f"{url[:200]}: {e}") from e
        port = port or (443 if scheme == "https" else 80)
        try:
            addresses = resolve_host(host.split("%", 1)[0], port, deadline, resolver)
        except ValueError as e:
            raise FetchError("invalid_url", f"{url[:200]}: {e}") from e
        except TimeoutError as e:
            raise FetchError("timeout", f"resolving {host}: {e}") from e
        except OSError as e:  # socket.gaierror: no such name
            raise FetchError("dns_error", f"{host}: {e}") from e
        if not addresses:
            raise FetchError("dns_error", f"{host}: no address")
        for ip in addresses:  # every answer must pass: a name with one public and one private address is refused
            verdict = self.address_verdict(ip)
            if verdict:
                raise FetchRefused(verdict, f"{host} -> {ip}")
        # spaces and non-ASCII in corpus URLs are percent-encoded (UTF-8) as browsers and requests do; existing escapes stay
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path += "?" + quote(parts.query, safe=_PATH_SAFE)
        sni_host = host if not _is_ip(host) else host.split("%", 1)[0]
        return Target(scheme, sni_host, port, path, str(addresses[0]))

    # ------------------------------------------------------------------ local paths
    def check_local_path(self, ref: str) -> str:
        """The real path a local reference (plain path or ``file://``) may be read from; raises ``FetchRefused``."""
        path = ref
        if ref[:7].lower() == "file://":
            parts = urlsplit(ref)
            if parts.netloc not in ("", "localhost"):
                raise FetchRefused("refused_path", ref[:80])
            path = unquote(parts.path)
        if "\x00" in path or not os.path.isabs(path):
            raise FetchRefused("refused_path", ref[:80])
        lexical = os.path.normpath(path)
        if self.allow_local_paths_outside_input:
            return os.path.realpath(lexical)
        # lexically first: nothing outside the roots is touched, so its existence cannot show
        if not any(_under(lexical, a) or _under(lexical, r) for a, r in self._roots):
            raise FetchRefused("refused_path", ref[:80])
        real = os.path.realpath(lexical)
        if not any(_under(real, r) for _, r in self._roots):
            raise FetchRefused("refused_path", ref[:80])
        return real

    # ------------------------------------------------------------------ object stores
    def check_object_uri(self, ref: str) -> str:
        """The object URI (``s3a`` read as ``s3``) if it lies under an allowed prefix; raises ``FetchRefused``."""
        scheme, _, rest = ref.partition("://")
        segments = rest.split("/")
        if not rest or any(s in (".", "..") for s in segments[1:]) or not segments[0]:
            raise FetchRefused("refused_object_prefix", ref[:80])
        uri = f"{_object_scheme(scheme)}://{rest}"
        if any(uri == p or uri.startswith(p + "/") for p in self.object_prefixes):
            return uri
        raise FetchRefused("refused_object_prefix", ref[:80])

    # ------------------------------------------------------------------ opt-out
    def opt_out(self, robots_tags: Iterable[str]) -> str | None:
        """The first opt-out directive among X-Robots-Tag values that applies to us, else None.

        ``noai, noindex`` applies to every agent; ``otherbot: noai`` only to ``otherbot``; a scope
        lasts until the next ``agent:`` in the same value. ``unavailable_after: <date>`` and the
        ``max-*: <value>`` directives are directives with a value, not scopes.
        """
        if not self.opt_out_directives:
            return None
        token = self.user_agent_token.lower()
        for value in robots_tags:
            scope = None
            for piece in str(value).split(","):
                head, sep, tail = piece.partition(":")
                if sep and _is_agent_scope(head):
                    scope, piece = head.strip().lower(), tail
                if scope not in (None, token, "*"):
                    continue
                directive = piece.strip().lower()
                if directive in self.opt_out_directives:
                    return directive
        return None


_VALUE_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def _is_agent_scope(head: str) -> bool:
    head = head.strip().lower()
    return bool(head) and " " not in head and head not in _VALUE_DIRECTIVES


def _object_scheme(scheme: str) -> str:
    scheme = scheme.lower()
    return {"s3a": "s3", "gcs": "gs"}.get(scheme, scheme)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """One checked request: connect to ``address``; ``host`` goes in the Host header and SNI."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


# ---------------------------------------------------------------------------------------- the GET
def http_get(
    url: str,
    policy: FetchPolicy,
    deadline: Deadline,
    *,
    max_bytes: int,
    op_timeout: float | None = None,
    user_agent: str = "realsyn/0.1",
    resolver: Resolver | None = None,
) -> bytes:
    """The body of ``url``, every hop checked by ``policy``, all of it within ``deadline``.

    Raises ``FetchRefused`` (a hop the policy forbids: nothing is sent to it), ``FetchOptedOut``,
    or ``FetchError`` with ``http_<code>``, ``too_large``, ``timeout``, ``unreachable``,
    ``dns_error``, ``tls_error``, ``bad_response``, ``truncated``, ``too_many_redirects``,
    ``invalid_url`` or ``unsupported_encoding``.
    """
    hops = 0
    while True:
        target = policy.check_url(url, deadline, resolver)
        conn = DeadlineHTTPConnection(target.scheme, target.host, target.port, address=target.address, op_timeout=op_timeout)
        conn.deadline = deadline
        try:
            try:
                conn.request(
                    "GET",
                    target.path,
                    headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"},
                )
                response = conn.getresponse()
                if response.status in REDIRECT_STATUSES:
                    location = response.getheader("Location")
                    if not location:
                        raise FetchError(f"http_{response.status}", f"redirect without Location: {url[:200]}")
                    hops += 1
                    if hops > policy.max_redirects:
                        raise FetchError("too_many_redirects", f"more than {policy.max_redirects}: {url[:200]}")
                    url = urljoin(url, location.strip())
                    continue
                if not 200 <= response.status < 300:
                    raise FetchError(f"http_{response.status}", url[:200])
                directive = policy.opt_out(response.headers.get_all("X-Robots-Tag") or [])
                if directive:
                    raise FetchOptedOut("opted_out", f"X-Robots-Tag {directive}: {url[:200]}")
                return _read_body(response, max_bytes, deadline)
            except TimeoutError as e:
                raise FetchError("timeout", f"{url[:200]}: {e}") from e
            except ssl.SSLError as e:
                raise FetchError("tls_error", f"{url[:200]}: {e}") from e
            except ConnectionError as e:  # refused, reset, RemoteDisconnected
                raise FetchError("unreachable", f"{url[:200]}: {type(e).__name__}: {e}") from e
            except http.client.InvalidURL as e:
                raise FetchError("invalid_url", f"{url[:200]}: {e}") from e
            except http.client.HTTPException as e:
                raise FetchError("bad_response", f"{url[:200]}: {type(e).__name__}: {e}"[:300]) from e
            except OSError as e:
                raise FetchError("unreachable", f"{url[:200]}: {type(e).__name__}: {e}") from e
        finally:
            conn.close()


def _read_body(response: Any, max_bytes: int, deadline: Deadline) -> bytes:
    declared = response.getheader("Content-Length")
    length = int(declared) if declared and declared.strip().isdigit() else None
    if length is not None and length > max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > {max_bytes}")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise FetchError("unsupported_encoding", encoding[:40])
    inflate = None if encoding == "identity" else zlib.decompressobj(47 if "gzip" in encoding else zlib.MAX_WBITS)
    raw = 0
    body = bytearray()
    while chunk := response.read1(_CHUNK):
        raw += len(chunk)
        if inflate is not None:
            chunk = inflate.decompress(chunk, max_bytes + 1 - len(body))  # a gzip bomb never inflates past the cap
        body += chunk
        if len(body) > max_bytes or (inflate is None and raw > max_bytes):
            raise FetchError("too_large", f"body over {max_bytes} bytes")
    if deadline.expired():  # a read cut short by the deadline must not pass for a complete body
        raise FetchError("timeout", "body not complete before the deadline")
    if length is not None and raw != length:
        raise FetchError("truncated", f"{raw} of {length} bytes")
    if inflate is not None and not inflate.eof:
        raise FetchError("truncated", "compressed body ended early")
    return bytes(body)


def object_ref(ref: str) -> bool:
    """True for an object-store URI (``s3://`` and the other fsspec stores)."""
    scheme, sep, _ = ref.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


def local_ref(ref: str) -> bool:
    """True for a local path or ``file://`` URI."""
    return ref[:7].lower() == "file://" or "://" not in ref


__all__ = [
    "FetchError",
    "FetchOptedOut",
    "FetchPolicy",
    "FetchRefused",
    "Target",
    "address_class",
    "http_get",
    "local_ref",
    "normalize_host",
    "object_ref",
    "parse_ipv4_number_host",
    "resolve_host",
]
