"""One request as the engine thread tracks it: :class:`SequenceState` (slot, sampler, progress, KV held).

Written only by the scheduler's engine thread (and, under its lock, by admission);
transports never see it -- they hold the request's :class:`~edgert.serving.stream.TokenStream`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgert.engine.base import Sampler, SequenceHandle
from edgert.serving.prefix_cache import PrefixEntry
from edgert.serving.request import GenerationRequest
from edgert.serving.stream import TokenStream
from edgert.serving.tokens import TextAssembler


@dataclass(eq=False, slots=True)
class SequenceState:
    request: GenerationRequest
    stream: TokenStream
    submitted: float
    order: int
    slot: int = -1
    sampler: Sampler | None = None
    #: the generator of a SequenceBackend (onnxruntime-genai)
    handle: SequenceHandle | None = None
    assembler: TextAssembler | None = None
    prompt_fed: int = 0
    n_past: int = 0
    last_token: int = -1
    generated: int = 0
    first_token_at: float | None = None
    cancelled: bool = False
    #: KV cells this sequence holds alone (prompt + max_tokens, less what it shares with a prefix entry)
    reserve: int = 0
    cached: int = 0
    #: the prefix cache entry whose cells this sequence shares (pinned while it runs)
    shared: PrefixEntry | None = None
    #: take a prefix snapshot when the prefill reaches this many tokens
    snapshot_at: int | None = None
    snapshot_exact: bool = False
    #: index into ``request.media`` of the first medium not yet evaluated (or skipped: cached)
    media_next: int = 0


def slot_of(seq: SequenceState) -> int:
    return seq.slot
