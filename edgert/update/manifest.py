"""The edgert part of the signed TUF metadata: model facts and channel pointers.

TUF signs each target file's ``custom`` object together with its length and
hashes, so whatever edgert puts there is as trustworthy as the file itself.
``edgert registry`` writes these shapes and the device reads them back; this
module is the one definition both sides share (pure: pydantic only, no TUF).

Two kinds of target carry edgert data::

    models/<model-id>/<version>/model.gguf    custom = {"edgert": ModelMeta}
    channels.json                             custom = {"edgert_channels": Channels}

Channel pointers live in the ``custom`` object of the ``channels.json`` target
rather than in a side file: a device learns them from the verified targets
metadata alone (``get_targetinfo("channels.json")``), without downloading
anything. The file's bytes are the same document, for humans with curl.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

CHANNELS_TARGET: Final = "channels.json"
MODEL_KEY: Final = "edgert"
CHANNELS_KEY: Final = "edgert_channels"
#: Every model target's base name; the operator's original name is kept in ModelMeta.file_name.
MODEL_FILE: Final = "model.gguf"

MODEL_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9._:-]{0,127}$"
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
CHANNEL_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NUMERIC_VERSION_PATTERN: Final = r"^\d+(\.\d+){0,3}$"


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
    file_name: str = Field(description="Base name of the .gguf as published")


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


def model_target_path(model_id: str, version: str) -> str:
    """The TUF target path of a model version: predictable, so a device can ask for a pinned version."""
    return f"models/{model_id}/{version}/{MODEL_FILE}"


def version_key(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` -> ``(0, 10, 2)``; digits only, for the minimum-edgert check."""
    if not re.match(NUMERIC_VERSION_PATTERN, version):
        raise ValueError(f"not a dotted numeric version: {version!r}")
    return tuple(int(part) for part in version.split("."))
