"""An edgert model registry: a TUF repository on the operator's disk (python-tuf metadata API).

Layout of a registry directory::

    registry.json              metadata lifetimes per role (seconds; older registries: days)
    keys/                      ed25519 signing keys, see :mod:`edgert.registry.keys`
    staging/targets.json       targets being edited by ``add`` / ``promote`` (unsigned until publish)
    repository/                the static site devices read, served by any HTTP host
      metadata/                1.root.json, 2.root.json, …, root.json (newest),
                               <n>.targets.json, <n>.snapshot.json, timestamp.json
      targets/                 consistent-snapshot names: models/<id>/<ver>/<sha256>.model.gguf,
                               models/<id>/<ver>/[<dir>/]<sha256>.<file> for each file of a
                               model folder, <sha256>.model.gguf.sig or
                               <sha256>.genai_config.json.sig (publisher bundles, optional),
                               <sha256>.channels.json

Consistent snapshots are always on: every published file has a content- or
version-addressed name, so a device that fetched timestamp N never mixes its
snapshot with files of another publication, and ``publish`` can upload while
devices read. ``timestamp.json`` is written last.

Channel pointers (which version a channel offers, and the rollout percentage)
are the signed ``custom`` object of the ``channels.json`` target; see
:mod:`edgert.update.manifest`.

Devices refuse a ``targets.json`` larger than python-tuf's ``targets_max_length``
(5 MB), so old versions must go: ``prune`` drops all but the newest N versions of
each model from the staged targets (never one a channel offers, as its version or
as the previous version devices outside a rollout stay on), and the next ``publish``
deletes their files from ``repository/targets`` and from ``--out``. ``status``
warns when the published targets metadata passes 80 % of the limit; ``publish``
refuses to exceed it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import UpdaterConfig

from edgert import __version__, store
from edgert.errors import RegistryError
from edgert.gguf_file import validate_gguf
from edgert.onnx_folder import validate_onnx_folder
from edgert.registry import keys
from edgert.update import publisher_signature
from edgert.update.manifest import (
    CHANNEL_PATTERN,
    CHANNELS_KEY,
    CHANNELS_TARGET,
    MAX_MODEL_FILES,
    MEMBER_PATTERN,
    MODEL_KEY,
    RESERVED_SUFFIXES,
    ChannelPointer,
    Channels,
    ModelMeta,
    member_target_path,
    model_target_path,
    model_target_paths,
    version_prefix,
)
from edgert.update.state import write_atomic

CONFIG_FILE: Final = "registry.json"
DEFAULT_EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
#: Bounds of a metadata lifetime: a minute (a short-lived timestamp is the defence against a freeze
#: attack, so hours and minutes are allowed) to ten years.
MIN_EXPIRY: Final = timedelta(minutes=1)
MAX_EXPIRY: Final = timedelta(days=3650)
_VERSION_PART = re.compile(r"\d+|[^\d.+_-]+")
_DURATION = re.compile(r"^(\d{1,9})([dhm]?)$")
_UNITS: Final = {"": "days", "d": "days", "h": "hours", "m": "minutes"}
#: Warn when less than this share of a role's expiry period is left.
WARN_FRACTION: Final = 0.25
#: Rough memory need when the operator does not give one: weights + 20% + 128 MiB of buffers.
RAM_OVERHEAD: Final = 1.2
RAM_BASE_MIB: Final = 128
_PRETTY: Final = JSONSerializer(compact=False)
#: The largest targets.json a device accepts (python-tuf's default; edgert's client keeps it).
TARGETS_MAX_LENGTH: Final = UpdaterConfig().targets_max_length
#: ``status`` warns from this share of TARGETS_MAX_LENGTH on.
TARGETS_WARN_FRACTION: Final = 0.8
#: Every file of the static site: the HTTP host serves it as another user (nginx as www-data), and
#: nothing in it is secret. mkstemp would make it 0600, which once took a fleet's updates down.
#: Directories are made with mkdir and honour the umask.
SITE_FILE_MODE: Final = 0o644


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Lifetime of each role's metadata in seconds (``init --expiry`` / ``publish --expiry``).
    expiry_s: dict[str, int] = Field(default_factory=dict)
    #: The older form, whole days: still read for registries made before ``expiry_s``; expiry_s wins.
    expiry_days: dict[str, int] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoleStatus:
    role: str
    version: int
    expires: datetime
    threshold: int
    keyids: list[str]
    #: "expired", "expires soon" or None.
    warning: str | None


@dataclass(frozen=True, slots=True)
class PublishedModel:
    """One model version: the target carrying its ModelMeta; ``length`` counts every file of a folder."""

    target_path: str
    length: int
    sha256: str
    meta: ModelMeta


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    roles: list[RoleStatus]
    models: list[PublishedModel]
    channels: Channels
    #: Staged add/promote changes not yet published.
    unpublished_changes: bool
    #: Size of the published targets metadata (None before the first publish) and the limit devices apply.
    targets_bytes: int | None = None
    targets_limit: int = TARGETS_MAX_LENGTH

    @property
    def targets_warning(self) -> str | None:
        if self.targets_bytes is None or self.targets_bytes < self.targets_limit * TARGETS_WARN_FRACTION:
            return None
        share = 100 * self.targets_bytes / self.targets_limit
        return (
            f"targets metadata is {self.targets_bytes} bytes, {share:.0f} % of the {self.targets_limit} bytes "
            "devices accept; drop old versions with `edgert registry prune --keep N` and publish"
        )


@dataclass(frozen=True, slots=True)
class PublishResult:
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    copied_files: int
    #: Files of pruned versions deleted from the repository (and as many from ``out``).
    removed_files: int = 0


@dataclass(frozen=True, slots=True)
class PruneResult:
    #: ``model_id@version`` of every version dropped from the staged targets.
    removed: list[str]
    #: ``model_id@version`` kept only because a channel offers it.
    kept_for_channels: list[str]


class Registry:
    """One registry directory. Methods sign with the key files under ``keys/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys_dir = directory / "keys"
        self.repo_dir = directory / "repository"
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.staging_file = directory / "staging" / "targets.json"

    # ------------------------------------------------------------------ init

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        key_counts: dict[str, int] | None = None,
        thresholds: dict[str, int] | None = None,
        expiry: dict[str, timedelta] | None = None,
        now: datetime | None = None,
    ) -> Registry:
        """Create keys, root metadata (version 1, consistent snapshots) and an empty staging targets."""
        registry = cls(directory)
        if (directory / CONFIG_FILE).exists():
            raise RegistryError(f"{directory} already holds a registry")
        counts = {role: 1 for role in keys.ROLES} | (key_counts or {})
        limits = {role: 1 for role in keys.ROLES} | (thresholds or {})
        periods = {role: timedelta(days=days) for role, days in DEFAULT_EXPIRY_DAYS.items()} | (expiry or {})
        _check_role_numbers(counts, limits, periods)
        now = now or _now()
        for path in (registry.metadata_dir, registry.targets_dir, registry.staging_file.parent):
            path.mkdir(parents=True, exist_ok=True)
        config = RegistryConfig(expiry_s={role: int(period.total_seconds()) for role, period in periods.items()})
        registry._save_config(config)
        registry.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(registry.keys_dir / "README.txt", keys.KEYS_README.encode())
        root = Root(expires=now + periods["root"], consistent_snapshot=True)
        signers: list[CryptoSigner] = []
        for role in keys.ROLES:
            for _ in range(counts[role]):
                signer = keys.generate_key(registry.keys_dir, role)
                root.add_key(signer.public_key, role)
                if role == "root":
                    signers.append(signer)
            root.roles[role].threshold = limits[role]
        registry._write_root(Metadata(root), signers)
        registry._save_staging(Metadata(Targets(version=1, expires=now + periods["targets"])))
        return registry

    # ------------------------------------------------------------------ add / promote

    def add(
        self,
        model: Path,
        *,
        model_id: str,
        version: str,
        min_edgert_version: str = __version__,
        ram_mib: int | None = None,
        signing_key: Path | None = None,
    ) -> PublishedModel:
        """Validate ``model`` like the engine does, then stage it as signed-to-be target(s).

        ``model`` is a ``.gguf`` file (one target ``models/<id>/<version>/model.gguf``) or
        an ONNX Runtime GenAI model folder (see :meth:`_add_folder`: one target per file).
        With ``signing_key`` (an EC private key, PEM) the model is also signed with
        model-signing and the bundle staged as the companion target ``<path>.sig``
        beside the target that carries the ModelMeta (``model.gguf.sig``, or
        ``genai_config.json.sig`` for a folder; see :mod:`edgert.update.publisher_signature`).
        """
        if model.is_dir():
            return self._add_folder(
                model,
                model_id=model_id,
                version=version,
                min_edgert_version=min_edgert_version,
                ram_mib=ram_mib,
                signing_key=signing_key,
            )
        gguf = model
        info = validate_gguf(gguf)
        size = gguf.stat().st_size
        meta = _model_meta(
            model_id=model_id,
            version=version,
            architecture=info.architecture,
            quant=info.file_type,
            context_length=info.context_length,
            ram_mib=ram_mib or _ram_estimate(size),
            min_edgert_version=min_edgert_version,
            file_name=gguf.name,
        )
        staging = self._load_staging()
        self._check_new_version(staging.signed, model_id, version)
        path = model_target_path(model_id, version)
        target = TargetFile.from_file(path, str(gguf), ["sha256"])
        target.unrecognized_fields["custom"] = {MODEL_KEY: meta.signed_custom()}
        signature = self._publisher_signature(gguf, path, signing_key) if signing_key is not None else None
        self._copy_target(gguf, target)
        staging.signed.targets[path] = target
        if signature is not None:
            staging.signed.targets[signature.path] = signature
        self._save_staging(staging)
        return PublishedModel(path, target.length, target.hashes["sha256"], meta)

    def _add_folder(
        self,
        folder: Path,
        *,
        model_id: str,
        version: str,
        min_edgert_version: str,
        ram_mib: int | None,
        signing_key: Path | None,
    ) -> PublishedModel:
        """Stage an ONNX Runtime GenAI folder: every file its own target, all listed in the ModelMeta.

        The folder is validated with the engine's structural checks
        (:func:`edgert.onnx_folder.validate_onnx_folder`; the execution providers it names
        are checked on the device, where it runs). Its regular files, recursively, become
        targets ``models/<id>/<version>/<relative path>`` (TUF length + sha256 each); the
        ``genai_config.json`` target carries the signed ModelMeta (``format = "onnx-genai"``,
        ``files`` = every member). Hidden entries (names starting with ``.``, such as
        ``.cache/`` or ``.gitattributes``) are left out; a symlink, a special file or a name
        that is not a safe relative path is refused, so the device gets exactly these bytes.
        With ``signing_key`` the registry's copies of exactly these members are signed as one
        model-signing folder (hidden files are thus outside the signature too), and the bundle
        is staged as ``<genai_config.json target>.sig``.
        """
        members = folder_members(folder)
        info = validate_onnx_folder(folder)  # ModelFileError: one line naming the folder and the defect
        size = sum((folder / member).stat().st_size for member in members)
        meta = _model_meta(
            model_id=model_id,
            version=version,
            architecture=info.architecture,
            quant=None,
            context_length=info.context_length or None,
            ram_mib=ram_mib or _ram_estimate(size),
            min_edgert_version=min_edgert_version,
            file_name=folder.resolve().name,
            format="onnx-genai",
            files=members,
        )
        staging = self._load_staging()
        self._check_new_version(staging.signed, model_id, version)
        if signing_key is not None:
            publisher_signature.check_signing_key(signing_key)  # a bad key fails before any copy
        anchor = model_target_path(model_id, version, meta.format)
        targets: dict[str, TargetFile] = {}
        copies: dict[str, Path] = {}
        for member in members:
            path = member_target_path(model_id, version, member)
            target = TargetFile.from_file(path, str(folder / member), ["sha256"])
            if path == anchor:
                target.unrecognized_fields["custom"] = {MODEL_KEY: meta.signed_custom()}
            self._copy_target(folder / member, target)
            targets[path] = target
            copies[member] = self._target_file(target)
        if signing_key is not None:
            signature = self._publisher_signature_of_folder(copies, anchor, signing_key, name=meta.file_name)
            targets[signature.path] = signature
        staging.signed.targets.update(targets)
        self._save_staging(staging)
        return PublishedModel(anchor, size, targets[anchor].hashes["sha256"], meta)

    @staticmethod
    def _check_new_version(targets: Targets, model_id: str, version: str) -> None:
        prefix = version_prefix(model_id, version)
        if any(path.startswith(prefix) for path in targets.targets):
            raise RegistryError(f"{model_id}@{version} is already in the registry; versions are immutable")

    def promote(
        self, model_id: str, version: str, *, channel: str, rollout: int, now: datetime | None = None
    ) -> ChannelPointer:
        """Point ``channel`` at ``model_id@version`` for ``rollout`` percent of devices."""
        if not 0 <= rollout <= 100:
            raise RegistryError(f"rollout must be 0..100, not {rollout}")
        if not _matches(CHANNEL_PATTERN, channel):
            raise RegistryError(f"invalid channel name {channel!r}")
        staging = self._load_staging()
        path = _model_target(staging.signed, model_id, version)
        if path is None:
            raise RegistryError(f"{model_id}@{version} is not in the registry; run `edgert registry add` first")
        channels = _channels_of(staging.signed)
        old = channels.channels.get(channel)
        previous_version, previous_target = None, None
        if old is not None and old.model_id == model_id:
            if old.version == version:  # only the percentage changes
                previous_version, previous_target = old.previous_version, old.previous_target
            elif old.rollout == 100:
                previous_version, previous_target = old.version, old.target
            else:  # the old rollout never finished: devices outside it are still on its previous
                previous_version, previous_target = old.previous_version, old.previous_target
        pointer = ChannelPointer(
            model_id=model_id,
            version=version,
            target=path,
            rollout=rollout,
            previous_version=previous_version,
            previous_target=previous_target,
            promoted_at=now or _now(),
        )
        updated = Channels(channels={**channels.channels, channel: pointer})
        body = json.dumps(updated.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
        target = TargetFile.from_data(CHANNELS_TARGET, body, ["sha256"])
        target.unrecognized_fields["custom"] = {CHANNELS_KEY: updated.model_dump(mode="json")}
        self._write_target_bytes(body, target)
        staging.signed.targets[CHANNELS_TARGET] = target
        self._save_staging(staging)
        return pointer

    # ------------------------------------------------------------------ prune

    def prune(self, keep: int) -> PruneResult:
        """Keep the newest ``keep`` versions of each model and every version a channel offers.

        "Newest" compares versions part by part, numbers as numbers (1.10.0 > 1.9.2,
        2026.11.1 > 2026.9.3); targets metadata keeps no date of ``add`` to go by. Only the
        staged targets change; the next ``publish`` signs the smaller targets metadata and
        then deletes the dropped versions' files.
        """
        if keep < 1:
            raise RegistryError(f"--keep must be at least 1, not {keep}")
        staging = self._load_staging()
        offered = _offered_versions(_channels_of(staging.signed))
        versions: dict[str, list[str]] = {}
        for model in _models_of(staging.signed):
            versions.setdefault(model.meta.model_id, []).append(model.meta.version)
        removed, kept_for_channels = [], []
        for model_id, listed in sorted(versions.items()):
            for version in sorted(listed, key=version_key)[:-keep]:
                name = f"{model_id}@{version}"
                if (model_id, version) in offered:
                    kept_for_channels.append(name)
                    continue
                prefix = version_prefix(model_id, version)
                for path in [p for p in staging.signed.targets if p.startswith(prefix)]:
                    del staging.signed.targets[path]
                removed.append(name)
        if removed:
            self._save_staging(staging)
        return PruneResult(removed, kept_for_channels)

    def _remove_unlisted_versions(self, targets: Targets, out: Path | None) -> int:
        """Delete the version directories under targets/models/ that ``targets`` no longer lists."""
        removed = 0
        models_dir = self.targets_dir / "models"
        if not models_dir.is_dir():
            return 0
        listed = {path.rpartition("/")[0] for path in targets.targets}
        for version_dir in sorted(p for p in models_dir.glob("*/*") if p.is_dir()):
            relative = version_dir.relative_to(self.targets_dir).as_posix()
            if any(path == relative or path.startswith(relative + "/") for path in listed):
                continue
            for site in (self.repo_dir, *([out] if out is not None else [])):
                gone = site / "targets" / relative
                if gone.is_dir():
                    removed += sum(1 for p in gone.rglob("*") if p.is_file())
                    shutil.rmtree(gone)
                    with contextlib.suppress(OSError):  # the model's directory, once its last version went
                        gone.parent.rmdir()
        return removed

    # ------------------------------------------------------------------ publish

    def publish(
        self, *, out: Path | None = None, timestamp_only: bool = False, now: datetime | None = None
    ) -> PublishResult:
        """Sign what changed, refresh snapshot and timestamp, and mirror the site to ``out``."""
        now = now or _now()
        config = self._config()
        root = self._root()
        published = self._published_versions()
        if timestamp_only:
            if published is None:
                raise RegistryError("nothing is published yet; run `edgert registry publish` first")
            targets_version, snapshot_version = published[0], published[1]
        else:
            targets_version = self._publish_targets(root, config, now, published)
            snapshot_version = (published[1] if published else 0) + 1
            snapshot = Snapshot(version=snapshot_version, expires=_expiry(config, "snapshot", now))
            snapshot.meta["targets.json"] = MetaFile(version=targets_version)
            self._sign_and_write(Metadata(snapshot), root, f"{snapshot_version}.snapshot.json")
        timestamp_version = (published[2] if published else 0) + 1
        timestamp = Timestamp(version=timestamp_version, expires=_expiry(config, "timestamp", now))
        timestamp.snapshot_meta = MetaFile(version=snapshot_version)
        self._sign_and_write(Metadata(timestamp), root, "timestamp.json")
        for path in self.repo_dir.rglob("*"):
            if path.is_file():
                _make_readable(path)  # files an older edgert wrote 0600
        copied = mirror(self.repo_dir, out) if out is not None else 0
        # After the new timestamp is out: devices that read the older one may still fetch these files
        # for a moment; a device that then gets a 404 retries with the new metadata.
        targets = self._load(f"{targets_version}.targets.json", Targets).signed
        removed = self._remove_unlisted_versions(targets, out)
        return PublishResult(targets_version, snapshot_version, timestamp_version, copied, removed)

    def _publish_targets(
        self, root: Root, config: RegistryConfig, now: datetime, published: tuple[int, int, int] | None
    ) -> int:
        staging = self._load_staging()
        if published is not None:
            current = self._load(f"{published[0]}.targets.json", Targets)
            fresh = current.signed.expires - now > _period(config, "targets") * (1 - WARN_FRACTION)
            signed_by_trusted = set(current.signatures) <= set(root.roles["targets"].keyids)
            if current.signed.targets == staging.signed.targets and fresh and signed_by_trusted:
                return published[0]  # nothing changed: keep the published version
            version = published[0] + 1
        else:
            version = 1
        staging.signed.version = version
        staging.signed.expires = _expiry(config, "targets", now)
        self._sign_and_write(staging, root, f"{version}.targets.json", max_length=TARGETS_MAX_LENGTH)
        return version

    # ------------------------------------------------------------------ rotate keys

    def rotate_keys(self, role: str, *, now: datetime | None = None) -> list[str]:
        """Replace every key of ``role`` with new ones (same count and threshold); return the new key ids.

        Writes the next root version, signed by the old root keys and (for a root
        rotation) the new ones too, as TUF requires. Run ``publish`` afterwards.
        """
        now = now or _now()
        root_md = Metadata.from_file(str(self.metadata_dir / "root.json"))
        root = root_md.signed
        if role not in root.roles:
            raise RegistryError(f"unknown role {role!r} (roles: {', '.join(keys.ROLES)})")
        old_keyids = list(root.roles[role].keyids)
        old_root_signers = self._signers(root, "root")
        new_signers = [keys.generate_key(self.keys_dir, role) for _ in old_keyids]
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        for signer in new_signers:
            root.add_key(signer.public_key, role)
        root.version += 1
        root.expires = _expiry(self._config(), "root", now)
        signers = old_root_signers + (new_signers if role == "root" else [])
        self._write_root(Metadata(root), signers)
        keys.retire_keys(self.keys_dir, [k for k in old_keyids if k not in _keyids_in_use(root)])
        return [signer.public_key.keyid for signer in new_signers]

    # ------------------------------------------------------------------ status

    def status(self, *, now: datetime | None = None) -> RegistryStatus:
        now = now or _now()
        config = self._config()
        root = self._root()
        roles = [_role_status("root", root.version, root.expires, root, config, now)]
        published = self._published_versions()
        models: list[PublishedModel] = []
        channels = Channels()
        if published is not None:
            targets = self._load(f"{published[0]}.targets.json", Targets).signed
            snapshot = self._load(f"{published[1]}.snapshot.json", Snapshot).signed
            timestamp = self._load("timestamp.json", Timestamp).signed
            for role, signed in (("targets", targets), ("snapshot", snapshot), ("timestamp", timestamp)):
                roles.append(_role_status(role, signed.version, signed.expires, root, config, now))
            models = _models_of(targets)
            channels = _channels_of(targets)
            unpublished = self._load_staging().signed.targets != targets.targets
            targets_bytes: int | None = (self.metadata_dir / f"{published[0]}.targets.json").stat().st_size
        else:
            unpublished = bool(self._load_staging().signed.targets)
            targets_bytes = None
        return RegistryStatus(roles, models, channels, unpublished, targets_bytes, TARGETS_MAX_LENGTH)

    def root_path(self) -> Path:
        """The newest root.json: what devices ship as ``update.trusted_root``."""
        return self.metadata_dir / "root.json"

    # ------------------------------------------------------------------ internals

    def set_expiry(self, expiry: dict[str, timedelta]) -> None:
        """Change roles' metadata lifetimes (kept in registry.json; applied at the next signing of each role)."""
        _check_expiry(expiry)
        config = self._config()
        config.expiry_s.update({role: int(period.total_seconds()) for role, period in expiry.items()})
        self._save_config(config)

    def expiry(self) -> dict[str, timedelta]:
        """Each role's metadata lifetime."""
        config = self._config()
        return {role: _period(config, role) for role in keys.ROLES}

    def _save_config(self, config: RegistryConfig) -> None:
        write_atomic(self.directory / CONFIG_FILE, config.model_dump_json(indent=2).encode() + b"\n")

    def _config(self) -> RegistryConfig:
        path = self.directory / CONFIG_FILE
        try:
            return RegistryConfig.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"{self.directory} is not a registry (no {CONFIG_FILE}); run init") from None
        except ValidationError as exc:
            raise RegistryError(f"{path}: {_first_error(exc)}") from None

    def _root(self) -> Root:
        self._config()
        root: Root = self._load("root.json", Root).signed
        return root

    def _load(self, name: str, role: type[Any]) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            md: Metadata[Any] = Metadata.from_file(str(path))
        except FileNotFoundError:
            raise RegistryError(f"missing metadata file {path}") from None
        if not isinstance(md.signed, role):
            raise RegistryError(f"{path} is not {role.__name__} metadata")
        return md

    def _published_versions(self) -> tuple[int, int, int] | None:
        """(targets, snapshot, timestamp) versions now published, or None before the first publish."""
        if not (self.metadata_dir / "timestamp.json").exists():
            return None
        timestamp = self._load("timestamp.json", Timestamp).signed
        snapshot = self._load(f"{timestamp.snapshot_meta.version}.snapshot.json", Snapshot).signed
        return snapshot.meta["targets.json"].version, snapshot.version, timestamp.version

    def _signers(self, root: Root, role: str) -> list[CryptoSigner]:
        trusted = root.roles[role]
        signers = keys.load_signers(self.keys_dir, role, trusted.keyids)
        if len(signers) < trusted.threshold:
            raise RegistryError(
                f"signing {role} needs {trusted.threshold} of its keys, {len(signers)} are in {self.keys_dir} "
                f"(offline keys must be brought back for this step)"
            )
        return signers

    def _sign_and_write(self, md: Metadata[Any], root: Root, name: str, *, max_length: int | None = None) -> None:
        md.signatures.clear()
        for signer in self._signers(root, md.signed.type):
            md.sign(signer, append=True)
        data = md.to_bytes(_PRETTY)
        if max_length is not None and len(data) > max_length:
            raise RegistryError(
                f"{md.signed.type} metadata would be {len(data)} bytes, over the {max_length} bytes devices accept "
                "(they would stop updating); drop old versions with `edgert registry prune --keep N`"
            )
        write_site_file(self.metadata_dir / name, data)

    def _write_root(self, md: Metadata[Root], signers: list[CryptoSigner]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        data = md.to_bytes(_PRETTY)
        write_site_file(self.metadata_dir / f"{md.signed.version}.root.json", data)
        write_site_file(self.metadata_dir / "root.json", data)

    def _load_staging(self) -> Metadata[Targets]:
        try:
            md: Metadata[Any] = Metadata.from_file(str(self.staging_file))
        except FileNotFoundError:
            raise RegistryError(f"{self.directory} is not a registry (no {self.staging_file})") from None
        return md

    def _save_staging(self, md: Metadata[Targets]) -> None:
        md.signatures.clear()
        write_atomic(self.staging_file, md.to_bytes(_PRETTY))

    def _copy_target(self, source: Path, target: TargetFile) -> None:
        destination = self._target_file(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        copy_site_file(source, destination)

    def _publisher_signature(self, gguf: Path, path: str, signing_key: Path) -> TargetFile:
        """Sign ``gguf`` with model-signing and write the bundle as the target ``<path>.sig``."""
        workdir = self.staging_file.parent
        with tempfile.TemporaryDirectory(prefix=".bundle-", dir=workdir) as tmp:
            bundle = Path(tmp) / "bundle.sig"
            publisher_signature.sign(gguf, signing_key, bundle, workdir=workdir)
            data = bundle.read_bytes()
        signature = TargetFile.from_data(publisher_signature.signature_target_path(path), data, ["sha256"])
        self._write_target_bytes(data, signature)
        return signature

    def _publisher_signature_of_folder(
        self, copies: dict[str, Path], anchor: str, signing_key: Path, *, name: str
    ) -> TargetFile:
        """Sign the published copies of a folder's members as one model; the bundle is the target ``<anchor>.sig``."""
        workdir = self.staging_file.parent
        with tempfile.TemporaryDirectory(prefix=".bundle-", dir=workdir) as tmp:
            bundle = Path(tmp) / "bundle.sig"
            publisher_signature.sign_folder(copies, signing_key, bundle, name=name, workdir=workdir)
            data = bundle.read_bytes()
        signature = TargetFile.from_data(publisher_signature.signature_target_path(anchor), data, ["sha256"])
        self._write_target_bytes(data, signature)
        return signature

    def _write_target_bytes(self, data: bytes, target: TargetFile) -> None:
        destination = self._target_file(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_site_file(destination, data)

    def _target_file(self, target: TargetFile) -> Path:
        directory, _, name = target.path.rpartition("/")
        prefixed = f"{target.hashes['sha256']}.{name}"
        return self.targets_dir / directory / prefixed if directory else self.targets_dir / prefixed


def mirror(source: Path, destination: Path) -> int:
    """Copy the static site to ``destination`` in an order devices can read through.

    Files that carry their version or hash in their name first (new ones only),
    then ``root.json``, then ``timestamp.json``: a device polling meanwhile sees
    the old publication or the new one, never a timestamp naming missing files.
    """
    copied = 0
    last = [source / "metadata" / "root.json", source / "metadata" / "timestamp.json"]
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p not in last):
        target = destination / path.relative_to(source)
        if target.is_file() and target.stat().st_size == path.stat().st_size:
            _make_readable(target)  # an older edgert published it 0600: repaired in place
            continue  # content-addressed: the same name is the same bytes
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_site_file(path, target)
        copied += 1
    for path in last:
        if path.is_file():
            (destination / "metadata").mkdir(parents=True, exist_ok=True)
            write_site_file(destination / "metadata" / path.name, path.read_bytes())
            copied += 1
    return copied


def _make_readable(path: Path) -> None:
    if stat.S_IMODE(path.stat().st_mode) != SITE_FILE_MODE:
        path.chmod(SITE_FILE_MODE)


def write_site_file(path: Path, data: bytes) -> None:
    """Write a file of the static site atomically (temp file, fsync, rename) with mode 0644."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, SITE_FILE_MODE)  # before the rename: the file is never visible with another mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        store.install_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def copy_site_file(source: Path, destination: Path) -> None:
    """Copy ``source`` into the static site atomically with mode 0644, whatever the source's mode or the umask."""
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, SITE_FILE_MODE)
        with os.fdopen(fd, "wb") as fh, source.open("rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        store.install_file(tmp, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _matches(pattern: str, value: str) -> bool:
    return re.match(pattern, value) is not None


def _period(config: RegistryConfig, role: str) -> timedelta:
    if role in config.expiry_s:
        return timedelta(seconds=config.expiry_s[role])
    return timedelta(days=config.expiry_days.get(role, DEFAULT_EXPIRY_DAYS[role]))


def parse_duration(text: str) -> timedelta:
    """A metadata lifetime: ``7`` or ``7d`` days, ``6h`` hours, ``30m`` minutes (a plain number is days)."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise RegistryError(f"expiry {text!r}: give days (7 or 7d), hours (6h) or minutes (30m)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def format_duration(period: timedelta) -> str:
    """The shortest of ``<n>d``, ``<n>h``, ``<n>m`` (else seconds) that states ``period`` exactly."""
    seconds = int(period.total_seconds())
    if seconds == 0:
        return "0m"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _expiry(config: RegistryConfig, role: str, now: datetime) -> datetime:
    return now + _period(config, role)


def _check_role_numbers(counts: dict[str, int], thresholds: dict[str, int], expiry: dict[str, timedelta]) -> None:
    for table in (counts, thresholds):
        _check_roles(table)
    for role in keys.ROLES:
        if not 1 <= thresholds[role] <= counts[role]:
            raise RegistryError(f"{role}: threshold {thresholds[role]} must be 1..{counts[role]} (its key count)")
    _check_expiry(expiry)


def _check_roles(table: Mapping[str, object]) -> None:
    unknown = set(table) - set(keys.ROLES)
    if unknown:
        raise RegistryError(f"unknown role(s) {', '.join(sorted(unknown))} (roles: {', '.join(keys.ROLES)})")


def _check_expiry(expiry: dict[str, timedelta]) -> None:
    _check_roles(expiry)
    for role, period in expiry.items():
        if not MIN_EXPIRY <= period <= MAX_EXPIRY:
            raise RegistryError(
                f"{role}: expiry {format_duration(period)} must be between {format_duration(MIN_EXPIRY)} "
                f"and {format_duration(MAX_EXPIRY)}"
            )


def _keyids_in_use(root: Root) -> set[str]:
    return {keyid for role in root.roles.values() for keyid in role.keyids}


def _role_status(
    role: str, version: int, expires: datetime, root: Root, config: RegistryConfig, now: datetime
) -> RoleStatus:
    left = expires - now
    warning = None
    if left <= timedelta(0):
        warning = "expired"
    elif left < _period(config, role) * WARN_FRACTION:
        warning = "expires soon"
    trusted = root.roles[role]
    return RoleStatus(role, version, expires, trusted.threshold, list(trusted.keyids), warning)


def _models_of(targets: Targets) -> list[PublishedModel]:
    """Every model version: the targets that carry a ModelMeta (a folder's length is all its members')."""
    models = []
    for path, target in sorted(targets.targets.items()):
        custom = target.custom
        if isinstance(custom, dict) and MODEL_KEY in custom:
            meta = ModelMeta.model_validate(custom[MODEL_KEY])
            length = target.length
            if meta.is_folder:
                length = sum(targets.targets[p].length for p in meta.target_paths() if p in targets.targets)
            models.append(PublishedModel(path, length, target.hashes["sha256"], meta))
    return models


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a version string: digit runs compare as numbers, other runs as text, numbers first."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _VERSION_PART.findall(version))


def _offered_versions(channels: Channels) -> set[tuple[str, str]]:
    """(model_id, version) of every version some device may be told to run: each channel's and its previous."""
    offered = set()
    for pointer in channels.channels.values():
        offered.add((pointer.model_id, pointer.version))
        if pointer.previous_version is not None:
            offered.add((pointer.model_id, pointer.previous_version))
    return offered


def _model_target(targets: Targets, model_id: str, version: str) -> str | None:
    """The target that carries ``model_id@version``'s ModelMeta, whatever its format; None when absent."""
    for path in model_target_paths(model_id, version):
        target = targets.targets.get(path)
        if target is not None and isinstance(target.custom, dict) and MODEL_KEY in target.custom:
            return path
    return None


def folder_members(folder: Path) -> tuple[str, ...]:
    """The files of a model folder as sorted relative paths; RegistryError on anything unsafe.

    Hidden entries (a name starting with ``.``) are skipped with everything below them;
    a symlink or a special file anywhere, a name that is not a safe target path
    (:data:`~edgert.update.manifest.MEMBER_PATTERN`) and an empty folder are refused.
    """
    found: list[str] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith("."):
                continue
            relative = entry.relative_to(folder).as_posix()
            if entry.is_symlink():
                raise RegistryError(f"{folder}: {relative} is a symbolic link; publish the real file instead")
            if entry.is_dir():
                pending.append(entry)
            elif not entry.is_file():
                raise RegistryError(f"{folder}: {relative} is not a regular file")
            elif not _matches(MEMBER_PATTERN, relative) or relative.endswith(RESERVED_SUFFIXES):
                raise RegistryError(
                    f"{folder}: {relative!r} cannot be a target path (letters, digits and ._+- only, "
                    "parts not starting with a dot, at most 8 deep, no .part suffix)"
                )
            else:
                found.append(relative)
    if not found:
        raise RegistryError(f"{folder}: the folder has no files to publish")
    if len(found) > MAX_MODEL_FILES:
        raise RegistryError(f"{folder}: {len(found)} files; a model folder may have at most {MAX_MODEL_FILES}")
    return tuple(sorted(found))


def _model_meta(**fields: Any) -> ModelMeta:
    try:
        return ModelMeta(**fields)
    except ValidationError as exc:
        raise RegistryError(f"invalid model metadata: {_first_error(exc)}") from None


def _ram_estimate(size: int) -> int:
    return math.ceil(size / 2**20 * RAM_OVERHEAD) + RAM_BASE_MIB


def _channels_of(targets: Targets) -> Channels:
    target = targets.targets.get(CHANNELS_TARGET)
    if target is None or not isinstance(target.custom, dict):
        return Channels()
    return Channels.model_validate(target.custom.get(CHANNELS_KEY, {}))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
