"""A Gemma 4 release with its MTP drafter through the signed update path, like the projector.

The operator publishes the committed tiny Gemma 4 model with its tiny drafter as version 2.0.0
(``edgert registry add --drafter``) of a model whose 1.0.0 is the tiny GGUF alone; the two files are two TUF
targets that a device installs as one folder and serves together (speculative decoding with the release's
drafter). A drafter made for another model is refused by the registry before signing, and by the device
before anything loads. Real parts: the registry made with ``edgert.registry``, nginx serving it, the real
engine loading model and drafter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgert.cli.registry import app as registry_app
from edgert.errors import ConfigError, RegistryError
from edgert.model_switch import RuntimeModelSwitch
from edgert.registry import staging
from edgert.serving.runtime import open_runtime
from edgert.store import with_release_drafter
from tests.integration.test_update_mmproj import current_link, state_of
from tests.integration.update_support import MODEL_ID, Fleet, device_settings, updater
from tests.unit.test_speculation_engine import run_together, wide_drafter

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_DRAFTER = FIXTURES / "tiny-gemma4-assistant.gguf"
TINY_MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
V1 = "tiny-gemma4+f16@1.0.0.gguf"
V2 = "tiny-gemma4+f16@2.0.0.mmgguf"  # the model + drafter release: a folder of both


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


def release_with_drafter(fleet: Fleet, version: str, drafter: Path = TINY_DRAFTER, **extra: Path) -> None:
    fleet.registry.add(fleet.model, model_id=MODEL_ID, version=version, drafter=drafter, **extra)
    fleet.registry.promote(MODEL_ID, version, channel="stable", rollout=100)
    fleet.registry.publish(out=fleet.site)


def test_a_release_with_its_drafter_installs_both_files_and_serves_with_it(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device_dir = tmp_path / "device"
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    serving = switch_closer[0].serving
    assert serving is not None and not serving.backend.can_draft

    release_with_drafter(fleet, "2.0.0")
    result = device.apply()
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    assert result.downloaded_bytes == tiny_gguf.stat().st_size + TINY_DRAFTER.stat().st_size
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend.can_draft  # engine.drafter unset: the release's own
    assert serving.backend.info.modalities == ("text",)  # no projector in this release
    folder = device_dir / "models" / "versions" / V2
    assert current_link(device_dir) == f"versions/{V2}"
    assert sorted(p.name for p in folder.iterdir()) == ["drafter.gguf", "model.gguf"]
    assert (folder / "drafter.gguf").read_bytes() == TINY_DRAFTER.read_bytes()
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.format == "gguf-mmproj"
    assert [m.path for m in state.current.members] == ["model.gguf", "drafter.gguf"]
    # what a restarted daemon loads (current.gguf -> the folder): the model, again with its drafter
    assert device.current_path() == folder
    settings = device_settings(device_dir, fleet)
    always = settings.model_copy(update={"engine": settings.engine.model_copy(update={"speculative": "on"})})
    restarted = open_runtime(always, str(device_dir / "models" / "current.gguf"))
    try:
        assert restarted.backend.can_draft
        run_together(restarted, ["Say something."])
        assert restarted.scheduler.stats.draft_tokens > 0  # speculative = "on" with the release's own drafter
    finally:
        restarted.close()


def test_speculative_on_without_any_drafter_is_refused_at_load(tmp_path: Path, fleet: Fleet, tiny_gguf: Path) -> None:
    settings = device_settings(tmp_path / "device", fleet)
    always = settings.model_copy(update={"engine": settings.engine.model_copy(update={"speculative": "on"})})
    with pytest.raises(ConfigError, match=r"speculative = 'on' needs a drafter and tiny-gemma4\.gguf has none"):
        open_runtime(always, str(tiny_gguf))


def test_a_release_with_projector_and_drafter_serves_media_and_drafts(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    release_with_drafter(fleet, "2.0.0", mmproj=TINY_MMPROJ)
    assert device.apply().outcome == "committed"
    serving = switch_closer[0].serving
    assert serving is not None and serving.backend.can_draft
    assert serving.backend.info.modalities == ("text", "image", "audio")
    folder = tmp_path / "device" / "models" / "versions" / V2
    assert sorted(p.name for p in folder.iterdir()) == ["drafter.gguf", "mmproj.gguf", "model.gguf"]


def test_the_release_drafter_yields_to_an_explicit_one_and_to_speculative_off(tmp_path: Path, fleet: Fleet) -> None:
    folder = tmp_path / "x@1.mmgguf"
    folder.mkdir()
    model = folder / "model.gguf"
    model.write_bytes(b"")
    (folder / "drafter.gguf").write_bytes(b"")
    base = device_settings(tmp_path / "device", fleet)
    assert with_release_drafter(base, model).engine.drafter == folder / "drafter.gguf"
    explicit = base.model_copy(update={"engine": base.engine.model_copy(update={"drafter": TINY_DRAFTER})})
    assert with_release_drafter(explicit, model).engine.drafter == TINY_DRAFTER
    off = base.model_copy(update={"engine": base.engine.model_copy(update={"speculative": "off"})})
    assert with_release_drafter(off, model).engine.drafter is None
    assert with_release_drafter(base, tmp_path / "plain.gguf").engine.drafter is None


def test_the_registry_refuses_to_sign_a_drafter_that_does_not_fit(tmp_path: Path, fleet: Fleet) -> None:
    with pytest.raises(
        RegistryError,
        match=r"wide-assistant\.gguf cannot be published with tiny-gemma4\.gguf: .*embedding_length_out is 128",
    ):
        fleet.registry.add(fleet.model, model_id=MODEL_ID, version="2.0.0", drafter=wide_drafter(tmp_path))
    with pytest.raises(RegistryError, match="not a Gemma 4 MTP drafter"):
        fleet.registry.add(fleet.model, model_id=MODEL_ID, version="2.0.0", drafter=fleet.model)
    release_with_drafter(fleet, "2.0.0")  # nothing was staged: the version is still free


def test_registry_add_drafter_on_the_command_line(fleet: Fleet) -> None:
    args = ["add", str(fleet.model), "--model-id", MODEL_ID, "--version", "2.0.0", "--drafter", str(TINY_DRAFTER)]
    result = CliRunner().invoke(registry_app, [*args, "--dir", str(fleet.registry.directory)])
    assert result.exit_code == 0, result.output
    assert f"added {MODEL_ID}@2.0.0: gguf-mmproj folder, 2 files" in result.stdout


def test_a_device_refuses_a_mismatched_drafter_before_loading_it(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch], monkeypatch: pytest.MonkeyPatch
) -> None:
    device_dir = tmp_path / "device"
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    # a registry that signs without checking (an older tool, or a mistake): the device checks on its own
    with monkeypatch.context() as unchecked:
        unchecked.setattr(staging, "check_drafter_files", lambda model, drafter: None)
        release_with_drafter(fleet, "2.0.0", wide_drafter(tmp_path))
    result = device.apply()
    assert (result.outcome, result.release) == ("rolled-back", f"{MODEL_ID}@2.0.0")
    assert "is not a loadable GGUF with its multimodal projector / MTP drafter" in result.detail
    assert "its embedding_length_out is 128, the model's embedding_length is 64" in result.detail
    state = state_of(device_dir)
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.blocklist == [f"{MODEL_ID}@2.0.0"]
    assert current_link(device_dir) == f"versions/{V1}"
    assert switch_closer[0].serving is not None and switch_closer[0].serving.path.name == V1
