"""Image URLs that are not ``data:``: refused unless the operator named the host.

A device must not fetch arbitrary URLs for whoever may send it a request (a requester could make it
probe its LAN or pull gigabytes), so ``http(s)://`` is refused by default and ``file://`` always.
``serve.media_url_hosts`` names the hosts it may fetch from; each entry is ``host`` (https on 443),
``host:port`` (https), or ``http://host[:port]`` / ``https://host[:port]`` to say the scheme. A fetch
follows at most :data:`MAX_REDIRECTS` redirects and only to the same host on an allowed scheme and
port, gives up after the timeout (connect, each read, and the whole body), and stops reading at the
size limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from edgert.errors import BadRequestError, PayloadTooLargeError

if TYPE_CHECKING:
    import httpx

MAX_REDIRECTS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class AllowedHost:
    scheme: str
    host: str
    port: int


def parse_host_entry(entry: str) -> AllowedHost:
    """One ``serve.media_url_hosts`` entry; ValueError for one that is not a host (with scheme/port)."""
    text = entry.strip()
    if "://" not in text:
        text = f"https://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"media_url_hosts entry {entry!r}: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"media_url_hosts entry {entry!r}: expected host, host:port or http(s)://host[:port]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"media_url_hosts entry {entry!r}: a host only, no path, query or credentials")
    return AllowedHost(parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme])


def _allowed(url: str, hosts: tuple[AllowedHost, ...]) -> AllowedHost | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return None
    wanted = AllowedHost(parts.scheme, (parts.hostname or "").lower(), port)
    return wanted if wanted in hosts else None


def check_url(url: str, hosts: tuple[AllowedHost, ...], where: str) -> None:
    """Refuse (400) a URL edgert will not fetch: any scheme but http(s), or a host not allowed."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        raise BadRequestError(f"{where}: file:// URLs are never read; send the image as a data: URL", param=where)
    if scheme not in _DEFAULT_PORTS:
        raise BadRequestError(
            f"{where}: unsupported URL scheme {scheme or url[:16]!r}; send a data:image/...;base64 URL", param=where
        )
    if _allowed(url, hosts) is None:
        raise BadRequestError(
            f"{where}: remote image URLs are refused (this device does not fetch URLs for requesters); send the "
            f"image as a data:image/...;base64 URL, or the operator names the host in serve.media_url_hosts",
            param=where,
        )


def fetch(url: str, hosts: tuple[AllowedHost, ...], *, max_bytes: int, timeout_s: float, where: str) -> bytes:
    """The body of an allowed URL, at most ``max_bytes`` (413 beyond), within ``timeout_s`` in all."""
    check_url(url, hosts, where)
    # imported here: the daemon serves without it unless an operator allowed a host (its start stays lean)
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    origin = urlsplit(url).hostname
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        if urlsplit(url).hostname != origin or _allowed(url, hosts) is None:
                            raise BadRequestError(
                                f"{where}: the image URL redirects to {url!r}, off the allowed host", param=where
                            )
                        continue
                    return _read(response, max_bytes=max_bytes, deadline=deadline, where=where)
    except httpx.HTTPError as exc:
        raise BadRequestError(f"{where}: fetching the image failed: {type(exc).__name__}: {exc}", param=where) from None
    raise BadRequestError(f"{where}: the image URL redirects more than {MAX_REDIRECTS} times", param=where)


def _read(response: httpx.Response, *, max_bytes: int, deadline: float, where: str) -> bytes:
    if response.status_code != 200:
        raise BadRequestError(f"{where}: fetching the image got HTTP {response.status_code}", param=where)
    too_large = PayloadTooLargeError(f"{where}: the image is larger than {max_bytes} bytes", param=where)
    announced = response.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        raise too_large
    body = bytearray()
    for chunk in response.iter_bytes():  # the limit holds whatever Content-Length said, or without one
        body += chunk
        if len(body) > max_bytes:
            raise too_large
        if time.monotonic() > deadline:  # httpx's timeout is per read: a trickle would never trip it
            raise BadRequestError(f"{where}: fetching the image took longer than the timeout", param=where)
    return bytes(body)
