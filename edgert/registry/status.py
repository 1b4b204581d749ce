"""``status``: each role's version and expiry, the published models and channels, and the size warning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from edgert.registry.catalog import PublishedModel, channels_of, models_of
from edgert.registry.config import WARN_FRACTION, RegistryConfig, role_period, utc_now
from edgert.registry.files import RegistryFiles
from edgert.registry.publish import TARGETS_MAX_LENGTH
from edgert.update.manifest import Channels

#: ``status`` warns from this share of TARGETS_MAX_LENGTH on.
TARGETS_WARN_FRACTION: Final = 0.8


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


class StatusReport(RegistryFiles):
    """Report on the published metadata (and whether staged changes wait)."""

    def status(self, *, now: datetime | None = None) -> RegistryStatus:
        now = now or utc_now()
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
            models = models_of(targets)
            channels = channels_of(targets)
            unpublished = self._load_staging().signed.targets != targets.targets
            targets_bytes: int | None = (self.metadata_dir / f"{published[0]}.targets.json").stat().st_size
        else:
            unpublished = bool(self._load_staging().signed.targets)
            targets_bytes = None
        return RegistryStatus(roles, models, channels, unpublished, targets_bytes, TARGETS_MAX_LENGTH)


def _role_status(
    role: str, version: int, expires: datetime, root: Root, config: RegistryConfig, now: datetime
) -> RoleStatus:
    left = expires - now
    warning = None
    if left <= timedelta(0):
        warning = "expired"
    elif left < role_period(config, role) * WARN_FRACTION:
        warning = "expires soon"
    trusted = root.roles[role]
    return RoleStatus(role, version, expires, trusted.threshold, list(trusted.keyids), warning)
