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

:class:`Registry` is the operator's one entry point. This module owns what changes the
trust itself (``init``, ``rotate-keys``, metadata lifetimes); the other steps live in

- :mod:`edgert.registry.staging`: ``add`` and ``promote`` (the staged targets),
- :mod:`edgert.registry.publish`: ``publish`` and ``prune`` (signing, the targets size limit),
- :mod:`edgert.registry.status`: ``status``,

on top of :mod:`edgert.registry.files` (paths, metadata I/O and signing),
:mod:`edgert.registry.config` (``registry.json``, lifetimes), :mod:`edgert.registry.catalog`
(reading targets) and :mod:`edgert.registry.site` (the static site's files).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Targets

from edgert.errors import RegistryError
from edgert.registry import keys
from edgert.registry.config import (
    CONFIG_FILE,
    DEFAULT_EXPIRY_DAYS,
    RegistryConfig,
    check_expiry,
    check_role_numbers,
    role_expiry,
    role_period,
    utc_now,
)
from edgert.registry.publish import Publishing
from edgert.registry.staging import Staging
from edgert.registry.status import StatusReport
from edgert.update.state import write_atomic


class Registry(Staging, Publishing, StatusReport):
    """One registry directory. Methods sign with the key files under ``keys/``.

    ``add``/``promote``, ``publish``/``prune`` and ``status`` come from the bases, one module each.
    """

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
        check_role_numbers(counts, limits, periods)
        now = now or utc_now()
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

    def rotate_keys(self, role: str, *, now: datetime | None = None) -> list[str]:
        """Replace every key of ``role`` with new ones (same count and threshold); return the new key ids.

        Writes the next root version, signed by the old root keys and (for a root
        rotation) the new ones too, as TUF requires. Run ``publish`` afterwards.
        """
        now = now or utc_now()
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
        root.expires = role_expiry(self._config(), "root", now)
        signers = old_root_signers + (new_signers if role == "root" else [])
        self._write_root(Metadata(root), signers)
        keys.retire_keys(self.keys_dir, [k for k in old_keyids if k not in _keyids_in_use(root)])
        return [signer.public_key.keyid for signer in new_signers]

    def set_expiry(self, expiry: dict[str, timedelta]) -> None:
        """Change roles' metadata lifetimes (kept in registry.json; applied at the next signing of each role)."""
        check_expiry(expiry)
        config = self._config()
        config.expiry_s.update({role: int(period.total_seconds()) for role, period in expiry.items()})
        self._save_config(config)

    def expiry(self) -> dict[str, timedelta]:
        """Each role's metadata lifetime."""
        config = self._config()
        return {role: role_period(config, role) for role in keys.ROLES}


def _keyids_in_use(root: Root) -> set[str]:
    return {keyid for role in root.roles.values() for keyid in role.keyids}
