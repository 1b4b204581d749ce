"""Prometheus metrics for one daemon, on their own registry (no module globals).

Engine counters are read from :class:`SchedulerStats` at scrape time, so the
engine thread never touches prometheus-client; request-level numbers (status
codes, TTFT, per-token latency) are recorded by the transports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from edgert import __version__
from edgert.serving.host import ServedModel
from edgert.serving.scheduler import SchedulerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[SchedulerStats, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats, n_ctx = self._stats()
        yield GaugeMetricFamily("edgert_queue_depth", "Requests waiting for a sequence slot", stats.queue_depth)
        yield GaugeMetricFamily("edgert_active_sequences", "Sequences being decoded", stats.active)
        yield GaugeMetricFamily(
            "edgert_kv_cache_used_ratio", "KV cells reserved / KV cells in all", stats.kv_reserved / n_ctx
        )
        yield GaugeMetricFamily("edgert_kv_cache_used_tokens", "KV cache cells reserved", stats.kv_reserved)
        yield CounterMetricFamily("edgert_prompt_tokens", "Prompt tokens prefilled", stats.prompt_tokens)
        yield CounterMetricFamily("edgert_generated_tokens", "Tokens generated", stats.generated_tokens)
        yield CounterMetricFamily("edgert_decode_steps", "Batched decode steps run", stats.steps)
        yield CounterMetricFamily(
            "edgert_rejected_requests", "Requests refused because the queue was full", stats.rejected
        )
        yield CounterMetricFamily("edgert_prefix_cache_hits", "Requests that reused a cached prefix", stats.prefix_hits)
        yield CounterMetricFamily(
            "edgert_prefix_cache_misses", "Requests with no usable cached prefix", stats.prefix_misses
        )
        yield CounterMetricFamily(
            "edgert_prefix_cache_tokens_reused",
            "Prompt tokens not recomputed thanks to the prefix cache",
            stats.prefix_tokens_reused,
        )
        yield GaugeMetricFamily("edgert_prefix_cache_entries", "Cached prefixes held", stats.prefix_entries)
        yield CounterMetricFamily("edgert_media_evaluated", "Images and audio clips encoded", stats.media_evals)
        yield CounterMetricFamily(
            "edgert_media_eval_seconds",
            "Seconds the engine spent encoding media (running streams wait that long, one medium at a time)",
            stats.media_eval_seconds,
        )
        yield CounterMetricFamily("edgert_draft_tokens", "Tokens drafted for speculative decoding", stats.draft_tokens)
        yield CounterMetricFamily(
            "edgert_draft_accepted_tokens", "Drafted tokens the model agreed with (emitted)", stats.draft_accepted
        )
        finished = CounterMetricFamily("edgert_sequences_finished", "Sequences finished, by reason", labels=["reason"])
        for reason, count in sorted(stats.finished.items()):
            finished.add_metric([reason], count)
        yield finished


class _ModelCollector(Collector):
    """``edgert_model_info`` asked of the model host at scrape time, so it follows every swap and rollback."""

    def __init__(self, served: Callable[[], ServedModel | None]) -> None:
        self._served = served

    def collect(self) -> Iterator[InfoMetricFamily]:
        served = self._served()
        if served is not None:
            yield InfoMetricFamily("edgert_model", "The model being served", value=served.labels())


class Metrics:
    def __init__(
        self,
        stats: Callable[[], tuple[SchedulerStats, int]],
        served: Callable[[], ServedModel | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._started = time.monotonic()
        self.requests = Counter(
            "edgert_requests", "Requests answered, by route and status", ["route", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "edgert_time_to_first_token_seconds",
            "Submit to first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "edgert_time_per_output_token_seconds",
            "Mean time between generated tokens of a request",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
            registry=self.registry,
        )
        self.mqtt_dropped = Counter(
            "edgert_mqtt_dropped",
            "MQTT requests, commands and resent replies dropped without a reply, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.build = Info("edgert_build", "edgert build", registry=self.registry)
        self.build.info({"version": __version__})
        uptime = Gauge("edgert_uptime_seconds", "Seconds since the daemon started", registry=self.registry)
        uptime.set_function(lambda: time.monotonic() - self._started)
        self.registry.register(_EngineCollector(stats))
        self.registry.register(_ModelCollector(served))

    def observe_finish(self, ttft_s: float | None, total_s: float, completion_tokens: int) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if completion_tokens > 1:
                self.token_latency.observe((total_s - ttft_s) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
