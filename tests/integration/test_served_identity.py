"""Issue 14, "model identity lost after a swap": who is served comes from the signed release, everywhere.

A real daemon against a real signed registry (nginx) and a real mosquitto: after the update
loop installs 1.0.0, after a swap to 2.0.0 and after a restart, ``/v1/models``, the
``edgert_model_info`` metric and the retained MQTT status all name the release (model id,
version, digest) -- not the versioned file name, and not the model served at start.
A manual rollback, in process on the real engine, gives the earlier release back its identity.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgert.model_switch import RuntimeModelSwitch
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.update_support import MODEL_ID, Fleet, device_update, make_variant, updater

DEVICE = "kiosk-9"


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def served(daemon: DaemonProcess) -> tuple[str, dict[str, str]]:
    """``/v1/models``'s id and the ``edgert_model_info`` labels."""
    with daemon.client() as client:
        model_id = str(client.get("/v1/models").json()["data"][0]["id"])
        text = client.get("/metrics").text
    (info,) = (
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgert_model_info"
    )
    return model_id, info


def mqtt_status(broker: Broker) -> dict[str, object]:
    return broker.retained(f"edgert/v1/{DEVICE}/status")


def wait_identity(daemon: DaemonProcess, broker: Broker, version: str, timeout: float = 60) -> None:
    """Poll until every place reports ``version`` (the swap reaches them a moment after the state file)."""
    deadline = time.monotonic() + timeout
    while True:
        _, info = served(daemon)
        model = mqtt_status(broker).get("model")
        if info.get("version") == version and isinstance(model, dict) and model.get("version") == version:
            return
        assert time.monotonic() < deadline, f"{version} not reported: {info} {model}\n{daemon.log()}"
        time.sleep(0.1)


def assert_identity(daemon: DaemonProcess, broker: Broker, fleet: Fleet, version: str) -> None:
    digest = "sha256:" + hashlib.sha256(fleet.target_file(version).read_bytes()).hexdigest()
    model_id, info = served(daemon)
    assert model_id == MODEL_ID  # not "tiny-gemma4:f16@2.0.0.gguf", the file's name
    assert (info["id"], info["version"], info["digest"], info["modalities"]) == (MODEL_ID, version, digest, "text")
    status = mqtt_status(broker)
    assert status["state"] == "online"
    assert status["model"] == {
        "id": MODEL_ID,
        "file": Path(info["path"]).name,
        "quant": "F16",
        "version": version,
        "modalities": ["text"],
    }
    with daemon.client() as client:
        asked = client.post(
            "/v1/chat/completions",
            json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
    assert asked.status_code == 200, asked.text
    assert asked.json()["model"] == MODEL_ID


def test_the_served_identity_follows_every_swap_and_restart(tmp_path: Path, fleet: Fleet, tiny_gguf: Path) -> None:
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    broker = Broker(tmp_path / "broker").start()
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    settings.update(broker.daemon_settings(mqtt__device_id=DEVICE))
    daemon = start_daemon(tmp_path / "device", tiny_gguf, **settings)
    try:
        wait_identity(daemon, broker, "1.0.0")
        assert_identity(daemon, broker, fleet, "1.0.0")

        fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
        with daemon.client() as client:
            assert client.post("/update/check").status_code in (200, 202)
        wait_identity(daemon, broker, "2.0.0")
        assert_identity(daemon, broker, fleet, "2.0.0")
    finally:
        assert daemon.stop() == 0, daemon.log()

    # A restart serves the committed release under its own name (no --model: the daemon picks it).
    daemon = start_daemon(tmp_path / "device", None, **settings)
    try:
        wait_identity(daemon, broker, "2.0.0")
        assert_identity(daemon, broker, fleet, "2.0.0")
    finally:
        assert daemon.stop() == 0, daemon.log()
        broker.stop()


def test_a_rollback_serves_the_earlier_release_under_its_name(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
    assert device.apply().outcome == "committed"
    host = switch_closer[0].host
    assert host.served is not None
    assert (host.served.id, host.served.version) == (MODEL_ID, "2.0.0")

    assert device.rollback().outcome == "rolled-back-manually"
    assert host.served is not None
    digest = "sha256:" + hashlib.sha256(fleet.target_file("1.0.0").read_bytes()).hexdigest()
    assert (host.served.id, host.served.version, host.served.digest) == (MODEL_ID, "1.0.0", digest)
