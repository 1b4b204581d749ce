"""The media side of a scheduler step: which image or clip waits, evaluating one, letting go of the rest.

Media are evaluated whole (``MediaBackend.eval_media``: encode, then write the embeddings into the
sequence), one per step, between decode steps: encoding is the heaviest thing a CPU does here, and the
streams already running must keep decoding. The time spent is the stall they see,
``stats.media_eval_seconds``. Runs only on the scheduler's engine thread (and, for letting go of the
media of a request that never ran, under its lock).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from edgert.engine.base import Backend, MediaBackend, MediaSpan, SequenceBackend
from edgert.errors import EdgertError
from edgert.serving.scheduler_config import SchedulerStats
from edgert.serving.sequence import SequenceState


class MediaSteps:
    def __init__(self, backend: Backend | SequenceBackend, stats: SchedulerStats) -> None:
        self._backend = backend if isinstance(backend, MediaBackend) else None
        self._stats = stats

    def pending(self, seq: SequenceState) -> MediaSpan | None:
        """The next medium this sequence still has to evaluate; media its cached prefix covered are let go."""
        media = seq.request.media
        while seq.media_next < len(media):
            span = media[seq.media_next]
            if span.start >= seq.prompt_fed:
                return span
            self.release(span)
            seq.media_next += 1
        return None

    def waiting(self, seq: SequenceState) -> bool:
        """Whether the sequence's prefill stands at a medium (its text tokens wait until it is evaluated)."""
        span = self.pending(seq)
        return span is not None and span.start == seq.prompt_fed

    def eval_one(self, running: Iterable[SequenceState]) -> tuple[SequenceState, EdgertError] | None:
        """Evaluate the first waiting medium; the sequence and its error when that failed."""
        if self._backend is None:
            return None
        for seq in running:
            span = self.pending(seq)
            if span is None or span.start != seq.prompt_fed:
                continue
            started = time.monotonic()
            try:
                self._backend.eval_media(seq.slot, span, seq.n_past)
            except EdgertError as exc:
                return seq, exc
            finally:
                self._backend.release_media(span)
            seq.media_next += 1
            seq.prompt_fed += span.n_tokens
            seq.n_past += span.n_tokens
            self._stats.prompt_tokens += span.n_tokens
            self._stats.media_evals += 1
            self._stats.media_eval_seconds += time.monotonic() - started
            return None
        return None

    def release(self, span: MediaSpan) -> None:
        if self._backend is not None:
            self._backend.release_media(span)
