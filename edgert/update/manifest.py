"""The edgert part of the signed TUF metadata: model facts and channel pointers.

TUF signs each target file's ``custom`` object together with its length and
hashes, so whatever edgert puts there is as trustworthy as the file itself.
``edgert registry`` writes these shapes and the device reads them back; this
module is the one definition both sides share (pure: pydantic only, no TUF).

Two kinds of target carry edgert data::

    models/<model-id>/<version>/model.gguf         custom = {"edgert": ModelMeta}   (a GGUF model, alone or
                                                                                     with its projector)
    models/<model-id>/<version>/genai_config.json  custom = {"edgert": ModelMeta}   (a folder model)
    models/<model-id>/<version>/eval.jsonl         (its evaluation set, when ModelMeta.evaluation is set)
    channels.json                                  custom = {"edgert_channels": Channels}

A model is one file (``format = "gguf"``), a GGUF with its multimodal projector and/or MTP drafter
(``format = "gguf-mmproj"``: the members ``model.gguf`` and ``mmproj.gguf`` and/or ``drafter.gguf``,
installed as one folder, all or none), or a folder (``format = "onnx-genai"``, an ONNX Runtime GenAI model).
Every file of a folder is its own TUF target,
``models/<model-id>/<version>/<relative path>``, with its own signed length and
hashes; the folder's ``genai_config.json`` target carries the ModelMeta, whose
``files`` lists every member, so the device knows which signed targets make one
model and installs all of them or none. An optional publisher signature is one more
target beside the one carrying the ModelMeta, ``<that target>.sig`` (see
:mod:`edgert.update.publisher_signature`). An evaluation set (:mod:`edgert.evalset`) is one more target,
``eval.jsonl``, whose signed length and hashes pin it; the ModelMeta's ``evaluation`` (its threshold and
case count) says the release has one, so a device never runs a release without the set it was signed with.
GGUF metadata is written without the two new fields, so devices that predate folders keep reading GGUF releases.

Channel pointers live in the ``custom`` object of the ``channels.json`` target
rather than in a side file: a device learns them from the verified targets
metadata alone (``get_targetinfo("channels.json")``), without downloading
anything. The file's bytes are the same document, for humans with curl.
"""

from __future__ import annotations

import posixpath
import re
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgert.onnx_folder import CONFIG_FILE as ONNX_CONFIG_FILE

CHANNELS_TARGET: Final = "channels.json"
MODEL_KEY: Final = "edgert"
CHANNELS_KEY: Final = "edgert_channels"
#: Every GGUF model target's base name; the operator's original name is kept in ModelMeta.file_name.
MODEL_FILE: Final = "model.gguf"
#: The member of a folder model whose target carries the ModelMeta (present in every such folder).
FOLDER_ANCHOR: Final = ONNX_CONFIG_FILE
#: A GGUF release's multimodal projector: the member beside ``model.gguf`` (which carries the ModelMeta).
PROJECTOR_FILE: Final = "mmproj.gguf"
#: The members of a ``gguf-mmproj`` release, in order: the language model, then its projector.
PAIR_FILES: Final = (MODEL_FILE, PROJECTOR_FILE)
#: A GGUF release's MTP drafter (Gemma 4's ``gemma4-assistant``): the member the device serves it with.
DRAFTER_FILE: Final = "drafter.gguf"
#: What a ``gguf-mmproj`` release may hold, in this order: the model, its projector and/or its drafter.
#: (Devices older than the drafter accept only PAIR_FILES, so they refuse a release with a drafter whole.)
COMPANION_LAYOUTS: Final = (PAIR_FILES, (MODEL_FILE, DRAFTER_FILE), (MODEL_FILE, PROJECTOR_FILE, DRAFTER_FILE))

ModelFormat = Literal["gguf", "onnx-genai", "gguf-mmproj"]
#: The formats that are folders of files rather than one file.
FOLDER_FORMATS: Final = frozenset({"onnx-genai", "gguf-mmproj"})
#: Most member files one folder model may list (bounds the work a device does for one release).
MAX_MODEL_FILES: Final = 256
#: One member's path relative to its folder: "/"-separated parts that do not start with a dot
#: (so no "..", no hidden files), at most 8 deep.
MEMBER_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}){0,7}$"
#: Suffixes a member may not have: the device's in-progress download names.
RESERVED_SUFFIXES: Final = (".part",)
#: A publisher's model-signing bundle is the companion target ``<model target>.sig``
#: (``model.gguf.sig``, or ``genai_config.json.sig`` beside a folder's members).
SIGNATURE_SUFFIX: Final = ".sig"
#: A release's evaluation set: the companion target ``models/<id>/<version>/eval.jsonl``.
EVAL_FILE: Final = "eval.jsonl"

MODEL_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9._:-]{0,127}$"
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
CHANNEL_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NUMERIC_VERSION_PATTERN: Final = r"^\d+(\.\d+){0,3}$"


class EvalMeta(BaseModel):
    """A release's evaluation gate (``custom.edgert.evaluation``): the set is the target :data:`EVAL_FILE`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: a percentage, not a fraction: TUF's canonical JSON signs no floats
    threshold_pct: int = Field(
        ge=0, le=100, description="Least percentage of the set's cases that must pass for a device to commit"
    )
    cases: int = Field(gt=0, description="Cases in the set (as published; the device counts them again)")

    @property
    def threshold(self) -> float:
        """The least score (a fraction 0..1) that commits."""
        return self.threshold_pct / 100


class ModelMeta(BaseModel):
    """What an operator signed about one model file (``custom.edgert`` of its target)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str = Field(pattern=MODEL_ID_PATTERN, description="Catalog-style id, e.g. gemma-4-e2b-it:q4_k_m")
    version: str = Field(pattern=VERSION_PATTERN, description="Operator's version of this model build")
    architecture: str = Field(description="GGUF general.architecture")
    quant: str | None = Field(None, description="Quantization from general.file_type, e.g. Q4_K_M")
    context_length: int | None = Field(None, gt=0, description="Trained context length")
    ram_mib: int = Field(gt=0, description="Memory the device needs to run it (MiB)")
    min_edgert_version: str = Field(
        pattern=NUMERIC_VERSION_PATTERN, description="Oldest edgert release that may install it"
    )
    file_name: str = Field(description="Base name of the .gguf (or of the model folder) as published")
    format: ModelFormat = Field(
        "gguf",
        description="gguf: one .gguf file; gguf-mmproj: model.gguf + its multimodal projector mmproj.gguf "
        "and/or its MTP drafter drafter.gguf; onnx-genai: an ONNX Runtime GenAI folder",
    )
    files: tuple[str, ...] = Field(
        (),
        max_length=MAX_MODEL_FILES,
        description="Folder models: every member file's path relative to the folder, each its own target "
        "models/<model-id>/<version>/<path>; empty for gguf",
    )
    evaluation: EvalMeta | None = Field(
        None, description=f"The release's evaluation gate; its set is the target models/<id>/<version>/{EVAL_FILE}"
    )

    @property
    def is_folder(self) -> bool:
        return self.format in FOLDER_FORMATS

    @model_validator(mode="after")
    def _check_files(self) -> ModelMeta:
        if not self.is_folder:
            if self.files:
                raise ValueError(f"a {self.format} model is one file; it lists no member files")
            return self
        if self.format == "gguf-mmproj":
            if self.files not in COMPANION_LAYOUTS:
                layouts = " or ".join(str(list(files)) for files in COMPANION_LAYOUTS)
                raise ValueError(f"a gguf-mmproj release has exactly the files {layouts}")
            return self
        for member in self.files:
            if not re.match(MEMBER_PATTERN, member) or member.endswith(RESERVED_SUFFIXES):
                raise ValueError(f"member file {member!r} is not a safe relative path")
            if posixpath.normpath(member) != member:
                raise ValueError(f"member file {member!r} is not a normalized relative path")
        if len(set(self.files)) != len(self.files):
            raise ValueError("member files are listed more than once")
        if FOLDER_ANCHOR not in self.files:
            raise ValueError(f"a {self.format} folder must contain {FOLDER_ANCHOR}")
        for reserved, what in ((MODEL_FILE, "the GGUF target name"), (EVAL_FILE, "the evaluation set's target name")):
            if reserved in self.files:
                raise ValueError(f"a {self.format} folder may not contain {reserved} ({what})")
        if FOLDER_ANCHOR + SIGNATURE_SUFFIX in self.files:
            raise ValueError(
                f"a {self.format} folder may not contain {FOLDER_ANCHOR}{SIGNATURE_SUFFIX} "
                "(the publisher signature's target name)"
            )
        return self

    def signed_custom(self) -> dict[str, Any]:
        """The ``custom.edgert`` object to sign: a GGUF's omits the folder fields, and a release without an
        evaluation set the ``evaluation`` field (older devices forbid fields they do not know)."""
        exclude = set() if self.is_folder else {"format", "files"}
        if self.evaluation is None:
            exclude.add("evaluation")
        return self.model_dump(mode="json", exclude=exclude or None)

    def evaluation_target(self) -> str | None:
        """The target of the release's evaluation set, or None when it has none."""
        return member_target_path(self.model_id, self.version, EVAL_FILE) if self.evaluation is not None else None

    def target_paths(self) -> tuple[str, ...]:
        """Every target that makes this model: the GGUF file, or each member of the folder."""
        if not self.is_folder:
            return (model_target_path(self.model_id, self.version),)
        return tuple(member_target_path(self.model_id, self.version, member) for member in self.files)


class ChannelPointer(BaseModel):
    """Which version of which model a channel offers, and to what share of the fleet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    target: str = Field(description="Target path of the promoted version")
    rollout: int = Field(ge=0, le=100, description="Percent of devices (by rollout bucket) that take it")
    previous_version: str | None = Field(
        None, description="Version devices outside the rollout stay on (the channel's earlier pointer)"
    )
    previous_target: str | None = None
    promoted_at: datetime


class Channels(BaseModel):
    """The whole ``channels.json`` document."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: dict[str, ChannelPointer] = Field(default_factory=dict)


def model_target_path(model_id: str, version: str, model_format: ModelFormat = "gguf") -> str:
    """The TUF target path that carries a model version's ModelMeta: predictable, so a device can ask
    for a pinned version (``model.gguf`` for a GGUF, with or without its projector; the folder's
    ``genai_config.json`` for an ONNX folder)."""
    name = FOLDER_ANCHOR if model_format == "onnx-genai" else MODEL_FILE
    return member_target_path(model_id, version, name)


def model_target_paths(model_id: str, version: str) -> tuple[str, ...]:
    """Where a version's ModelMeta may be, whatever its format (the GGUF path first)."""
    return (model_target_path(model_id, version), model_target_path(model_id, version, "onnx-genai"))


def member_target_path(model_id: str, version: str, member: str) -> str:
    """The TUF target path of one file of a model version (``member`` relative to its folder)."""
    return f"{version_prefix(model_id, version)}{member}"


def version_prefix(model_id: str, version: str) -> str:
    """Every target of a model version starts with this."""
    return f"models/{model_id}/{version}/"


def pointer_mismatch(
    pointer: ChannelPointer, meta: ModelMeta, target_path: str, *, pin_version: str | None
) -> str | None:
    """Why the signed model metadata found on ``target_path`` is not the release ``pointer`` offers; None when it is.

    The blocklist is checked against the pointer's versions before the target is read, so the target
    must carry exactly one of them: its ModelMeta sits on its own canonical target path and names the
    pointer's model and its version, previous version, or the operator's pinned version. A pointer
    saying 3.0.0 while naming 2.0.0's target would otherwise reinstall a blocklisted 2.0.0.
    """
    canonical = model_target_path(meta.model_id, meta.version, meta.format)
    if target_path != canonical:
        return f"{target_path} carries the metadata of {meta.model_id}@{meta.version}, whose target is {canonical}"
    offered = {pin_version} if pin_version is not None else {pointer.version, pointer.previous_version}
    if meta.model_id != pointer.model_id or meta.version not in offered:
        versions = ", ".join(sorted(version for version in offered if version is not None))
        return (
            f"the channel offers {pointer.model_id} {versions}, but its target {target_path} "
            f"is {meta.model_id}@{meta.version}"
        )
    return None


def version_key(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` -> ``(0, 10, 2)``; digits only, for the minimum-edgert check."""
    if not re.match(NUMERIC_VERSION_PATTERN, version):
        raise ValueError(f"not a dotted numeric version: {version!r}")
    return tuple(int(part) for part in version.split("."))
