"""Admission and continuous batching: the single owner of the engine.

One engine thread owns the backend. Requests arrive from the event loop through
:meth:`Scheduler.submit`, wait in a bounded priority queue, and join the running
batch between decode steps when a sequence slot and enough KV cache are free.
Each step puts, into one ``llama_batch``, the last sampled token of every
generating sequence plus a bounded chunk of prompt from sequences still
prefilling — so a long prompt never stalls the streams already running. Finished,
cancelled and expired sequences leave at once and free their slot and KV cells.

Tokens travel back to the event loop through :class:`TokenStream` (an async
iterator) via ``loop.call_soon_threadsafe``; nothing on the engine thread waits
for a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from edgert.engine.base import Backend, BatchToken, Sampler, SamplingParams, SequenceBackend, SequenceHandle
from edgert.errors import (
    BadRequestError,
    DeadlineExceededError,
    EdgertError,
    EngineError,
    OverloadedError,
    PromptTooLongError,
)
from edgert.serving.prefix_cache import Match, PrefixCache, PrefixEntry, PrefixStore
from edgert.serving.tokens import TextAssembler

log = logging.getLogger("edgert.scheduler")

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
    last_progress: float = field(default_factory=time.monotonic)


class TokenStream:
    """What a transport iterates: text chunks, then :attr:`result`.

    Iteration raises the request's error instead when it failed before any text
    was produced (deadline in the queue, engine failure), so a transport can still
    answer with a proper status.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, scheduler: Scheduler) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TextChunk | Finished] = asyncio.Queue()
        self._scheduler = scheduler
        self._seq: _Sequence | None = None
        self.result: Finished | None = None
        self.produced_text = False
        #: called on the event loop when the request's end arrives, read or not (the model host counts requests)
        self.on_finished: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop generating; takes effect before the next decode step."""
        if self.result is None and self._seq is not None:
            self._scheduler.cancel(self._seq)

    def __aiter__(self) -> AsyncIterator[TextChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TextChunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, Finished):
                self.result = item
                if item.error is not None and not self.produced_text:
                    raise item.error
                return
            self.produced_text = True
            yield item

    async def collect(self) -> tuple[str, Finished]:
        parts = [chunk.text async for chunk in self]
        assert self.result is not None
        return "".join(parts), self.result


class _Outbox:
    """What one engine step produced, handed to each event loop in one call.

    One wake-up of the event loop per step instead of one per token: on a 2-core
    device every context switch is time taken from llama.cpp's compute threads.
    """

    def __init__(self) -> None:
        self._items: list[tuple[TokenStream, TextChunk | Finished]] = []

    def put(self, stream: TokenStream, item: TextChunk | Finished) -> None:
        self._items.append((stream, item))

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, TextChunk | Finished]]] = {}
        for stream, item in self._items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        self._items = []
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is gone (process shutting down), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[TokenStream, TextChunk | Finished]]) -> None:
    """On the event loop: hand each stream its items, in order."""
    for stream, item in items:
        stream._queue.put_nowait(item)
        if isinstance(item, Finished) and stream.on_finished is not None:
            stream.on_finished()


@dataclass(eq=False, slots=True)
class _Sequence:
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


def _slot_of(seq: _Sequence) -> int:
    return seq.slot


@dataclass(frozen=True, slots=True)
class _PrefixPlan:
    match: Match
    #: tokens to take from the entry (the last prompt token is always computed)
    reuse: int
    #: False when the sliding window no longer holds the positions the reuse needs
    usable: bool


class Scheduler:
    """Drives a batch backend (llama.cpp: one decode for all sequences per step) or a
    sequence backend (onnxruntime-genai: one token per sequence per step, round-robin)."""

    def __init__(self, backend: Backend | SequenceBackend, config: SchedulerConfig) -> None:
        if config.n_slots + len(config.prefix_seqs) > backend.info.n_seq_max:
            raise ValueError("more slots than the backend's context has sequences")
        self._sequence_backend: SequenceBackend | None = None
        self._batch_backend: Backend | None = None
        if isinstance(backend, SequenceBackend):
            self._sequence_backend = backend
            if config.prefix_seqs:
                raise ValueError("the prefix cache needs a batch backend")
        else:
            self._batch_backend = backend
        self._info = backend.info
        self._config = config
        self._cv = threading.Condition()
        self._pending: list[tuple[int, int, _Sequence]] = []
        self._active: list[_Sequence] = []
        # A min-heap: the lowest free slot first, so running sequences keep low, adjacent ids.
        # With private per-sequence KV (kv_unified off) llama.cpp puts tokens of several
        # sequences into one micro-batch only when their ids are consecutive and in order.
        self._free_slots = list(range(config.n_slots))
        self._order = itertools.count()
        self._running = False
        self._thread: threading.Thread | None = None
        self._outbox = _Outbox()
        #: private KV: exact entries whose stream copy llama.cpp runs at the next decode, saved after it
        self._unsaved: list[PrefixEntry] = []
        self.stats = SchedulerStats()
        self._prefix = (
            PrefixCache(
                list(config.prefix_seqs),
                min_tokens=config.prefix_min_tokens,
                max_tokens=config.prefix_max_tokens,
                n_swa=self._info.n_swa,
            )
            if config.prefix_seqs
            else None
        )

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def kv_cells(self) -> int:
        return self._config.kv_cells or self._config.n_ctx

    @property
    def _backend(self) -> Backend:
        """The batch backend; only batch code paths (and the prefix cache) use this."""
        assert self._batch_backend is not None
        return self._batch_backend

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._load_saved_prefixes()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="edgert-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything, wait for the engine thread, free the backend's slots."""
        with self._cv:
            self._running = False
            for seq in self._active:
                seq.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def idle(self) -> bool:
        with self._cv:
            return not self._active and not self._pending

    # ------------------------------------------------------------ admission
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; call from the event loop. Raises at once when it cannot run."""
        loop = asyncio.get_running_loop()
        if not request.prompt:
            raise PromptTooLongError("the prompt is empty", param="messages")
        if len(request.prompt) >= self._config.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(request.prompt)} tokens but the context holds {self._config.n_ctx}; shorten it",
                param="messages",
            )
        stream = TokenStream(loop, self)
        seq = _Sequence(request, stream, time.monotonic(), next(self._order))
        seq.reserve = min(len(request.prompt) + request.max_tokens, self._config.n_ctx)
        stream._seq = seq
        with self._cv:
            if not self._running:
                raise OverloadedError("the engine is shutting down", retry_after_s=self._config.retry_after_s)
            # Free slots will take queued requests on the engine's next turn, so they count as room.
            if len(self._pending) >= self._config.max_queue + len(self._free_slots):
                self.stats.rejected += 1
                raise OverloadedError(
                    f"queue full ({self._config.max_queue} waiting)", retry_after_s=self._config.retry_after_s
                )
            heapq.heappush(self._pending, (int(request.priority), seq.order, seq))
            self.stats.queue_depth = len(self._pending)
            self._cv.notify()
        return stream

    def cancel(self, seq: _Sequence) -> None:
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def _expire_queued(self, now: float) -> None:
        """Drop queued requests whose client left or whose deadline passed, wherever they wait. Holds the lock."""
        keep = []
        for item in self._pending:
            seq = item[2]
            if seq.cancelled:
                self._emit_finish(seq, "cancelled", now, None)
            elif seq.request.deadline is not None and now >= seq.request.deadline:
                self._emit_finish(seq, "deadline", now, DeadlineExceededError("deadline passed while queued"))
            else:
                keep.append(item)
        if len(keep) != len(self._pending):
            heapq.heapify(keep)
            self._pending = keep

    def _admit(self, now: float) -> None:
        """Move queued requests into free slots while the KV budget allows. Holds the lock."""
        self._expire_queued(now)
        while self._pending and self._free_slots:
            _, _, seq = self._pending[0]
            plan = self._plan_prefix(seq)
            shared, reuse = (plan.match.entry, plan.reuse) if plan is not None and plan.usable else (None, 0)
            # Cells taken from a cached prefix are shared, not copied: count them once, in the entry.
            need = seq.reserve - reuse
            if shared is not None:
                shared.users += 1  # the room made below must not evict it
            if not self._make_room(need):
                if shared is not None:
                    shared.users -= 1
                break
            heapq.heappop(self._pending)
            seq.slot = heapq.heappop(self._free_slots)
            seq.reserve = need
            self.stats.kv_reserved += need
            self._active.append(seq)
            self._attach_prefix(seq, plan, now)
        self.stats.queue_depth = len(self._pending)
        self.stats.active = len(self._active)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._active and not self._pending:
                    self.stats.last_progress = time.monotonic()
                    self._cv.wait(timeout=1.0)
                if not self._running and not self._active:
                    self._fail_pending()
                    self._outbox.flush()
                    return
                now = time.monotonic()
                self._admit(now)
                self._reap(now)
            if self._active:
                try:
                    if self._sequence_backend is None:
                        self._step()
                    else:
                        self._step_sequences(self._sequence_backend)
                except Exception:  # a bug must not kill the engine thread and leave every client hanging
                    log.exception("engine step failed; failing the running sequences")
                    self._fail_active(EngineError("internal engine error; see the daemon log"))
            self._outbox.flush()
            self.stats.last_progress = time.monotonic()

    def _fail_active(self, error: EdgertError) -> None:
        now = time.monotonic()
        for seq in list(self._active):
            try:
                self._finish(seq, "error", now, error)
            except Exception:  # keep freeing the other sequences
                log.exception("could not free sequence %d", seq.slot)

    def _fail_pending(self) -> None:
        now = time.monotonic()
        while self._pending:
            _, _, seq = heapq.heappop(self._pending)
            self._emit_finish(seq, "cancelled", now, OverloadedError("the engine stopped before this ran"))
        self.stats.queue_depth = 0

    def _reap(self, now: float) -> None:
        """Finish cancelled and expired sequences before spending a step on them."""
        for seq in list(self._active):
            if seq.cancelled:
                self._finish(seq, "cancelled", now)
            elif seq.request.deadline is not None and now >= seq.request.deadline:
                error = DeadlineExceededError("the request's deadline passed during generation")
                self._finish(seq, "deadline", now, error)

    def _build_batch(self) -> tuple[list[BatchToken], list[tuple[int, _Sequence]]]:
        batch: list[BatchToken] = []
        samples: list[tuple[int, _Sequence]] = []
        # Private KV: sequences in slot order, each one's tokens together (see _free_slots);
        # a unified pool takes any order, and prompts are fed oldest first.
        running = sorted(self._active, key=_slot_of) if self._config.private_kv else self._active
        budget = self._config.n_batch - sum(1 for seq in running if seq.prompt_fed == len(seq.request.prompt))
        for seq in running:
            prompt = seq.request.prompt
            remaining = len(prompt) - seq.prompt_fed
            if remaining == 0:
                samples.append((len(batch), seq))
                batch.append(BatchToken(seq.slot, seq.last_token, seq.n_past, True))
                continue
            if budget == 0:
                continue
            take = min(remaining, budget, self._config.prefill_chunk)
            if seq.snapshot_at is not None and seq.snapshot_exact and seq.prompt_fed < seq.snapshot_at:
                # stop exactly at a shared-prefix boundary; a candidate (the whole prompt but its
                # last token) is copied after the step instead, so the prompt is not split and the
                # first token does not wait one more decode step
                take = min(take, seq.snapshot_at - seq.prompt_fed)
            for offset in range(take):
                index = seq.prompt_fed + offset
                last = index == len(prompt) - 1
                if last:
                    samples.append((len(batch), seq))
                batch.append(BatchToken(seq.slot, prompt[index], index, last))
            budget -= take
        return batch, samples

    def _step(self) -> None:
        batch, samples = self._build_batch()
        unsaved, self._unsaved = self._unsaved, []
        try:
            self._backend.decode(batch)
        except EdgertError as exc:
            now = time.monotonic()
            for seq in {id(s): s for s in self._active if any(t.seq == s.slot for t in batch)}.values():
                self._finish(seq, "error", now, exc)
            return
        if unsaved:
            self._persist_copied(unsaved)
        self.stats.steps += 1
        fed: dict[int, int] = {}
        for token in batch:
            fed[token.seq] = fed.get(token.seq, 0) + 1
        for seq in self._active:
            count = fed.get(seq.slot, 0)
            if seq.prompt_fed < len(seq.request.prompt):
                seq.prompt_fed += count
                self.stats.prompt_tokens += count
            seq.n_past += count
            if seq.snapshot_at is not None and seq.prompt_fed >= seq.snapshot_at:
                self._snapshot(seq.slot, seq.request.prompt[: seq.snapshot_at], exact=seq.snapshot_exact, owner=seq)
                seq.snapshot_at = None
        now = time.monotonic()
        for batch_index, seq in samples:
            self._on_logits(seq, batch_index, now)

    def _step_sequences(self, backend: SequenceBackend) -> None:
        """One token for every running sequence, in admission order (no shared batch)."""
        self.stats.steps += 1
        for seq in list(self._active):
            if seq.handle is None:
                prompt = seq.request.prompt
                max_length = min(self._config.n_ctx, len(prompt) + seq.request.max_tokens)
                try:
                    seq.handle = backend.start(list(prompt), seq.request.sampling, max_length)
                except EdgertError as exc:
                    self._finish(seq, "error", time.monotonic(), exc)
                    continue
                seq.prompt_fed = seq.n_past = len(prompt)
                self.stats.prompt_tokens += len(prompt)
                seq.assembler = TextAssembler(seq.request.stop)
            token, piece = backend.next_token(seq.handle)
            seq.n_past += 1
            self._on_token(seq, token, piece, time.monotonic())
        # onnxruntime-genai keeps the GIL while it computes a token; without a pause here the
        # event loop (streaming, disconnects, new requests) only gets it every switch interval.
        time.sleep(0)

    def _on_logits(self, seq: _Sequence, batch_index: int, now: float) -> None:
        backend = self._backend
        if seq.request.prefill_only:
            self._finish(seq, "stop", now)
            return
        if seq.sampler is None:
            try:
                seq.sampler = backend.new_sampler(seq.request.sampling)
            except EdgertError as exc:
                error = BadRequestError(f"response_format: {exc.message}", param="response_format")
                self._finish(seq, "error", now, error)
                return
            seq.assembler = TextAssembler(seq.request.stop)
        token = backend.sample(seq.sampler, batch_index)
        self._on_token(seq, token, backend.token_bytes(token), now)

    def _on_token(self, seq: _Sequence, token: int, piece: bytes, now: float) -> None:
        """The same for both backends: end of generation, stop strings, limits, streaming."""
        assert seq.assembler is not None
        if seq.first_token_at is None:
            seq.first_token_at = now
        backend = self._sequence_backend or self._batch_backend
        assert backend is not None
        if backend.is_end_of_generation(token) and not seq.request.ignore_eos:
            self._finish(seq, "stop", now)
            return
        seq.generated += 1
        self.stats.generated_tokens += 1
        step = seq.assembler.feed(piece)
        if step.delta:
            self._outbox.put(seq.stream, TextChunk(step.delta))
        if step.stopped:
            self._finish(seq, "stop", now)
        elif seq.generated >= seq.request.max_tokens or seq.n_past + 1 >= self._config.n_ctx:
            self._finish(seq, "length", now)
        else:
            seq.last_token = token

    def _finish(self, seq: _Sequence, reason: FinishReason, now: float, error: EdgertError | None = None) -> None:
        if seq.assembler is not None and reason != "stop":
            tail = seq.assembler.flush()
            if tail:
                self._outbox.put(seq.stream, TextChunk(tail))
        if self._sequence_backend is not None:
            if seq.handle is not None:
                self._sequence_backend.release(seq.handle)
                seq.handle = None
        else:
            self._backend.seq_remove(seq.slot)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        with self._cv:
            self._active.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
            self.stats.kv_reserved -= seq.reserve
            if seq.shared is not None:
                seq.shared.users -= 1
                seq.shared = None
            self.stats.active = len(self._active)
        self._emit_finish(seq, reason, now, error)

    def _emit_finish(self, seq: _Sequence, reason: FinishReason, now: float, error: EdgertError | None) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        ttft = seq.first_token_at - seq.submitted if seq.first_token_at is not None else None
        self._outbox.put(
            seq.stream,
            Finished(
                reason=reason,
                prompt_tokens=len(seq.request.prompt),
                completion_tokens=seq.generated,
                ttft_s=ttft,
                total_s=now - seq.submitted,
                error=error,
                cached_tokens=seq.cached,
            ),
        )

    # --------------------------------------------------------- prefix cache
    def _make_room(self, need: int) -> bool:
        """True when ``need`` more KV cells fit, evicting cached prefixes if that is what it takes."""
        while self.stats.kv_reserved + need > self.kv_cells:
            victim = self._prefix.lru() if self._prefix is not None else None
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _plan_prefix(self, seq: _Sequence) -> _PrefixPlan | None:
        """The cached prefix a queued sequence would start from, if any (decided before admission)."""
        cache = self._prefix
        if cache is None or seq.request.prefill_only:
            return None
        prompt = seq.request.prompt
        match = cache.best_match(prompt)
        if match is None or match.common < cache.min_tokens:
            return None
        reuse = min(match.common, len(prompt) - 1)  # the last prompt token always yields the first logits
        usable = cache.usable(match, reuse, self._backend.seq_pos_min(match.entry.seq))
        return _PrefixPlan(match, reuse, usable)

    def _attach_prefix(self, seq: _Sequence, plan: _PrefixPlan | None, now: float) -> None:
        """Give a newly admitted sequence its planned cached prefix, and plan a snapshot."""
        cache = self._prefix
        if cache is None:
            return
        prompt = seq.request.prompt
        if seq.request.prefill_only:
            if cache.has_exact(prompt):
                seq.prompt_fed = seq.n_past = len(prompt)
                self._finish(seq, "stop", now)
            else:
                seq.snapshot_at, seq.snapshot_exact = len(prompt), True
            return
        if plan is not None and plan.usable:
            entry, reuse = plan.match.entry, plan.reuse
            self._copy_prefix(entry.seq, seq.slot, reuse)
            seq.prompt_fed = seq.n_past = seq.cached = reuse
            seq.shared = entry  # pinned by _admit
            cache.touch(entry)
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reuse
            if reuse < len(entry) and not cache.has_exact(prompt[:reuse]):
                # the shared part ends inside this entry: keep exactly the shared part
                self._snapshot(entry.seq, prompt[:reuse], exact=True)
            return
        if plan is not None:
            if not cache.has_exact(prompt[: plan.reuse]):
                seq.snapshot_at, seq.snapshot_exact = plan.reuse, True
        elif len(prompt) - 1 >= cache.min_tokens:
            seq.snapshot_at, seq.snapshot_exact = len(prompt) - 1, False
        self.stats.prefix_misses += 1

    def _snapshot(
        self, source_seq: int, tokens: tuple[int, ...], *, exact: bool, owner: _Sequence | None = None
    ) -> None:
        """Copy positions [0, len(tokens)) of ``source_seq`` into a cache entry (cells are shared, not copied).

        With ``owner`` (the running sequence that computed the cells) the cells move from the
        owner's reservation to the entry, which the owner then shares; otherwise they are counted anew.
        """
        cache = self._prefix
        if cache is None or len(tokens) > cache.max_tokens:
            return
        need = len(tokens)
        while not cache.free_seqs or cache.tokens_held + need > cache.max_tokens:
            victim = cache.lru()
            if victim is None or (victim.exact and not exact):
                return  # a mere candidate never pushes out a proven shared prefix
            self._evict(victim)
        transfer = owner is not None and owner.shared is None and owner.reserve >= need
        if not transfer and self.stats.kv_reserved + need > self.kv_cells:
            return
        seq_id = cache.take_seq()
        assert seq_id is not None
        self._copy_prefix(source_seq, seq_id, need)
        entry = cache.add(tokens, seq_id, exact=exact)
        if transfer:
            assert owner is not None
            owner.reserve -= need
            owner.shared = entry
            entry.users += 1
        else:
            self.stats.kv_reserved += need
        self.stats.prefix_entries = len(cache.entries)
        store = self._config.prefix_store
        if exact and store is not None:
            if self._config.private_kv:
                self._unsaved.append(entry)
            else:
                self._persist(store, entry)

    def _copy_prefix(self, source_seq: int, target_seq: int, n_tokens: int) -> None:
        """Positions [0, n_tokens) of ``source_seq`` into the empty ``target_seq``.

        One KV pool: the cells get one more sequence tag, nothing moves. Private KV: llama.cpp
        copies only whole sequence streams, so the whole source is copied and the tail dropped;
        the data moves at the start of the next decode (saving such an entry waits for that).
        """
        backend = self._backend
        if not self._config.private_kv:
            backend.seq_copy(source_seq, target_seq, 0, n_tokens)
            return
        backend.seq_copy(source_seq, target_seq)
        backend.seq_remove(target_seq, n_tokens)

    def _persist_copied(self, entries: list[PrefixEntry]) -> None:
        """Save entries whose (private KV) stream copy the decode just made, if still cached."""
        store, cache = self._config.prefix_store, self._prefix
        if store is None or cache is None:
            return
        for entry in entries:
            if entry in cache.entries:
                self._persist(store, entry)

    def _persist(self, store: PrefixStore, entry: PrefixEntry) -> None:
        path = store.path_for(entry.tokens)
        tmp = path.with_suffix(".tmp")
        try:
            store.directory.mkdir(parents=True, exist_ok=True)
            self._backend.save_seq_state(entry.seq, tmp, list(entry.tokens))
            tmp.replace(path)
        except (OSError, EdgertError) as exc:
            log.warning("could not persist a cached prefix to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _evict(self, entry: PrefixEntry) -> None:
        assert self._prefix is not None
        assert entry.users == 0, "a prefix entry in use cannot be evicted"
        self._backend.seq_remove(entry.seq)
        self._prefix.drop(entry)
        self.stats.kv_reserved -= len(entry)
        self.stats.prefix_entries = len(self._prefix.entries)
        store = self._config.prefix_store
        if entry.exact and store is not None:
            with contextlib.suppress(OSError):
                store.path_for(entry.tokens).unlink()

    def _load_saved_prefixes(self) -> None:
        """Restore persisted prefixes (newest first) before the engine thread starts."""
        cache, store = self._prefix, self._config.prefix_store
        if cache is None or store is None:
            return
        for path in store.saved():
            seq_id = cache.take_seq()
            if seq_id is None:
                break
            try:
                tokens = tuple(self._backend.load_seq_state(seq_id, path, cache.max_tokens))
            except EdgertError as exc:
                tokens = ()
                log.warning("ignoring cached prefix %s: %s", path.name, exc)
            room = cache.tokens_held + len(tokens) <= cache.max_tokens
            if not tokens or not store.verify(path, tokens) or not room:
                self._backend.seq_remove(seq_id)
                cache.free_seqs.append(seq_id)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            cache.add(tokens, seq_id, exact=True)
            self.stats.kv_reserved += len(tokens)
        self.stats.prefix_entries = len(cache.entries)
        if cache.entries:
            log.info("restored %d cached prefixes from %s", len(cache.entries), store.directory)


__all__ = [
    "EngineError",
    "Finished",
    "GenerationRequest",
    "Priority",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "TextChunk",
    "TokenStream",
]
