"""The media side of a scheduler step: which image or clip waits, evaluating one, letting go of the rest.

A medium is evaluated in two steps of its own, between decode steps: the projector's encoder
(``MediaBackend.encode_media``), then the text model over its embeddings (``decode_media``). On a CPU
each is seconds for an image, and the streams already running must keep decoding in between. The time
spent is the stall they see, ``stats.media_eval_seconds``. Runs only on the scheduler's engine thread
(and, for letting go of the media of a request that never ran, under its lock).
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
        """One piece of media work: write an encoded medium into its sequence, else encode a waiting one.

        Encoding and writing the embeddings (a text-model decode over them) are each seconds on a CPU for
        an image; done in separate steps, the running streams decode in between and never wait longer than
        the longer of the two. Returns the sequence and its error when the work failed.
        """
        if self._backend is None:
            return None
        waiting = [seq for seq in running if self.waiting(seq)]
        ready = [seq for seq in waiting if seq.request.media[seq.media_next].encoded is not None]
        for seq in ready[:1] or waiting[:1]:
            span = seq.request.media[seq.media_next]
            started = time.monotonic()
            try:
                if span.encoded is None:
                    self._backend.encode_media(span)
                else:
                    self._backend.decode_media(seq.slot, span, seq.n_past)
                    self._backend.release_media(span)
                    seq.media_next += 1
                    seq.prompt_fed += span.n_tokens
                    seq.n_past += span.n_tokens
                    self._stats.prompt_tokens += span.n_tokens
                    self._stats.media_evals += 1
            except EdgertError as exc:
                self._backend.release_media(span)
                return seq, exc
            finally:
                self._stats.media_eval_seconds += time.monotonic() - started
        return None

    def release(self, span: MediaSpan) -> None:
        if self._backend is not None:
            self._backend.release_media(span)
