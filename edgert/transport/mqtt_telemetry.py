"""One telemetry reading of the device, as :class:`~edgert.api.mqtt_schemas.Telemetry` (no paho here).

:mod:`.mqtt` publishes a reading every ``mqtt.telemetry_interval_s`` and whenever the link comes back,
retained, so ``edgert fleet status`` reads every device's latest one at once. The per-release counters
(:mod:`edgert.serving.release_counters`) make ``edgert fleet compare`` possible: they are cumulative since
``started``, so two readings of one device give a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import psutil

from edgert.api.mqtt_schemas import LinkCounters, MemoryReading, Telemetry, VersionCounters
from edgert.serving.release_counters import ReleaseCounters
from edgert.transport.shared import ServingState


class TelemetrySampler:
    """Makes readings; remembers the last one's generated-token count for the tokens/s of the interval."""

    def __init__(self, state: ServingState, device_id: str) -> None:
        self._state = state
        self._device_id = device_id
        self._last_tokens = 0
        self._last_at = time.monotonic()

    async def reading(self, link: LinkCounters) -> Telemetry:
        """A reading now (memory and temperature are read on a worker thread: /proc and /sys)."""
        service = self._state.service
        stats = service.stats()[0] if service is not None else None
        now = time.monotonic()
        tokens = stats.generated_tokens if stats is not None else 0
        # A swap starts the new engine's counter from 0: that interval's rate is unknown, not negative.
        rate = max(tokens - self._last_tokens, 0) / max(now - self._last_at, 1e-9)
        self._last_tokens, self._last_at = tokens, now
        memory, temperature = await asyncio.to_thread(_readings)
        return Telemetry(
            ts=time.time(),
            device_id=self._device_id,
            uptime_s=round(now - self._state.started, 3),
            tokens_per_s=round(rate, 2),
            queue_depth=stats.queue_depth if stats else 0,
            active=stats.active if stats else 0,
            requests_finished=sum(stats.finished.values()) if stats else 0,
            rejected=stats.rejected if stats else 0,
            memory=memory,
            temperature_c=temperature,
            mqtt=link,
            versions=version_counters(service.host.releases) if service is not None else [],
        )


def version_counters(counters: ReleaseCounters) -> list[VersionCounters]:
    """The per-release counters as they travel (seconds rounded to the millisecond: bytes on the wire)."""
    return [
        VersionCounters(
            release=release,
            started=round(counters.started, 3),
            requests_ok=count.requests_ok,
            requests_failed=count.requests_failed,
            prompt_tokens=count.prompt_tokens,
            completion_tokens=count.completion_tokens,
            decode_s=round(count.decode_s, 3),
            ttft_buckets=count.ttft_buckets,
        )
        for release, count in counters.snapshot().items()
    ]


def _readings() -> tuple[MemoryReading, float | None]:
    """RAM and the hottest readable temperature sensor (reads /proc and /sys: run off the loop)."""
    vm = psutil.virtual_memory()
    memory = MemoryReading(
        rss_bytes=psutil.Process().memory_info().rss, available_bytes=vm.available, total_bytes=vm.total
    )
    temperature: float | None = None
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        with contextlib.suppress(OSError, RuntimeError):
            readings = [entry.current for group in sensors().values() for entry in group if entry.current]
            temperature = max(readings) if readings else None
    return memory, temperature
