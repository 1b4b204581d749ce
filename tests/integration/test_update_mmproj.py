"""A Gemma 4 release with its multimodal projector through the signed update path: both files or neither.

The operator publishes the committed tiny Gemma 4 model with its tiny projector as version 2.0.0
(``edgert registry add --mmproj``) of a model whose 1.0.0 is the tiny GGUF alone; the two files are
two TUF targets that a device installs as one folder. Real parts throughout: the registry made with
``edgert.registry``, nginx serving it, the real engine loading model and projector (libmtmd), and
``edgert update apply`` as a subprocess where a ``kill -9`` is part of the test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgert.cli.registry import app as registry_app
from edgert.errors import RegistryError
from edgert.model_switch import RuntimeModelSwitch
from edgert.registry import staging
from edgert.update.state import Phase, StateStore, UpdateState
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.test_update_daemon import start_device, wait_for_current, wait_served
from tests.integration.test_update_faults import SLOW_BYTES_PER_S, apply_cli, kill9, start_apply, throttle, wait_until
from tests.integration.update_support import MODEL_ID, Fleet, device_env, device_update, updater

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
V1 = "tiny-gemma4+f16@1.0.0.gguf"
V2 = "tiny-gemma4+f16@2.0.0.mmgguf"  # the model + projector release: a folder of both


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


def release_pair(fleet: Fleet, version: str, mmproj: Path = TINY_MMPROJ) -> None:
    fleet.registry.add(fleet.model, model_id=MODEL_ID, version=version, mmproj=mmproj)
    fleet.registry.promote(MODEL_ID, version, channel="stable", rollout=100)
    fleet.registry.publish(out=fleet.site)


def projector_for_width(tmp_path: Path, width: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_gemma4_mmproj", FIXTURES / "make_tiny_gemma4_mmproj.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / f"mmproj-{width}.gguf"
    module.build(out, projection_dim=width)
    return out


def versions(device_dir: Path) -> list[str]:
    return sorted(p.name for p in (device_dir / "models" / "versions").iterdir())


def state_of(device_dir: Path) -> UpdateState:
    return StateStore(device_dir / "update").load()


def current_link(device_dir: Path) -> str:
    return (device_dir / "models" / "current.gguf").readlink().as_posix()


def test_a_release_with_its_projector_installs_both_files_and_serves_images_and_audio(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device_dir = tmp_path / "device"
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend.info.modalities == ("text",)

    release_pair(fleet, "2.0.0")
    result = device.apply()
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    assert result.downloaded_bytes == tiny_gguf.stat().st_size + TINY_MMPROJ.stat().st_size
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend.info.modalities == ("text", "image", "audio")
    folder = device_dir / "models" / "versions" / V2
    assert current_link(device_dir) == f"versions/{V2}"
    assert versions(device_dir) == sorted([V1, V2])  # no staging folder left behind
    assert sorted(p.name for p in folder.iterdir()) == ["mmproj.gguf", "model.gguf"]
    assert (folder / "model.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert (folder / "mmproj.gguf").read_bytes() == TINY_MMPROJ.read_bytes()
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.format == "gguf-mmproj"
    assert [m.path for m in state.current.members] == ["model.gguf", "mmproj.gguf"]
    assert device.current_path() == folder  # what a restarted daemon loads: the model and its projector


def test_the_registry_refuses_to_sign_a_pair_that_does_not_fit(tmp_path: Path, fleet: Fleet) -> None:
    with pytest.raises(RegistryError, match=r"mmproj-48\.gguf cannot be published with tiny-gemma4\.gguf: .*"):
        fleet.registry.add(fleet.model, model_id=MODEL_ID, version="2.0.0", mmproj=projector_for_width(tmp_path, 48))
    with pytest.raises(RegistryError, match="not a multimodal projector"):
        fleet.registry.add(fleet.model, model_id=MODEL_ID, version="2.0.0", mmproj=fleet.model)
    # nothing was staged: the version is still free
    release_pair(fleet, "2.0.0")


def test_registry_add_mmproj_on_the_command_line(tmp_path: Path, fleet: Fleet) -> None:
    args = ["add", str(fleet.model), "--model-id", MODEL_ID, "--version", "2.0.0", "--mmproj", str(TINY_MMPROJ)]
    result = CliRunner().invoke(registry_app, [*args, "--dir", str(fleet.registry.directory)])
    assert result.exit_code == 0, result.output
    assert f"added {MODEL_ID}@2.0.0: gguf-mmproj folder, 2 files" in result.stdout


def test_a_device_refuses_a_mismatched_pair_before_loading_it(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch], monkeypatch: pytest.MonkeyPatch
) -> None:
    device_dir = tmp_path / "device"
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    # a registry that signs without checking (an older tool, or a mistake): the device checks on its own
    with monkeypatch.context() as unchecked:
        unchecked.setattr(staging, "check_pair_files", lambda model, mmproj: None)
        release_pair(fleet, "2.0.0", projector_for_width(tmp_path, 48))
    result = device.apply()
    assert (result.outcome, result.release) == ("rolled-back", f"{MODEL_ID}@2.0.0")
    assert "is not a loadable GGUF with its multimodal projector" in result.detail
    assert "projects to 48, 48, the model's embedding length (gemma4) is 64" in result.detail
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.blocklist == [f"{MODEL_ID}@2.0.0"]  # not fetched again next round
    assert current_link(device_dir) == f"versions/{V1}"
    assert versions(device_dir) == [V1]
    assert switch_closer[0].serving is not None and switch_closer[0].serving.path.name == V1


def test_kill_between_the_two_files_installs_neither_then_resume_installs_both(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    device_dir = tmp_path / "device"
    # no daemon answers on this socket, so `edgert update apply` drives the updater itself
    env = {**device_env(device_dir, fleet), "EDGERT_SERVE__SOCKET": str(tmp_path / "no-daemon.sock")}
    assert apply_cli(env)["outcome"] == "committed"
    release_pair(fleet, "2.0.0")
    staging_dir = device_dir / "models" / "versions" / f".{V2}.staging"
    projector_part = staging_dir / "mmproj.gguf.part"
    throttle(fleet, SLOW_BYTES_PER_S)
    proc = start_apply(env)
    # the model is complete and verified, the projector half-way: the worst moment to die
    wait_until(lambda: projector_part.exists() and projector_part.stat().st_size >= 200_000, "a partial projector")
    kill9(proc)
    assert sorted(p.name for p in staging_dir.iterdir()) == ["mmproj.gguf.part", "model.gguf"]
    assert not (device_dir / "models" / "versions" / V2).exists()  # nothing under a name a daemon could load
    assert state_of(device_dir).phase is Phase.DOWNLOADING
    assert current_link(device_dir) == f"versions/{V1}"

    throttle(fleet, None)
    result = apply_cli(env)
    assert result["outcome"] == "committed"
    assert result["resumed_from"] >= tiny_gguf.stat().st_size + 200_000  # type: ignore[operator]
    folder = device_dir / "models" / "versions" / V2
    assert current_link(device_dir) == f"versions/{V2}"
    assert (folder / "model.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert (folder / "mmproj.gguf").read_bytes() == TINY_MMPROJ.read_bytes()
    assert versions(device_dir) == sorted([V1, V2])


def test_a_daemon_installs_the_pair_serves_media_and_loads_it_again_after_a_restart(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    (tmp_path / "device").mkdir()

    def modalities(daemon: DaemonProcess) -> list[str]:
        with daemon.client() as client:
            return list(client.get("/v1/models").json()["data"][0]["modalities"])

    daemon = start_device(tmp_path, fleet, tiny_gguf)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        assert modalities(daemon) == ["text"]
        release_pair(fleet, "2.0.0")
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        wait_for_current(daemon, f"{MODEL_ID}@2.0.0")
        wait_served(daemon, "2.0.0")
        assert modalities(daemon) == ["text", "image", "audio"]
    finally:
        assert daemon.stop() == 0, daemon.log()
    # no --model: the daemon serves the committed release, the folder with the model and its projector
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    restarted = start_daemon(tmp_path / "device", None, **settings)
    try:
        wait_served(restarted, "2.0.0")
        assert modalities(restarted) == ["text", "image", "audio"]
    finally:
        assert restarted.stop() == 0, restarted.log()
