"""The scheduler's limits (:class:`SchedulerConfig`) and the counters it publishes (:class:`SchedulerStats`).

Apart from :mod:`edgert.serving.scheduler` so that the pieces it drives (the prefix KV
bookkeeping) and the readers of its counters (/metrics, telemetry) need not import the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgert.serving.prefix_cache import PrefixStore
from edgert.serving.speculation import SpeculativeMode


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    n_slots: int
    #: the most positions one request may use (prompt + generated)
    n_ctx: int
    n_batch: int
    prefill_chunk: int
    #: KV cells admission may reserve in all; 0 = n_ctx (one unified pool)
    kv_cells: int = 0
    #: each sequence has its own KV cells (llama.cpp kv_unified off)
    private_kv: bool = False
    max_queue: int = 64
    #: Retry-After hint given when the queue is full
    retry_after_s: float = 1.0
    #: sequence ids (beyond the slots) that hold cached prefixes; empty = no prefix cache
    prefix_seqs: tuple[int, ...] = ()
    prefix_min_tokens: int = 32
    prefix_max_tokens: int = 0
    #: where exact prefixes are persisted, or None
    prefix_store: PrefixStore | None = None
    #: speculative decoding with the backend's drafter: never, when measured costs say it pays, or always
    speculative: SpeculativeMode = "off"
    #: the most tokens drafted per sequence per step
    draft_max: int = 3
    #: the acceptance rate a new sequence is assumed to have until its own rounds are counted
    draft_acceptance_prior: float = 0.6


@dataclass(slots=True)
class SchedulerStats:
    """Counters read by /metrics and telemetry; written only by the engine thread."""

    queue_depth: int = 0
    active: int = 0
    kv_reserved: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_tokens_reused: int = 0
    prefix_entries: int = 0
    #: images and audio clips evaluated, and the seconds the engine spent on them (running streams waited)
    media_evals: int = 0
    media_eval_seconds: float = 0.0
    #: speculative decoding: tokens drafted and how many of them the model agreed with
    draft_tokens: int = 0
    draft_accepted: int = 0
    last_progress: float = field(default_factory=time.monotonic)
