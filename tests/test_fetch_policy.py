"""The fetch policy: address rules as pure functions over every spelling (no connection), redirects,
pinning, deadlines and opt-out against local servers on 127.0.0.1/127.0.0.2 only, local paths,
object-store prefixes (moto on 127.0.0.1)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from realsyn.fetch_policy import (
    FetchError,
    FetchPolicy,
    FetchRefused,
    address_class,
    http_get,
    parse_ipv4_number_host,
)
from realsyn.filters.image_rules import ImageRuleFilter
from realsyn.image_db import ImageFetcher
from realsyn.net import Deadline
from tests.s3_server import moto_s3

LOOPBACK_A = "127.0.0.1"
LOOPBACK_B = "127.0.0.2"  # a second loopback address: must never receive a request in these tests
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _reason(fn, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(FetchError) as info:
        fn(*args, **kwargs)
    return type(info.value).__name__, info.value.reason


# ------------------------------------------------------------------ pure address rules (no connection)
class _Resolver:
    """A fake DNS: name -> addresses; records every lookup. Nothing leaves the process."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, host, port, deadline):
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.table[host]]


SPELLINGS = [
    # loopback, every spelling
    ("http://127.0.0.1/", "refused_loopback"),
    ("http://2130706433/", "refused_loopback"),
    ("http://0177.0.0.1/", "refused_loopback"),
    ("http://0x7f.1/", "refused_loopback"),
    ("http://0x7f000001/", "refused_loopback"),
    ("http://127.1/", "refused_loopback"),
    ("http://127.0.1/", "refused_loopback"),
    ("http://017700000001/", "refused_loopback"),
    ("http://127.0.0.1./", "refused_loopback"),
    ("http://%31%32%37.0.0.1/", "refused_loopback"),
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/", "refused_loopback"),  # fullwidth digits and dots
    ("http://127\u30020\u30020\u30021/", "refused_loopback"),  # ideographic full stops
    ("http://[::1]/", "refused_loopback"),
    ("http://[0:0:0:0:0:0:0:1]:8080/", "refused_loopback"),
    ("http://[::ffff:127.0.0.1]/", "refused_loopback"),
    ("http://[::ffff:7f00:1]/", "refused_loopback"),
    ("http://[2002:7f00:1::]/", "refused_loopback"),  # 6to4 of 127.0.0.1
    ("http://[64:ff9b::7f00:1]/", "refused_loopback"),  # NAT64 of 127.0.0.1
    ("http://user:pw@127.0.0.1:80/", "refused_loopback"),
    ("HTTP://127.0.0.1/", "refused_loopback"),
    # unspecified
    ("http://0.0.0.0/", "refused_unspecified"),
    ("http://0/", "refused_unspecified"),
    ("http://0x/", "refused_unspecified"),
    ("http://[::]/", "refused_unspecified"),
    # link-local: the cloud metadata endpoint in its spellings
    ("http://169.254.169.254/latest/meta-data/", "refused_link_local"),
    ("http://2852039166/", "refused_link_local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "refused_link_local"),
    ("http://0251.0376.0251.0376/", "refused_link_local"),
    ("http://[::ffff:169.254.169.254]/", "refused_link_local"),
    ("http://[fe80::1]/", "refused_link_local"),
    ("http://[fe80::1%25eth0]/", "refused_link_local"),
    # private
    ("http://10.0.0.1/", "refused_private"),
    ("http://10.1/", "refused_private"),
    ("http://172.16.0.1/", "refused_private"),
    ("http://172.31.255.255/", "refused_private"),
    ("http://192.168.1.1/", "refused_private"),
    ("http://3232235777/", "refused_private"),
    ("http://[fd00::1]/", "refused_private"),
    ("http://[fc00::1]/", "refused_private"),
    ("http://[::ffff:10.0.0.1]/", "refused_private"),
    ("http://[64:ff9b::a00:1]/", "refused_private"),
    # CGNAT, multicast, reserved
    ("http://100.64.0.1/", "refused_shared"),
    ("http://100.127.255.254/", "refused_shared"),
    ("http://224.0.0.1/", "refused_multicast"),
    ("http://239.255.255.250/", "refused_multicast"),
    ("http://[ff02::1]/", "refused_multicast"),
    ("http://255.255.255.255/", "refused_reserved"),
    ("http://4294967295/", "refused_reserved"),
    ("http://240.0.0.1/", "refused_reserved"),
    ("http://192.0.2.1/", "refused_reserved"),
    ("http://198.18.0.1/", "refused_reserved"),
    ("http://192.0.0.8/", "refused_reserved"),
    ("http://[2001:db8::1]/", "refused_reserved"),
    ("http://[100::1]/", "refused_reserved"),
    ("http://[::127.0.0.1]/", "refused_reserved"),  # deprecated IPv4-compatible form
    # schemes
    ("ftp://example.org/a.png", "refused_scheme"),
    ("gopher://example.org/", "refused_scheme"),
    ("file:///etc/passwd", "refused_scheme"),
]


@pytest.mark.parametrize("url, reason", SPELLINGS)
def test_every_spelling_of_a_non_public_address_is_refused_without_dns(url, reason):
    resolver = _Resolver({})
    with pytest.raises(FetchRefused) as info:
        FetchPolicy().check_url(url, resolver=resolver)
    assert info.value.reason == reason and info.value.status == "fetch_refused"
    assert resolver.calls == []  # numeric hosts and IP literals never go to DNS


@pytest.mark.parametrize(
    "url, table, reason",
    [
        ("http://localhost/a.png", {"localhost": ["127.0.0.1", "::1"]}, "refused_loopback"),
        ("http://localhost./a.png", {"localhost": ["127.0.0.1"]}, "refused_loopback"),
        ("http://LOCALHOST/a.png", {"localhost": ["127.0.0.1"]}, "refused_loopback"),
        (
            "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
            {"localhost": ["127.0.0.1"]},
            "refused_loopback",
        ),  # fullwidth IDN
        ("http://metadata.google.internal/", {"metadata.google.internal": ["169.254.169.254"]}, "refused_link_local"),
        ("http://mixed.example/", {"mixed.example": ["93.184.216.34", "10.0.0.7"]}, "refused_private"),  # any bad answer refuses
        ("http://v6.example/", {"v6.example": ["::ffff:192.168.0.1"]}, "refused_private"),
    ],
)
def test_names_are_judged_by_every_address_they_resolve_to(url, table, reason):
    resolver = _Resolver(table)
    with pytest.raises(FetchRefused) as info:
        FetchPolicy().check_url(url, resolver=resolver)
    assert info.value.reason == reason
    assert len(resolver.calls) == 1


def test_public_targets_are_pinned_to_the_checked_address():
    resolver = _Resolver({"images.example": ["93.184.216.34"], "xn--bcher-kva.example": ["93.184.216.35"]})
    target = FetchPolicy().check_url("https://Images.Example:8443/a/b.png?x=1#frag", resolver=resolver)
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https",
        "images.example",
        8443,
        "/a/b.png?x=1",
        "93.184.216.34",
    )
    idn = FetchPolicy().check_url("http://b\u00fccher.example/", resolver=resolver)
    assert (idn.host, idn.address, idn.port) == ("xn--bcher-kva.example", "93.184.216.35", 80)
    assert resolver.calls == ["images.example", "xn--bcher-kva.example"]
    assert FetchPolicy().check_url("http://1.1.1.1/x.jpg").address == "1.1.1.1"  # a literal: no DNS, no connection


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://1.2.3.4.5/", "invalid_url"),  # ends in a number: must be IPv4, never sent to DNS
        ("http://a.1/", "invalid_url"),
        ("http://09/", "invalid_url"),
        ("http://256.256.256.256/", "invalid_url"),
        ("http://0x100000000/", "invalid_url"),
        ("http://[::1/", "invalid_url"),
        ("http://example.org:99999/", "invalid_url"),
        ("http:///nohost", "invalid_url"),
    ],
)
def test_malformed_hosts_fail_without_dns(url, reason):
    resolver = _Resolver({})
    assert _reason(FetchPolicy().check_url, url, resolver=resolver)[1] == reason
    assert resolver.calls == []


def test_unknown_names_fail_as_dns_errors():
    assert _reason(FetchPolicy().check_url, "http://nowhere.example/", resolver=_Resolver({})) == ("FetchError", "dns_error")


@pytest.mark.parametrize(
    "host, expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.1", "127.0.0.1"),
        ("1.2.3", "1.2.0.3"),
        ("10.1", "10.0.0.1"),
        ("example.org", None),
    ],
)
def test_ipv4_number_parser(host, expected):
    got = parse_ipv4_number_host(host)
    assert (str(got) if got else None) == expected


def test_address_classes_and_opt_ins():
    assert address_class(ipaddress.ip_address("93.184.216.34")) is None
    assert address_class(ipaddress.ip_address("2606:4700::1111")) is None
    open_private = FetchPolicy(allow_private_networks=True)
    assert open_private.address_verdict(ipaddress.ip_address("10.0.0.1")) is None
    assert open_private.address_verdict(ipaddress.ip_address("100.64.0.1")) is None
    assert open_private.address_verdict(ipaddress.ip_address("fd00::1")) is None
    # private opt-in never opens loopback, link-local (metadata) or multicast
    assert open_private.address_verdict(ipaddress.ip_address("127.0.0.1")) == "refused_loopback"
    assert open_private.address_verdict(ipaddress.ip_address("169.254.169.254")) == "refused_link_local"
    assert open_private.address_verdict(ipaddress.ip_address("224.0.0.1")) == "refused_multicast"
    one = FetchPolicy(allowed_networks=["127.0.0.1/32"])
    assert one.address_verdict(ipaddress.ip_address("127.0.0.1")) is None
    assert one.address_verdict(ipaddress.ip_address("::ffff:127.0.0.1")) == "refused_loopback"
    assert one.address_verdict(ipaddress.ip_address("127.0.0.2")) == "refused_loopback"
    with pytest.raises(ValueError, match="allowed_networks"):
        FetchPolicy(allowed_networks=["not-a-net"])


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["noimageai"], "noimageai"),
        (["NoIndex, nofollow"], "noindex"),
        (["none"], "none"),
        (["noimageindex"], "noimageindex"),
        (["max-image-preview:large, noai"], "noai"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noimageai"], "noimageai"),
        (["otherbot: noai"], None),
        (["otherbot: noindex, realsyn: noai"], "noai"),
        (["realsyn: noimageai"], "noimageai"),
        (["googlebot: nofollow", "noai"], "noai"),
        (["nofollow", "noarchive"], None),
        ([], None),
    ],
)
def test_x_robots_tag_opt_out_rules(values, expected):
    assert FetchPolicy().opt_out(values) == expected
    assert FetchPolicy(opt_out_directives=()).opt_out(values) is None


# ------------------------------------------------------------------ local servers on 127.0.0.1 / 127.0.0.2
class _Recorder(BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Host")))
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for k, v in headers.items():
            for value in v if isinstance(v, list) else [v]:
                self.send_header(k, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(host, routes):
    httpd = ThreadingHTTPServer((host, 0), _Recorder)
    httpd.daemon_threads = True
    httpd.routes, httpd.requests = routes, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture
def servers():
    # 127.0.0.0/8 is loopback on Linux (CI included): failing to bind 127.0.0.2 fails the test
    a = _serve(LOOPBACK_A, {})
    b = _serve(LOOPBACK_B, {"/secret": (200, {}, b"internal data")})
    yield a, b
    for s in (a, b):
        s.shutdown()
        s.server_close()


ONLY_A = FetchPolicy(allowed_networks=["127.0.0.1/32"])


def _fetcher(policy=ONLY_A, **kw):
    return ImageFetcher(timeout_s=1.0, retries=0, policy=policy, **kw)


def test_redirect_to_another_address_is_refused_and_never_sent(servers):
    a, b = servers
    pa_, pb = a.server_address[1], b.server_address[1]
    a.routes.update(
        {
            "/to-b": (302, {"Location": f"http://{LOOPBACK_B}:{pb}/secret"}, b""),
            "/to-b-mapped": (301, {"Location": f"http://[::ffff:{LOOPBACK_B}]:{pb}/secret"}, b""),
            "/to-b-decimal": (307, {"Location": f"http://2130706434:{pb}/secret"}, b""),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-a": (303, {"Location": "/img.png"}, b""),
            "/img.png": (200, {}, PNG),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/no-location": (302, {}, b""),
        }
    )
    base = f"http://{LOOPBACK_A}:{pa_}"
    fetcher = _fetcher()
    for path in ("/to-b", "/to-b-mapped", "/to-b-decimal"):
        assert _reason(fetcher.fetch, base + path) == ("FetchRefused", "refused_loopback")
    assert _reason(fetcher.fetch, base + "/to-file") == ("FetchRefused", "refused_scheme")
    assert b.requests == []  # the second server never saw a request
    assert fetcher.fetch(base + "/to-a") == PNG  # a redirect inside what is allowed is followed
    assert _reason(fetcher.fetch, base + "/loop") == ("FetchError", "too_many_redirects")
    assert [p for p, _ in a.requests].count("/loop") == 6  # the first request and max_redirects=5 hops
    assert _reason(_fetcher(FetchPolicy(allowed_networks=["127.0.0.1/32"], max_redirects=0)).fetch, base + "/to-a") == (
        "FetchError",
        "too_many_redirects",
    )
    assert _reason(fetcher.fetch, base + "/no-location") == ("FetchError", "http_302")
    # without the opt-in, the allow-listed server itself is refused, before any request
    before = len(a.requests)
    assert _reason(ImageFetcher(retries=0).fetch, base + "/img.png") == ("FetchRefused", "refused_loopback")
    assert len(a.requests) == before


def test_connection_goes_to_the_checked_address_with_the_name_in_host(servers):
    a, b = servers
    a.routes["/img.png"] = (200, {}, PNG)
    # a rebinding resolver: the first answer passes the check, a second would point elsewhere
    answers = iter([[LOOPBACK_A], [LOOPBACK_B]])
    calls = []

    def rebinding(host, port, deadline):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in next(answers)]

    port = a.server_address[1]
    body = http_get(f"http://images.test:{port}/img.png", ONLY_A, Deadline(5), max_bytes=1000, op_timeout=1, resolver=rebinding)
    assert body == PNG
    assert calls == ["images.test"]  # resolved once: the check and the connection use the same answer
    assert a.requests[-1] == ("/img.png", f"images.test:{port}")
    assert b.requests == []


def test_spaces_and_non_ascii_in_paths_are_percent_encoded(servers):
    a, _ = servers
    a.routes["/my%20photo/caf%C3%A9.png?s=a%20b"] = (200, {}, PNG)
    base = f"http://{LOOPBACK_A}:{a.server_address[1]}"
    assert _fetcher().fetch(base + "/my photo/caf\u00e9.png?s=a b") == PNG
    assert _fetcher().fetch(base + "/my%20photo/caf%C3%A9.png?s=a%20b#fragment") == PNG  # escapes kept, fragment not sent
    assert [p for p, _ in a.requests] == ["/my%20photo/caf%C3%A9.png?s=a%20b"] * 2


def test_x_robots_tag_opts_out_and_is_counted(servers, tmp_path):
    a, _ = servers
    a.routes.update(
        {
            "/noai.png": (200, {"X-Robots-Tag": "noai"}, PNG),
            "/two-headers.png": (200, {"X-Robots-Tag": ["googlebot: nofollow", "noimageai"]}, PNG),
            "/other-bot.png": (200, {"X-Robots-Tag": "otherbot: noai"}, PNG),
            "/fine.png": (200, {"X-Robots-Tag": "nofollow"}, PNG),
        }
    )
    base = f"http://{LOOPBACK_A}:{a.server_address[1]}"
    fetcher = _fetcher()
    assert _reason(fetcher.fetch, base + "/noai.png") == ("FetchOptedOut", "opted_out")
    assert _reason(fetcher.fetch, base + "/two-headers.png") == ("FetchOptedOut", "opted_out")
    assert fetcher.fetch(base + "/other-bot.png") == PNG
    assert fetcher.fetch(base + "/fine.png") == PNG
    ignoring = _fetcher(FetchPolicy(allowed_networks=["127.0.0.1/32"], opt_out_directives=()))
    assert ignoring.fetch(base + "/noai.png") == PNG


def test_gzip_bomb_is_capped_while_inflating(servers):
    a, _ = servers
    bomb = gzip.compress(b"\x00" * 5_000_000)
    a.routes["/bomb"] = (200, {"Content-Encoding": "gzip"}, bomb)
    a.routes["/small-gz"] = (200, {"Content-Encoding": "gzip"}, gzip.compress(PNG))
    a.routes["/brotli"] = (200, {"Content-Encoding": "br"}, b"xx")
    base = f"http://{LOOPBACK_A}:{a.server_address[1]}"
    assert len(bomb) < 10_000
    assert _reason(_fetcher(max_bytes=100_000).fetch, base + "/bomb") == ("FetchError", "too_large")
    assert _fetcher(max_bytes=100_000).fetch(base + "/small-gz") == PNG
    assert _reason(_fetcher().fetch, base + "/brotli") == ("FetchError", "unsupported_encoding")


class DripServer:
    """A raw HTTP server on 127.0.0.1: reads one request, sends ``head`` at once, then ``drip`` one
    byte every ``interval`` seconds until the client goes away (or ``max_seconds``)."""

    def __init__(self, head: bytes, drip: bytes, interval: float = 0.1, max_seconds: float = 8.0):
        self.head, self.drip, self.interval, self.max_seconds = head, drip, interval, max_seconds
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK_A, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://{LOOPBACK_A}:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        started = time.monotonic()
        with conn:
            conn.settimeout(2)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(self.head)
                for i in range(len(self.drip)):
                    if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                        return
                    conn.sendall(self.drip[i : i + 1])
                    time.sleep(self.interval)
            except OSError:
                return


def test_slowly_dripped_headers_hit_the_total_deadline():
    with DripServer(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 200 + b"\r\n\r\n", interval=0.05) as server:
        fetcher = ImageFetcher(timeout_s=1.0, total_timeout_s=0.8, retries=2, policy=ONLY_A)
        started = time.monotonic()
        assert _reason(fetcher.fetch, server.url + "/img.png") == ("FetchError", "timeout")
        elapsed = time.monotonic() - started
    assert elapsed < 3.0  # one deadline for the whole fetch, retries included (the drip alone lasts 10 s)
    assert server.connections == 1  # no retry once the deadline is spent


def test_slowly_dripped_body_hits_the_total_deadline_and_never_passes_as_complete():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n"
    with DripServer(head, b"z" * 300, interval=0.05) as server:
        fetcher = ImageFetcher(timeout_s=1.0, total_timeout_s=0.8, retries=0, policy=ONLY_A)
        started = time.monotonic()
        assert _reason(fetcher.fetch, server.url + "/img.png") == ("FetchError", "timeout")
        assert time.monotonic() - started < 3.0


def test_a_body_shorter_than_its_length_is_truncated_not_ok():
    with DripServer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n", b"abc", interval=0.0) as server:
        assert _reason(ImageFetcher(timeout_s=1.0, retries=0, policy=ONLY_A).fetch, server.url) in {
            ("FetchError", "truncated"),
            ("FetchError", "bad_response"),
        }


# ------------------------------------------------------------------ local paths
@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(PNG)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(PNG)
    os.symlink(secret / "private.png", root / "images" / "escape.png")
    os.symlink(secret, root / "linked-dir")
    os.symlink(root / "images" / "a.png", root / "images" / "inside-link.png")
    os.mkfifo(root / "images" / "fifo.png")
    return root, secret


def test_local_paths_only_inside_the_input_root(corpus):
    root, secret = corpus
    fetcher = ImageFetcher(policy=FetchPolicy.for_input(str(root)))
    assert fetcher.fetch(str(root / "images" / "a.png")) == PNG
    assert fetcher.fetch(f"file://{root}/images/a.png") == PNG
    assert fetcher.fetch(f"file://localhost{root}/images/a.png") == PNG
    assert fetcher.fetch(str(root / "images" / "inside-link.png")) == PNG  # a link that stays inside
    refused = [
        str(secret / "private.png"),
        str(secret / "absent.png"),  # absent and present outside answer alike: no existence oracle
        f"{root}/images/../../secret/private.png",
        f"{root}/../secret/private.png",
        str(root / "images" / "escape.png"),  # symlink out of the root
        str(root / "linked-dir" / "private.png"),  # symlinked folder out of the root
        str(root / "linked-dir" / "absent.png"),
        f"file://{secret}/private.png",
        "file:///etc/passwd",
        "file://otherhost/etc/passwd",
        "/etc/hostname",
        "/root/.aws/credentials",
        "relative/a.png",  # relative refs are resolved beside the shard by the reader, never against the cwd
        str(root) + "-sibling/a.png",  # a prefix of the root's name is not inside it
    ]
    for ref in refused:
        assert _reason(fetcher.fetch, ref) == ("FetchRefused", "refused_path"), ref
    assert _reason(fetcher.fetch, str(root / "images" / "absent.png")) == ("FetchError", "not_found")
    assert _reason(fetcher.fetch, str(root / "images")) == ("FetchError", "not_found")  # a folder
    assert _reason(fetcher.fetch, str(root / "images" / "fifo.png")) == ("FetchError", "not_found")  # never blocks on a FIFO
    # the default policy has no local root at all; the opt-in reads anywhere
    assert _reason(ImageFetcher().fetch, str(root / "images" / "a.png")) == ("FetchRefused", "refused_path")
    anywhere = ImageFetcher(policy=FetchPolicy.for_input(str(root), allow_local_paths_outside_input=True))
    assert anywhere.fetch(str(secret / "private.png")) == PNG
    more = ImageFetcher(policy=FetchPolicy.for_input(str(root), allowed_local_roots=[str(secret)]))
    assert more.fetch(str(secret / "private.png")) == PNG
    # a shard file as the input location: its folder is the root
    (root / "part.jsonl").write_text("")
    assert ImageFetcher(policy=FetchPolicy.for_input(str(root / "part.jsonl"))).fetch(str(root / "images" / "a.png")) == PNG


def test_ingest_counts_every_refusal_with_its_reason(corpus):
    from realsyn.stages.ingest import ingest_shard
    from realsyn.storage import Storage

    root, secret = corpus
    shard = root / "part.jsonl"
    images = [
        "images/a.png",  # relative: resolved beside the shard, inside the root
        "../secret/private.png",
        str(secret / "private.png"),
        f"file://{secret}/private.png",
        "http://127.0.0.1:9/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "s3://other-bucket/x.png",
        "images/absent.png",
    ]
    shard.write_text(json.dumps({"id": "d", "images": images, "texts": [None] * len(images)}) + "\n")
    storage = Storage(str(root.parent / "store"))
    stats, _ = ingest_shard(storage, "part", str(shard), input_uri=str(root), fetch_timeout_s=1.0)
    rows = storage.reader("image_db", "part").read_parquet("images.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] + ["fetch_refused"] * 6 + ["fetch_failed"]
    assert [r["image_bytes"] for r in rows[1:]] == [None] * 7
    counts = {k: v for k, v in stats.as_dict().items() if k.startswith(("images_", "fetch_error_"))}
    assert counts == {
        "images_in": 8,
        "images_ok": 1,
        "images_fetch_refused": 6,
        "images_fetch_failed": 1,
        "fetch_error_refused_path": 3,
        "fetch_error_refused_loopback": 1,
        "fetch_error_refused_link_local": 1,
        "fetch_error_refused_object_prefix": 1,
        "fetch_error_not_found": 1,
    }
    reasons = ImageRuleFilter(min_short_side=1).reasons(rows)
    assert reasons == [None] + ["fetch_refused"] * 6 + ["fetch_failed"]
    # the opt-in from the run config reaches the fetcher
    stats, _ = ingest_shard(
        storage, "part", str(shard), input_uri=str(root), fetch_policy={"allowed_local_roots": [str(secret)]}, fetch_timeout_s=1.0
    )
    assert stats.counts["images_ok"] == 4 and "fetch_error_refused_path" not in stats.counts


def test_ingest_config_options_build_a_policy():
    from assets.configs import IngestConfig

    config = IngestConfig(allow_private_networks=True, allowed_s3_prefixes=["s3://mirror/images"], opt_out_directives=["noai"])
    policy = FetchPolicy.for_input("s3://corpus/shards", **config.fetch_policy_options())
    assert policy.allow_private_networks and policy.opt_out_directives == ("noai",)
    assert policy.object_prefixes == ("s3://mirror/images", "s3://corpus/shards")
    assert policy.local_roots == ()
    assert IngestConfig().max_image_pixels == 40_000_000


# ------------------------------------------------------------------ object stores (moto on 127.0.0.1)
def test_s3_images_only_under_allowed_prefixes():
    with moto_s3(("corpus", "private")):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.pipe_file("corpus/shards/img/a.png", PNG)
        fs.pipe_file("corpus/shards-other/a.png", PNG)
        fs.pipe_file("private/secret.png", PNG)
        fs.pipe_file("private/pub/ok.png", PNG)
        fetcher = ImageFetcher(policy=FetchPolicy.for_input("s3://corpus/shards"))
        assert fetcher.fetch("s3://corpus/shards/img/a.png") == PNG
        assert fetcher.fetch("s3a://corpus/shards/img/a.png") == PNG
        for ref in (
            "s3://private/secret.png",
            "s3://private/absent.png",  # absent and present outside the prefix answer alike
            "s3://corpus/shards-other/a.png",  # a prefix of the name is not a folder prefix
            "s3://corpus/shards/../shards-other/a.png",
            "s3://corpus/other.png",
            "gs://corpus/shards/img/a.png",
            "s3:///a.png",
        ):
            assert _reason(fetcher.fetch, ref) == ("FetchRefused", "refused_object_prefix"), ref
        assert _reason(fetcher.fetch, "s3://corpus/shards/img/absent.png") == ("FetchError", "not_found")
        more = ImageFetcher(policy=FetchPolicy.for_input("s3://corpus/shards", allowed_s3_prefixes=["s3://private/pub/"]))
        assert more.fetch("s3://private/pub/ok.png") == PNG
        assert _reason(more.fetch, "s3://private/secret.png") == ("FetchRefused", "refused_object_prefix")
        # a local corpus reads no bucket by default
        assert _reason(ImageFetcher(policy=FetchPolicy.for_input("/tmp")).fetch, "s3://corpus/shards/img/a.png") == (
            "FetchRefused",
            "refused_object_prefix",
        )


# ------------------------------------------------------------------ TLS: the pinned address, the name in SNI and the certificate check
def _certificates(tmp_path, name):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "realsyn test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca.public_bytes(serialization.Encoding.PEM).decode(), str(cert_file), str(key_file)


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    import ssl

    import realsyn.net
    from realsyn.net import DeadlineSSLSocket

    pytest.importorskip("cryptography")
    ca_pem, cert_file, key_file = _certificates(tmp_path, "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    sni = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    client_ctx = ssl.create_default_context(cadata=ca_pem)  # trusts the test CA only
    client_ctx.sslsocket_class = DeadlineSSLSocket
    monkeypatch.setattr(realsyn.net, "_SSL_CONTEXT", client_ctx)
    httpd = _serve(LOOPBACK_A, {"/img.png": (200, {}, PNG)})
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    yield httpd, sni
    httpd.shutdown()
    httpd.server_close()


def test_tls_connects_to_the_checked_address_with_the_name_in_sni_and_the_certificate_check(tls_server):
    httpd, sni = tls_server
    port = httpd.server_address[1]
    resolver = _Resolver({"images.test": [LOOPBACK_A], "other.test": [LOOPBACK_A]})
    deadline = Deadline(5)
    body = http_get(f"https://images.test:{port}/img.png", ONLY_A, deadline, max_bytes=1000, op_timeout=2, resolver=resolver)
    assert body == PNG
    assert sni == ["images.test"] and httpd.requests == [("/img.png", f"images.test:{port}")]
    # the certificate is checked against the name: a different name on the same address fails, as does the bare IP
    for url in (f"https://other.test:{port}/img.png", f"https://{LOOPBACK_A}:{port}/img.png"):
        with pytest.raises(FetchError) as info:
            http_get(url, ONLY_A, Deadline(5), max_bytes=1000, op_timeout=2, resolver=resolver)
        assert info.value.reason == "tls_error"
    assert len(httpd.requests) == 1
