"""Folder models (ONNX Runtime GenAI) through the signed update path: all member files or nothing.

The operator publishes the committed tiny ONNX GenAI folder (``tests/fixtures/tiny-gemma3-onnx``)
as version 2.0.0 of a model whose 1.0.0 is the tiny GGUF; every file of the folder is its
own TUF target. Real parts throughout: the registry made with ``edgert.registry``, nginx
serving it, the real engines activating the models, ``edgert update apply`` and
``edgert serve`` as subprocesses where a crash or the socket is part of the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from edgert.errors import DownloadError, IntegrityError, UntrustedMetadataError
from edgert.model_switch import RuntimeModelSwitch
from edgert.update.manifest import member_target_path
from edgert.update.orchestrator import Updater
from edgert.update.publisher_signature import PublisherSignatureError
from edgert.update.state import Phase, StateStore, UpdateState
from tests.integration.test_update_daemon import start_device, update_status, wait_for_current, wait_served
from tests.integration.test_update_faults import (
    SLOW_BYTES_PER_S,
    apply_cli,
    blocking_hook,
    kill9,
    kill_hook,
    start_apply,
    throttle,
    wait_until,
)
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    device_env,
    make_variant,
    signed_updater,
    updater,
    write_hook,
)
from tests.signing_keys import ec_key_pair

V1 = "tiny-gemma4+f16@1.0.0.gguf"
V2 = "tiny-gemma4+f16@2.0.0.onnx"  # the folder release
CHAT = "/v1/chat/completions"


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


def members(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def versions(device_dir: Path) -> list[str]:
    return sorted(p.name for p in (device_dir / "models" / "versions").iterdir())


def current_link(device_dir: Path) -> str:
    return os.readlink(device_dir / "models" / "current.gguf")


def state_of(device_dir: Path) -> UpdateState:
    return StateStore(device_dir / "update").load()


def assert_on_v1(device_dir: Path) -> None:
    """Nothing of 2.0.0 is installed and 1.0.0 is the committed model."""
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert current_link(device_dir) == f"versions/{V1}"
    assert not (device_dir / "models" / "versions" / V2).exists()


def folder_size(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in members(folder))


# --------------------------------------------------------------------------- install, serve, roll back


def test_daemon_installs_a_folder_release_and_serves_it_on_the_socket(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, tiny_onnx: Path
) -> None:
    (tmp_path / "device").mkdir()
    daemon = start_device(tmp_path, fleet, tiny_gguf)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        fleet.release("2.0.0", tiny_onnx)
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        state = wait_for_current(daemon, f"{MODEL_ID}@2.0.0")
        wait_served(daemon, "2.0.0")
        current = state["current"]
        assert isinstance(current, dict)
        assert current["meta"]["format"] == "onnx-genai"
        assert [m["path"] for m in current["members"]] == members(tiny_onnx)
        assert current["length"] == folder_size(tiny_onnx)

        with daemon.client() as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
            reply = client.post(CHAT, json=body)
        assert model == MODEL_ID  # the signed release's id, not its folder's versioned name (issue 14)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        assert reply.json()["choices"][0]["message"]["content"]

        installed = tmp_path / "device" / "state" / "models" / "versions" / V2
        assert members(installed) == members(tiny_onnx)
        for name in members(tiny_onnx):  # byte for byte what the operator published
            assert (installed / name).read_bytes() == (tiny_onnx / name).read_bytes()
        assert update_status(daemon)["phase"] == "idle"
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_folder_release_commit_rollback_and_garbage_collection(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    hooks, log = tmp_path / "hooks", tmp_path / "hooks.log"
    for event in ("pre-install", "on-commit"):
        write_hook(hooks, event, f'echo "$EDGERT_HOOK_EVENT $EDGERT_MODEL_FORMAT $EDGERT_MODEL_PATH" >> {log}')
    device_dir = tmp_path / "device"
    device = updater(tmp_path, fleet, switch_closer, hooks_dir=str(hooks))
    assert device.apply().outcome == "committed"

    model = Path(shutil.copytree(tiny_onnx, tmp_path / "onnx-model"))
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("a member in a subfolder keeps its relative path\n")
    fleet.release("2.0.0", model)
    result = device.apply()
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    assert result.downloaded_bytes == folder_size(model)
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend_name.startswith("onnxruntime-genai")
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == sorted([V1, V2])  # no staging folder left behind
    folder = device_dir / "models" / "versions" / V2
    assert device.current_path() == folder  # what a restarted daemon loads (unless --model names another)
    assert members(folder) == members(model)
    assert (folder / "extra" / "notes.txt").read_text().startswith("a member in a subfolder")
    assert log.read_text().splitlines()[-2:] == [
        f"pre-install onnx-genai {folder}",
        f"on-commit onnx-genai {folder}",
    ]

    # a GGUF after the folder: the folder is kept as the previous release, 1.0.0 is collected
    fleet.release("3.0.0", make_variant(fleet.model, tmp_path / "v3.gguf", general_name="v3"))
    assert device.apply().outcome == "committed"
    assert versions(device_dir) == sorted([V2, "tiny-gemma4+f16@3.0.0.gguf"])

    # manual rollback loads the folder again through the model switch
    rolled = device.rollback()
    assert (rolled.outcome, rolled.release) == ("rolled-back-manually", f"{MODEL_ID}@2.0.0")
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend_name.startswith("onnxruntime-genai")
    state = device.status()
    assert state.current is not None and state.current.meta.is_folder
    assert state.blocklist == [f"{MODEL_ID}@3.0.0"]
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == [V2]

    # two more GGUF releases: the folder ages out and is deleted whole
    fleet.release("4.0.0", make_variant(fleet.model, tmp_path / "v4.gguf", general_name="v4"))
    assert device.apply().outcome == "committed"
    fleet.release("5.0.0", make_variant(fleet.model, tmp_path / "v5.gguf", general_name="v5"))
    assert device.apply().outcome == "committed"
    assert versions(device_dir) == ["tiny-gemma4+f16@4.0.0.gguf", "tiny-gemma4+f16@5.0.0.gguf"]


def test_pinned_folder_version(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    fleet.release("2.0.0", tiny_onnx)
    fleet.release("3.0.0", make_variant(fleet.model, tmp_path / "v3.gguf", general_name="v3"))
    device = updater(tmp_path, fleet, switch_closer)
    result = device.apply(pin_version="2.0.0")
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    assert current_link(tmp_path / "device") == f"versions/{V2}"


# --------------------------------------------------------------------------- tampering and missing members


@pytest.fixture
def on_v1(tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]) -> Updater:
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    return device


def test_one_tampered_member_installs_nothing(tmp_path: Path, fleet: Fleet, tiny_onnx: Path, on_v1: Updater) -> None:
    fleet.release("2.0.0", tiny_onnx)
    weights = fleet.member_file("2.0.0", "model.onnx.data")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the last big member: every member before it was already verified
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.onnx\.data.*sha256 mismatch"):
        on_v1.apply()
    state = on_v1.status()
    assert state.phase is Phase.IDLE and state.pending is None
    assert state.last_error is not None and "model.onnx.data" in state.last_error
    assert state.blocklist == []  # never activated: a fixed host is tried again
    assert_on_v1(tmp_path / "device")
    assert versions(tmp_path / "device") == [V1]  # the staging folder went with the bad member


def test_a_member_missing_on_the_host_installs_nothing_then_resumes(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, on_v1: Updater
) -> None:
    fleet.release("2.0.0", tiny_onnx)
    tokenizer = fleet.member_file("2.0.0", "tokenizer.json")
    kept = tokenizer.read_bytes()
    tokenizer.unlink()
    with pytest.raises(DownloadError, match="HTTP 404"):
        on_v1.apply()
    assert on_v1.status().phase is Phase.DOWNLOADING  # a transient host problem: resumed next time
    assert_on_v1(tmp_path / "device")

    tokenizer.write_bytes(kept)
    result = on_v1.apply()
    assert result.outcome == "committed"
    assert result.resumed_from > 0  # the members verified before the 404 were not fetched again
    assert result.downloaded_bytes == folder_size(tiny_onnx) - result.resumed_from
    assert current_link(tmp_path / "device") == f"versions/{V2}"


def test_a_member_the_signed_metadata_lacks_is_refused(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, on_v1: Updater
) -> None:
    registry = fleet.registry
    registry.add(tiny_onnx, model_id=MODEL_ID, version="2.0.0")
    # an operator's tool (or a bug) that drops one member's target from the signed metadata
    staging = registry._load_staging()
    del staging.signed.targets[member_target_path(MODEL_ID, "2.0.0", "tokenizer.json")]
    registry._save_staging(staging)
    registry.promote(MODEL_ID, "2.0.0", channel="stable", rollout=100)
    registry.publish(out=fleet.site)
    with pytest.raises(UntrustedMetadataError, match=r"lists the file tokenizer\.json, but .* is not a signed target"):
        on_v1.apply()
    assert_on_v1(tmp_path / "device")
    assert versions(tmp_path / "device") == [V1]


def test_a_folder_this_device_cannot_run_is_rolled_back_and_blocklisted(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, on_v1: Updater
) -> None:
    """A valid folder whose execution provider this device lacks: the engine refuses it at activation."""
    folder = tmp_path / "cuda-folder"
    folder.mkdir()
    for name in members(tiny_onnx):
        (folder / name).write_bytes((tiny_onnx / name).read_bytes())
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {}}]
    (folder / "genai_config.json").write_text(json.dumps(config))
    fleet.release("2.0.0", folder)
    result = on_v1.apply()
    if result.outcome == "committed":
        pytest.skip("this onnxruntime-genai build has CUDA")
    assert result.outcome == "rolled-back"
    assert "needs execution provider 'cuda'" in result.detail
    assert on_v1.status().blocklist == [f"{MODEL_ID}@2.0.0"]
    assert_on_v1(tmp_path / "device")
    assert versions(tmp_path / "device") == [V1]


# --------------------------------------------------------------------------- publisher signatures


@pytest.fixture
def signed_device(
    tmp_path: Path, fleet: Fleet, publisher: tuple[Path, Path], switch_closer: list[RuntimeModelSwitch]
) -> Updater:
    """A device that requires publisher signatures, serving the signed GGUF 1.1.0."""
    return signed_updater(tmp_path, fleet, switch_closer, publisher, "1.1.0")


def assert_refused_on_v1_1(device: Updater, device_dir: Path, version: str) -> None:
    """Nothing of ``version`` is installed or left staged; 1.1.0 serves; the release is not blocklisted."""
    state = device.status()
    assert state.phase is Phase.IDLE and state.pending is None
    assert state.current is not None and state.current.meta.version == "1.1.0"
    assert state.last_error is not None and f"{MODEL_ID}@{version} refused before staging" in state.last_error
    assert state.blocklist == []  # never activated: refused like an unsigned GGUF, not blocklisted
    assert versions(device_dir) == ["tiny-gemma4+f16@1.1.0.gguf"]  # no folder, no staging folder
    assert current_link(device_dir) == "versions/tiny-gemma4+f16@1.1.0.gguf"
    assert not [p for p in (device_dir / "models").iterdir() if p.name.startswith(".publisher-signature-")]


def test_a_folder_signed_by_the_publisher_installs_and_serves(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, publisher: tuple[Path, Path], signed_device: Updater,
    switch_closer: list[RuntimeModelSwitch],
) -> None:  # fmt: skip
    fleet.release("2.0.0", tiny_onnx, signing_key=publisher[0])
    assert fleet.member_file("2.0.0", "genai_config.json.sig").stat().st_size > 0  # the bundle, beside the config
    result = signed_device.apply()
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend_name.startswith("onnxruntime-genai")
    device_dir = tmp_path / "device"
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == sorted(["tiny-gemma4+f16@1.1.0.gguf", V2])
    installed = device_dir / "models" / "versions" / V2
    assert members(installed) == members(tiny_onnx)  # the bundle is not installed with the model


def test_a_folder_unsigned_or_signed_by_another_key_installs_nothing(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, signed_device: Updater
) -> None:
    device_dir = tmp_path / "device"
    fleet.release("2.0.0", tiny_onnx)
    with pytest.raises(PublisherSignatureError, match=r"no model-signing bundle .*/2\.0\.0/genai_config\.json\.sig"):
        signed_device.apply()
    assert_refused_on_v1_1(signed_device, device_dir, "2.0.0")

    impostor, _ = ec_key_pair(tmp_path, "impostor")
    fleet.release("3.0.0", tiny_onnx, signing_key=impostor)
    with pytest.raises(PublisherSignatureError, match="does not verify"):
        signed_device.apply()
    assert_refused_on_v1_1(signed_device, device_dir, "3.0.0")


def test_a_folder_file_the_publisher_did_not_sign_installs_nothing(
    tmp_path: Path, fleet: Fleet, tiny_onnx: Path, publisher: tuple[Path, Path], signed_device: Updater
) -> None:
    """The registry (compromised, or a tool's bug) adds a TUF-valid member the publisher never signed."""
    registry = fleet.registry
    registry.add(tiny_onnx, model_id=MODEL_ID, version="2.0.0", signing_key=publisher[0])
    staging = registry._load_staging()
    extra = member_target_path(MODEL_ID, "2.0.0", "extra.txt")
    data = b"not from the publisher\n"
    target = TargetFile.from_data(extra, data, ["sha256"])
    registry._write_target_bytes(data, target)
    staging.signed.targets[extra] = target
    anchor = staging.signed.targets[member_target_path(MODEL_ID, "2.0.0", "genai_config.json")]
    custom = anchor.unrecognized_fields["custom"]
    custom["edgert"]["files"] = sorted([*custom["edgert"]["files"], "extra.txt"])
    registry._save_staging(staging)
    registry.promote(MODEL_ID, "2.0.0", channel="stable", rollout=100)
    registry.publish(out=fleet.site)
    with pytest.raises(PublisherSignatureError, match=r"Extra files found .*extra\.txt"):
        signed_device.apply()
    assert_refused_on_v1_1(signed_device, tmp_path / "device", "2.0.0")


# --------------------------------------------------------------------------- kill -9


def staging_dir(device_dir: Path) -> Path:
    return device_dir / "models" / "versions" / f".{V2}.staging"


def weights_part(device_dir: Path) -> int:
    part = staging_dir(device_dir) / "model.onnx.data.part"
    return part.stat().st_size if part.exists() else 0


def test_kill_mid_folder_download_then_resume(tmp_path: Path, fleet: Fleet, tiny_onnx: Path) -> None:
    device_dir = tmp_path / "device"
    env = device_env(device_dir, fleet)
    assert apply_cli(env)["outcome"] == "committed"
    fleet.release("2.0.0", tiny_onnx)
    throttle(fleet, SLOW_BYTES_PER_S)
    proc = start_apply(env)
    wait_until(lambda: weights_part(device_dir) >= 300_000, "a partial download of model.onnx.data")
    kill9(proc)
    staged = sorted(p.name for p in staging_dir(device_dir).iterdir())
    assert staged == ["README.md", "genai_config.json", "model.onnx", "model.onnx.data.part"]
    kept = weights_part(device_dir) + sum(
        (tiny_onnx / name).stat().st_size for name in ("README.md", "genai_config.json", "model.onnx")
    )
    assert state_of(device_dir).phase is Phase.DOWNLOADING
    assert_on_v1(device_dir)

    throttle(fleet, None)
    result = apply_cli(env)
    assert result["outcome"] == "committed"
    assert result["resumed_from"] >= kept  # type: ignore[operator]
    assert result["downloaded_bytes"] == folder_size(tiny_onnx) - result["resumed_from"]  # type: ignore[operator]
    log = fleet.host.access_log()
    assert re.search(r'"GET /targets/models/\S+model\.onnx\.data HTTP/1\.1" 206 ', log)
    assert len(re.findall(r"GET /targets/models/\S+\.model\.onnx HTTP", log)) == 1  # verified once, kept
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == sorted([V1, V2])
    installed = device_dir / "models" / "versions" / V2
    assert all((installed / n).read_bytes() == (tiny_onnx / n).read_bytes() for n in members(tiny_onnx))
    assert state_of(device_dir).phase is Phase.IDLE


def test_kill_after_the_folder_is_staged_then_restart_finishes(tmp_path: Path, fleet: Fleet, tiny_onnx: Path) -> None:
    device_dir, hooks, go, pid_file = tmp_path / "device", tmp_path / "hooks", tmp_path / "go", tmp_path / "hook.pid"
    write_hook(hooks, "pre-install", blocking_hook(go, pid_file))
    env = device_env(device_dir, fleet, hooks_dir=str(hooks))
    go.touch()
    assert apply_cli(env)["outcome"] == "committed"
    go.unlink()
    fleet.release("2.0.0", tiny_onnx)
    proc = start_apply(env)
    wait_until(pid_file.exists, "the pre-install hook")
    kill9(proc)
    kill_hook(pid_file)
    state = state_of(device_dir)
    assert state.phase is Phase.STAGED
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert current_link(device_dir) == f"versions/{V1}"
    assert (device_dir / "models" / "versions" / V2).is_dir()  # staged under its final name, not committed

    # As if the kill had come between the folder's rename and the state saying "staged":
    state = state_of(device_dir)
    state.phase = Phase.DOWNLOADING
    StateStore(device_dir / "update").save(state)
    go.touch()
    result = apply_cli(env)
    assert result["outcome"] == "committed"
    assert result["downloaded_bytes"] == 0  # every member was verified again on disk, none fetched
    assert result["resumed_from"] == folder_size(tiny_onnx)
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == sorted([V1, V2])
