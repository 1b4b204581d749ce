"""Faults during an update: ``kill -9`` of ``edgert update apply`` in each phase, a registry host that dies.

After every fault the old model must still be the committed one, and the next
``edgert update apply`` must end consistent: resumed (the download continues
with an HTTP Range request) or finished, never half-installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgert.update.state import Phase, StateStore, UpdateState
from tests.integration.update_support import MODEL_ID, Fleet, device_env, edgert_cmd, make_variant, write_hook

#: Throttle for the registry's /targets/ so a 1.6 MB download takes a few seconds.
SLOW_BYTES_PER_S = 250_000


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


def apply_cli(env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run(
        edgert_cmd("update", "apply", "--json"), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def start_apply(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        edgert_cmd("update", "apply", "--json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def kill_hook(pid_file: Path) -> None:
    """The hook runs in its own process group (a real power cut would end it too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def blocking_hook(go: Path, pid_file: Path) -> str:
    """Hook body: pass once ``go`` exists, else publish the hook's pid and block until killed."""
    return f"[ -e {go} ] && exit 0; echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; sleep 60"


def state_of(device_dir: Path) -> UpdateState:
    return StateStore(device_dir / "update").load()


def assert_serving(device_dir: Path, version: str) -> None:
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.version == version
    link = device_dir / "models" / "current.gguf"
    assert os.readlink(link) == f"versions/tiny-gemma4+f16@{version}.gguf"
    assert link.resolve().is_file()


def install_v1_then_release_v2(tmp_path: Path, fleet: Fleet, env: dict[str, str]) -> None:
    assert apply_cli(env)["outcome"] == "committed"
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))


def throttle(fleet: Fleet, rate: int | None) -> None:
    fleet.host.stop()
    fleet.host.rate = rate
    fleet.host.start()


def part_size(device_dir: Path) -> int:
    part = device_dir / "models" / "versions" / "tiny-gemma4+f16@2.0.0.gguf.part"
    return part.stat().st_size if part.exists() else 0


def test_kill_mid_download_then_resume_with_range(tmp_path: Path, fleet: Fleet) -> None:
    device_dir = tmp_path / "device"
    env = device_env(device_dir, fleet)
    install_v1_then_release_v2(tmp_path, fleet, env)
    throttle(fleet, SLOW_BYTES_PER_S)
    proc = start_apply(env)
    wait_until(lambda: part_size(device_dir) >= 300_000, "a partial download")
    kill9(proc)
    kept = part_size(device_dir)
    assert state_of(device_dir).phase is Phase.DOWNLOADING
    assert_serving(device_dir, "1.0.0")

    throttle(fleet, None)
    result = apply_cli(env)
    assert result["outcome"] == "committed"
    assert result["resumed_from"] >= kept  # type: ignore[operator]
    length = (tmp_path / "v2.gguf").stat().st_size
    assert result["downloaded_bytes"] == length - result["resumed_from"]  # type: ignore[operator]
    assert '"GET /targets/models/' in fleet.host.access_log() and " 206 " in fleet.host.access_log()
    assert_serving(device_dir, "2.0.0")


def test_server_dies_mid_download_and_comes_back(tmp_path: Path, fleet: Fleet) -> None:
    device_dir = tmp_path / "device"
    env = device_env(device_dir, fleet)
    install_v1_then_release_v2(tmp_path, fleet, env)
    throttle(fleet, SLOW_BYTES_PER_S)
    proc = start_apply(env)
    wait_until(lambda: part_size(device_dir) >= 300_000, "a partial download")
    fleet.host.stop()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "next attempt resumes" in stderr
    assert state_of(device_dir).phase is Phase.DOWNLOADING
    assert_serving(device_dir, "1.0.0")

    fleet.host.rate = None
    fleet.host.start()
    result = apply_cli(env)
    assert result["outcome"] == "committed"
    assert result["resumed_from"] > 0  # type: ignore[operator]
    assert_serving(device_dir, "2.0.0")


@pytest.mark.parametrize(
    ("event", "phase"),
    [("pre-install", Phase.STAGED), ("health-check", Phase.HEALTH_CHECK), ("on-commit", Phase.IDLE)],
)
def test_kill_in_stage_health_check_or_commit_then_restart_finishes(
    tmp_path: Path, fleet: Fleet, event: str, phase: Phase
) -> None:
    device_dir, hooks, go = tmp_path / "device", tmp_path / "hooks", tmp_path / "go"
    pid_file = tmp_path / "hook.pid"
    write_hook(hooks, event, blocking_hook(go, pid_file))
    env = device_env(device_dir, fleet, hooks_dir=str(hooks))
    go.touch()
    install_v1_then_release_v2(tmp_path, fleet, env)
    go.unlink()

    proc = start_apply(env)
    wait_until(pid_file.exists, f"the {event} hook")
    kill9(proc)
    kill_hook(pid_file)
    state = state_of(device_dir)
    assert state.phase is phase
    if phase is Phase.IDLE:  # killed after the commit was persisted: already consistent on v2
        assert_serving(device_dir, "2.0.0")
    else:
        assert_serving(device_dir, "1.0.0")

    go.touch()
    result = apply_cli(env)
    expected = "up-to-date" if phase is Phase.IDLE else "committed"
    assert result["outcome"] == expected
    assert result["downloaded_bytes"] == 0  # the verified file was kept, not fetched again
    assert_serving(device_dir, "2.0.0")
    assert state_of(device_dir).phase is Phase.IDLE


def test_repeated_crash_in_activation_rolls_back_and_blocklists(tmp_path: Path, fleet: Fleet) -> None:
    device_dir, hooks = tmp_path / "device", tmp_path / "hooks"
    pid_file, go = tmp_path / "hook.pid", tmp_path / "go"
    write_hook(hooks, "health-check", blocking_hook(go, pid_file))
    env = device_env(device_dir, fleet, hooks_dir=str(hooks), max_activation_attempts=1)
    go.touch()
    install_v1_then_release_v2(tmp_path, fleet, env)
    go.unlink()
    proc = start_apply(env)
    wait_until(pid_file.exists, "the health-check hook")
    kill9(proc)
    kill_hook(pid_file)

    # The version that died in activation max_activation_attempts times is given up on.
    result = apply_cli(env)
    assert result["outcome"] == "up-to-date"
    state = state_of(device_dir)
    assert state.blocklist == [f"{MODEL_ID}@2.0.0"]
    assert state.last_error is not None and "died during 1 activations" in state.last_error
    assert_serving(device_dir, "1.0.0")
    assert not (device_dir / "models" / "versions" / "tiny-gemma4+f16@2.0.0.gguf").exists()
