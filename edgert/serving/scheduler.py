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

This module owns the queue, the slots, the KV budget and the step loop; admission and the
loop stay together (~440 lines) because both change that state under one lock. Beside it:
request and result types (:mod:`.request`), the stream and per-step outbox (:mod:`.stream`),
per-request engine state (:mod:`.sequence`), limits and counters (:mod:`.scheduler_config`),
the prefix cache's KV bookkeeping (:mod:`.prefix_kv`), media evaluation (:mod:`.media_steps`),
speculative decoding's drafts and draft lengths (:mod:`.speculative_step`, :mod:`.speculation`; the
verification stays here, in ``_on_verify``, because it emits tokens like ``_on_logits``).
Transports import the names from here.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import threading
import time

from edgert.engine.base import Backend, BatchToken, DraftingBackend, SequenceBackend
from edgert.errors import (
    BadRequestError,
    DeadlineExceededError,
    EdgertError,
    EngineError,
    OverloadedError,
    PromptTooLongError,
)
from edgert.serving.media_steps import MediaSteps
from edgert.serving.prefix_kv import PrefixKV
from edgert.serving.request import Finished, FinishReason, GenerationRequest, Priority, TextChunk
from edgert.serving.scheduler_config import SchedulerConfig, SchedulerStats
from edgert.serving.sequence import SequenceState, slot_of
from edgert.serving.speculation import SpeculationPolicy
from edgert.serving.speculative_step import SpeculativeSteps
from edgert.serving.stream import Outbox, TokenStream
from edgert.serving.tokens import TextAssembler

log = logging.getLogger("edgert.scheduler")


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
        self._pending: list[tuple[int, int, SequenceState]] = []
        self._active: list[SequenceState] = []
        # A min-heap: the lowest free slot first, so running sequences keep low, adjacent ids.
        # With private per-sequence KV (kv_unified off) llama.cpp puts tokens of several
        # sequences into one micro-batch only when their ids are consecutive and in order.
        self._free_slots = list(range(config.n_slots))
        self._order = itertools.count()
        self._running = False
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()
        self.stats = SchedulerStats()
        self._prefix = PrefixKV(self._backend, config, self.stats, self.kv_cells) if config.prefix_seqs else None
        self._media = MediaSteps(backend, self.stats)
        self._spec: SpeculativeSteps | None = None
        if isinstance(backend, DraftingBackend) and backend.can_draft and config.speculative != "off":
            policy = SpeculationPolicy(config.speculative, config.draft_max, config.draft_acceptance_prior)
            self._spec = SpeculativeSteps(backend, policy, config, self.stats)

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
        if self._prefix is not None:
            self._prefix.load_saved()
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
        stream = TokenStream(loop)
        seq = SequenceState(request, stream, time.monotonic(), next(self._order))
        seq.reserve = min(len(request.prompt) + request.max_tokens, self._config.n_ctx)
        stream._cancel = functools.partial(self.cancel, seq)
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

    def cancel(self, seq: SequenceState) -> None:
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
            plan = self._prefix.plan(seq) if self._prefix is not None else None
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
            if self._prefix is not None and self._prefix.attach(seq, plan):
                self._finish(seq, "stop", now)
        self.stats.queue_depth = len(self._pending)
        self.stats.active = len(self._active)

    def _make_room(self, need: int) -> bool:
        """True when ``need`` more KV cells fit, evicting cached prefixes if that is what it takes."""
        while self.stats.kv_reserved + need > self.kv_cells:
            if self._prefix is None or not self._prefix.evict_lru():
                return False
        return True

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

    def _build_batch(self, drafts: dict[int, list[int]]) -> tuple[list[BatchToken], list[tuple[int, SequenceState]]]:
        batch: list[BatchToken] = []
        samples: list[tuple[int, SequenceState]] = []
        # Private KV: sequences in slot order, each one's tokens together (see _free_slots);
        # a unified pool takes any order, and prompts are fed oldest first.
        running = sorted(self._active, key=slot_of) if self._config.private_kv else self._active
        budget = self._config.n_batch - sum(
            1 + len(drafts.get(seq.slot, ())) for seq in running if seq.prompt_fed == len(seq.request.prompt)
        )
        for seq in running:
            prompt = seq.request.prompt
            remaining = len(prompt) - seq.prompt_fed
            if remaining == 0:
                samples.append((len(batch), seq))
                batch.append(BatchToken(seq.slot, seq.last_token, seq.n_past, True))
                # drafts ride behind the last token at the next positions, each with logits to verify it
                for offset, token in enumerate(drafts.get(seq.slot, ())):
                    batch.append(BatchToken(seq.slot, token, seq.n_past + 1 + offset, True))
                continue
            if budget == 0:
                continue
            if self._media.waiting(seq):
                continue  # its medium is evaluated on its own, before a step (MediaSteps)
            take = min(remaining, budget, self._config.prefill_chunk)
            span = self._media.pending(seq)
            if span is not None:
                take = min(take, span.start - seq.prompt_fed)
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
        failed = self._media.eval_one(self._active)
        if failed is not None:
            self._finish(failed[0], "error", time.monotonic(), failed[1])
        drafts = self._spec.draft(self._active) if self._spec is not None else {}
        batch, samples = self._build_batch(drafts)
        unsaved = self._prefix.take_unsaved() if self._prefix is not None else []
        try:
            started = time.perf_counter()
            self._backend.decode(batch)
            if self._spec is not None:
                self._spec.decoded(len(batch), time.perf_counter() - started)
        except EdgertError as exc:
            now = time.monotonic()
            for seq in {id(s): s for s in self._active if any(t.seq == s.slot for t in batch)}.values():
                self._finish(seq, "error", now, exc)
            return
        if unsaved:
            assert self._prefix is not None
            self._prefix.persist_copied(unsaved)
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
                assert self._prefix is not None  # only the prefix cache plans snapshots
                self._prefix.snapshot(
                    seq.slot, seq.request.prompt[: seq.snapshot_at], exact=seq.snapshot_exact, owner=seq
                )
                seq.snapshot_at = None
        now = time.monotonic()
        for batch_index, seq in samples:
            draft = drafts.get(seq.slot)
            if draft:
                self._on_verify(seq, batch_index, draft, now)
                continue
            self._on_logits(seq, batch_index, now)
            if self._spec is not None and seq.sampler is not None:  # still generating
                self._spec.keep(seq, batch_index)

    def _on_verify(self, seq: SequenceState, batch_index: int, draft: list[int], now: float) -> None:
        """Sample the rows of ``seq``'s last token and drafts in order while the samples agree with the drafts.

        Every token comes from the model's own sampler on the logits after the accepted prefix, so the output
        is what plain decoding gives (greedy: the same tokens; sampling: the same distribution); the drafts
        only decide how many rows were computed ahead. Rejected positions leave the KV cache.
        """
        assert self._spec is not None and seq.sampler is not None
        backend = self._backend
        seq.n_past -= len(draft)  # the step counted every draft as fed; only agreed ones stay
        accepted = 0
        for offset in range(len(draft) + 1):
            token = backend.sample(seq.sampler, batch_index + offset)
            piece = seq.request.special_pieces.get(token)
            self._on_token(seq, token, backend.token_bytes(token) if piece is None else piece, now)
            if seq.sampler is None:  # finished: end of generation, a stop string, a limit
                break
            if offset == len(draft) or token != draft[offset]:
                break
            accepted += 1
            seq.n_past += 1
        self._spec.verified(seq, len(draft), accepted, finished=seq.sampler is None)
        if seq.sampler is not None:
            backend.seq_remove(seq.slot, seq.n_past, -1)
            self._spec.keep(seq, batch_index + accepted)

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

    def _on_logits(self, seq: SequenceState, batch_index: int, now: float) -> None:
        backend = self._backend
        if seq.request.prefill_only:
            self._finish(seq, "stop", now)
            return
        if seq.sampler is None:
            try:
                seq.sampler = backend.new_sampler(seq.request.sampling)
            except EdgertError as exc:
                field = "tools" if seq.request.sampling.grammar is not None else "response_format"
                error = BadRequestError(f"{field}: {exc.message}", param=field)
                self._finish(seq, "error", now, error)
                return
            seq.assembler = TextAssembler(seq.request.stop)
        token = backend.sample(seq.sampler, batch_index)
        piece = seq.request.special_pieces.get(token)
        self._on_token(seq, token, backend.token_bytes(token) if piece is None else piece, now)

    def _on_token(self, seq: SequenceState, token: int, piece: bytes, now: float) -> None:
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

    def _finish(self, seq: SequenceState, reason: FinishReason, now: float, error: EdgertError | None = None) -> None:
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
        if self._spec is not None:
            self._spec.forget(seq)
        with self._cv:
            self._active.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
            self.stats.kv_reserved -= seq.reserve
            if seq.shared is not None:
                seq.shared.users -= 1
                seq.shared = None
            self.stats.active = len(self._active)
        self._emit_finish(seq, reason, now, error)

    def _emit_finish(self, seq: SequenceState, reason: FinishReason, now: float, error: EdgertError | None) -> None:
        for span in seq.request.media:  # whatever was not evaluated: queued, cancelled, failed
            self._media.release(span)
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
                image_tokens=sum(span.n_tokens for span in seq.request.media if span.kind == "image"),
                audio_tokens=sum(span.n_tokens for span in seq.request.media if span.kind == "audio"),
            ),
        )


__all__ = [
    "EngineError",
    "FinishReason",
    "Finished",
    "GenerationRequest",
    "Priority",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "TextChunk",
    "TokenStream",
]
