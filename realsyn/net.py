"""HTTP/1.1 connections with one wall-clock deadline over DNS, connect, TLS, headers and body.

``requests``/``urllib3`` timeouts bound each socket operation, so a server that drips one byte a
second (headers or body) holds a request for as long as it likes. Here every socket operation
first sets its timeout to what is left of the request's ``Deadline``: the request as a whole can
never outlast it. ``DeadlineHTTPConnection`` may be pinned to an address checked beforehand
(``realsyn.fetch_policy``): it connects to that address, while the Host header and TLS SNI /
certificate check carry the name, so a DNS answer cannot change between check and connect.

Used by the image fetcher (``realsyn.image_db``) and the vLLM client
(``realsyn.generation.vllm_backend``). Environment proxies are not used, by design: an address
check is meaningless through a proxy that resolves names itself.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


class Deadline:
    """A wall-clock budget, restarted per request (a connection keeps one and reuses it)."""

    def __init__(self, seconds: float | None = None):
        self.end = time.monotonic() + seconds if seconds is not None else float("inf")

    def restart(self, seconds: float) -> Deadline:
        self.end = time.monotonic() + float(seconds)
        return self

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def timeout(self, cap: float | None = None) -> float:
        """Seconds the next operation may block: what is left, at most ``cap``; raises ``TimeoutError`` when none is."""
        left = self.remaining()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left if cap is None else min(cap, left)


class _DeadlineMixin:
    """Each read and write first sets the socket timeout to the time left on ``self.deadline``."""

    deadline: Deadline | None = None
    op_timeout: float | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            socket.socket.settimeout(self, self.deadline.timeout(self.op_timeout))  # type: ignore[arg-type]

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)  # type: ignore[misc]

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)  # type: ignore[misc]

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        return super().sendall(*args, **kwargs)  # type: ignore[misc]


class DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def ssl_context() -> ssl.SSLContext:
    """A verifying client context (certifi's CA bundle when installed) whose sockets obey deadlines."""
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            try:
                import certifi

                ctx = ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - certifi ships with requests
                ctx = ssl.create_default_context()
            ctx.sslsocket_class = DeadlineSSLSocket
            _SSL_CONTEXT = ctx
        return _SSL_CONTEXT


# getaddrinfo has no timeout: it runs on a small pool and the caller waits at most the time left.
_RESOLVER: tuple[int, ThreadPoolExecutor] | None = None
_RESOLVER_LOCK = threading.Lock()


def _resolver_pool() -> ThreadPoolExecutor:
    global _RESOLVER
    with _RESOLVER_LOCK:
        if _RESOLVER is None or _RESOLVER[0] != os.getpid():  # a forked child gets its own threads
            _RESOLVER = (os.getpid(), ThreadPoolExecutor(max_workers=8, thread_name_prefix="realsyn-dns"))
        return _RESOLVER[1]


def getaddrinfo(host: str, port: int, deadline: Deadline) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo(host, port, type=SOCK_STREAM)`` waited on at most until ``deadline``."""
    future = _resolver_pool().submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        return future.result(timeout=deadline.timeout())
    except FutureTimeout as e:
        future.cancel()
        raise TimeoutError(f"resolving {host} did not finish before the deadline") from e


def connect(address: tuple[Any, ...], family: int, deadline: Deadline, op_timeout: float | None) -> DeadlineSocket:
    """A TCP connection to one resolved ``address``, bounded by the deadline."""
    sock = DeadlineSocket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline.timeout(op_timeout))
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    sock.deadline, sock.op_timeout = deadline, op_timeout
    return sock


class DeadlineHTTPConnection(http.client.HTTPConnection):
    """``http.client`` connection (plain or TLS) whose every operation obeys ``self.deadline``.

    ``address``: connect to this already checked IP instead of resolving ``host``. ``host`` is
    still what the Host header, SNI and the certificate check use. Call ``deadline.restart``
    before each request; a kept-alive socket shares the same ``Deadline`` object.
    """

    def __init__(self, scheme: str, host: str, port: int, *, address: str | None = None, op_timeout: float | None = None):
        super().__init__(host, port)
        self.scheme = scheme
        self.default_port = 443 if scheme == "https" else 80  # the Host header omits the default port
        self.address = address
        self.op_timeout = op_timeout
        self.deadline = Deadline()

    def connect(self) -> None:
        if self.address is not None:
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            infos = [(family, socket.SOCK_STREAM, 0, "", (self.address, self.port))]
        else:
            infos = getaddrinfo(self.host, self.port, self.deadline)
        last: BaseException | None = None
        sock = None
        for family, _type, _proto, _name, sockaddr in infos:
            try:
                sock = connect(sockaddr, family, self.deadline, self.op_timeout)
                break
            except TimeoutError:
                raise
            except OSError as e:
                last = e
        if sock is None:
            raise last or OSError(f"no address for {self.host}")
        if self.scheme == "https":
            try:
                tls = ssl_context().wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
                tls.deadline, tls.op_timeout = self.deadline, self.op_timeout
                tls.settimeout(self.deadline.timeout(self.op_timeout))
                tls.do_handshake()  # CPython bounds the whole handshake by the timeout set here
            except BaseException:
                sock.close()
                raise
            sock = tls
        self.sock = sock

    def is_dropped(self) -> bool:
        """A kept-alive socket the server closed (or wrote to unasked) reads as ready: do not reuse it."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)
