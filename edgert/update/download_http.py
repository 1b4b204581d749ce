"""The HTTP client of :mod:`edgert.update.download`: httpcore's public pool, large socket reads.

httpcore reads 64 KiB per ``recv``; on a fast link the per-buffer Python work (h11 parsing,
write, hand-over to the hashing thread) then dominates (``benchmarks/update_download.py``).
httpcore's public extension point for that is a *network backend*
(``httpcore.ConnectionPool(network_backend=...)``); httpx's own ``HTTPTransport`` does not
take one. So this module is an ``httpx.BaseTransport`` (httpx's public interface for custom
transports, the one ``MockTransport`` implements) that owns such a pool and translates
requests, responses and exceptions the way httpx's transport does, instead of replacing
``HTTPTransport``'s private ``_pool`` as the code before it did.

Proxies are not handled by it: :func:`client` gives a client whose environment names a
proxy (and that asks for env proxies) httpx's own transport (64 KiB reads) instead.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import httpcore
import httpx

#: Most bytes taken from the socket per read. Over TLS a read usually returns one record (16 KiB) at most.
READ_BYTES: Final = 1 << 20

# httpcore's exceptions and httpx's equivalents, most specific first (the first match wins).
_EXCEPTIONS: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def client(
    timeout: httpx.Timeout | float,
    *,
    follow_redirects: bool = True,
    receive_buffer_bytes: int | None = None,
    env_proxies: bool = False,
    headers: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """An HTTP client for :func:`fetch` with large reads; ``receive_buffer_bytes`` sets ``SO_RCVBUF``
    (None: the kernel's autotuning; a cap also limits throughput to about twice the cap per RTT).

    ``env_proxies``: when the environment names a proxy (``HTTPS_PROXY`` ...), use httpx's own
    transport, which honours it and ``NO_PROXY`` (64 KiB reads); the large-read transport goes
    direct. ``transport`` replaces the network layer (an ``httpx.MockTransport`` in tests).
    """
    if transport is None and not (env_proxies and _environment_names_a_proxy()):
        options = [] if receive_buffer_bytes is None else [(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)]
        transport = LargeReadTransport(socket_options=options)
    return httpx.Client(
        timeout=timeout, follow_redirects=follow_redirects, transport=transport, headers=headers, trust_env=True
    )


def _environment_names_a_proxy() -> bool:
    return any(scheme != "no" for scheme in urllib.request.getproxies())


class LargeReadTransport(httpx.BaseTransport):
    """httpx transport over an ``httpcore.ConnectionPool`` whose connections read up to ``READ_BYTES``.

    ``socket_options`` are passed to every new socket (``SO_RCVBUF`` for the kill benchmark);
    the pool uses httpx's default limits and TLS context (which honours ``SSL_CERT_FILE``).
    """

    def __init__(self, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> None:
        limits = httpx.Limits()
        self._connections = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            socket_options=socket_options,
            network_backend=_LargeReads(httpcore.SyncBackend()),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_exceptions():
            response = self._connections.handle_request(core_request)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._connections.close()


@contextlib.contextmanager
def _httpx_exceptions() -> Iterator[None]:
    """Raise httpx's exception for httpcore's, so callers of an httpx client see only httpx's tree."""
    try:
        yield
    except Exception as exc:
        for core, mapped in _EXCEPTIONS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_exceptions():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _LargeReads(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _LargeReadStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max(max_bytes, READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)
