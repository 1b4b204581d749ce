"""The scheduler's speculative-decoding step: which sequences draft how much, the drafter call, the bookkeeping.

The scheduler asks :meth:`SpeculativeSteps.draft` for drafts before it builds a step's batch, puts each
sequence's drafts behind its last token, and verifies them after the decode (``Scheduler._on_verify``),
reporting back through :meth:`verified` and :meth:`keep`. How many tokens each sequence drafts is the
:class:`~edgert.serving.speculation.SpeculationPolicy`'s call, from the decode and draft timings measured here.
"""

from __future__ import annotations

import logging
import time

from edgert.engine.base import DraftingBackend, DraftRequest
from edgert.errors import EngineError
from edgert.serving.scheduler_config import SchedulerConfig, SchedulerStats
from edgert.serving.sequence import SequenceState
from edgert.serving.speculation import SpeculationPolicy

log = logging.getLogger("edgert.scheduler")


class SpeculativeSteps:
    """Drafts for the generating sequences of one step; used only from the scheduler's engine thread."""

    def __init__(
        self, backend: DraftingBackend, policy: SpeculationPolicy, config: SchedulerConfig, stats: SchedulerStats
    ) -> None:
        self._backend = backend
        self.policy = policy
        self._config = config
        self._stats = stats

    def draft(self, active: list[SequenceState]) -> dict[int, list[int]]:
        """Slot -> draft tokens for this step (sequences missing draft nothing)."""
        generating = [s for s in active if s.prompt_fed == len(s.request.prompt) and s.sampler is not None]
        if not generating:
            return {}
        caps: dict[int, int] = {}
        for seq in generating:
            # never draft past max_tokens or the context: those rows could not be kept
            caps[seq.slot] = min(seq.request.max_tokens - seq.generated - 1, self._config.n_ctx - seq.n_past - 2)
        room = self._config.n_batch - len(generating)
        prefill = sum(
            min(len(s.request.prompt) - s.prompt_fed, self._config.prefill_chunk)
            for s in active
            if s.prompt_fed < len(s.request.prompt)
        )
        base = len(generating) + min(prefill, room)
        other = sum(1 for cap in caps.values() if cap <= 0)
        plan = self.policy.plan(caps, base, other)
        while sum(plan.values()) > room:  # the batch holds n_batch tokens: trim the longest drafts
            longest = max(plan, key=lambda slot: plan[slot])
            plan[longest] -= 1
            if plan[longest] == 0:
                del plan[longest]
        if not plan:
            return {}
        by_slot = {s.slot: s for s in generating}
        requests = [DraftRequest(slot, by_slot[slot].last_token, by_slot[slot].n_past, k) for slot, k in plan.items()]
        started = time.perf_counter()
        try:
            drafts = self._backend.draft(requests)
        except EngineError as exc:  # a failed draft costs this step its speculation, never a stream
            log.warning("draft step failed, decoding without drafts: %s", exc)
            return {}
        steps = max(len(d) for d in drafts) if drafts else 0
        if steps:
            self.policy.observe_draft_step(len(requests), (time.perf_counter() - started) / steps)
        return {r.seq: d for r, d in zip(requests, drafts, strict=True) if d}

    def decoded(self, n_tokens: int, seconds: float) -> None:
        self.policy.observe_decode(n_tokens, seconds)

    def verified(self, seq: SequenceState, drafted: int, accepted: int, *, finished: bool) -> None:
        if not finished:  # a finished sequence's slot was forgotten: its next holder starts afresh
            self.policy.observe_round(seq.slot, drafted, accepted)
        self._stats.draft_tokens += drafted
        self._stats.draft_accepted += accepted

    def keep(self, seq: SequenceState, batch_index: int) -> None:
        try:
            self._backend.keep_draft_state(seq.slot, batch_index)
        except EngineError as exc:  # only its next drafts suffer (they start from an older state)
            log.warning("no draft state for sequence %d: %s", seq.slot, exc)

    def forget(self, seq: SequenceState) -> None:
        self.policy.forget(seq.slot)
