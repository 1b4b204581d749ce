"""The daemon's update loop survives every fault of a round (issue 13, finding 2).

Before the fix the loop caught only ``EdgertError``: an ``OSError`` from the state
write (ENOSPC), a hook without a shebang (``Exec format error``), a lock file that
cannot be opened (left by ``sudo edgert update apply``), or a ``TimeoutError`` from
the model switch ended it for good, silently, and later nudges did nothing. Each
case here runs the real loop (in-process, in an event loop) against a real registry
on nginx: the faulty round fails with a named reason, recorded in ``/update/status``
and counted in the metrics, the loop stays alive, and the next nudge, once the fault
is gone, installs the release.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from edgert.identity import ReleaseIdentity
from edgert.model_switch import RuntimeModelSwitch
from edgert.update import state as state_module
from edgert.update_service import UpdateService
from tests.integration.update_support import MODEL_ID, Fleet, device_settings, write_hook


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


class FlakySwitch(RuntimeModelSwitch):
    """The real switch, whose first ``load_beside`` times out (as a wait on a busy event loop does)."""

    timeouts = 1

    def load_beside(self, path: Path, release: ReleaseIdentity | None = None) -> None:
        if self.timeouts:
            self.timeouts -= 1
            raise TimeoutError
        super().load_beside(path, release)


def failures(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgert_update_failures_total"
    }


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


Fault = Callable[[pytest.MonkeyPatch, Path], Callable[[], None]]


def disk_full(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], None]:
    """ENOSPC from every atomic write of the state file (a full disk cannot be made here without root mounts)."""

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state_module, "write_atomic", full)
    return monkeypatch.undo


def hook_without_shebang(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], None]:
    hook = write_hook(tmp_path / "hooks", "pre-download", "exit 0")
    hook.write_text("echo no interpreter line\n")  # execve: Exec format error
    return hook.unlink


def unusable_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], None]:
    # The lock left by `sudo edgert update apply` is root's and read-only to the service user; these
    # tests run as root, which may open any file, so the lock's path is made a directory instead:
    # opening it fails with an OSError in the same place.
    lock = tmp_path / "device" / "update" / "lock"
    lock.mkdir(parents=True)
    return lambda: shutil.rmtree(lock)


def switch_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], None]:
    return lambda: None  # FlakySwitch times out once by itself


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (disk_full, "disk_full"),
        (hook_without_shebang, "hook"),
        (unusable_lock, "lock"),
        (switch_timeout, "timeout"),
    ],
)
def test_update_loop_survives_a_failed_round_and_the_next_nudge_installs(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch, fault: Fault, reason: str
) -> None:
    settings = device_settings(tmp_path / "device", fleet, hooks_dir=str(tmp_path / "hooks"))
    (tmp_path / "hooks").mkdir()
    metrics = CollectorRegistry()
    repair = fault(monkeypatch, tmp_path)

    async def scenario() -> None:
        updates = UpdateService(settings, metrics)
        switch = FlakySwitch(settings)
        switch.timeouts = 1 if fault is switch_timeout else 0
        task = updates.start_loop(switch)
        assert task is not None
        try:
            await wait_for(lambda: failures(metrics).get(reason, 0) >= 1, f"a failure counted as {reason}")
            status = updates.status()
            assert str(status["last_error"]).startswith(f"{reason}: "), status
            assert status["loop"]["running"] is True, status  # type: ignore[index]
            assert not task.done()

            repair()
            updates.nudge.set()
            # the round's report, not the state file: the commit is saved a moment before the round returns
            committed = f"committed {MODEL_ID}@1.0.0"
            await wait_for(lambda: updates.status()["loop"]["last_round"] == committed, "the next round to install")  # type: ignore[index]
            assert _current(updates) == f"{MODEL_ID}@1.0.0"
            assert failures(metrics)[reason] == 1
        finally:
            updates.stop()
            await asyncio.gather(task, return_exceptions=True)
            switch.close()

    asyncio.run(scenario())


def _current(updates: UpdateService) -> str | None:
    current = updates.status().get("current")
    return f"{current['meta']['model_id']}@{current['meta']['version']}" if isinstance(current, dict) else None
