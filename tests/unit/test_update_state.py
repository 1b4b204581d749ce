"""The update path's pure decisions (edgert.update.state): target choice, compatibility, crash recovery."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgert.errors import UpdateError, UpdateStateError
from edgert.update.manifest import ChannelPointer, ModelMeta, model_target_path
from edgert.update.state import (
    Phase,
    Recovery,
    Release,
    StateStore,
    UpdateState,
    choose_target,
    in_rollout,
    incompatibility,
    recovery_for,
)

MODEL = "m:q4"


def pointer(rollout: int, *, previous: str | None = "1") -> ChannelPointer:
    return ChannelPointer(
        model_id=MODEL,
        version="2",
        target=model_target_path(MODEL, "2"),
        rollout=rollout,
        previous_version=previous,
        previous_target=model_target_path(MODEL, previous) if previous else None,
        promoted_at=datetime.now(UTC),
    )


def meta(**changes: object) -> ModelMeta:
    base: dict[str, object] = {
        "model_id": MODEL,
        "version": "2",
        "architecture": "gemma4",
        "ram_mib": 100,
        "min_edgert_version": "0.1.0",
        "file_name": "m.gguf",
    }
    return ModelMeta.model_validate(base | changes)


def release() -> Release:
    return Release(meta=meta(), target_path="t", length=1, hashes={"sha256": "0" * 64}, file_name="m@2.gguf")


def test_full_rollout_offers_the_new_version_and_blocklist_falls_back_to_previous() -> None:
    assert choose_target(pointer(100), device_id="d", blocklist=[]).target == model_target_path(MODEL, "2")
    fallback = choose_target(pointer(100), device_id="d", blocklist=[f"{MODEL}@2"])
    assert fallback.target == model_target_path(MODEL, "1")
    nothing = choose_target(pointer(100), device_id="d", blocklist=[f"{MODEL}@2", f"{MODEL}@1"])
    assert nothing.target is None and "blocklisted" in nothing.reason


def test_zero_rollout_keeps_devices_on_previous_or_nothing() -> None:
    assert choose_target(pointer(0), device_id="d", blocklist=[]).target == model_target_path(MODEL, "1")
    outside = choose_target(pointer(0, previous=None), device_id="d", blocklist=[])
    assert outside.target is None and "outside the 0% rollout" in outside.reason
    assert choose_target(None, device_id="d", blocklist=[]).target is None


def test_pinned_version_skips_rollout_but_not_blocklist() -> None:
    assert choose_target(pointer(0), device_id="d", blocklist=[], pin_version="7").target == model_target_path(
        MODEL, "7"
    )
    assert choose_target(pointer(0), device_id="d", blocklist=[f"{MODEL}@7"], pin_version="7").target is None


def test_rollout_share_is_close_to_the_percentage() -> None:
    inside = sum(in_rollout(f"device-{n}", pointer(20)) for n in range(2000))
    assert 340 <= inside <= 460


def test_incompatibility_reasons() -> None:
    ok = {"edgert_version": "0.1.0", "ram_mib": 1000, "max_bytes": 10, "length": 5}
    assert incompatibility(meta(), **ok) is None  # type: ignore[arg-type]
    assert "needs edgert >= 0.2" in (incompatibility(meta(min_edgert_version="0.2"), **ok) or "")  # type: ignore[arg-type]
    assert "MiB of memory" in (incompatibility(meta(ram_mib=5000), **ok) or "")  # type: ignore[arg-type]
    assert "max_target_bytes" in (incompatibility(meta(), **(ok | {"length": 11})) or "")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("phase", "attempts", "expected"),
    [
        (Phase.IDLE, 0, Recovery.NOTHING),
        (Phase.DOWNLOADING, 0, Recovery.RESUME_DOWNLOAD),
        (Phase.STAGED, 0, Recovery.CONTINUE_STAGED),
        (Phase.ACTIVATING, 1, Recovery.RETRY_ACTIVATION),
        (Phase.HEALTH_CHECK, 1, Recovery.RETRY_ACTIVATION),
        (Phase.HEALTH_CHECK, 2, Recovery.ROLL_BACK),
        (Phase.COMMITTING, 1, Recovery.FINISH_COMMIT),
        (Phase.ROLLING_BACK, 1, Recovery.FINISH_ROLLBACK),
    ],
)
def test_recovery_after_a_crash(phase: Phase, attempts: int, expected: Recovery) -> None:
    state = UpdateState(phase=phase, pending=release(), activation_attempts=attempts)
    assert recovery_for(state, max_activation_attempts=2) is expected


def test_state_store_round_trip_and_unreadable_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "update")
    assert store.load() == UpdateState()
    state = UpdateState(phase=Phase.STAGED, pending=release(), blocklist=["x@1"])
    store.save(state)
    assert store.load() == state
    assert not [p for p in store.directory.iterdir() if p.name != "state.json"]  # no temp files left
    store.path.write_text("{not json")
    with pytest.raises(UpdateError, match="unreadable"):
        store.load()


def test_unreadable_state_is_quarantined_and_updates_stay_off_until_an_operator_acts(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "update")
    store.save(UpdateState(blocklist=["m@2"]))
    store.path.write_bytes(store.path.read_bytes()[:20])  # truncated mid-write by a full disk or a power cut
    moved = store.set_aside_unreadable()
    assert moved is not None and moved.name.startswith("state.json.corrupt-")
    assert not store.path.exists()
    # a fresh, empty state would forget the blocklist: refused while the quarantined file is there
    with pytest.raises(UpdateStateError, match=r"moved to .*state\.json\.corrupt-"):
        store.load()
    moved.unlink()
    assert store.load() == UpdateState()


def test_state_of_a_newer_edgert_is_refused_and_left_in_place(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "update")
    store.save(UpdateState())
    store.path.write_text(store.path.read_text().replace('"schema_version": 1', '"schema_version": 7'))
    with pytest.raises(UpdateStateError, match="newer edgert"):
        store.load()
    assert store.set_aside_unreadable() is None
    assert store.path.exists()


def test_credentials_and_queries_in_urls_never_enter_the_state() -> None:
    state = UpdateState()
    state.last_error = "download of https://edgert:s3cret@cdn.example/m.gguf?X-Sig=t0ken interrupted"
    state.remember("downloading from https://edgert:s3cret@cdn.example/m.gguf?X-Sig=t0ken")
    dumped = state.model_dump_json()
    assert "cdn.example/m.gguf" in dumped
    assert "s3cret" not in dumped and "t0ken" not in dumped
