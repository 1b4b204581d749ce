"""The daemon's own update loop: installs on start, swaps on a nudge, and no request fails across the swap."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.hostile_registry import HostileRegistry
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
    """``<model-id>@<version>``: the id ``/v1/models`` reports and the version in ``edgert_model_info``."""
    with daemon.client() as client:
        model_id = str(client.get("/v1/models").json()["data"][0]["id"])
        text = client.get("/metrics").text
    (info,) = (
        s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == "edgert_model_info"
    )
    return f"{model_id}@{info['version']}"


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

        def wait_completed(count: int) -> None:
            deadline = time.monotonic() + 60
            while completed < count:
                assert time.monotonic() < deadline, f"{completed} of {count} requests done: {failures}"
                time.sleep(0.02)

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        wait_completed(3)  # traffic flows before the update starts
        fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        state = wait_for_current(daemon, f"{MODEL_ID}@2.0.0")
        wait_served(daemon, "2.0.0")
        wait_completed(completed + 3)  # traffic continues on the new model
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
        deploy = retained_deploy(broker, "kiosk-7")
        assert deploy["device_id"] == "kiosk-7"
        assert deploy["phase"] == "idle"
        assert deploy["current"] == f"{MODEL_ID}@1.0.0"
        assert deploy["last_round"] == f"committed {MODEL_ID}@1.0.0"
    finally:
        assert daemon.stop() == 0, daemon.log()
        broker.stop()


def metric_samples(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with daemon.client() as client:
        text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def failures_counted(daemon: DaemonProcess, reason: str) -> float:
    return metric_samples(daemon).get(("edgert_update_failures_total", (("reason", reason),)), 0.0)


def wait_failures(daemon: DaemonProcess, reason: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while failures_counted(daemon, reason) < count:
        assert time.monotonic() < deadline, f"{reason} not counted {count}x: {update_status(daemon)}\n{daemon.log()}"
        time.sleep(0.1)


def retained_deploy(broker: Broker, device_id: str) -> dict[str, object]:
    return broker.retained(f"edgert/v1/{device_id}/deploy")


def test_daemon_names_counts_and_reports_each_hostile_registry_failure_then_recovers(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    """Issue 13, findings 2 and 4 (and 15: credentials in the registry URLs never show)."""
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    broker = Broker(tmp_path / "broker").start()
    with HostileRegistry(fleet.site) as hostile:
        hostile.mode = "truncate"
        update = device_update(
            fleet,
            registry_url=hostile.url.replace("http://", "http://edgert:s3cret@"),
            targets_url=fleet.host.url.replace("http://", "http://edgert:s3cret@") + "targets/",
        )
        settings = {f"update__{key}": str(value) for key, value in update.items()}
        daemon = start_daemon(
            tmp_path / "device", tiny_gguf, **settings, **broker.daemon_settings(mqtt__device_id="kiosk-9")
        )
        try:
            wait_failures(daemon, "connection_dropped", 1)
            status = update_status(daemon)
            assert str(status["last_error"]).startswith("connection_dropped: connection dropped while refreshing")
            assert status["loop"]["running"] is True  # type: ignore[index]
            assert any("failed (connection_dropped)" in line for line in status["history"])  # type: ignore[attr-defined]

            hostile.mode = "drop"  # python-tuf's message for this one carries the whole URL
            with daemon.client() as client:
                assert client.post("/update/check").status_code == 202
            wait_failures(daemon, "connection_dropped", 2)
            deadline = time.monotonic() + 30
            # the round is counted a moment before its report reaches the broker
            while "/metadata/timestamp.json" not in str((deploy := retained_deploy(broker, "kiosk-9"))["last_error"]):
                assert time.monotonic() < deadline, deploy
                time.sleep(0.1)
            assert str(deploy["last_round"]).startswith("failed (connection_dropped): ")
            assert str(deploy["last_error"]).startswith("connection_dropped: ")  # the URL in it has no userinfo
            deploy_text = json.dumps(deploy)

            hostile.mode = "oversized"
            with daemon.client() as client:
                assert client.post("/update/check").status_code == 202
            wait_failures(daemon, "oversized", 1)

            hostile.mode = None
            with daemon.client() as client:
                assert client.post("/update/check").status_code == 202
            state = wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
            assert failures_counted(daemon, "connection_dropped") == 2
            assert failures_counted(daemon, "oversized") == 1
            assert state["loop"]["last_round"] == f"committed {MODEL_ID}@1.0.0"  # type: ignore[index]
            for shown in (json.dumps(state), deploy_text, daemon.log()):
                assert "s3cret" not in shown
        finally:
            assert daemon.stop() == 0, daemon.log()
            broker.stop()


@pytest.mark.parametrize("damage", ["truncated", "newer"])
def test_daemon_starts_on_a_bad_update_state_serving_the_committed_model_with_updates_off(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, damage: str
) -> None:
    """Issue 13, finding 7: a truncated state.json (or a newer edgert's) no longer keeps the daemon down."""
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    daemon = start_device(tmp_path, fleet, tiny_gguf)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
    finally:
        assert daemon.stop() == 0, daemon.log()
    update_dir = tmp_path / "device" / "state" / "update"
    state_file = update_dir / "state.json"
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:100])
    else:
        state_file.write_text(state_file.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))

    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    daemon = start_daemon(tmp_path / "device", None, **settings)  # no --model: it picks the committed one
    try:
        assert "1.0.0" in served_model(daemon)
        status = update_status(daemon)
        assert status["disabled"], status
        assert str(status["last_error"]).startswith("state: ")
        if damage == "truncated":
            assert "moved to" in str(status["disabled"])
            (quarantined,) = update_dir.glob("state.json.corrupt-*")
            assert quarantined.stat().st_size == 100
            assert not state_file.exists()
        else:
            assert "newer edgert" in str(status["disabled"])
            assert state_file.exists()  # left for the newer version
        samples = metric_samples(daemon)
        assert samples[("edgert_update_disabled", ())] == 1.0
        assert samples[("edgert_update_failures_total", (("reason", "state"),))] == 1.0
        with daemon.client() as client:  # a check asked for is refused with the reason, not "scheduled"
            refused = client.post("/update/check")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "updates_disabled"
        assert refused.json()["error"]["message"].startswith("updates are off: ")
        assert "ERROR" in daemon.log() and "UPDATES ARE OFF" in daemon.log()
        assert "1.0.0" in served_model(daemon)
        assert not list((tmp_path / "device" / "state" / "models" / "versions").glob("*2.0.0*"))
    finally:
        assert daemon.stop() == 0, daemon.log()
