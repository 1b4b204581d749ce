"""The device's view of the registry: python-tuf's ngclient, and nothing else of TUF.

Every rule of the TUF client workflow (root rotation, signature thresholds,
expiry, version rollback, snapshot/targets consistency, metadata size caps) is
python-tuf's; this adapter only

* keeps the trusted metadata in ``<state_dir>/update/tuf`` between runs — that
  cache is what makes rollback and freeze attacks detectable, so it is never reset;
* bootstraps from the cached root when there is one (it may be newer than the
  shipped root after a key rotation), else from ``update.trusted_root``;
* turns a verified ``TargetFile`` into a plain :class:`SignedTarget` and the
  ``channels.json`` custom metadata into :class:`~edgert.update.manifest.Channels`;
* converts python-tuf's exceptions into edgert errors at this boundary.

Model bytes are not downloaded here (ngclient's ``download_target`` buffers in
TMPDIR with no resume and no fsync); :mod:`edgert.update.download` does that
against the signed length and hashes returned by :meth:`RegistryClient.target`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import urllib3
from pydantic import ValidationError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from edgert import __version__
from edgert.errors import (
    ConfigError,
    RegistryUnavailableError,
    TargetNotFoundError,
    UntrustedMetadataError,
    UpdateError,
)
from edgert.update.failures import FailureReason, reason_of
from edgert.update.manifest import CHANNELS_KEY, CHANNELS_TARGET, MODEL_KEY, Channels, ModelMeta

USER_AGENT: Final = f"edgert/{__version__}"


@dataclass(frozen=True, slots=True)
class SignedTarget:
    """A target file as the verified metadata describes it."""

    path: str
    length: int
    hashes: dict[str, str]
    #: The name to fetch under the targets URL (hash-prefixed: consistent snapshots).
    url_path: str
    meta: ModelMeta | None


class RegistryClient:
    """One refresh of the signed metadata; make a new client for each check (ngclient refreshes once)."""

    def __init__(self, *, cache_dir: Path, registry_url: str, trusted_root: Path | None) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        bootstrap: bytes | None = None
        if not (cache_dir / "root.json").is_file():
            if trusted_root is None:
                raise ConfigError("update.trusted_root is not set: the device has no root of trust")
            try:
                bootstrap = trusted_root.read_bytes()
            except OSError as exc:
                raise ConfigError(f"update.trusted_root {trusted_root}: {exc.strerror or exc}") from None
        base = registry_url.rstrip("/")
        with _converted("loading the trusted root"):
            self._updater = Updater(
                metadata_dir=str(cache_dir),
                metadata_base_url=f"{base}/metadata/",
                target_base_url=f"{base}/targets/",
                config=UpdaterConfig(app_user_agent=USER_AGENT),
                bootstrap=bootstrap,
            )

    def refresh(self) -> None:
        """Fetch and verify root, timestamp, snapshot and targets (python-tuf's client workflow)."""
        with _converted("refreshing the signed metadata"):
            self._updater.refresh()

    def channels(self) -> Channels:
        info = self._info(CHANNELS_TARGET)
        if info is None:
            return Channels()
        custom = info.custom
        try:
            return Channels.model_validate(custom[CHANNELS_KEY] if isinstance(custom, dict) else {})
        except (KeyError, ValidationError) as exc:
            raise UntrustedMetadataError(f"signed channels.json metadata is malformed: {exc}") from None

    def target(self, path: str) -> SignedTarget:
        """The verified description of ``path``; TargetNotFoundError when the metadata does not list it."""
        info = self._info(path)
        if info is None:
            raise TargetNotFoundError(f"{path} is not in the registry's signed targets metadata")
        if "sha256" not in info.hashes:
            raise UntrustedMetadataError(f"{path}: the signed metadata has no sha256 for it")
        return SignedTarget(
            path=info.path,
            length=info.length,
            hashes=dict(info.hashes),
            url_path=_url_path(info),
            meta=_model_meta(info),
        )

    def _info(self, path: str) -> TargetFile | None:
        with _converted(f"looking up {path}"):
            return self._updater.get_targetinfo(path)


def _url_path(info: TargetFile) -> str:
    directory, slash, name = info.path.rpartition("/")
    return quote(f"{directory}{slash}{info.hashes['sha256']}.{name}")


def _model_meta(info: TargetFile) -> ModelMeta | None:
    custom: Any = info.custom
    if not isinstance(custom, dict) or MODEL_KEY not in custom:
        return None
    try:
        return ModelMeta.model_validate(custom[MODEL_KEY])
    except ValidationError as exc:
        raise UntrustedMetadataError(f"{info.path}: signed model metadata is malformed: {exc}") from None


@contextmanager
def _converted(doing: str) -> Iterator[None]:
    """python-tuf's exceptions -> edgert's, by class (never by message), each named by its failure class.

    python-tuf wraps a failed request in its DownloadError, but a response cut off
    mid-body surfaces from its urllib3 fetcher as urllib3's own ProtocolError.
    """
    try:
        yield
    except tuf_errors.DownloadLengthMismatchError as exc:
        # More bytes than python-tuf accepts for that metadata: a hostile or broken host, not an outage.
        raise UntrustedMetadataError(
            f"metadata larger than python-tuf accepts while {doing}: {_describe(exc)}", reason=FailureReason.OVERSIZED
        ) from None
    except tuf_errors.SlowRetrievalError as exc:
        raise RegistryUnavailableError(
            f"registry too slow while {doing}: {_describe(exc)}", reason=FailureReason.DEADLINE
        ) from None
    except tuf_errors.DownloadError as exc:
        dropped = isinstance(_root_cause(exc), urllib3.exceptions.ProtocolError)
        what = "connection dropped" if dropped else "registry unreachable"
        reason = FailureReason.CONNECTION_DROPPED if dropped else FailureReason.UNREACHABLE
        raise RegistryUnavailableError(f"{what} while {doing}: {_describe(exc)}", reason=reason) from None
    except urllib3.exceptions.HTTPError as exc:
        raise RegistryUnavailableError(
            f"connection dropped while {doing}: {_describe(exc)}", reason=FailureReason.CONNECTION_DROPPED
        ) from None
    except tuf_errors.RepositoryError as exc:
        # Bad signature, expired, rolled-back version, snapshot/targets mismatch, bad length or hash.
        raise UntrustedMetadataError(
            f"signed metadata rejected while {doing}: {_describe(exc)}", reason=_METADATA_REASONS.get(type(exc))
        ) from None
    except OSError as exc:
        raise UpdateError(f"metadata cache error while {doing}: {exc}", reason=reason_of(exc)) from None


#: python-tuf's verdicts on metadata; any other RepositoryError (malformed, inconsistent) is "metadata"
_METADATA_REASONS: Final[dict[type[Exception], str]] = {
    tuf_errors.UnsignedMetadataError: FailureReason.SIGNATURE,
    tuf_errors.BadVersionNumberError: FailureReason.ROLLBACK,
    tuf_errors.EqualVersionNumberError: FailureReason.ROLLBACK,
    tuf_errors.ExpiredMetadataError: FailureReason.EXPIRED,
    tuf_errors.LengthOrHashMismatchError: FailureReason.HASH_LENGTH,
}


def _root_cause(exc: BaseException) -> BaseException | None:
    """What a python-tuf DownloadError wraps: the fetcher's error, or the reason urllib3 gave up retrying."""
    cause = exc.__cause__
    if isinstance(cause, urllib3.exceptions.MaxRetryError):
        return cause.reason
    return cause


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
