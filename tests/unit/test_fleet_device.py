"""The device side of fleet operations (issue 18), below the daemon: per-release counters, the undone release.

Counters are fed real :class:`Finished` values; the swap test runs two real runtimes on the tiny GGUF, so
the request that finishes on the old model after the swap is attributed by the model host, not by a fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edgert.api.mqtt_schemas import TTFT_BUCKETS_S, Telemetry
from edgert.api.schemas import CompletionRequest
from edgert.errors import DeadlineExceededError, EngineError
from edgert.identity import ReleaseIdentity
from edgert.serving.host import ModelHost
from edgert.serving.release_counters import ReleaseCounters
from edgert.serving.request import Finished
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.service import InferenceService, Limits
from edgert.settings import Settings, load_settings
from edgert.transport.mqtt_telemetry import version_counters
from edgert.update import state as st
from edgert.update.state import Phase
from edgert.update_service import UpdateService
from tests.unit.test_update_transitions import NOW, V1, V2, V3, in_phase


def finished(reason: str = "stop", *, ttft: float | None = 0.2, total: float = 1.0, tokens: int = 5) -> Finished:
    error = {"deadline": DeadlineExceededError("late"), "error": EngineError("boom")}.get(reason)
    return Finished(reason, prompt_tokens=7, completion_tokens=tokens, ttft_s=ttft, total_s=total, error=error)  # type: ignore[arg-type]


def test_counters_split_ok_and_failed_per_release_and_skip_cancelled_requests() -> None:
    counters = ReleaseCounters()
    counters.record("m@1", finished("stop"))
    counters.record("m@1", finished("length", ttft=0.1, total=0.6))
    counters.record("m@1", finished("deadline", ttft=None, total=2.0, tokens=0))  # late in the queue
    counters.record("m@1", finished("cancelled"))  # the client left: nothing about the release
    counters.record("m@2", finished("error", ttft=31.0, total=40.0))
    snapshot = counters.snapshot()
    assert list(snapshot) == ["m@1", "m@2"]
    one, two = snapshot["m@1"], snapshot["m@2"]
    assert (one.requests_ok, one.requests_failed) == (2, 1)
    assert (one.prompt_tokens, one.completion_tokens) == (21, 10)
    assert one.decode_s == pytest.approx(0.8 + 0.5)  # first token to last; the deadline one had none
    assert (two.requests_ok, two.requests_failed) == (0, 1)
    assert len(one.ttft_buckets) == len(TTFT_BUCKETS_S) + 1
    # le-buckets: 0.1 falls in the 0.1 bucket, 0.2 in the 0.25 one, 31 s past the last bound (+Inf)
    assert one.ttft_buckets[TTFT_BUCKETS_S.index(0.1)] == 1
    assert one.ttft_buckets[TTFT_BUCKETS_S.index(0.25)] == 1
    assert sum(one.ttft_buckets) == 2
    assert two.ttft_buckets[-1] == 1


def test_only_the_most_recently_served_releases_are_kept() -> None:
    counters = ReleaseCounters(max_releases=2)
    for release in ("m@1", "m@2", "m@1", "m@3"):  # m@1 again after a rollback: recent again, m@2 goes first
        counters.record(release, finished())
    assert {release: count.requests_ok for release, count in counters.snapshot().items()} == {"m@1": 2, "m@3": 1}


def test_a_snapshot_is_a_copy_and_travels_as_telemetry_version_counters() -> None:
    counters = ReleaseCounters()
    counters.record("m@1", finished())
    snapshot = counters.snapshot()
    counters.record("m@1", finished())
    assert snapshot["m@1"].requests_ok == 1
    assert sum(snapshot["m@1"].ttft_buckets) == 1  # the list too is a copy
    (wire,) = version_counters(counters)
    assert (wire.release, wire.requests_ok, wire.started) == ("m@1", 2, round(counters.started, 3))
    # it fits the payload schema the fleet reads
    reading = Telemetry.model_validate(
        {
            "ts": 0,
            "device_id": "d",
            "uptime_s": 1,
            "tokens_per_s": 0,
            "queue_depth": 0,
            "active": 0,
            "requests_finished": 2,
            "rejected": 0,
            "memory": {"rss_bytes": 1, "available_bytes": 1, "total_bytes": 1},
            "mqtt": {
                "connected": True,
                "reconnects": 0,
                "buffered": 0,
                "dropped": 0,
                "duplicates": 0,
                "bad_payloads": 0,
                "requests": 0,
            },
            "versions": [wire.model_dump()],
        }
    )
    assert reading.versions[0].ttft_buckets == wire.ttft_buckets


@pytest.fixture
def runtimes(tmp_path: Path, tiny_gguf: Path) -> Iterator[tuple[Runtime, Runtime]]:
    settings = load_settings(
        state_dir=tmp_path, engine={"n_ctx": 512, "n_parallel": 2, "n_threads": 1, "prefix_cache_entries": 0}
    )
    old, new = open_runtime(settings, str(tiny_gguf)), open_runtime(settings, str(tiny_gguf))
    yield old, new
    for runtime in (old, new):
        runtime.close()


def test_a_request_that_finishes_after_a_swap_counts_for_the_release_that_ran_it(
    runtimes: tuple[Runtime, Runtime],
) -> None:
    old, new = runtimes
    host = ModelHost.serving_runtime(old, ReleaseIdentity("m", "1"))
    host.ready = True
    service = InferenceService(host, Limits(default_timeout_s=60, max_tokens_cap=16))
    ask = CompletionRequest(prompt="Once upon a time", max_tokens=16, ignore_eos=True, temperature=0)

    async def scenario() -> None:
        on_old = await service.generate(ask, "on-old")
        # swapped before its end can reach the loop (it is delivered there): it still counts for m@1
        host.retire(host.serve(new, ReleaseIdentity("m", "2")) or old)
        on_new = await service.generate(ask, "on-new")
        await on_old.collect()
        await on_new.collect()

    asyncio.run(scenario())
    counts = host.releases.snapshot()
    assert {release: count.requests_ok for release, count in counts.items()} == {"m@1": 1, "m@2": 1}
    assert counts["m@1"].completion_tokens == counts["m@2"].completion_tokens == 16


def test_an_undone_release_is_kept_past_the_round_for_the_fleet() -> None:
    # a failed health check: rolled back, blocklisted, and named with its reason
    state = st.begin_health_check(st.begin_activation(in_phase(Phase.STAGED)))
    state = st.rolled_back(st.begin_rollback(state, "m@3 failed its health check: no tokens"), now=NOW)
    assert (state.last_rollback, state.last_rollback_reason) == ("m@3", "m@3 failed its health check: no tokens")
    # a committed release later does not erase it: the fleet still sees what this device refused
    state = st.start_download(state, V1.model_copy(update={"file_name": "m@4.gguf"}), now=NOW)
    assert state.last_rollback == "m@3"

    # a hook veto is the device refusing the release; a download the channel dropped is not
    vetoed = st.abandoned(in_phase(Phase.STAGED), "pre-install hook vetoed m@3: busy", now=NOW, refused=True)
    assert (vetoed.last_rollback, vetoed.last_rollback_reason) == ("m@3", "pre-install hook vetoed m@3: busy")
    dropped = st.abandoned(in_phase(Phase.DOWNLOADING), "download of m@3 dropped: moved on", now=NOW)
    assert dropped.last_rollback is None

    manual = st.manual_rollback(st.UpdateState(current=V2, previous=V1), now=NOW)
    assert (manual.last_rollback, manual.last_rollback_reason) == ("m@2", "manual rollback to m@1")


def test_undone_reasons_lose_credentials_like_last_error() -> None:
    reason = "m@3 failed: https://user:secret@registry.example/targets/x?token=abc"
    state = st.rolled_back(st.begin_rollback(in_phase(Phase.HEALTH_CHECK), reason), now=NOW)
    assert state.last_rollback_reason is not None
    assert "secret" not in state.last_rollback_reason
    assert "token=abc" not in state.last_rollback_reason


def test_a_rollback_under_way_names_its_own_release_and_reason(tmp_path: Path) -> None:
    """From begin_rollback on, the blocklist names the release: the deploy message must not pair it with an
    earlier rollback's reason (the fleet controller's halt line quoted 3.0.0's reason for 4.0.0)."""
    updates = UpdateService(Settings(state_dir=tmp_path), CollectorRegistry())
    try:
        earlier = st.rolled_back(st.begin_rollback(in_phase(Phase.HEALTH_CHECK), "m@2 did not load"), now=NOW)
        assert earlier.last_rollback is not None
        again = earlier.model_copy(update={"phase": Phase.HEALTH_CHECK, "pending": V3})
        undoing = st.begin_rollback(again, "m@3 failed its health check: camera driver rejects it")
        deploy = updates.deploy_of(undoing, device_id="d")
        assert (deploy.phase, deploy.rolled_back) == ("rolling_back", "m@3")
        assert deploy.rollback_reason == "m@3 failed its health check: camera driver rejects it"
        done = updates.deploy_of(st.rolled_back(undoing, now=NOW), device_id="d")
        assert (done.phase, done.rolled_back, done.rollback_reason) == ("idle", "m@3", deploy.rollback_reason)
    finally:
        updates.stop()  # it holds the update lock file
