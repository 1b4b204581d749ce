"""httpx clients for a daemon's Unix socket (used by the CLI, the tests and the README)."""

from __future__ import annotations

import socket
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


def answers(socket_path: Path) -> bool:
    """Something accepts connections on ``socket_path`` (a raw connect: httpx leaks a socket when one is refused)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a listener whose backlog is full would block a connect indefinitely
    with probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True
