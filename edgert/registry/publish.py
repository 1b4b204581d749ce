"""``publish`` and ``prune``: signing a publication, and keeping targets metadata under the size devices accept.

Consistent snapshots are always on: every published file has a content- or
version-addressed name, so a device that fetched timestamp N never mixes its
snapshot with files of another publication, and ``publish`` can upload while
devices read. ``timestamp.json`` is written last.

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
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import UpdaterConfig

from edgert.errors import RegistryError
from edgert.registry.catalog import channels_of, models_of
from edgert.registry.config import WARN_FRACTION, RegistryConfig, role_expiry, role_period, utc_now
from edgert.registry.files import RegistryFiles
from edgert.registry.site import make_readable, mirror
from edgert.update.manifest import Channels, version_prefix

#: The largest targets.json a device accepts (python-tuf's default; edgert's client keeps it).
TARGETS_MAX_LENGTH: Final = UpdaterConfig().targets_max_length
_VERSION_PART = re.compile(r"\d+|[^\d.+_-]+")


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


class Publishing(RegistryFiles):
    """Sign and publish what is staged; prune old versions from it."""

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
        offered = _offered_versions(channels_of(staging.signed))
        versions: dict[str, list[str]] = {}
        for model in models_of(staging.signed):
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

    def publish(
        self, *, out: Path | None = None, timestamp_only: bool = False, now: datetime | None = None
    ) -> PublishResult:
        """Sign what changed, refresh snapshot and timestamp, and mirror the site to ``out``."""
        now = now or utc_now()
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
            snapshot = Snapshot(version=snapshot_version, expires=role_expiry(config, "snapshot", now))
            snapshot.meta["targets.json"] = MetaFile(version=targets_version)
            self._sign_and_write(Metadata(snapshot), root, f"{snapshot_version}.snapshot.json")
        timestamp_version = (published[2] if published else 0) + 1
        timestamp = Timestamp(version=timestamp_version, expires=role_expiry(config, "timestamp", now))
        timestamp.snapshot_meta = MetaFile(version=snapshot_version)
        self._sign_and_write(Metadata(timestamp), root, "timestamp.json")
        for path in self.repo_dir.rglob("*"):
            if path.is_file():
                make_readable(path)  # files an older edgert wrote 0600
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
            fresh = current.signed.expires - now > role_period(config, "targets") * (1 - WARN_FRACTION)
            signed_by_trusted = set(current.signatures) <= set(root.roles["targets"].keyids)
            if current.signed.targets == staging.signed.targets and fresh and signed_by_trusted:
                return published[0]  # nothing changed: keep the published version
            version = published[0] + 1
        else:
            version = 1
        staging.signed.version = version
        staging.signed.expires = role_expiry(config, "targets", now)
        self._sign_and_write(staging, root, f"{version}.targets.json", max_length=TARGETS_MAX_LENGTH)
        return version


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
