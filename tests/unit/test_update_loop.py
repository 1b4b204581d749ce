"""The update loop's own rules: failure backoff, surviving any exception, supervision (issue 13, finding 2)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from edgert.errors import UntrustedMetadataError
from edgert.update.loop import RoundReport, Supervisor, backoff_delay, run_update_loop
from edgert.update.orchestrator import ApplyResult


def test_backoff_after_failures_doubles_up_to_the_cap() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, initial_s=30.0, cap_s=3600.0, jitter_s=0.0, rng=rng) for n in range(1, 10)]
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    assert delays[-1] == 3600.0
    jittered = backoff_delay(1, initial_s=30.0, cap_s=3600.0, jitter_s=10.0, rng=rng)
    assert 30.0 <= jittered <= 40.0


async def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class _Updater:
    """Stands in for Updater: its rounds raise the scripted exceptions, then succeed."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.config = SimpleNamespace(check_interval_s=3600.0, check_jitter_s=0.0, retry_initial_s=3600.0)

    def apply(self) -> ApplyResult:
        if self.errors:
            raise self.errors.pop(0)
        return ApplyResult("up-to-date", None, "nothing offered")


def test_loop_survives_any_exception_names_it_and_runs_the_next_nudged_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    updater = _Updater([KeyError("bug"), UntrustedMetadataError("bad signature", reason="signature")])
    reports: list[RoundReport] = []

    async def scenario() -> None:
        nudge = asyncio.Event()
        task = asyncio.create_task(
            run_update_loop(updater, nudge=nudge, on_round=reports.append)  # type: ignore[arg-type]
        )
        for expected in (1, 2, 3):
            await _wait_for(lambda n=expected: len(reports) >= n, f"round {expected}")  # type: ignore[misc]
            nudge.set()
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="edgert.update.loop"):
        asyncio.run(scenario())
    assert [report.reason for report in reports[:3]] == ["internal", "signature", None]
    assert reports[0].outcome.startswith("failed (internal): KeyError")
    assert reports[2].outcome == "up-to-date -"
    # the unexpected error is logged once with its traceback; the named one in one line
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1 and "KeyError" in caplog.text


def test_supervisor_restarts_a_task_that_died_and_not_one_that_was_stopped(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def body() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("escaped the loop")
        await asyncio.Event().wait()

    async def scenario() -> Supervisor:
        supervisor = Supervisor(body, name="edgert-update", restart_delay_s=0.01)
        supervisor.start()
        await _wait_for(lambda: len(runs) == 2, "the restart")
        supervisor.stop()
        await asyncio.sleep(0.05)
        return supervisor

    supervisor = asyncio.run(scenario())
    assert supervisor.restarts == 1
    assert len(runs) == 2
    assert "escaped the loop" in caplog.text
    assert any(r.exc_info is not None for r in caplog.records)
