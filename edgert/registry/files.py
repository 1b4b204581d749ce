"""One registry directory's files: where each lives, and loading, signing and writing its metadata.

:class:`RegistryFiles` is the base the registry's steps build on (:mod:`~edgert.registry.staging`,
:mod:`~edgert.registry.publish`, :mod:`~edgert.registry.status`, :mod:`~edgert.registry.repository`):
it reads ``registry.json``, the published metadata and the staged targets, and signs with
the key files under ``keys/`` (a role's threshold of them, or it refuses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgert.errors import RegistryError
from edgert.registry import keys
from edgert.registry.config import CONFIG_FILE, RegistryConfig, first_error
from edgert.registry.site import write_site_file
from edgert.update.state import write_atomic

_PRETTY: Final = JSONSerializer(compact=False)


class RegistryFiles:
    """The paths of one registry directory and the metadata I/O every step shares."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys_dir = directory / "keys"
        self.repo_dir = directory / "repository"
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.staging_file = directory / "staging" / "targets.json"

    def root_path(self) -> Path:
        """The newest root.json: what devices ship as ``update.trusted_root``."""
        return self.metadata_dir / "root.json"

    def _save_config(self, config: RegistryConfig) -> None:
        write_atomic(self.directory / CONFIG_FILE, config.model_dump_json(indent=2).encode() + b"\n")

    def _config(self) -> RegistryConfig:
        path = self.directory / CONFIG_FILE
        try:
            return RegistryConfig.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"{self.directory} is not a registry (no {CONFIG_FILE}); run init") from None
        except ValidationError as exc:
            raise RegistryError(f"{path}: {first_error(exc)}") from None

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
