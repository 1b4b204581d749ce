"""The downloader's HTTP client: httpx's exceptions from the large-read transport, proxies only when asked.

A real ``http.server`` on loopback plays the file host (or a forward proxy); no mocks.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgert.errors import DownloadError
from edgert.update import download
from edgert.update.download_http import LargeReadTransport

BLOB = bytes(range(256)) * 4096  # 1 MiB


class _Host(http.server.BaseHTTPRequestHandler):
    """Serves BLOB for any GET and records the request line (a forward proxy sees absolute URLs)."""

    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def host() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Handler", (_Host,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # nothing listens once the socket is closed


def _job(url: str, tmp_path: Path) -> download.Fetch:
    return download.Fetch(url, tmp_path / "blob.part", len(BLOB), {"sha256": hashlib.sha256(BLOB).hexdigest()})


def test_the_large_read_client_fetches_and_verifies(host: tuple[str, list[str]], tmp_path: Path) -> None:
    url, seen = host
    with download.client(10) as client:
        fetched = download.fetch(client, _job(f"{url}/blob", tmp_path))
    assert (fetched.received, fetched.sha256) == (len(BLOB), hashlib.sha256(BLOB).hexdigest())
    assert (tmp_path / "blob.part").read_bytes() == BLOB
    assert seen == ["/blob"]


def test_the_transport_raises_httpx_exceptions_not_httpcore_ones(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/blob"
    with httpx.Client(transport=LargeReadTransport()) as client, pytest.raises(httpx.ConnectError):
        client.get(url)
    with download.client(10) as client, pytest.raises(DownloadError, match="interrupted"):
        download.fetch(client, _job(url, tmp_path))


def test_a_proxy_named_in_the_environment_is_used_only_when_asked(
    host: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, seen = host
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    target = f"http://127.0.0.1:{_closed_port()}/blob"  # reachable only through the proxy
    with download.client(10, env_proxies=True) as client:  # models pull
        download.fetch(client, _job(target, tmp_path))
    assert seen == [target]
    (tmp_path / "blob.part").unlink()
    # The updater's client goes direct, as before.
    with download.client(10) as client, pytest.raises(DownloadError, match="interrupted"):
        download.fetch(client, _job(target, tmp_path))
    assert seen == [target]
