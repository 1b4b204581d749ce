"""The daemon's own update loop: installs on start, swaps on a nudge, and no request fails across the swap."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.update_support import MODEL_ID, Fleet, broken_model, device_update, make_variant

CHAT = "/v1/chat/completions"


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def start_device(tmp_path: Path, fleet: Fleet, fallback_model: Path) -> DaemonProcess:
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    return start_daemon(tmp_path / "device", fallback_model, **settings)


def update_status(daemon: DaemonProcess) -> dict[str, object]:
    with daemon.client() as client:
        response = client.get("/update/status")
        assert response.status_code == 200, response.text
        return dict(response.json())


def wait_for_current(daemon: DaemonProcess, key: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = update_status(daemon)
        current = state.get("current")
        if isinstance(current, dict) and f"{current['meta']['model_id']}@{current['meta']['version']}" == key:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{key} not current after {timeout}s: {update_status(daemon)}\n{daemon.log()}")


def served_model(daemon: DaemonProcess) -> str:
    with daemon.client() as client:
        return str(client.get("/v1/models").json()["data"][0]["id"])


def wait_served(daemon: DaemonProcess, version: str, timeout: float = 30) -> None:
    """The swap to the committed release reaches the socket API (a moment after the state file)."""
    deadline = time.monotonic() + timeout
    while version not in served_model(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert version in served_model(daemon)


def test_daemon_updates_under_live_traffic_without_a_failed_request(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    daemon = start_device(tmp_path, fleet, tiny_gguf)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        wait_served(daemon, "1.0.0")

        failures: list[str] = []
        completed = 0
        stop = threading.Event()

        def traffic() -> None:
            nonlocal completed
            with daemon.client() as client:
                while not stop.is_set():
                    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "stream": True}
                    with client.stream("POST", CHAT, json=body) as response:
                        lines = [line for line in response.iter_lines() if line]
                    if response.status_code != 200 or lines[-1] != "data: [DONE]":
                        failures.append(f"{response.status_code}: {lines[-3:]}")
                    completed += 1

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(0.3)
        fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        state = wait_for_current(daemon, f"{MODEL_ID}@2.0.0")
        wait_served(daemon, "2.0.0")
        time.sleep(0.3)  # traffic continues on the new model for a moment
        stop.set()
        for worker in workers:
            worker.join(30)
        assert failures == []
        assert completed >= 6
        assert state["phase"] == "idle"

        with daemon.client() as client:
            text = client.get("/metrics").text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("edgert_update_phase", (("phase", "idle"),))] == 1.0
        release = next(labels for (name, labels) in samples if name == "edgert_update_release_info")
        assert dict(release)["current"] == f"{MODEL_ID}@2.0.0"
        assert dict(release)["previous"] == f"{MODEL_ID}@1.0.0"
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_daemon_keeps_serving_the_old_model_when_the_new_one_is_broken(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    daemon = start_device(tmp_path, fleet, tiny_gguf)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        fleet.release("1.1.0", broken_model(tiny_gguf, tmp_path / "broken.gguf"))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        deadline = time.monotonic() + 60
        while f"{MODEL_ID}@1.1.0" not in update_status(daemon).get("blocklist", []):  # type: ignore[operator]
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        state = update_status(daemon)
        assert json.dumps(state["current"]).count("1.0.0") >= 1
        with daemon.client() as client:
            reply = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert reply.status_code == 200
        assert "1.0.0" in served_model(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_deploy_state_is_retained_on_the_mqtt_deploy_topic(tmp_path: Path, fleet: Fleet, tiny_gguf: Path) -> None:
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    broker = Broker(tmp_path / "broker").start()
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    daemon = start_daemon(
        tmp_path / "device", tiny_gguf, **settings, **broker.daemon_settings(mqtt__device_id="kiosk-7")
    )
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        out = subprocess.run(
            ["mosquitto_sub", "-p", str(broker.port), "-t", "edgert/v1/kiosk-7/deploy", "-C", "1", "-W", "30"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        deploy = json.loads(out)
        assert deploy["device_id"] == "kiosk-7"
        assert deploy["phase"] == "idle"
        assert deploy["current"] == f"{MODEL_ID}@1.0.0"
        assert deploy["last_round"] == f"committed {MODEL_ID}@1.0.0"
    finally:
        assert daemon.stop() == 0, daemon.log()
        broker.stop()
