"""Where releases live under ``versions/``: injective names, checked names, guarded deletions.

Issue 13, finding 6: ``tiny:q4@1`` and ``tiny_q4@1`` both became ``tiny_q4@1.gguf``, and rolling one
back deleted the other's committed file (``current.gguf`` left dangling). Finding 17: a file name read
from the state file was deleted unchecked, and a channel pointer naming an allowed version could lead
to a blocklisted target. A real registry served by nginx, real GGUF files, real model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from edgert.errors import UntrustedMetadataError, UpdateError
from edgert.model_switch import RuntimeModelSwitch
from edgert.update.manifest import CHANNELS_KEY, CHANNELS_TARGET, ChannelPointer, Channels, model_target_path
from edgert.update.orchestrator import Updater, version_file_name
from edgert.update.state import Phase
from tests.integration.update_support import MODEL_ID, Fleet, broken_model, make_variant, updater


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def release_as(fleet: Fleet, model_id: str, version: str, model: Path) -> None:
    """Publish ``model_id@version`` and point the stable channel at it."""
    fleet.registry.add(model, model_id=model_id, version=version)
    fleet.registry.promote(model_id, version, channel="stable", rollout=100)
    fleet.registry.publish(out=fleet.site)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions_dir(device: Updater) -> Path:
    return device.versions_dir


def assert_current_intact(device: Updater, key: str, digest: str) -> None:
    state = device.status()
    assert state.current is not None and state.current.key == key
    link = device.settings.models_dir / "current.gguf"
    assert link.resolve().is_file(), f"current.gguf -> {os.readlink(link)} dangles"
    assert sha256(link.resolve()) == digest


def test_names_are_injective() -> None:
    pairs = [
        (("tiny:q4", "1", False), ("tiny_q4", "1", False)),  # the reported collision
        (("m", "1.gguf", True), ("m", "1", False)),  # a folder named like a GGUF
        (("m", "1.gguf.part", True), ("m", "1", False)),  # ... or like a GGUF's download
        (("a:b", "1", False), ("a+b", "1", False)),
    ]
    for (id_a, ver_a, folder_a), (id_b, ver_b, folder_b) in pairs:
        if "+" in id_b:  # not a valid model id: refused rather than named
            with pytest.raises(UpdateError):
                version_file_name(id_b, ver_b, folder=folder_b)
            continue
        assert version_file_name(id_a, ver_a, folder=folder_a) != version_file_name(id_b, ver_b, folder=folder_b)


def test_rolling_back_one_model_id_keeps_the_committed_file_of_a_look_alike_id(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    """Finding 6: the broken ``tiny:q4@1`` must not overwrite, then delete, the committed ``tiny_q4@1``."""
    release_as(fleet, "tiny_q4", "1", tiny_gguf)
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    committed = sha256(device.settings.models_dir / "current.gguf")

    release_as(fleet, "tiny:q4", "1", broken_model(tiny_gguf, tmp_path / "broken.gguf"))
    result = device.apply()
    assert result.outcome == "rolled-back", result
    assert_current_intact(device, "tiny_q4@1", committed)
    assert "tiny:q4@1" in device.status().blocklist


def test_a_release_whose_name_an_earlier_install_holds_is_refused_and_the_old_install_keeps_working(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    """Finding 6: a release installed under the old naming keeps its name; a newcomer may not take it."""
    release_as(fleet, "tiny:q4", "1", tiny_gguf)
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    # Make it an install from before the injective naming: ':' was written '_'.
    state_file = device.update_dir / "state.json"
    state = json.loads(state_file.read_text())
    old_name = state["current"]["file_name"]
    legacy = "tiny_q4@1.gguf"
    state["current"]["file_name"] = legacy
    state["current"].pop("file_id", None)
    state_file.write_text(json.dumps(state))
    (device.versions_dir / old_name).rename(device.versions_dir / legacy)
    link = device.settings.models_dir / "current.gguf"
    link.unlink()
    link.symlink_to(f"versions/{legacy}")
    committed = sha256(link.resolve())

    assert device.apply().outcome == "up-to-date"  # the old name is read back and served
    assert device.current_path() == device.versions_dir / legacy
    assert_current_intact(device, "tiny:q4@1", committed)

    release_as(fleet, "tiny_q4", "1", make_variant(tiny_gguf, tmp_path / "other.gguf", general_name="other"))
    with pytest.raises(UpdateError, match="the file of tiny:q4@1"):
        device.apply()
    assert_current_intact(device, "tiny:q4@1", committed)
    assert device.status().phase is Phase.IDLE


def test_a_rollback_does_not_delete_a_file_that_is_no_longer_the_installed_one(
    tmp_path: Path,
    fleet: Fleet,
    tiny_gguf: Path,
    switch_closer: list[RuntimeModelSwitch],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 6: deletions are guarded by the file identity recorded at install."""
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="v2"))
    assert device.apply().outcome == "committed"
    v2 = device.current_path()
    assert v2 is not None
    # Someone else's file now has v2's name (a copy: another inode).
    replacement = v2.with_name("elsewhere")
    shutil.copyfile(v2, replacement)
    replacement.replace(v2)
    with caplog.at_level(logging.WARNING, logger="edgert.update.orchestrator"):
        assert device.rollback().outcome == "rolled-back-manually"
    assert v2.is_file(), "the file that replaced v2 was deleted"
    assert "no longer the file installed for" in caplog.text


def test_an_unsafe_file_name_in_the_state_deletes_nothing(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    """Finding 17: a file name from the state file is checked before anything is deleted."""
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    victim = device.settings.models_dir / "victim.gguf"
    victim.write_bytes(b"not yours")
    state_file = device.update_dir / "state.json"
    state = json.loads(state_file.read_text())
    pending = {key: value for key, value in state["current"].items() if key != "file_id"}
    pending["file_name"] = "../victim.gguf"
    state.update(phase="rolling_back", pending=pending, rollback_reason="test")
    state_file.write_text(json.dumps(state))
    with pytest.raises(UpdateError, match="not a plain file name"):
        device.apply()
    assert victim.read_bytes() == b"not yours"


def test_a_channel_pointer_cannot_lead_to_a_blocklisted_release_under_another_version(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    """Finding 17: a pointer saying 3.0.0 but naming 2.0.0's target must not reinstall a blocklisted 2.0.0."""
    fleet.release("1.0.0")
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="v2"))
    assert device.apply().outcome == "committed"
    assert device.rollback().outcome == "rolled-back-manually"
    assert f"{MODEL_ID}@2.0.0" in device.status().blocklist

    # The targets role signs a pointer whose version is new but whose target is 2.0.0's.
    registry = fleet.registry
    pointer = ChannelPointer(
        model_id=MODEL_ID,
        version="3.0.0",
        target=model_target_path(MODEL_ID, "2.0.0"),
        rollout=100,
        promoted_at=datetime.now(UTC),
    )
    channels = Channels(channels={"stable": pointer})
    body = json.dumps(channels.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
    target = TargetFile.from_data(CHANNELS_TARGET, body, ["sha256"])
    target.unrecognized_fields["custom"] = {CHANNELS_KEY: channels.model_dump(mode="json")}
    staging = registry._load_staging()
    registry._write_target_bytes(body, target)
    staging.signed.targets[CHANNELS_TARGET] = target
    registry._save_staging(staging)
    registry.publish(out=fleet.site)

    with pytest.raises(UntrustedMetadataError, match=r"is tiny-gemma4:f16@2\.0\.0"):
        device.apply()
    state = device.status()
    assert state.current is not None and state.current.key == f"{MODEL_ID}@1.0.0"
    assert not any(p.name.startswith(version_file_name(MODEL_ID, "2.0.0")) for p in versions_dir(device).iterdir())
