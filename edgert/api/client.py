"""httpx clients for a daemon's Unix socket (used by the CLI, the tests and the README)."""

from __future__ import annotations

from pathlib import Path

import httpx

#: any host name works over a Unix socket; this one reads well in logs
BASE_URL = "http://edgert"


def unix_client(socket_path: Path, *, timeout: float = 300.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url=BASE_URL, timeout=timeout)


def async_unix_client(socket_path: Path, *, timeout: float = 300.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket_path)), base_url=BASE_URL, timeout=timeout
    )
