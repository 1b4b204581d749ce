"""Signing keys of an edgert registry: ed25519, one PEM file per key.

Layout under ``<registry>/keys/``::

    root-<keyid16>.pem        OFFLINE: keep on removable media; signs root (key rotation) only
    targets-<keyid16>.pem     OFFLINE when possible: signs which models exist and the channels
    snapshot-<keyid16>.pem    online: re-signed on every publish
    timestamp-<keyid16>.pem   online: re-signed on every publish (and by a timer, to stay fresh)
    retired/                  keys replaced by ``rotate-keys``, kept for the record

Private keys are unencrypted PKCS#8 PEM written with mode 0600: the operator
machine's disk encryption and access control protect them. The key id is the
TUF key id (sha256 of the public key's canonical JSON), recomputed on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgert import store
from edgert.errors import RegistryError

ROLES: Final = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES: Final = ("root", "targets")

KEYS_README: Final = """\
edgert registry signing keys (ed25519, PKCS#8 PEM, mode 0600).

  root-*.pem       OFFLINE. Move to removable media after `edgert registry init`;
                   bring back only for `edgert registry rotate-keys`.
  targets-*.pem    OFFLINE when possible. Needed by `add`/`promote` + `publish`.
  snapshot-*.pem   ONLINE. Needed by every `publish`.
  timestamp-*.pem  ONLINE. Needed by every `publish --timestamp-only` (run it from a timer
                   more often than the timestamp expiry, or devices refuse stale metadata).
  retired/         keys replaced by `rotate-keys`; no longer trusted by root.json.

Anyone holding threshold-many keys of a role can sign as that role: treat these files as
the fleet's master keys.
"""


def generate_key(keys_dir: Path, role: str) -> CryptoSigner:
    """Create a new ed25519 key for ``role``, written as ``<role>-<keyid16>.pem`` (0600)."""
    _check_role(role)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signer = CryptoSigner.generate_ed25519()
    path = keys_dir / f"{role}-{signer.public_key.keyid[:16]}.pem"
    # O_EXCL: never overwrite an existing private key, whatever happens.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, signer.private_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    store.fsync_dir(keys_dir)
    return signer


def load_signers(keys_dir: Path, role: str, keyids: list[str]) -> list[CryptoSigner]:
    """Signers for every key file of ``role`` whose key id is one of ``keyids`` (the trusted ones)."""
    _check_role(role)
    wanted = set(keyids)
    signers = []
    for path in sorted(keys_dir.glob(f"{role}-*.pem")):
        signer = _load(path)
        if signer.public_key.keyid in wanted:
            signers.append(signer)
    return signers


def retire_keys(keys_dir: Path, keyids: list[str]) -> list[Path]:
    """Move the key files of ``keyids`` to ``retired/``; return their new paths."""
    retired_dir = keys_dir / "retired"
    retired_dir.mkdir(exist_ok=True, mode=0o700)
    moved = []
    for path in sorted(keys_dir.glob("*.pem")):
        if _load(path).public_key.keyid in keyids:
            destination = retired_dir / path.name
            path.replace(destination)
            moved.append(destination)
    store.fsync_dir(keys_dir)
    store.fsync_dir(retired_dir)
    return moved


def _load(path: Path) -> CryptoSigner:
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise RegistryError(f"cannot load signing key {path}: {exc}") from None
    public_key = SSlibKey.from_crypto(private_key.public_key())
    return CryptoSigner(private_key, public_key)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise RegistryError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
