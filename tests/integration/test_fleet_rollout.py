"""``edgert fleet rollout`` end to end: a real registry served by nginx, a real mosquitto, three real daemons
(tiny fixture, one thread) and the controller as a real subprocess.

A good 2.0.0 converges through two waves (the first raised to hold --min-devices, the controller killed -9
in the middle of it and run again); a 3.0.0 that every device fails to load halts after its first wave, the
channel is re-signed back to 2.0.0, and the retained deploy states show the rollback. The root key is
off the machine the whole time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgert.api.mqtt_schemas import DeployState
from edgert.fleet import rollout_state
from edgert.fleet.observe import DeviceView, FleetObserver
from edgert.fleet.rollout import wave_members
from edgert.fleet.rollout_state import Status
from edgert.update.state import rollout_bucket
from tests.integration.daemon import DaemonProcess, start_daemon, wait_until_ready
from tests.integration.mosquitto import Broker
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    broken_model,
    device_update,
    edgert_cmd,
    make_variant,
    write_hook,
)

#: bucket for 2.0.0 / 3.0.0: roll-8 20/61, roll-1 30/62, roll-7 51/4 -- so the 25 % wave of 2.0.0 holds one
#: device (raised to 31 % to hold two) and the 25 % wave of 3.0.0 holds roll-7 alone
DEVICES = ("roll-1", "roll-7", "roll-8")
V2, V3, V4 = f"{MODEL_ID}@2.0.0", f"{MODEL_ID}@3.0.0", f"{MODEL_ID}@4.0.0"
#: 4.0.0 loads everywhere, but this device's health-check hook refuses it (a device-specific failure)
HOOKED = "roll-7"
VETO_V4 = 'if [ "$EDGERT_MODEL_VERSION" = 4.0.0 ]; then echo "the camera driver rejects 4.0.0"; exit 1; fi'
EXIT_HALTED = 9


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


@pytest.fixture
def devices(tmp_path: Path, fleet: Fleet, broker: Broker, tiny_gguf: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    try:
        for device_id in DEVICES:
            update = device_update(fleet, device_id=device_id, check_interval_s=10, check_jitter_s=0)
            if device_id == HOOKED:
                update["hooks_dir"] = str(write_hook(tmp_path / "hooks", "health-check", VETO_V4).parent)
            settings = {f"update__{key}": str(value) for key, value in update.items()}
            settings |= {"engine__n_ctx": "512", "engine__n_parallel": "1"}
            workdir = tmp_path / device_id
            workdir.mkdir()
            started.append(start_daemon(workdir, tiny_gguf, wait_ready=False, **settings, **broker.daemon_settings()))
        for daemon in started:
            wait_until_ready(daemon)
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def rollout(fleet: Fleet, broker: Broker, version: str, *args: str) -> list[str]:
    return edgert_cmd(
        "fleet",
        "rollout",
        MODEL_ID,
        version,
        "--channel",
        "stable",
        "--registry-dir",
        str(fleet.registry.directory),
        "--out",
        str(fleet.site),
        "--broker",
        f"127.0.0.1:{broker.port}",
        "--wave-wait",
        "90s",
        "--max-failure-rate",
        "0.1",
        *args,
    )


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=150, check=False)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def deploy_of(views: dict[str, DeviceView], device_id: str) -> DeployState | None:
    view = views.get(device_id)
    return view.deploy if view is not None else None


def fleet_views(broker: Broker, ready: Callable[[dict[str, DeviceView]], bool]) -> dict[str, DeviceView]:
    """Every device's retained state, once ``ready`` holds for it (the last deploy message may be in flight)."""
    with FleetObserver(broker.client_settings()) as observer:
        assert observer.wait_until(ready, 60), observer.snapshot()
        return observer.snapshot()


def test_a_good_release_converges_in_waves_and_a_bad_one_halts_back(
    tmp_path: Path, fleet: Fleet, broker: Broker, tiny_gguf: Path, devices: list[DaemonProcess]
) -> None:
    model = MODEL_ID
    # the wave memberships the test relies on (see DEVICES)
    assert wave_members(DEVICES, model, "2.0.0", 25) == ["roll-8"]
    assert wave_members(DEVICES, model, "3.0.0", 25) == ["roll-7"]
    fleet.registry.add(
        make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"), model_id=model, version="2.0.0"
    )
    fleet.registry.publish(out=fleet.site)
    # root stays offline: the rollout signs with targets, snapshot and timestamp only
    offline = tmp_path / "removable-media"
    offline.mkdir()
    for key in fleet.registry.keys_dir.glob("root-*.pem"):
        key.rename(offline / key.name)
    assert not list(fleet.registry.keys_dir.glob("root-*.pem"))
    fleet_views(broker, lambda views: all(deploy_of(views, d) is not None for d in DEVICES))
    state_file = rollout_state.default_path(fleet.registry.directory, "stable")

    # 2.0.0: started, killed -9 once its first wave is decided, run again: it continues, both waves pass
    cmd = rollout(fleet, broker, "2.0.0", "--waves", "25,100", "--min-devices", "2")
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def wave_decided() -> bool:
            saved = rollout_state.load(state_file) if state_file.exists() else None
            return saved is not None and saved.promoted is not None

        wait_for(wave_decided, 60, "the first wave's percentage in the state file")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert first.stdout is not None
        first.stdout.close()
    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the rollout of tiny-gemma4:f16@2.0.0: wave 1 of 2, promoted 31%" in resumed.stdout
    assert "wave 1/2: promoted 31% (asked 25%), 2 devices in wave, 2 reported, 0 failed: pass" in resumed.stdout
    assert "wave 2/2: promoted 100%, 3 devices in wave, 3 reported, 0 failed: pass" in resumed.stdout
    done = rollout_state.load(state_file)
    assert done is not None and done.status is Status.DONE
    assert [(r.asked, r.percent, r.devices, r.updated) for r in done.results] == [(25, 31, 2, 2), (100, 100, 3, 3)]
    fleet_views(broker, lambda views: all(getattr(deploy_of(views, d), "current", None) == V2 for d in DEVICES))
    channel = fleet.registry.status().channels.channels["stable"]
    assert (channel.version, channel.rollout) == ("2.0.0", 100)

    # run again: already done, nothing signed
    again = run(cmd, tmp_path)
    assert again.returncode == 0 and "is already done" in again.stdout, again.stdout + again.stderr

    # 3.0.0 fails to load on every device: halted after its first wave, the channel back on 2.0.0
    fleet.registry.add(broken_model(tiny_gguf, tmp_path / "v3.gguf"), model_id=model, version="3.0.0")
    fleet.registry.publish(out=fleet.site)
    halted = run(rollout(fleet, broker, "3.0.0", "--waves", "25,100", "--min-devices", "1"), tmp_path)
    assert halted.returncode == EXIT_HALTED, halted.stdout + halted.stderr
    text = " ".join(halted.stdout.split())
    assert "wave 1/2: promoted 25%, 1 devices in wave, 1 reported, 1 failed: HALT: 1 of 1 devices failed" in text
    assert "roll-7:" in text
    assert "halted:" in text and "the channel is back on tiny-gemma4:f16@2.0.0 for every device" in text
    assert "wave 2/2" not in text
    channel = fleet.registry.status().channels.channels["stable"]
    assert (channel.version, channel.rollout) == ("2.0.0", 100)
    saved = rollout_state.load(state_file)
    assert saved is not None and saved.status is Status.HALTED and saved.previous == V2
    assert saved.reason is not None and "roll-7" in saved.reason

    # the retained deploy states: roll-7 rolled 3.0.0 back and serves 2.0.0; the others never took it
    def settled(views: dict[str, DeviceView]) -> bool:
        return all(getattr(deploy_of(views, d), "phase", None) == "idle" for d in DEVICES)

    views = fleet_views(broker, settled)
    bad = views["roll-7"].deploy
    assert bad is not None and bad.rolled_back == V3 and V3 in bad.blocklist and bad.current == V2
    assert bad.rollback_reason
    for device_id in ("roll-1", "roll-8"):
        deploy = views[device_id].deploy
        assert deploy is not None and deploy.current == V2 and V3 not in deploy.blocklist, deploy
        assert rollout_bucket(device_id, model, "3.0.0") >= 25
    assert json.loads(state_file.read_text())["status"] == "halted"

    # 4.0.0 in one wave of 100 %: two devices commit it, roll-7's health-check hook refuses it; the halt
    # re-signs 2.0.0 and the two devices that committed 4.0.0 go back to it through the signed path
    fleet.registry.add(
        make_variant(tiny_gguf, tmp_path / "v4.gguf", general_name="tiny v4"), model_id=model, version="4.0.0"
    )
    fleet.registry.publish(out=fleet.site)
    halted = run(rollout(fleet, broker, "4.0.0", "--waves", "100", "--min-devices", "1"), tmp_path)
    assert halted.returncode == EXIT_HALTED, halted.stdout + halted.stderr
    text = " ".join(halted.stdout.split())
    assert "1 of 3 devices failed" in text
    assert "roll-7:" in text and "camera driver rejects 4.0.0" in text
    channel = fleet.registry.status().channels.channels["stable"]
    assert (channel.version, channel.rollout, channel.previous_version) == ("2.0.0", 100, "4.0.0")
    views = fleet_views(
        broker,
        lambda views: all(getattr(deploy_of(views, d), "current", None) == V2 for d in DEVICES) and settled(views),
    )
    hooked = views[HOOKED].deploy
    assert hooked is not None and hooked.rolled_back == V4 and V4 in hooked.blocklist
    went_back = [d for d in ("roll-1", "roll-8") if (deploy := deploy_of(views, d)) and deploy.previous == V4]
    assert went_back, "no device had committed 4.0.0 before the halt"  # so the return path was exercised
    assert f"back on {V2}: " in text, text
