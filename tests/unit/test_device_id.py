"""Issue 14: one device-id fallback. The updater (rollout buckets, deploy reports) and MQTT (topics) agree."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgert import device
from edgert.settings import load_settings
from edgert.transport import mqtt_link
from edgert.update.orchestrator import Updater


def both(tmp_path: Path, **settings: object) -> tuple[str, str]:
    loaded = load_settings(state_dir=tmp_path, **settings)
    return Updater(loaded).device_id, mqtt_link.resolve_device_id(loaded)


def test_unconfigured_both_paths_use_the_machine_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(device, "MACHINE_ID", machine_id)
    assert both(tmp_path) == ("0123456789abcdef0123456789abcdef",) * 2


def test_without_a_machine_id_both_paths_use_the_topic_safe_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "MACHINE_ID", tmp_path / "absent")
    monkeypatch.setattr(socket, "gethostname", lambda: "kiosk 7/b#")
    assert both(tmp_path) == ("kiosk_7_b_",) * 2


def test_a_configured_update_device_id_names_both(tmp_path: Path) -> None:
    assert both(tmp_path, update={"device_id": "van-17"}) == ("van-17", "van-17")
    # mqtt.device_id renames the topics only (as documented)
    assert both(tmp_path, update={"device_id": "van-17"}, mqtt={"device_id": "van-17-mqtt"}) == (
        "van-17",
        "van-17-mqtt",
    )
