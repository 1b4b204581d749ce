"""The wire form of media in a chat message (OpenAI content parts) and the marker that stands for each.

These models live here rather than in :mod:`edgert.api.schemas` (which re-exports them) so that
:mod:`edgert.media` never imports the API package: the schemas need :data:`MEDIA_MARKER`, and the
engine may use :mod:`edgert.media`'s types while it may not see ``edgert.api`` at all.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: What a chat template sees in place of each medium, in order; the prompt code hands it to
#: ``mtmd_tokenize``, which puts the medium (between Gemma 4's ``<|image>`` ... ``<image|>``) there.
#: Random per process, as llama-server's ``get_media_marker()``, so user text cannot forge one.
MEDIA_MARKER = f"<__media_{secrets.token_hex(16)}__>"


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    #: a ``data:image/...;base64,`` URL, or ``https://`` for a host in ``serve.media_url_hosts``
    url: str = Field(min_length=1)
    #: OpenAI's fidelity hint: "low" downscales to 512 px on the longest side (about 85 tokens on
    #: Gemma 4 E2B/E4B, as OpenAI's low detail); "auto" and "high" keep up to ``serve.media_max_side``
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    #: the encoded file in base64 (a ``data:audio/...;base64,`` URL is accepted too, as llama-server does)
    data: str = Field(min_length=1)
    format: Literal["wav", "mp3"]


class InputAudioPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_audio"]
    input_audio: InputAudio
