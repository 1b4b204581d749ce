"""Signed model updates end to end: a real registry served by nginx, the real engine activating models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.errors import HookVetoError, InsufficientStorageError, TargetNotFoundError
from edgert.model_switch import RuntimeModelSwitch
from edgert.update.loop import next_delay, run_update_loop
from edgert.update.manifest import ChannelPointer
from edgert.update.orchestrator import Updater
from edgert.update.state import Phase, in_rollout, rollout_bucket
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    broken_model,
    device_env,
    device_settings,
    edgert_cmd,
    make_variant,
    updater,
    write_hook,
)


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def current_link(tmp_path: Path) -> str:
    return os.readlink(tmp_path / "device" / "models" / "current.gguf")


def test_install_upgrade_and_up_to_date(tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    first = device.apply()
    assert (first.outcome, first.release) == ("committed", f"{MODEL_ID}@1.0.0")
    assert first.downloaded_bytes == fleet.model.stat().st_size
    assert device.apply().outcome == "up-to-date"

    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))
    assert device.check().offered is not None
    second = device.apply()
    assert (second.outcome, second.release) == ("committed", f"{MODEL_ID}@2.0.0")
    state = device.status()
    assert state.phase is Phase.IDLE
    assert state.current is not None and state.current.meta.version == "2.0.0"
    assert state.previous is not None and state.previous.meta.version == "1.0.0"
    assert current_link(tmp_path) == "versions/tiny-gemma4+f16@2.0.0.gguf"
    # the previous version stays for a manual rollback; nothing else is kept
    versions = sorted(p.name for p in (tmp_path / "device" / "models" / "versions").iterdir())
    assert versions == ["tiny-gemma4+f16@1.0.0.gguf", "tiny-gemma4+f16@2.0.0.gguf"]


def test_broken_model_fails_health_check_rolls_back_and_is_blocklisted(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    device.apply()
    fleet.release("2.0.0", broken_model(fleet.model, tmp_path / "broken.gguf"))
    result = device.apply()
    assert result.outcome == "rolled-back"
    assert "llama.cpp could not load" in result.detail
    state = device.status()
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.blocklist == [f"{MODEL_ID}@2.0.0"]
    assert current_link(tmp_path) == "versions/tiny-gemma4+f16@1.0.0.gguf"
    assert not (tmp_path / "device" / "models" / "versions" / "tiny-gemma4+f16@2.0.0.gguf").exists()
    # never offered again on this device
    again = device.check()
    assert again.offered is None


def test_health_check_hook_failure_rolls_back(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    hooks = tmp_path / "hooks"
    log = tmp_path / "hook.log"
    write_hook(hooks, "health-check", 'test "$EDGERT_MODEL_VERSION" != 2.0.0')
    write_hook(hooks, "on-rollback", f'echo "$EDGERT_MODEL_VERSION $EDGERT_PREVIOUS_VERSION $EDGERT_REASON" >> {log}')
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer, hooks_dir=str(hooks))
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))
    result = device.apply()
    assert result.outcome == "rolled-back"
    assert "health-check hook health-check exited 1" in result.detail
    assert log.read_text().startswith("2.0.0 1.0.0 ")
    assert device.status().blocklist == [f"{MODEL_ID}@2.0.0"]


def test_manual_rollback_returns_to_previous_and_blocklists(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    example = Path(__file__).parents[2] / "firmware_hooks" / "on-commit.10-notify"
    for name in ("on-commit.10-notify", "on-rollback.10-notify"):  # the shipped example, both events
        (hooks / name).write_bytes(example.read_bytes())
        (hooks / name).chmod(0o755)
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer, hooks_dir=str(hooks))
    device.apply()
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))
    device.apply()
    result = device.rollback()
    events = [json.loads(line) for line in (tmp_path / "device" / "update" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["version"], e["previous"]) for e in events] == [
        ("on-commit", "1.0.0", ""),
        ("on-commit", "2.0.0", "1.0.0"),
        ("on-rollback", "2.0.0", "1.0.0"),
    ]
    assert events[-1]["reason"] == f"manual rollback to {MODEL_ID}@1.0.0"
    assert (result.outcome, result.release) == ("rolled-back-manually", f"{MODEL_ID}@1.0.0")
    state = device.status()
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.previous is None
    assert f"{MODEL_ID}@2.0.0" in state.blocklist
    assert current_link(tmp_path) == "versions/tiny-gemma4+f16@1.0.0.gguf"
    assert device.apply().outcome == "up-to-date"


def test_pre_install_veto_and_hook_timeout_install_nothing(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    hooks = tmp_path / "hooks"
    pid_file = tmp_path / "hook.pid"
    # The example hook from firmware_hooks/: refuse when free space is below a huge threshold.
    example = Path(__file__).parents[2] / "firmware_hooks" / "pre-install.10-disk-space"
    (hooks / "pre-install.10-disk-space").parent.mkdir(parents=True)
    (hooks / "pre-install.10-disk-space").write_bytes(example.read_bytes())
    (hooks / "pre-install.10-disk-space").chmod(0o755)
    hooks_env_file = hooks / "disk-space.conf"
    hooks_env_file.write_text("MIN_FREE_MIB=999999999\n")
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer, hooks_dir=str(hooks), hook_timeout_s=1)
    with pytest.raises(HookVetoError, match="pre-install"):
        device.apply()
    state = device.status()
    assert state.current is None and state.phase is Phase.IDLE and state.blocklist == []

    hooks_env_file.write_text("MIN_FREE_MIB=1\n")
    write_hook(hooks, "pre-install.20-slow", f"echo $$ > {pid_file}; sleep 30")
    with pytest.raises(HookVetoError, match="timed out"):
        device.apply()
    hook_pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(hook_pid, 0)  # the whole process group was killed
    assert device.status().current is None

    (hooks / "pre-install.20-slow").unlink()
    assert device.apply().outcome == "committed"  # a veto is not a blocklisting


def test_disk_full_is_refused_before_downloading(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    small = tmp_path / "device"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fleet.release("1.0.0")
        device = updater(tmp_path, fleet, switch_closer)
        with pytest.raises(InsufficientStorageError, match="MiB"):
            device.apply()
        state = device.status()
        assert state.current is None and state.phase is Phase.IDLE
        assert not list((small / "models" / "versions").iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_max_target_size_and_unknown_pin(tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer, max_target_bytes=1000)
    result = device.check()
    assert result.offered is None and "max_target_bytes" in result.reason
    assert device.apply().outcome == "up-to-date"
    with pytest.raises(TargetNotFoundError):
        updater(tmp_path, fleet, switch_closer).apply(pin_version="9.9.9")


def test_rollout_20_percent_is_deterministic(tmp_path: Path, fleet: Fleet) -> None:
    fleet.release("1.0.0")
    fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"), rollout=20)
    pointer = Updater(device_settings(tmp_path / "d", fleet)).check()
    assert pointer.channel == "stable"
    channels = fleet.registry.status().channels.channels["stable"]
    assert (channels.version, channels.rollout, channels.previous_version) == ("2.0.0", 20, "1.0.0")

    devices = [f"device-{n:03d}" for n in range(100)]
    chosen = [d for d in devices if in_rollout(d, channels)]
    assert 10 <= len(chosen) <= 30
    assert chosen == [d for d in devices if in_rollout(d, channels)]  # same answer every time
    # A real device in the rollout gets 2.0.0, one outside gets the previous version.
    inside, outside = chosen[0], next(d for d in devices if d not in chosen)
    offered_in = Updater(device_settings(tmp_path / "in", fleet, device_id=inside)).check().offered
    offered_out = Updater(device_settings(tmp_path / "out", fleet, device_id=outside)).check().offered
    assert offered_in is not None and offered_in.meta.version == "2.0.0"
    assert offered_out is not None and offered_out.meta.version == "1.0.0"
    # Widening the rollout keeps everyone already inside it inside.
    wider = ChannelPointer(**{**channels.model_dump(), "rollout": 50})
    assert all(in_rollout(d, wider) for d in chosen)
    assert rollout_bucket("device-000", MODEL_ID, "2.0.0") == rollout_bucket("device-000", MODEL_ID, "2.0.0")


def test_cli_apply_status_check_and_registry_status(tmp_path: Path, fleet: Fleet) -> None:
    fleet.release("1.0.0")
    env = device_env(tmp_path / "device", fleet)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(edgert_cmd(*args), env=env, capture_output=True, text=True, timeout=120, check=False)

    check = run("update", "check", "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["offered"] == f"{MODEL_ID}@1.0.0"
    applied = run("update", "apply", "--json")
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["outcome"] == "committed"
    status = run("update", "status", "--json")
    assert json.loads(status.stdout)["current"]["meta"]["version"] == "1.0.0"
    rollback = run("update", "rollback")
    assert rollback.returncode == 1 and rollback.stderr.startswith("error: no previous model version")
    registry = run("registry", "status", "--dir", str(fleet.registry.directory), "--json")
    assert registry.returncode == 0, registry.stderr
    report = json.loads(registry.stdout)
    assert report["channels"]["stable"]["version"] == "1.0.0"
    assert [role["role"] for role in report["roles"]] == ["root", "targets", "snapshot", "timestamp"]


def test_background_loop_installs_on_start_and_when_nudged(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer, check_interval_s=3600, check_jitter_s=0)

    async def scenario() -> list[str | None]:
        nudge = asyncio.Event()
        task = asyncio.create_task(run_update_loop(device, nudge=nudge))
        seen = [await wait_for_version(device, "1.0.0")]  # the round on start
        fleet.release("2.0.0", make_variant(fleet.model, tmp_path / "v2.gguf", general_name="v2"))
        nudge.set()  # what `edgert update check` via the daemon or an MQTT cmd will do
        seen.append(await wait_for_version(device, "2.0.0"))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(scenario()) == ["1.0.0", "2.0.0"]


async def wait_for_version(device: Updater, version: str) -> str | None:
    for _ in range(1000):
        current = device.status().current
        if current is not None and current.meta.version == version:
            return version
        await asyncio.sleep(0.02)
    return None


def test_next_delay_stays_within_interval_and_jitter() -> None:
    rng = random.Random(1)
    delays = [next_delay(60, 30, rng) for _ in range(200)]
    assert all(60 <= d <= 90 for d in delays) and max(delays) - min(delays) > 20
