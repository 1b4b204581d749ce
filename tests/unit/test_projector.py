"""Multimodal projectors on the model side: where they live, which one a model is served with, what they cost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgert import store
from edgert.catalog import load_catalog
from edgert.errors import ModelFileError, ModelMissingError
from edgert.settings import EngineSettings, Settings

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
E2B_Q4 = "gemma-4-e2b-it:q4_k_m"
E2B_Q8 = "gemma-4-e2b-it:q8_0"


def settings_for(state: Path, **engine: object) -> Settings:
    return Settings(state_dir=state, engine=EngineSettings.model_validate(engine))


def install(models: Path, name: str, source: Path = FIXTURES / "tiny-gemma4.gguf") -> Path:
    models.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, models / name))


# --------------------------------------------------------------------------- resolve_projector


def test_the_catalog_models_installed_projector_is_served(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    spec = load_catalog().get(E2B_Q4)
    model = install(settings.models_dir, spec.filename)
    assert store.resolve_projector(settings, spec, model) is None  # not installed: text only
    projector = install(settings.models_dir, "gemma-4-e2b-it.mmproj.gguf", TINY_MMPROJ)
    assert store.projector_path(settings.models_dir, spec) == projector
    assert store.resolve_projector(settings, spec, model) == projector


def test_multimodal_off_serves_text_only_whatever_is_installed_or_set(tmp_path: Path) -> None:
    spec = load_catalog().get(E2B_Q4)
    settings = settings_for(tmp_path, multimodal=False, mmproj=TINY_MMPROJ)
    model = install(settings.models_dir, spec.filename)
    install(settings.models_dir, "gemma-4-e2b-it.mmproj.gguf", TINY_MMPROJ)
    assert store.resolve_projector(settings, spec, model) is None


def test_an_explicit_projector_wins_over_the_catalogs(tmp_path: Path) -> None:
    spec = load_catalog().get(E2B_Q4)
    own = install(tmp_path / "elsewhere", "mine.gguf", TINY_MMPROJ)
    settings = settings_for(tmp_path, mmproj=own)
    model = install(settings.models_dir, spec.filename)
    install(settings.models_dir, "gemma-4-e2b-it.mmproj.gguf", TINY_MMPROJ)
    assert store.resolve_projector(settings, spec, model) == own
    assert store.resolve_projector(settings, None, FIXTURES / "tiny-gemma4.gguf") == own  # a model given by path


def test_a_model_given_by_path_has_no_projector_unless_one_is_set(tmp_path: Path) -> None:
    assert store.resolve_projector(settings_for(tmp_path), None, FIXTURES / "tiny-gemma4.gguf") is None


def test_an_explicit_projector_that_is_missing_or_not_a_projector_is_refused(tmp_path: Path) -> None:
    model = FIXTURES / "tiny-gemma4.gguf"
    with pytest.raises(ModelMissingError, match=r"projector file .*absent\.gguf does not exist") as missing:
        store.resolve_projector(settings_for(tmp_path, mmproj=tmp_path / "absent.gguf"), None, model)
    assert missing.value.param == "mmproj"
    # a language model where the projector belongs: refused before llama.cpp sees it
    with pytest.raises(ModelFileError, match=r"not a multimodal projector: .*unsupported architecture 'gemma4'"):
        store.resolve_projector(settings_for(tmp_path, mmproj=model), None, model)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(TINY_MMPROJ.read_bytes()[:4096])
    with pytest.raises(ModelFileError, match="not a multimodal projector"):
        store.resolve_projector(settings_for(tmp_path, mmproj=truncated), None, model)


def test_an_onnx_folder_cannot_take_a_projector(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="ONNX model folder"):
        store.resolve_projector(settings_for(tmp_path, mmproj=TINY_MMPROJ), None, FIXTURES / "tiny-gemma3-onnx")


def test_the_mmproj_setting_expands_the_home_directory() -> None:
    assert EngineSettings(mmproj=Path("~/p.gguf")).mmproj == Path.home() / "p.gguf"


# --------------------------------------------------------------------------- listing and removal


def test_projectors_are_not_listed_as_models(tmp_path: Path) -> None:
    catalog = load_catalog()
    models = tmp_path / "models"
    install(models, catalog.get(E2B_Q4).filename)
    install(models, "gemma-4-e2b-it.mmproj.gguf", TINY_MMPROJ)
    install(models, "stray.gguf")
    listed = [(m.path.name, m.spec.id if m.spec else None) for m in store.list_installed(models, catalog)]
    assert listed == [("gemma-4-e2b-it.q4_k_m.gguf", E2B_Q4), ("stray.gguf", None)]


def test_removing_a_quant_keeps_the_projector_another_installed_quant_shares(tmp_path: Path) -> None:
    catalog = load_catalog()
    models = tmp_path / "models"
    q4 = install(models, catalog.get(E2B_Q4).filename)
    q8 = install(models, catalog.get(E2B_Q8).filename)
    projector = install(models, "gemma-4-e2b-it.mmproj.gguf", TINY_MMPROJ)
    assert store.remove_model(models, catalog.get(E2B_Q4), catalog) == [q4]
    assert projector.is_file()
    partial = install(models, "gemma-4-e2b-it.mmproj.gguf.part", TINY_MMPROJ)
    assert store.remove_model(models, catalog.get(E2B_Q8), catalog) == [q8, projector, partial]
