"""Publisher identity: an OpenSSF model-signing bundle beside each model target (optional second layer).

TUF says *the fleet's registry keys* approved a file; a model-signing bundle says
*the publisher* (who may not run the registry) built it. The operator signs the
GGUF with an elliptic-curve private key (``edgert registry add --sign-key``); the
bundle becomes the companion TUF target ``models/<id>/<version>/model.gguf.sig``,
so it is itself length- and hash-checked like every target. A device with
``update.publisher_public_key`` set verifies the downloaded GGUF against it before
staging and refuses a release without a bundle or with one that does not verify.

The signature manifest records file names, so both sides sign and verify the file
under the name :data:`~edgert.update.manifest.MODEL_FILE` (a hard link in a
temporary directory; a copy when the link is impossible).

``model_signing`` (the ``[signing]`` extra) is imported here only, and lazily.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from edgert.errors import ConfigError, UntrustedMetadataError
from edgert.update.manifest import MODEL_FILE

#: The companion target's name suffix: ``models/<id>/<version>/model.gguf.sig``.
SIGNATURE_SUFFIX: Final = ".sig"
#: A key-signed bundle is about 1.5 KB; anything far larger is not one.
MAX_BUNDLE_BYTES: Final = 1 << 20


class PublisherSignatureError(UntrustedMetadataError):
    """The release has no publisher bundle, or its bundle does not verify with the configured key."""


def signature_target_path(model_target: str) -> str:
    """The TUF target path of the bundle that signs ``model_target``."""
    return model_target + SIGNATURE_SUFFIX


def sign(model: Path, private_key: Path, bundle: Path, *, workdir: Path) -> None:
    """Write the model-signing bundle of ``model`` (signed as ``model.gguf``) to ``bundle``.

    ``workdir`` holds the temporary ``model.gguf`` link; on ``model``'s file system it costs no copy.
    """
    with _signing_extra():
        from model_signing import signing  # noqa: PLC0415 - the [signing] extra is optional
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {private_key}: {exc}") from None
    with _named_as_model(model, workdir) as path:
        config.sign(path, bundle)


def verify(model: Path, bundle: Path, public_key: Path, *, workdir: Path) -> None:
    """Raise PublisherSignatureError unless ``bundle`` signs ``model`` with ``public_key``'s private half."""
    with _signing_extra():
        from model_signing import verifying  # noqa: PLC0415 - the [signing] extra is optional
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"update.publisher_public_key {public_key}: {exc}") from None
    with _named_as_model(model, workdir) as path:
        try:
            config.verify(path, bundle)
        # model_signing raises ValueError, cryptography's InvalidSignature, JSON and
        # protobuf errors, KeyError… for bundles that do not verify: all mean "refuse".
        except Exception as exc:  # noqa: BLE001
            detail = str(exc) or type(exc).__name__
            raise PublisherSignatureError(f"publisher signature does not verify: {detail}") from None


@contextlib.contextmanager
def _named_as_model(model: Path, workdir: Path) -> Iterator[Path]:
    """``model`` reachable as ``<workdir>/<tmp>/model.gguf`` (the name recorded in the signature manifest)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publisher-signature-", dir=workdir) as tmp:
        path = Path(tmp) / MODEL_FILE
        try:
            os.link(model, path)
        except OSError:
            shutil.copyfile(model, path)
        yield path


@contextlib.contextmanager
def _signing_extra() -> Iterator[None]:
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"publisher signatures need the [signing] extra (pip install 'edgert[signing]'): {exc}"
        ) from None
