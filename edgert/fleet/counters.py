"""Per-release request counters, added up over devices and time windows (pure: no I/O).

Devices publish cumulative :class:`~edgert.api.mqtt_schemas.VersionCounters` per served release since
their daemon started. A fleet figure is a sum over devices; a window is the difference of two readings of
the same device and release. A reading whose ``started`` changed, or any of whose counters went down, is
a restart: the new reading is the whole window's work (what ran before the restart is lost, not negative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgert.api.mqtt_schemas import TTFT_BUCKETS_S, VersionCounters

#: TTFT histogram length: one count per upper bound, then +Inf
BUCKETS = len(TTFT_BUCKETS_S) + 1


def _no_buckets() -> tuple[int, ...]:
    return (0,) * BUCKETS


def ttft_quantile(buckets: tuple[int, ...] | list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of time to first token from histogram counts, None without requests.

    Linear within the bucket it falls in (lower bound 0 for the first), as Prometheus' histogram_quantile
    does; one that falls in the open +Inf bucket is given as the last finite bound (a lower bound: "at
    least 30 s")."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside 0..1")
    total = sum(buckets)
    if total == 0 or len(buckets) != BUCKETS:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(buckets[:-1]):
        if count and below + count >= rank:
            lower = TTFT_BUCKETS_S[index - 1] if index else 0.0
            upper = TTFT_BUCKETS_S[index]
            return lower + (upper - lower) * max(rank - below, 0) / count
        below += count
    return TTFT_BUCKETS_S[-1]


@dataclass(frozen=True)
class Totals:
    """Counters of one release, summed over devices (and, for a window, over its difference)."""

    devices: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_s: float = 0.0
    ttft_buckets: tuple[int, ...] = field(default_factory=_no_buckets)

    @classmethod
    def of(cls, counters: VersionCounters) -> Totals:
        """One device's reading. A histogram of another length (another edgert's bucket bounds) cannot be
        added to ours bucket by bucket: its TTFT is left out, its other counters count."""
        buckets = tuple(counters.ttft_buckets) if len(counters.ttft_buckets) == BUCKETS else _no_buckets()
        return cls(
            devices=1,
            requests_ok=counters.requests_ok,
            requests_failed=counters.requests_failed,
            prompt_tokens=counters.prompt_tokens,
            completion_tokens=counters.completion_tokens,
            decode_s=counters.decode_s,
            ttft_buckets=buckets,
        )

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            devices=self.devices + other.devices,
            requests_ok=self.requests_ok + other.requests_ok,
            requests_failed=self.requests_failed + other.requests_failed,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            decode_s=self.decode_s + other.decode_s,
            ttft_buckets=tuple(a + b for a, b in zip(self.ttft_buckets, other.ttft_buckets, strict=True)),
        )

    def minus(self, earlier: Totals) -> Totals | None:
        """This reading less an earlier one of the same device and release; None when a counter went
        down (the daemon restarted in between)."""
        decode_s = self.decode_s - earlier.decode_s
        diff = Totals(
            devices=self.devices,
            requests_ok=self.requests_ok - earlier.requests_ok,
            requests_failed=self.requests_failed - earlier.requests_failed,
            prompt_tokens=self.prompt_tokens - earlier.prompt_tokens,
            completion_tokens=self.completion_tokens - earlier.completion_tokens,
            decode_s=max(decode_s, 0.0),
            ttft_buckets=tuple(a - b for a, b in zip(self.ttft_buckets, earlier.ttft_buckets, strict=True)),
        )
        counts = (
            diff.requests_ok,
            diff.requests_failed,
            diff.prompt_tokens,
            diff.completion_tokens,
            *diff.ttft_buckets,
        )
        # float sums: a difference of -1e-9 is rounding, not a restart
        if min(counts) < 0 or decode_s < -1e-6:
            return None
        return diff

    @property
    def requests(self) -> int:
        return self.requests_ok + self.requests_failed

    @property
    def error_rate(self) -> float | None:
        return self.requests_failed / self.requests if self.requests else None

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second of decoding (first token to last), the model's generation speed."""
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else None

    @property
    def prompt_tokens_per_request(self) -> float | None:
        return self.prompt_tokens / self.requests if self.requests else None

    @property
    def completion_tokens_per_request(self) -> float | None:
        return self.completion_tokens / self.requests if self.requests else None

    def ttft(self, q: float) -> float | None:
        return ttft_quantile(self.ttft_buckets, q)


def window(start: VersionCounters | None, end: VersionCounters) -> Totals:
    """What one device did for one release between two readings (``start`` None: it began in the window)."""
    now = Totals.of(end)
    if start is None or start.started != end.started:
        return now
    diff = now.minus(Totals.of(start))
    return now if diff is None else diff
