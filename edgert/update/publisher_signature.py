"""Publisher identity: an OpenSSF model-signing bundle beside each model target (optional second layer).

TUF says *the fleet's registry keys* approved a file; a model-signing bundle says
*the publisher* (who may not run the registry) built it. The operator signs the
model with an elliptic-curve private key (``edgert registry add --sign-key``); the
bundle becomes the companion TUF target ``<model target>.sig``, so it is itself
length- and hash-checked like every target. A device with
``update.publisher_public_key`` set verifies the downloaded model against it before
staging and refuses a release without a bundle or with one that does not verify.

Both formats are signed with model-signing's own serialization:

* a GGUF file (bundle ``models/<id>/<version>/model.gguf.sig``): the signature
  manifest records file names, so both sides sign and verify the file under the
  name :data:`~edgert.update.manifest.MODEL_FILE` (a hard link in a temporary
  directory; a copy when the link is impossible);
* a model folder (bundle ``models/<id>/<version>/genai_config.json.sig``): the
  manifest lists every file by its path relative to the folder. The registry signs
  a temporary folder of hard links to exactly the member files it publishes (its
  own copies, so hidden files the registry leaves out are not in the signed set
  either, and no ``ignore_paths`` are recorded); the device verifies the staging
  folder, which holds exactly the TUF-verified members, before renaming it into
  place, and also requires the signed file list to equal the release's member list,
  so a file the publisher did not sign, or one it signed that is missing, is refused.

``model_signing`` (the ``[signing]`` extra) is imported here only, and lazily.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edgert.errors import ConfigError

# Defined with every other error in edgert.errors; re-exported because callers catch it by this module.
from edgert.errors import PublisherSignatureError as PublisherSignatureError  # noqa: PLC0414
from edgert.update.manifest import MODEL_FILE, SIGNATURE_SUFFIX

if TYPE_CHECKING:
    from model_signing import signing, verifying

#: A key-signed bundle is about 1.5 KB; anything far larger is not one.
MAX_BUNDLE_BYTES: Final = 1 << 20


def signature_target_path(model_target: str) -> str:
    """The TUF target path of the bundle that signs ``model_target``."""
    return model_target + SIGNATURE_SUFFIX


def check_signing_key(private_key: Path) -> None:
    """ConfigError unless ``private_key`` is a usable signing key (and the extra is installed)."""
    _signing_config(private_key)


def sign(model: Path, private_key: Path, bundle: Path, *, workdir: Path) -> None:
    """Write the model-signing bundle of ``model`` (signed as ``model.gguf``) to ``bundle``.

    ``workdir`` holds the temporary ``model.gguf`` link; on ``model``'s file system it costs no copy.
    """
    config = _signing_config(private_key)
    with _named_as_model(model, workdir) as path:
        config.sign(path, bundle)


def sign_folder(files: Mapping[str, Path], private_key: Path, bundle: Path, *, name: str, workdir: Path) -> None:
    """Write the model-signing bundle of a folder made of exactly ``files`` (relative path -> file).

    The folder signed is ``<workdir>/<tmp>/<name>/`` holding a hard link (a copy when the link
    is impossible) per member, so the signed set is ``files`` and nothing else; ``name`` (the
    folder's name) is informative only, verification does not compare it.
    """
    config = _signing_config(private_key, folder=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publisher-signature-", dir=workdir) as tmp:
        folder = Path(tmp) / name
        for member, source in files.items():
            path = folder / member
            path.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(source, path)
        config.sign(folder, bundle)


def verify(model: Path, bundle: Path, public_key: Path, *, workdir: Path) -> None:
    """Raise PublisherSignatureError unless ``bundle`` signs ``model`` with ``public_key``'s private half."""
    config = _verifying_config(public_key)
    with _named_as_model(model, workdir) as path:
        _verify(config, path, bundle)


def verify_folder(folder: Path, members: Sequence[str], bundle: Path, public_key: Path) -> None:
    """Raise PublisherSignatureError unless ``bundle`` signs exactly ``members`` of ``folder`` with the key.

    model-signing hashes every file in ``folder`` and compares it with the signed manifest
    (an extra, missing or altered file fails); the signed file list must then also equal
    ``members``, so a bundle that leaves a member out (``ignore_paths``) does not cover it.
    """
    config = _verifying_config(public_key)
    _verify(config, folder, bundle)
    signed = _signed_resources(bundle)
    if sorted(signed) != sorted(members):
        missing, extra = sorted(set(members) - set(signed)), sorted(set(signed) - set(members))
        raise PublisherSignatureError(
            f"publisher signature does not cover the release's files exactly (unsigned: {missing}, "
            f"signed but not in the release: {extra})"
        )


def _signing_config(private_key: Path, *, folder: bool = False) -> signing.Config:
    with _signing_extra():
        from model_signing import hashing, signing  # noqa: PLC0415 - the [signing] extra is optional
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {private_key}: {exc}") from None
    if folder:  # every file of the signed folder is a member: ignore nothing, record no ignored paths
        config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False))
    return config


def _verifying_config(public_key: Path) -> verifying.Config:
    with _signing_extra():
        from model_signing import verifying  # noqa: PLC0415 - the [signing] extra is optional
    try:
        return verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"update.publisher_public_key {public_key}: {exc}") from None


def _verify(config: verifying.Config, model: Path, bundle: Path) -> None:
    try:
        config.verify(model, bundle)
    # model_signing raises ValueError, cryptography's InvalidSignature, JSON and
    # protobuf errors, KeyError… for bundles that do not verify: all mean "refuse".
    except Exception as exc:  # noqa: BLE001
        detail = str(exc) or type(exc).__name__
        raise PublisherSignatureError(f"publisher signature does not verify: {detail}") from None


def _signed_resources(bundle: Path) -> list[str]:
    """The file names in a *verified* bundle's in-toto statement (``predicate.resources[].name``)."""
    try:
        envelope = json.loads(bundle.read_bytes())["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        return [str(resource["name"]) for resource in statement["predicate"]["resources"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublisherSignatureError(f"publisher signature has no readable file list: {exc}") from None


@contextlib.contextmanager
def _named_as_model(model: Path, workdir: Path) -> Iterator[Path]:
    """``model`` reachable as ``<workdir>/<tmp>/model.gguf`` (the name recorded in the signature manifest)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publisher-signature-", dir=workdir) as tmp:
        path = Path(tmp) / MODEL_FILE
        _link_or_copy(model, path)
        yield path


def _link_or_copy(source: Path, path: Path) -> None:
    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)


@contextlib.contextmanager
def _signing_extra() -> Iterator[None]:
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"publisher signatures need the [signing] extra (pip install 'edgert[signing]'): {exc}"
        ) from None
