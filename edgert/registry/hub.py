"""Upload the published static site (``metadata/`` + ``targets/``) to a Hugging Face Hub repo.

The Hub then is the registry's HTTP host: devices set ``update.registry_url`` to
``<endpoint>/<repo>/resolve/<revision>`` (see :func:`registry_url`) and read
``metadata/…`` and ``targets/…`` under it, with the usual TUF checks; the Hub is
trusted for nothing but availability. Devices read without a token, so the repo must
be public (a new one is created with the namespace's default visibility).

Everything goes through huggingface_hub's public API (``HfApi.create_repo`` and
``HfApi.create_commit``), so the endpoint (``--hf-endpoint`` or ``HF_ENDPOINT``),
the token (``HF_TOKEN``, else the one ``hf auth login`` saved) and the transfer
protocol (Xet when ``hf_xet`` is installed, else Git LFS; ``HF_HUB_DISABLE_XET=1``
forces LFS) are huggingface_hub's. The token is never logged or printed.

Order and atomicity: one ``create_commit`` holds every file. huggingface_hub
uploads the large (LFS/Xet) blobs first, then sends the commit, and a Hub commit
moves the branch in one step, so a device reading ``resolve/<revision>`` sees the
old publication or the new one, never a timestamp naming files that are not there.
The operations are also listed targets first, then versioned metadata, then
``root.json``, and ``timestamp.json`` last, the order :func:`~edgert.registry.site.mirror`
copies in, so a server that applied them one by one would still be safe.
Unchanged files are skipped by huggingface_hub (same blob id) and old versions
are never deleted: a device in the middle of an update may still read them.

Only this module imports huggingface_hub in :mod:`edgert.registry`; it raises
:class:`~edgert.errors.RegistryUploadError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from edgert.errors import RegistryUploadError

#: Top-level folders of the static site that are uploaded (the registry's keys and staging never are).
SITE_FOLDERS: Final = ("targets", "metadata")
DEFAULT_REVISION: Final = "main"
#: Repo kinds that serve files under ``resolve/`` (a Space would also need an SDK).
REPO_TYPES: Final = ("model", "dataset")
#: Exception modules of the HTTP stacks huggingface_hub has used (requests, httpx, httpx2).
_TRANSPORT_MODULES: Final = frozenset({"requests", "urllib3", "httpx", "httpx2", "httpcore"})


@dataclass(frozen=True, slots=True)
class HubRepo:
    """Where to upload: ``repo_id`` (``owner/name``) on ``endpoint`` (None: huggingface_hub's default)."""

    repo_id: str
    endpoint: str | None = None
    revision: str = DEFAULT_REVISION
    repo_type: str = "model"
    private: bool | None = None


@dataclass(frozen=True, slots=True)
class HubUpload:
    #: Site files in the commit request (huggingface_hub leaves out those the revision already holds).
    files: int
    commit_url: str
    #: What devices put in ``update.registry_url``.
    registry_url: str


def site_files(site: Path) -> list[Path]:
    """The site's files in upload order: targets, versioned metadata, root.json, timestamp.json last."""
    last = [site / "metadata" / "root.json", site / "metadata" / "timestamp.json"]
    files = [
        path
        for folder in SITE_FOLDERS
        for path in sorted((site / folder).rglob("*"))
        if path.is_file() and path not in last and not path.name.endswith(".tmp")
    ]
    return files + [path for path in last if path.is_file()]


def upload_site(site: Path, repo: HubRepo, *, token: str | None = None, message: str | None = None) -> HubUpload:
    """Create ``repo`` if needed and commit the site's files to ``repo.revision`` in one commit."""
    # Imported here: huggingface_hub takes ~0.25 s to import and only `publish --hf-repo` needs it.
    from huggingface_hub import CommitOperationAdd, HfApi  # noqa: PLC0415

    if repo.repo_type not in REPO_TYPES:
        raise RegistryUploadError(f"--hf-repo-type must be one of {', '.join(REPO_TYPES)}, not {repo.repo_type!r}")
    files = site_files(site)
    if not any(path.name == "timestamp.json" for path in files):
        raise RegistryUploadError(f"{site} has no metadata/timestamp.json: run `edgert registry publish` first")
    api = HfApi(endpoint=repo.endpoint, token=token)
    where = f"{repo.repo_id} on {api.endpoint}"
    with _converted(where):
        api.create_repo(repo.repo_id, repo_type=repo.repo_type, private=repo.private, exist_ok=True)
        if repo.revision != DEFAULT_REVISION:
            api.create_branch(repo.repo_id, branch=repo.revision, repo_type=repo.repo_type, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(site).as_posix(), path_or_fileobj=str(path))
            for path in files
        ]
        commit = api.create_commit(
            repo.repo_id,
            operations,
            commit_message=message or _message(site),
            repo_type=repo.repo_type,
            revision=repo.revision,
        )
    return HubUpload(files=len(files), commit_url=str(commit.commit_url), registry_url=registry_url(repo, api.endpoint))


def registry_url(repo: HubRepo, endpoint: str) -> str:
    """The base URL devices read ``metadata/`` and ``targets/`` under (the Hub's ``resolve`` route)."""
    prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
    return f"{endpoint.rstrip('/')}/{prefix}{repo.repo_id}/resolve/{quote(repo.revision, safe='')}"


def _message(site: Path) -> str:
    try:
        version = json.loads((site / "metadata" / "timestamp.json").read_bytes())["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        version = "?"
    return f"edgert registry publish: timestamp v{version}"


@contextmanager
def _converted(where: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> RegistryUploadError, by class and HTTP status (never by message)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError  # noqa: PLC0415

    try:
        yield
    except HFValidationError as exc:
        raise RegistryUploadError(f"{where}: {exc}") from None
    except Exception as exc:  # transport classes differ by huggingface_hub version; others re-raised
        cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            raise RegistryUploadError(_http_problem(where, cause.response.status_code)) from None
        if isinstance(cause, OSError) or type(cause).__module__.split(".")[0] in _TRANSPORT_MODULES:
            raise RegistryUploadError(
                f"cannot reach {where} ({type(cause).__name__}); check --hf-endpoint / HF_ENDPOINT and the network"
            ) from None
        raise


def _http_problem(where: str, status: int) -> str:
    if status == 401:
        return (
            f"{where} refused the credentials (HTTP 401): set HF_TOKEN to a token with write access, "
            "or log in with `hf auth login`"
        )
    if status == 403:
        return f"{where}: the token may not write to this repo (HTTP 403); use a token with write access to it"
    if status == 404:
        return f"{where}: repo or revision not found (HTTP 404)"
    return f"{where} answered HTTP {status}"
