"""What a generation request is and what comes back: the value types every transport shares.

A :class:`GenerationRequest` goes into the scheduler; :class:`TextChunk` items and one
:class:`Finished` come back through a :class:`~edgert.serving.stream.TokenStream`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from edgert.engine.base import MediaSpan, SamplingParams
from edgert.errors import EdgertError

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]


class Priority(IntEnum):
    """Lower runs first: a kiosk user waiting beats a batch job."""

    INTERACTIVE = 0
    BATCH = 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    priority: Priority = Priority.INTERACTIVE
    #: absolute ``time.monotonic()`` instant, or None for no deadline
    deadline: float | None = None
    request_id: str = ""
    #: keep generating past end-of-generation tokens (benchmarks need fixed lengths)
    ignore_eos: bool = False
    #: only compute the prompt's KV and keep it as a cached prefix (start-up warming)
    prefill_only: bool = False
    #: control tokens whose text the output parser needs (``<|tool_call>``...): the engine writes
    #: their text into the stream; every other control token stays silent, as in plain chat
    special_pieces: Mapping[int, bytes] = field(default_factory=dict)
    #: images and audio inside ``prompt`` (their positions hold placeholder tokens), in order
    media: tuple[MediaSpan, ...] = ()

    def media_boundary(self, n: int) -> int:
        """The largest prefix length <= ``n`` that does not cut a medium (media are evaluated whole)."""
        for span in self.media:
            if span.start < n < span.start + span.n_tokens:
                return span.start
        return n


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: seconds from submit to the first generated token; None when none was generated
    ttft_s: float | None
    #: seconds from submit to finish
    total_s: float
    error: EdgertError | None = None
    #: prompt tokens taken from the prefix cache instead of being computed
    cached_tokens: int = 0
    #: prompt positions that were images / audio
    image_tokens: int = 0
    audio_tokens: int = 0
