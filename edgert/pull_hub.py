"""What the Hugging Face Hub says about a file before ``edgert models pull`` downloads it (:mod:`edgert.pull`).

Its own module so that pull's flow stays one readable file; like :mod:`edgert.pull` it may import
huggingface_hub (the import contract names both), and it takes only the endpoint, offline mode and the
token from it. The HEAD goes through pull's httpx client; its exceptions become edgert errors here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import httpx

from edgert.catalog import HuggingFaceSource
from edgert.errors import DownloadError
from edgert.log import scrub_urls

SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class HubFile:
    """What a HEAD on ``/{repo}/resolve/{revision}/{file}`` says about the file."""

    #: Where to GET the bytes: the CDN location of a redirect, or the resolve URL itself.
    url: str
    #: Headers for that GET (auth only when it stays on the Hub's host).
    headers: dict[str, str]
    size: int | None
    #: The LFS object id, which is the file's SHA-256.
    sha256: str | None
    commit: str | None


def hub_file(
    client: httpx.Client, name: str, filename: str, source: HuggingFaceSource, endpoint: str | None
) -> HubFile:
    """HEAD the file on the Hub, the way huggingface_hub does, through our own HTTP client.

    huggingface_hub supplies the endpoint (``HF_ENDPOINT``), offline mode
    (``HF_HUB_OFFLINE``) and the token (``HF_TOKEN`` or ``hf auth login``). Its own
    request helpers are not used: they differ between its major versions, and since
    1.x they also fetch ``{endpoint}/api/agent-harnesses`` to build a User-Agent.
    """
    # Imported here, not at the top: huggingface_hub takes ~0.25 s to import and only
    # Hugging Face pulls need it (`edgert models list` should stay instant).
    from huggingface_hub import constants as hf_constants  # noqa: PLC0415
    from huggingface_hub import get_token, hf_hub_url  # noqa: PLC0415

    if hf_constants.HF_HUB_OFFLINE:
        raise DownloadError(
            f"cannot pull {name}: HF_HUB_OFFLINE is set; unset it, or copy the file to <models_dir>/{filename}"
        )
    url = hf_hub_url(source.repo, source.file, revision=source.revision, endpoint=endpoint)
    headers = {"Accept-Encoding": "identity"}
    if token := get_token():
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = _head_on_hub(client, url, headers)
    except httpx.HTTPError as exc:
        raise DownloadError(f"cannot pull {name}: {_host(url)} unreachable ({scrub_urls(str(exc))})") from None
    _raise_for_hub_status(name, source, response)
    location = response.headers.get("Location") if response.is_redirect else None
    target = str(response.url.join(location)) if location else str(response.url)
    if _host(target) != _host(url):  # a CDN: its signed URL is the credential
        headers.pop("Authorization", None)
    return HubFile(
        url=target,
        headers=headers,
        size=_int_or_none(response.headers.get("X-Linked-Size") or _own_length(response)),
        sha256=sha256_or_none(response.headers.get("X-Linked-Etag") or response.headers.get("ETag")),
        commit=response.headers.get("X-Repo-Commit"),
    )


def _head_on_hub(client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
    """HEAD ``url``, following redirects that stay on the Hub (renamed repos) but not to a CDN."""
    response = client.head(url, headers=headers)
    for _ in range(5):
        location = response.headers.get("Location")
        if not response.is_redirect or not location or _host(str(response.url.join(location))) != _host(url):
            break
        response = client.head(response.url.join(location), headers=headers)
    return response


def _raise_for_hub_status(name: str, source: HuggingFaceSource, response: httpx.Response) -> None:
    if response.is_success or response.is_redirect:
        return
    where = f"{source.repo}@{source.revision}/{source.file}"
    code = response.headers.get("X-Error-Code", "")
    if code == "GatedRepo":
        raise DownloadError(
            f"cannot pull {name}: {source.repo} is gated; accept its license on the Hub and set HF_TOKEN"
        )
    if response.status_code in (401, 404) or code.endswith("NotFound"):
        raise DownloadError(f"cannot pull {name}: {where} does not exist on {response.url.host}")
    raise DownloadError(f"cannot pull {name}: {response.url.host} answered HTTP {response.status_code}")


def _own_length(response: httpx.Response) -> str | None:
    # A redirect's Content-Length is the length of the redirect body, not of the file.
    return None if response.is_redirect else response.headers.get("Content-Length")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def sha256_or_none(etag: str | None) -> str | None:
    """An LFS ETag is the file's sha256 in quotes, possibly weak (``W/"..."``)."""
    if etag is None:
        return None
    value = etag.removeprefix("W/").strip('"')
    return value if SHA256_RE.match(value) else None


def _host(url: str) -> str:
    """Host and port of ``url``, never its user:password."""
    return urlsplit(url).netloc.rpartition("@")[2]
