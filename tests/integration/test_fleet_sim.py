"""The fleet scenario of benchmarks/fleet_sim.py, short: 6 real daemons, one mosquitto, one registry behind nginx.

Outcomes only, never timings: a good 2.0.0 rolled out in waves by ``edgert fleet rollout`` converges on every
device without a failed request on the devices under load, and ``edgert fleet status`` shows it; a 3.0.0
that every device fails to load halts after its first wave, those devices roll back, the channel and the
whole fleet stay on 2.0.0 and no device outside the wave fetched it; devices killed -9 in the middle of
downloading 4.0.0 resume their ``.part`` on restart (a Range request) and converge.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.fleet import rollout_state
from edgert.fleet.rollout import wave_members
from edgert.fleet.rollout_state import Status
from tests.integration.fleet import Load, SimFleet
from tests.integration.update_support import MODEL_ID, broken_model, make_variant

SIZE = 6
EXIT_HALTED = 9
#: model files at 250 kB/s: the 1.6 MB fixture takes ~6 s to fetch, long enough to kill a device midway
RATE = 250_000


@pytest.fixture
def sim(tiny_gguf: Path) -> Iterator[SimFleet]:
    # Not under tmp_path: every pytest that starts meanwhile (other suites run beside this one) sets
    # /tmp/pytest-of-<user> back to 0700, and nginx's unprivileged workers then get 403 for the whole site.
    workdir = Path(tempfile.mkdtemp(prefix="edgert-fleet-test-"))
    fleet = SimFleet(workdir / "fleet", tiny_gguf, SIZE, rate=RATE)
    try:
        fleet.start("1.0.0", ready_timeout=120)
        yield fleet
    finally:
        fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_fleet_converges_halts_on_a_bad_release_and_resumes_after_kill_9(
    sim: SimFleet, tmp_path: Path, tiny_gguf: Path
) -> None:
    devices = {d.device_id: d for d in sim.devices}
    assert {d.group for d in sim.devices} == {"lobby", "kiosk"}

    # a good 2.0.0 in two waves, requests running on two devices throughout
    sim.add("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
    load = Load(sim.devices[:2]).start()
    try:
        good = sim.rollout("2.0.0", "--waves", "50,100", "--min-devices", "2", "--wave-wait", "90s").finish(150)
    finally:
        load.stop()
    assert good.returncode == 0, good.output
    assert "wave 2/2: promoted 100%, 6 devices in wave, 6 reported, 0 failed: pass" in good.output
    sim.wait_current(sim.devices, "2.0.0", 30)
    assert load.failures == []
    assert load.ok > 0
    status = sim.fleet_status()  # what the operator sees
    assert status.returncode == 0, status.output
    rows = json.loads(status.output)
    assert [(r["device_id"], r["state"], r["model"]) for r in rows] == [
        (d.device_id, "online", f"{MODEL_ID}@2.0.0") for d in sim.devices
    ]

    # a 3.0.0 that no device can load: the first wave fails its health check, the rollout halts
    sim.add("3.0.0", broken_model(tiny_gguf, tmp_path / "broken.gguf"))
    since = time.time()
    bad = sim.rollout("3.0.0", "--waves", "10,50,100", "--min-devices", "1", "--wave-wait", "90s").finish(150)
    assert bad.returncode == EXIT_HALTED, bad.output
    assert "wave 1/3" in bad.output and "HALT" in bad.output
    assert "wave 2/3" not in bad.output
    channel = sim.registry.registry.status().channels.channels["stable"]
    assert (channel.version, channel.rollout) == ("2.0.0", 100)
    state = rollout_state.load(rollout_state.default_path(sim.registry.registry.directory, "stable"))
    assert state is not None and state.status is Status.HALTED and len(state.results) == 1
    wave = wave_members(devices, MODEL_ID, "3.0.0", state.results[0].percent)
    assert 1 <= len(wave) <= 2, bad.output  # the first wave only: 10 % raised to hold one device of six
    sim.watch.wait(
        lambda: all(sim.rejected(devices[d], "3.0.0") for d in wave),
        30,
        lambda: str({d: sim.deploy(devices[d]) for d in wave}),
    )
    sim.wait_current(sim.devices, "2.0.0", 30)
    fetched = sim.bytes_by_device("3.0.0", since)
    assert {d for d, sent in fetched.items() if sent} <= set(wave), fetched

    # 4.0.0 to everyone; two devices killed -9 while their download is under way, started again
    sim.add("4.0.0", make_variant(tiny_gguf, tmp_path / "v4.gguf", general_name="tiny v4"))
    size = sim.registry.target_file("4.0.0").stat().st_size
    since = time.time()
    run = sim.rollout("4.0.0", "--waves", "100", "--wave-wait", "120s")
    victims = sim.devices[-2:]
    kept = sim.kill_mid_download(victims, size, 60)
    for device in victims:
        device.start()
    result = run.finish(180)
    assert result.returncode == 0, result.output
    sim.wait_current(sim.devices, "4.0.0", 30)
    fetches = [f for f in sim.host.fetches() if f.at >= since and f.path.endswith(".gguf") and "/4.0.0/" in f.path]
    for device in victims:
        ranges = [f.range for f in fetches if f.device_id == device.device_id and f.status == 206]
        assert ranges, [f for f in fetches if f.device_id == device.device_id]
        start = int(ranges[-1].removeprefix("bytes=").rstrip("-"))
        assert start >= kept[device.device_id] > 0  # resumed from what the killed daemon had kept
        served = sum(f.body_bytes for f in fetches if f.device_id == device.device_id)
        assert size <= served < 2 * size  # what the kill cost is the unsaved tail, not a second download
