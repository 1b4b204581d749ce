"""What each served release did since the daemon started: requests, errors, tokens, time to first token.

The fleet compares versions from these (``edgert fleet compare``): the counters are cumulative and never
reset while the daemon runs, so a reader takes the difference of two readings with the same ``started``.

A request counts against the release whose runtime ran it (the model host knows which runtime a request
holds), so a swap in the middle of a run never mixes versions: the requests still finishing on the old
model count for the old release. Everything here runs on the event loop -- a request's end is delivered
there, and telemetry reads there -- so the hot path takes no lock: one dict lookup and a few additions.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field, replace

from edgert.api.mqtt_schemas import TTFT_BUCKETS_S
from edgert.serving.request import Finished

#: releases whose counters are kept (and published): the served one and those just before it. A device that
#: takes an update a day for a year without a restart must not send 365 of them every telemetry interval.
MAX_RELEASES = 4


@dataclass(slots=True)
class ReleaseCount:
    """One release's cumulative numbers (see :class:`edgert.api.mqtt_schemas.VersionCounters`)."""

    requests_ok: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: seconds from first token to last, summed over requests that produced a token
    decode_s: float = 0.0
    #: requests per time-to-first-token bucket (upper bounds TTFT_BUCKETS_S, then +Inf); not cumulative
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_S) + 1))


class ReleaseCounters:
    """Per-release counters of finished requests; written and read on the event loop only."""

    def __init__(self, max_releases: int = MAX_RELEASES) -> None:
        #: Unix time counting started (the daemon's start): a reader spots a restart by a new value
        self.started = time.time()
        self._max = max_releases
        #: least recently counted first
        self._by_release: dict[str, ReleaseCount] = {}
        self._last: str | None = None

    def record(self, release: str, result: Finished) -> None:
        """Count one finished request of ``release`` (``<id>@<version>``, or ``<id>`` off the registry).

        A cancelled request (its client went away, the daemon stopped) says nothing about the release: not
        counted. A deadline or an error is a failure: its tokens and time still count.
        """
        if result.reason == "cancelled":
            return
        if release != self._last:  # a swap (or the first request): keep the order of recency, bound the count
            self._last = release
            count = self._by_release.pop(release, None) or ReleaseCount()
            while len(self._by_release) >= self._max:
                del self._by_release[next(iter(self._by_release))]
            self._by_release[release] = count
        count = self._by_release[release]
        if result.error is not None or result.reason in ("error", "deadline"):
            count.requests_failed += 1
        else:
            count.requests_ok += 1
        count.prompt_tokens += result.prompt_tokens
        count.completion_tokens += result.completion_tokens
        if result.ttft_s is not None:
            count.decode_s += max(result.total_s - result.ttft_s, 0.0)
            count.ttft_buckets[bisect.bisect_left(TTFT_BUCKETS_S, result.ttft_s)] += 1

    def snapshot(self) -> dict[str, ReleaseCount]:
        """Copies of the kept releases' counts, the most recently counted last."""
        return {
            release: replace(count, ttft_buckets=list(count.ttft_buckets))
            for release, count in self._by_release.items()
        }
