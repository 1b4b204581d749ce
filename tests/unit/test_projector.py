"""Multimodal projectors on the model side: where they live, which one a model is served with, what they cost."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from edgert import store
from edgert.catalog import load_catalog
from edgert.errors import ModelFileError, ModelMissingError
from edgert.gguf_file import validate_gguf
from edgert.hardware import CpuInfo, Hardware
from edgert.memory_fit import choose_model, memory_need
from edgert.projector import check_pair
from edgert.serving.host import probe
from edgert.serving.runtime import open_runtime
from edgert.settings import EngineSettings, Settings
from edgert.update.manifest import ModelMeta, model_target_path

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
E2B_Q4 = "gemma-4-e2b-it:q4_k_m"
E2B_Q8 = "gemma-4-e2b-it:q8_0"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_gemma4_mmproj", FIXTURES / "make_tiny_gemma4_mmproj.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def projector_for_width(tmp_path: Path, width: int) -> Path:
    out = tmp_path / f"mmproj-{width}.gguf"
    generator().build(out, projection_dim=width)
    return out


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


# --------------------------------------------------------------------------- pairing


def test_headers_say_what_a_projector_reads_and_how_wide_a_model_is() -> None:
    projector = validate_gguf(TINY_MMPROJ, architectures=store.PROJECTOR_ARCHITECTURES)
    assert (projector.projector_modalities, projector.projection_dims) == (("image", "audio"), (64, 64))
    assert projector.embedding_length is None  # clip.vision.embedding_length is the encoder's own width
    model = validate_gguf(FIXTURES / "tiny-gemma4.gguf")
    assert (model.embedding_length, model.projector_modalities) == (64, ())
    check_pair(projector, model)


def test_a_projector_for_another_width_is_refused_naming_both_widths(tmp_path: Path) -> None:
    wrong = validate_gguf(projector_for_width(tmp_path, 48), architectures=store.PROJECTOR_ARCHITECTURES)
    model = validate_gguf(FIXTURES / "tiny-gemma4.gguf")
    with pytest.raises(ModelFileError, match=r"projects to 48, 48, the model.s embedding length \(gemma4\) is 64"):
        check_pair(wrong, model)
    with pytest.raises(ModelFileError, match="not a multimodal projector"):
        check_pair(model, model)


def test_serving_a_mismatched_projector_is_refused_before_llama_cpp_loads_it(tmp_path: Path) -> None:
    spec = load_catalog().get(E2B_Q4)
    settings = settings_for(tmp_path)
    model = install(settings.models_dir, spec.filename)
    install(settings.models_dir, "gemma-4-e2b-it.mmproj.gguf", projector_for_width(tmp_path, 48))
    with pytest.raises(ModelFileError, match=r"does not pair with model gemma-4-e2b-it\.q4_k_m\.gguf") as caught:
        store.resolve_projector(settings, spec, model)
    assert caught.value.param == "mmproj"
    explicit = settings_for(tmp_path, mmproj=projector_for_width(tmp_path, 32))
    with pytest.raises(ModelFileError, match="projects to 32, 32"):
        store.resolve_projector(explicit, None, FIXTURES / "tiny-gemma4.gguf")


# --------------------------------------------------------------------------- memory fit (the packaged catalog)


def machine(ram_mib: int) -> Hardware:
    return Hardware(
        system="Linux",
        machine="aarch64",
        cpu=CpuInfo("test cpu", 4, 4, ()),
        ram_total_mib=ram_mib,
        ram_available_mib=ram_mib,
        gpus=(),
        build_gpu_offload=False,
        backend="cpu",
    )


def test_the_projector_counts_in_the_need_unless_multimodal_is_off() -> None:
    spec = load_catalog().get(E2B_Q4)
    assert spec.projector is not None
    need = memory_need(spec, EngineSettings())
    assert (need.lean_mib, need.projector_mib) == (spec.ram_mib, spec.projector.ram_mib)
    assert need.total_mib == spec.ram_mib + spec.projector.ram_mib
    assert need.text_only_mib == spec.ram_mib
    assert memory_need(spec, EngineSettings(multimodal=False)).total_mib == spec.ram_mib
    assert memory_need(spec, EngineSettings(), projector=False).projector_mib == 0
    assert memory_need(load_catalog().get("gemma-3-270m:q4_k_m"), EngineSettings()).projector_mib == 0


def test_a_6_gib_device_fits_e2b_text_only_and_is_told_how() -> None:
    # 6144 - 1024 headroom = 5120 MiB: E2B Q4_K_M is 4100 MiB, 5610 with its 1510 MiB projector.
    catalog = load_catalog()
    with_media = choose_model(catalog, machine(6144), EngineSettings())
    assert with_media.chosen is not None and with_media.chosen.id == "gemma-3-270m:q4_k_m"
    line = next(line for line in with_media.lines if line.startswith(E2B_Q4))
    assert line == (
        f"{E2B_Q4}: needs 5610 MiB (4100 lean + 1510 projector) > budget 5120 MiB, does not fit; "
        "text only (4100 MiB, engine.multimodal = false) would fit"
    )
    text_only = choose_model(catalog, machine(6144), EngineSettings(multimodal=False))
    assert text_only.chosen is not None and text_only.chosen.id == "gemma-4-e2b-it:q5_k_m"  # 4338 MiB


def test_only_installed_projectors_count_when_the_caller_says_which_are_installed() -> None:
    catalog = load_catalog()
    installed = {"gemma-3-270m:q4_k_m", E2B_Q4}
    without = choose_model(catalog, machine(6144), EngineSettings(), installed=installed, projectors=frozenset())
    assert without.chosen is not None and without.chosen.id == E2B_Q4  # pulled --no-mmproj: serves text only
    assert "multimodal projector" not in without.explanation
    with_it = choose_model(catalog, machine(8192), EngineSettings(), installed=installed, projectors={E2B_Q4})
    assert with_it.chosen is not None and with_it.chosen.id == E2B_Q4
    assert "+ its multimodal projector, 1510 MiB" in with_it.explanation


def test_nothing_fitting_with_projectors_points_at_text_only() -> None:
    catalog = [spec for spec in load_catalog() if spec.projector is not None]
    choice = choose_model(catalog, machine(5632), EngineSettings())
    assert choice.chosen is None
    # 4608 MiB: no Gemma 4 with its projector; text only, the best is E2B Q5_K_M (4338)
    assert (
        "Nothing fits with its multimodal projector; served text only (engine.multimodal = false), "
        "gemma-4-e2b-it:q5_k_m needs 4338 MiB."
    ) in choice.explanation


# --------------------------------------------------------------------------- the readiness probe


@pytest.mark.parametrize("with_projector", [True, False])
def test_the_probe_evaluates_an_image_when_the_model_reads_images(tmp_path: Path, with_projector: bool) -> None:
    engine = {"n_ctx": 1024, "n_parallel": 1, "n_threads": 1, "n_ubatch": 512, "prefix_cache_entries": 0}
    settings = Settings(
        state_dir=tmp_path,
        engine=EngineSettings.model_validate({**engine, "mmproj": TINY_MMPROJ if with_projector else None}),
    )
    runtime = open_runtime(settings, str(FIXTURES / "tiny-gemma4.gguf"))
    try:
        result = asyncio.run(probe(runtime, "Say hello.", 60))
    finally:
        runtime.close()
    assert result.completion_tokens == 4
    if with_projector:
        assert result.image_tokens > 0  # the synthetic 96x96 image went through the vision encoder
        assert result.prompt_tokens > result.image_tokens
    else:
        assert result.image_tokens == 0


# --------------------------------------------------------------------------- a release with its projector


def test_a_model_and_projector_release_lists_exactly_its_two_files() -> None:
    fields = {
        "model_id": "m:q4",
        "version": "1",
        "architecture": "gemma4",
        "ram_mib": 100,
        "min_edgert_version": "0.1",
        "file_name": "m.gguf",
        "format": "gguf-mmproj",
    }
    meta = ModelMeta.model_validate({**fields, "files": ["model.gguf", "mmproj.gguf"]})
    assert meta.is_folder and meta.target_paths() == ("models/m:q4/1/model.gguf", "models/m:q4/1/mmproj.gguf")
    assert model_target_path("m:q4", "1", "gguf-mmproj") == "models/m:q4/1/model.gguf"  # the anchor
    assert meta.signed_custom()["files"] == ["model.gguf", "mmproj.gguf"]
    for files in (["model.gguf"], ["mmproj.gguf", "model.gguf"], ["model.gguf", "mmproj.gguf", "x"]):
        with pytest.raises(ValidationError, match="exactly the files"):
            ModelMeta.model_validate({**fields, "files": files})


def test_a_release_folder_serves_its_model_with_its_own_projector(tmp_path: Path) -> None:
    name = store.version_name("m:q4", "1", pair=True)
    assert name == "m+q4@1.mmgguf"
    assert len({name, store.version_name("m:q4", "1"), store.version_name("m:q4", "1", folder=True)}) == 3
    folder = tmp_path / "versions" / name
    model = install(folder, "model.gguf")
    projector = install(folder, "mmproj.gguf", TINY_MMPROJ)
    settings = settings_for(tmp_path / "state")
    link = tmp_path / "current.gguf"
    link.symlink_to(folder)
    assert store.resolve_model(settings, load_catalog(), str(link)) == (None, model)
    assert store.resolve_model(settings, load_catalog(), str(folder)) == (None, model)
    assert store.resolve_projector(settings, None, model) == projector
    assert store.resolve_projector(settings_for(tmp_path / "state", multimodal=False), None, model) is None
