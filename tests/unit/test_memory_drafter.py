"""The MTP drafter in the memory model, the budget planner and memory_budget at load (speculative off to fit)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgert.catalog import load_catalog
from edgert.gguf_file import read_layout
from edgert.memory_model import (
    BYTES_PER_MERGE,
    DRAFTER_BYTES_PER_TOKEN,
    MIB,
    ModelShape,
    drafter_bytes,
    drafter_shape,
    estimate,
    estimate_file,
    shape_of,
)
from edgert.memory_plan import STEPS, beside_mib, file_estimates, fit_settings, plan
from edgert.serving.runtime import open_runtime
from edgert.settings import EngineSettings, Settings
from edgert.store import drafter_path, model_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_DRAFTER = FIXTURES / "tiny-gemma4-assistant.gguf"


def e2b_drafter_like() -> ModelShape:
    """The E2B-shape assistant's memory-relevant shape (Q8_0: 78 MiB of tensors, the model's 262k vocabulary)."""
    return ModelShape(
        architecture="gemma4-assistant",
        tensor_bytes=78 * MIB + 261 * 1024,
        n_vocab=262144,
        n_embd=256,
        n_head=4,
        n_swa=512,
        kv_layers=(),
        matrices=(),
        per_layer_embd_bytes=0,
        per_layer_embd_row_bytes=0,
        tied_output=True,
        n_merges=514906,
    )


def _settings(tmp_path: Path, model: Path, budget: str | None, **engine: object) -> Settings:
    return Settings(
        state_dir=tmp_path,
        model=str(model),
        memory_budget=budget,
        engine=EngineSettings.model_validate({"n_threads": 1, "prefix_cache_persist": False, **engine}),
    )


def test_drafter_part_follows_the_measured_e2b_figures() -> None:
    # measured beside the E2B-shape model: +199 MiB RSS at 1 sequence, +213 MiB at 12 (benchmarks/RESULTS.md)
    one = EngineSettings(n_parallel=1, prefix_cache_entries=0)
    assert drafter_bytes(e2b_drafter_like(), one, repack={}) / MIB == pytest.approx(199, rel=0.02)
    assert drafter_bytes(e2b_drafter_like(), EngineSettings(), repack={}) / MIB == pytest.approx(213, rel=0.02)
    # a CPU that repacks its Q8_0 matrices keeps a second copy of them
    shape = e2b_drafter_like()
    assert drafter_bytes(shape, one, repack={"Q8_0": 4}) == drafter_bytes(shape, one, repack={})  # no matrices


def test_tiny_drafter_is_counted_unless_speculation_is_off(tiny_gguf: Path) -> None:
    shape = drafter_shape(TINY_DRAFTER)
    assert shape.architecture == "gemma4-assistant" and shape.n_vocab == 8192
    model = shape_of(read_layout(tiny_gguf))
    engine = EngineSettings(drafter=TINY_DRAFTER)
    served = estimate(model, engine, repack={}, drafter=shape)
    expected = shape.tensor_bytes + shape.n_merges * BYTES_PER_MERGE + shape.n_vocab * DRAFTER_BYTES_PER_TOKEN
    assert served.drafter_mib >= expected // MIB
    assert served.parts()["drafter"] == served.drafter_mib
    off = estimate(model, engine.model_copy(update={"speculative": "off"}), repack={}, drafter=shape)
    assert off.drafter_mib == 0 and off.total_mib == served.total_mib - served.drafter_mib


def test_plan_drops_the_drafter_after_the_free_steps_and_before_the_context() -> None:
    from tests.unit.test_memory_model import AVX2, e2b_like

    shape, drafter = e2b_like(), e2b_drafter_like()
    engine = EngineSettings(drafter=Path("/d.gguf"))
    full = estimate(shape, engine, repack=AVX2, drafter=drafter)
    assert full.drafter_mib > 0
    # what lazy + repack off + q8_0 KV reach, less a little: only dropping the drafter fits, n_ctx stays
    cheap = engine.model_copy(update={"lazy_embeddings": "on", "weight_repack": False, "kv_cache_type": "q8_0"})
    after_cheap = estimate(shape, cheap, repack=AVX2, drafter=drafter).total_mib
    fitted = plan(shape, engine, after_cheap - 1, repack=AVX2, drafter=drafter)
    names = [c.split(":")[0].removeprefix("engine.") for c in fitted.changes]
    assert fitted.fits and names[-1] == "speculative" and "n_ctx" not in names
    assert names == sorted(names, key=STEPS.index)
    assert fitted.engine.speculative == "off" and fitted.engine.n_ctx == engine.n_ctx
    assert fitted.breakdown.drafter_mib == 0
    # without a drafter the same budget shrinks the context instead
    plain = plan(shape, engine.model_copy(update={"drafter": None}), after_cheap - 1, repack=AVX2)
    assert "engine.speculative" not in " ".join(plain.changes)


def test_budget_turns_speculation_off_and_the_model_loads_without_its_drafter(
    tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, tiny_gguf, None, drafter=TINY_DRAFTER, speculative="on", kv_cache_type="q8_0")
    with_drafter = estimate(
        shape_of(read_layout(tiny_gguf)), settings.engine, repack={}, drafter=drafter_shape(TINY_DRAFTER)
    )
    without = estimate_file(tiny_gguf, settings.engine.model_copy(update={"speculative": "off"}), repack={})
    assert with_drafter.total_mib > without.total_mib
    tight = settings.model_copy(update={"memory_budget": f"{without.total_mib}MiB"})
    fitted, _ = fit_settings(tight, None, tiny_gguf, None)
    assert fitted.engine.speculative == "off" and fitted.engine.n_ctx == settings.engine.n_ctx
    with caplog.at_level(logging.WARNING, logger="edgert.memory_plan"):
        runtime = open_runtime(tight)
    try:
        assert not runtime.backend.can_draft
    finally:
        runtime.close()
    assert any("engine.speculative: on -> off" in record.message for record in caplog.records)
    # and with room for it, the drafter loads
    roomy = settings.model_copy(update={"memory_budget": f"{with_drafter.total_mib}MiB"})
    runtime = open_runtime(roomy)
    try:
        assert runtime.backend.can_draft
    finally:
        runtime.close()


def test_a_second_model_with_a_drafter_is_sized_with_it(tiny_gguf: Path, tmp_path: Path) -> None:
    plain = beside_mib(_settings(tmp_path, tiny_gguf, None), tiny_gguf)
    drafted = beside_mib(_settings(tmp_path, tiny_gguf, None, drafter=TINY_DRAFTER), tiny_gguf)
    assert plain is not None and drafted is not None
    assert (
        drafted - plain
        == estimate(
            shape_of(read_layout(tiny_gguf)),
            EngineSettings(drafter=TINY_DRAFTER),
            repack={},
            drafter=drafter_shape(TINY_DRAFTER),
        ).drafter_mib
    )


def test_the_fit_counts_an_installed_catalog_drafter(tiny_gguf: Path, tmp_path: Path) -> None:
    spec = load_catalog().get("gemma-4-e2b-it:q4_k_m")  # a catalog entry with a drafter; tiny files stand in
    models = tmp_path / "models"
    models.mkdir()
    model_path(models, spec).write_bytes(tiny_gguf.read_bytes())
    installed = {spec.id}
    plain = file_estimates(models, [spec], installed, EngineSettings())[spec.id]
    drafter = drafter_path(models, spec)
    assert drafter is not None
    drafter.write_bytes(TINY_DRAFTER.read_bytes())
    served = file_estimates(models, [spec], installed, EngineSettings())[spec.id]
    part = estimate(
        shape_of(read_layout(tiny_gguf)), EngineSettings(), repack={}, drafter=drafter_shape(TINY_DRAFTER)
    ).drafter_mib
    assert served == plain + part
    assert file_estimates(models, [spec], installed, EngineSettings(speculative="off"))[spec.id] == plain
