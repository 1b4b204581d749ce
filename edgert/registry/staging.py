"""``add`` and ``promote``: changes staged in ``staging/targets.json`` until the next ``publish``.

``add`` validates a model like the engine does (a GGUF file, a GGUF with its multimodal
projector, or an ONNX Runtime GenAI folder with every file its own target), copies it under
``repository/targets`` by its consistent-snapshot name and stages its target(s), optionally with
a publisher signature and an evaluation set (:mod:`edgert.registry.evaluation`).

Channel pointers (which version a channel offers, and the rollout percentage)
are the signed ``custom`` object of the ``channels.json`` target; see
:mod:`edgert.update.manifest`. ``promote`` rewrites it.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from tuf.api.metadata import TargetFile, Targets

from edgert import __version__
from edgert.drafter_file import check_drafter_files
from edgert.errors import ModelFileError, RegistryError
from edgert.gguf_file import validate_gguf
from edgert.onnx_folder import validate_onnx_folder
from edgert.projector import check_pair_files
from edgert.registry.catalog import PublishedModel, channels_of
from edgert.registry.config import first_error, utc_now
from edgert.registry.evaluation import EvalAttachment, eval_target
from edgert.registry.files import RegistryFiles
from edgert.registry.site import copy_site_file, write_site_file
from edgert.update import publisher_signature
from edgert.update.manifest import (
    CHANNEL_PATTERN,
    CHANNELS_KEY,
    CHANNELS_TARGET,
    DRAFTER_FILE,
    MAX_MODEL_FILES,
    MEMBER_PATTERN,
    MODEL_FILE,
    MODEL_KEY,
    PROJECTOR_FILE,
    RESERVED_SUFFIXES,
    ChannelPointer,
    Channels,
    ModelMeta,
    member_target_path,
    model_target_path,
    model_target_paths,
    version_prefix,
)

#: Rough memory need when the operator does not give one: weights + 20% + 128 MiB of buffers.
RAM_OVERHEAD: Final = 1.2
RAM_BASE_MIB: Final = 128


class Staging(RegistryFiles):
    """Stage models and channel pointers; each step rewrites ``staging/targets.json``."""

    def add(
        self,
        model: Path,
        *,
        model_id: str,
        version: str,
        min_edgert_version: str = __version__,
        ram_mib: int | None = None,
        signing_key: Path | None = None,
        mmproj: Path | None = None,
        drafter: Path | None = None,
        evaluation: EvalAttachment | None = None,
    ) -> PublishedModel:
        """Validate ``model`` like the engine does, then stage it as signed-to-be target(s).

        With ``mmproj`` (its multimodal projector) and/or ``drafter`` (its MTP drafter) a GGUF becomes a
        ``gguf-mmproj`` release of two or three targets, delivered all or nothing (see :meth:`_add_pair`).

        ``model`` is a ``.gguf`` file (one target ``models/<id>/<version>/model.gguf``) or
        an ONNX Runtime GenAI model folder (see :meth:`_add_folder`: one target per file).
        With ``signing_key`` (an EC private key, PEM) the model is also signed with
        model-signing and the bundle staged as the companion target ``<path>.sig``
        beside the target that carries the ModelMeta (``model.gguf.sig``, or
        ``genai_config.json.sig`` for a folder; see :mod:`edgert.update.publisher_signature`).
        With ``evaluation`` the release carries its evaluation set as the target ``eval.jsonl`` and its
        threshold in the ModelMeta (:mod:`edgert.registry.evaluation`).
        """
        gate = evaluation.meta if evaluation is not None else None
        if mmproj is not None or drafter is not None:
            return self._add_pair(
                model,
                mmproj,
                drafter,
                model_id=model_id,
                version=version,
                min_edgert_version=min_edgert_version,
                ram_mib=ram_mib,
                signing_key=signing_key,
                evaluation=evaluation,
            )
        if model.is_dir():
            return self._add_folder(
                model,
                model_id=model_id,
                version=version,
                min_edgert_version=min_edgert_version,
                ram_mib=ram_mib,
                signing_key=signing_key,
                evaluation=evaluation,
            )
        gguf = model
        meta = _gguf_meta(
            gguf,
            gguf.stat().st_size,
            model_id=model_id,
            version=version,
            ram_mib=ram_mib,
            min_edgert_version=min_edgert_version,
            evaluation=gate,
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
        if evaluation is not None:
            self._stage_evaluation(staging.signed.targets, evaluation, meta)
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
        evaluation: EvalAttachment | None,
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
            evaluation=evaluation.meta if evaluation is not None else None,
        )
        sources = {member: folder / member for member in members}
        return self._stage_members(meta, sources, size, signing_key, evaluation)

    def _add_pair(
        self,
        model: Path,
        mmproj: Path | None,
        drafter: Path | None,
        *,
        model_id: str,
        version: str,
        min_edgert_version: str,
        ram_mib: int | None,
        signing_key: Path | None,
        evaluation: EvalAttachment | None,
    ) -> PublishedModel:
        """Stage a Gemma 4 GGUF with its multimodal projector and/or MTP drafter: targets ``model.gguf``
        (carrying the ModelMeta, ``format = "gguf-mmproj"``), ``mmproj.gguf`` and/or ``drafter.gguf``, which a
        device installs all or none.

        Each companion is checked against the model as the device checks it before loading (a projector GGUF
        whose every encoder projects into the model's embedding width; a ``gemma4-assistant`` drafter whose
        widths, KV heads and vocabulary match the model's), so a mismatched release is never signed.
        """
        sources = {MODEL_FILE: model}
        for option, member, companion, check in (
            ("--mmproj", PROJECTOR_FILE, mmproj, check_pair_files),
            ("--drafter", DRAFTER_FILE, drafter, check_drafter_files),
        ):
            if companion is None:
                continue
            if model.is_dir() or companion.is_dir():
                raise RegistryError(f"{option} pairs a .gguf file with a model .gguf file, not a folder")
            try:
                check(model, companion)
            except ModelFileError as exc:
                raise RegistryError(f"{companion.name} cannot be published with {model.name}: {exc.message}") from None
            sources[member] = companion
        size = sum(source.stat().st_size for source in sources.values())
        meta = _gguf_meta(
            model,
            size,
            model_id=model_id,
            version=version,
            ram_mib=ram_mib,
            min_edgert_version=min_edgert_version,
            format="gguf-mmproj",
            files=tuple(sources),
            evaluation=evaluation.meta if evaluation is not None else None,
        )
        return self._stage_members(meta, sources, size, signing_key, evaluation)

    def _stage_members(
        self,
        meta: ModelMeta,
        sources: dict[str, Path],
        size: int,
        signing_key: Path | None,
        evaluation: EvalAttachment | None,
    ) -> PublishedModel:
        """Stage each member of a multi-file release as its own target; the anchor carries the ModelMeta."""
        staging = self._load_staging()
        self._check_new_version(staging.signed, meta.model_id, meta.version)
        if signing_key is not None:
            publisher_signature.check_signing_key(signing_key)  # a bad key fails before any copy
        anchor = model_target_path(meta.model_id, meta.version, meta.format)
        targets: dict[str, TargetFile] = {}
        copies: dict[str, Path] = {}
        for member, source in sources.items():
            path = member_target_path(meta.model_id, meta.version, member)
            target = TargetFile.from_file(path, str(source), ["sha256"])
            if path == anchor:
                target.unrecognized_fields["custom"] = {MODEL_KEY: meta.signed_custom()}
            self._copy_target(source, target)
            targets[path] = target
            copies[member] = self._target_file(target)
        if signing_key is not None:
            signature = self._publisher_signature_of_folder(copies, anchor, signing_key, name=meta.file_name)
            targets[signature.path] = signature
        if evaluation is not None:
            self._stage_evaluation(targets, evaluation, meta)
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
        channels = channels_of(staging.signed)
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
            promoted_at=now or utc_now(),
        )
        updated = Channels(channels={**channels.channels, channel: pointer})
        body = json.dumps(updated.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
        target = TargetFile.from_data(CHANNELS_TARGET, body, ["sha256"])
        target.unrecognized_fields["custom"] = {CHANNELS_KEY: updated.model_dump(mode="json")}
        self._write_target_bytes(body, target)
        staging.signed.targets[CHANNELS_TARGET] = target
        self._save_staging(staging)
        return pointer

    def _stage_evaluation(self, targets: dict[str, TargetFile], evaluation: EvalAttachment, meta: ModelMeta) -> None:
        target = eval_target(evaluation, meta)
        self._copy_target(evaluation.source, target)
        targets[target.path] = target

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


def _matches(pattern: str, value: str) -> bool:
    return re.match(pattern, value) is not None


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
        raise RegistryError(f"invalid model metadata: {first_error(exc)}") from None


def _gguf_meta(gguf: Path, size: int, *, ram_mib: int | None, **fields: Any) -> ModelMeta:
    """The ModelMeta of a release whose model is ``gguf`` (``size``: all its files), read from the GGUF header."""
    info = validate_gguf(gguf)
    return _model_meta(
        architecture=info.architecture,
        quant=info.file_type,
        context_length=info.context_length,
        ram_mib=ram_mib or _ram_estimate(size),
        file_name=gguf.name,
        **fields,
    )


def _ram_estimate(size: int) -> int:
    return math.ceil(size / 2**20 * RAM_OVERHEAD) + RAM_BASE_MIB
