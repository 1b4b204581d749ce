"""The device side of fleet operations (issue 18): what a real daemon tells the broker, and when.

Real parts only: mosquitto, the daemon as a subprocess on the tiny Gemma 4 fixture, a signed registry on
nginx (tests/integration/update_support.py). What is read is what any late subscriber reads: the retained
messages (``Broker.retained``), and, for the order of the deploy phases, a ``mosquitto_sub`` that
subscribed before the daemon started.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgert.api.mqtt_schemas import DeployState, DeviceStatus, ReplyFinal, Telemetry, Topics
from edgert.model_switch import RuntimeModelSwitch
from edgert.transport.mqtt_client import MqttRequester
from edgert.update.state import Phase, UpdateState
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    broken_model,
    device_update,
    make_variant,
    updater,
    write_hook,
)

CHAT = "/v1/chat/completions"
#: every persisted move of a clean install, in order (the deploy topic must show each, never out of order)
INSTALL = ["downloading", "staged", "activating", "health_check", "committing", "idle"]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wipe_and_restart(broker: Broker) -> None:
    """A broker that lost its retained store (a replaced cluster node, a restore): only the devices can refill it."""
    broker.stop()
    (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
    broker.start()


class Recorder:
    """Every message on ``topic`` from now on, in arrival order (a ``mosquitto_sub`` subscribed before return)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        cmd = ["stdbuf", "-oL", "mosquitto_sub", *broker.cli_args(), "-d", "-q", "1", "-t", topic, "-F", "%p"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.messages: list[dict[str, object]] = []
        stdout = self._proc.stdout
        assert stdout is not None
        while "received SUBACK" not in (line := stdout.readline()):
            assert line, "mosquitto_sub ended before its subscription was acknowledged"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("{"):  # payloads; -d's own lines are "Client ... sending/received ..."
                self.messages.append(json.loads(line))

    def wait(self, predicate: Callable[[dict[str, object]], bool], what: str, timeout: float = 90.0) -> None:
        wait_for(lambda: any(predicate(message) for message in list(self.messages)), what, timeout)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
        self._proc.wait(10)
        self._reader.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def phases(messages: list[dict[str, object]]) -> list[str]:
    """The phases in arrival order, repeats of one phase (a round's report after its last move) folded."""
    seen: list[str] = []
    for message in messages:
        if not seen or seen[-1] != message["phase"]:
            seen.append(str(message["phase"]))
    return seen


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own (it is wiped and restarted), stopped however the test ends."""
    broker = Broker(tmp_path / "broker").start()
    yield broker
    broker.stop()


def nudge(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        assert client.post("/update/check").status_code == 202


# ---------------------------------------------------------------------------- telemetry
def test_telemetry_counts_each_release_is_retained_and_is_republished_when_the_broker_comes_back(
    tmp_path: Path, tiny_gguf: Path, own_broker: Broker
) -> None:
    broker = own_broker
    topics = Topics("kiosk-t")
    # One reading at connect, then none for an hour: whatever else arrives came from the link coming back.
    (tmp_path / "device").mkdir()
    daemon = start_daemon(
        tmp_path / "device",
        tiny_gguf,
        **broker.daemon_settings(
            mqtt__device_id="kiosk-t",
            mqtt__telemetry_interval_s="3600",
            mqtt__reconnect_min_s="0.1",
            mqtt__reconnect_max_s="0.5",
        ),
    )
    try:
        wait_for(lambda: broker.retained(topics.status)["state"] == "online", "the device online")
        first = Telemetry.model_validate(broker.retained(topics.telemetry))
        assert first.versions == []  # nothing served yet
        with daemon.client() as client:
            for _ in range(2):
                ok = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
                assert ok.status_code == 200, ok.text
            # A real failing path: the request's deadline passes before generation can finish.
            late = client.post(
                CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "timeout": 0.001}
            )
            # (cut in the queue: an error status; cut while generating: the text so far, finish_reason "deadline")
            assert late.status_code == 504 or late.json()["choices"][0]["finish_reason"] == "deadline", late.text
        with MqttRequester(broker.client_settings()) as requester:
            [final] = requester.ask(topics.req, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            assert isinstance(final, ReplyFinal) and final.error is None

        wipe_and_restart(broker)  # the retained store is empty now; the device must refill it
        wait_for(lambda: _answers(broker, topics.telemetry), "telemetry republished after the broker came back")
        reading = Telemetry.model_validate(broker.retained(topics.telemetry))
        status = DeviceStatus.model_validate(broker.retained(topics.status))
        assert status.state == "online"
        assert reading.mqtt.reconnects >= 1
        (counts,) = reading.versions
        assert counts.release == tiny_gguf.name  # not from the registry: the model id alone
        assert (counts.requests_ok, counts.requests_failed) == (3, 1)  # socket and MQTT alike
        assert counts.completion_tokens >= 3
        assert counts.prompt_tokens > 0
        assert 3 <= sum(counts.ttft_buckets) <= 4  # every request that produced a first token
        assert counts.decode_s >= 0
        assert abs(counts.started - time.time()) < 600
        sizes = {"telemetry": len(reading.model_dump_json()), "status": len(status.model_dump_json())}
    finally:
        assert daemon.stop() == 0, daemon.log()
    # The device is gone; its last reading stays for whoever subscribes later (fleet status).
    after = Telemetry.model_validate(broker.retained(topics.telemetry))
    assert after.versions[0].requests_ok == 3
    print(f"payload bytes: {sizes}")


def _answers(broker: Broker, topic: str) -> bool:
    """A retained message is there now (mosquitto_sub gives up after a second when none is)."""
    out = subprocess.run(
        ["mosquitto_sub", *broker.cli_args(), "-t", topic, "-C", "1", "-W", "1", "--retained-only"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.returncode == 0 and out.stdout.startswith("{")


# ---------------------------------------------------------------------------- deploy state
@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def test_deploy_phases_arrive_in_order_rollbacks_say_why_and_a_returning_device_catches_up(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, own_broker: Broker
) -> None:
    broker = own_broker
    topic = Topics("kiosk-u").deploy
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet, hooks_dir=str(hooks)).items()}
    mqtt = broker.daemon_settings(mqtt__device_id="kiosk-u", mqtt__reconnect_min_s="0.1", mqtt__reconnect_max_s="0.5")
    fleet.release("1.0.0")
    recorder = Recorder(broker, topic)
    (tmp_path / "device").mkdir()
    daemon = start_daemon(tmp_path / "device", tiny_gguf, **settings, **mqtt)
    try:
        # 1. A clean install on start: every move on the broker as it happens, in order, with phase_since.
        recorder.wait(lambda m: m.get("current") == f"{MODEL_ID}@1.0.0", "1.0.0 committed")
        installed = list(recorder.messages)
        assert phases(installed)[-len(INSTALL) :] == INSTALL, phases(installed)
        states = [DeployState.model_validate(message) for message in installed]
        moves = [state for state in states if state.phase_since is not None]
        assert [state.phase_since for state in moves] == sorted(state.phase_since for state in moves)
        assert [state.ts for state in states] == sorted(state.ts for state in states)
        during = next(state for state in states if state.phase == "downloading")
        assert during.pending == f"{MODEL_ID}@1.0.0"
        assert during.phase_since is not None and during.phase_since <= during.ts

        # 2. A release that does not load: rolled back, and the deploy state says which and why.
        fleet.release("1.1.0", broken_model(tiny_gguf, tmp_path / "broken.gguf"))
        nudge(daemon)
        recorder.wait(lambda m: m.get("rolled_back") == f"{MODEL_ID}@1.1.0", "1.1.0 rolled back")
        recorder.wait(lambda m: m.get("last_round") == f"rolled-back {MODEL_ID}@1.1.0", "the round's report")
        rollback = DeployState.model_validate(broker.retained(topic))
        assert rollback.rollback_reason is not None
        assert rollback.rollback_reason.startswith(f"{MODEL_ID}@1.1.0 failed its health check: ")
        assert (rollback.phase, rollback.current) == ("idle", f"{MODEL_ID}@1.0.0")
        assert f"{MODEL_ID}@1.1.0" in rollback.blocklist
        assert "rolling_back" in phases(recorder.messages)[len(phases(installed)) :]

        # 3. A pre-install hook vetoes the next one: the device refused it, and says so the same way.
        write_hook(hooks, "pre-install", "echo 'kiosk is in use'; exit 1")
        fleet.release("1.2.0", make_variant(tiny_gguf, tmp_path / "v12.gguf", general_name="tiny v1.2"))
        nudge(daemon)
        recorder.wait(lambda m: m.get("rolled_back") == f"{MODEL_ID}@1.2.0", "1.2.0 vetoed")
        vetoed = DeployState.model_validate(broker.retained(topic))
        assert vetoed.rollback_reason is not None
        assert vetoed.rollback_reason.startswith(f"pre-install hook vetoed {MODEL_ID}@1.2.0: ")
        assert "kiosk is in use" in vetoed.rollback_reason
        assert vetoed.current == f"{MODEL_ID}@1.0.0"
        (hooks / "pre-install").unlink()
        recorder.close()

        # 4. The broker loses its retained store: the device fills it again when its link comes back.
        wipe_and_restart(broker)
        wait_for(lambda: _answers(broker, topic), "the deploy state republished")
        again = DeployState.model_validate(broker.retained(topic))
        assert (again.current, again.rolled_back) == (f"{MODEL_ID}@1.0.0", f"{MODEL_ID}@1.2.0")
    finally:
        recorder.close()
        assert daemon.stop() == 0, daemon.log()

    # 5. A device that was off during a rollout checks the registry as it starts (no nudge, hourly checks),
    #    and what it rolled back before the restart is still reported (it is in the update state).
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
    daemon = start_daemon(tmp_path / "device", tiny_gguf, **settings, **mqtt)
    try:
        wait_for(lambda: broker.retained(topic).get("current") == f"{MODEL_ID}@2.0.0", "2.0.0 installed on start", 120)
        back = DeployState.model_validate(broker.retained(topic))
        assert (back.phase, back.previous, back.rolled_back) == ("idle", f"{MODEL_ID}@1.0.0", f"{MODEL_ID}@1.2.0")
        print(f"payload bytes: deploy {len(back.model_dump_json())}")
    finally:
        assert daemon.stop() == 0, daemon.log()


# ---------------------------------------------------------------------------- the update path's listener
def test_the_updater_tells_its_listener_every_saved_move_and_survives_a_failing_one(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    seen: list[UpdateState] = []
    device.on_phase = seen.append
    assert device.apply().outcome == "committed"
    assert [state.phase.value for state in seen] == INSTALL
    assert seen[0].pending is not None and seen[0].pending.key == f"{MODEL_ID}@1.0.0"
    assert [state.phase_since for state in seen] == sorted(state.phase_since or 0.0 for state in seen)
    assert seen[-1] == device.status()  # each one is what was saved, and a copy: the round changed on
    assert seen[0].phase is Phase.DOWNLOADING

    def broken_listener(_state: UpdateState) -> None:
        raise RuntimeError("a bug in whoever listens")

    device.on_phase = broken_listener
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
    assert device.apply().outcome == "committed"  # the update itself never depends on its listener
