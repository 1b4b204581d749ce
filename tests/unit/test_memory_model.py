"""The memory model (edgert.memory_model), the budget planner (edgert.memory_plan) and memory_budget at load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgert.errors import MemoryBudgetError
from edgert.gguf_file import read_layout
from edgert.memory_model import (
    KvLayer,
    Matrix,
    ModelShape,
    estimate,
    estimate_file,
    kv_bytes,
    repack_rule,
    shape_of,
    type_bytes,
)
from edgert.memory_plan import STEPS, beside_mib, fit_settings, parse_budget, plan
from edgert.serving.runtime import open_runtime
from edgert.settings import EngineSettings, Settings

MIB = 1024 * 1024
AVX2 = repack_rule(("AVX2", "AVX512"))


def e2b_like() -> ModelShape:
    """Gemma 4 E2B's memory-relevant shape (MEASUREMENTS.md), with llama.cpp's figures for it in the asserts."""
    sliding = [il % 5 != 4 for il in range(15)]
    return ModelShape(
        architecture="gemma4",
        tensor_bytes=3242 * MIB + 1926758400,
        n_vocab=262144,
        n_embd=1536,
        n_head=8,
        n_swa=512,
        kv_layers=tuple(KvLayer(256 if s else 512, 256 if s else 512, s) for s in sliding),
        matrices=(
            Matrix("blk.0.ffn_up.weight", "Q4_K", 6144, 861 * MIB),
            Matrix("blk.0.ffn_down.weight", "Q6_K", 1536, 100 * MIB),
        ),
        per_layer_embd_bytes=1926758400,
        per_layer_embd_row_bytes=1926758400 // 262144,
        tied_output=True,
        tied_embd_bytes=315 * MIB,
    )


def test_kv_matches_llama_cpp_for_e2b() -> None:
    # llama.cpp's log for E2B at n_ctx 4096, 12 sequences, unified: non-SWA 24 MiB + SWA 48 MiB (4096 cells each)
    assert kv_bytes(e2b_like(), EngineSettings()) == 72 * MIB
    # q8_0 is 34 bytes per 32 values instead of 64
    assert kv_bytes(e2b_like(), EngineSettings(kv_cache_type="q8_0")) == pytest.approx(72 * MIB * 34 / 64, abs=1)
    # private cells per sequence: the sliding window needs only n_swa + n_ubatch per stream, not n_swa x n_seq
    # private KV: each of the 12 streams gets n_ctx / 12 = 341 cells padded to 512, so 1.5x the unified pool
    assert kv_bytes(e2b_like(), EngineSettings(kv_unified=False)) == 108 * MIB
    one_slot = EngineSettings(n_parallel=1, prefix_cache_entries=0, n_ctx=32768)
    assert kv_bytes(e2b_like(), one_slot) == 3 * 32768 * 1024 * 2 + 12 * 1024 * 512 * 2


def test_repack_counts_only_the_types_this_cpu_repacks() -> None:
    shape = e2b_like()
    assert estimate(shape, EngineSettings(), repack=AVX2).repack_mib == 861  # Q4_K on AVX2, not Q6_K
    arm = repack_rule(("NEON", "DOTPROD"))
    assert estimate(shape, EngineSettings(), repack=arm).repack_mib == 961  # ARM repacks Q6_K too
    assert estimate(shape, EngineSettings(weight_repack=False), repack=AVX2).repack_mib == 0
    # without mmap the repacked matrices replace their originals: no duplicate; but Gemma 4's loader reads a
    # tied token embedding twice (output before token_embd)
    mapped, read = (estimate(shape, EngineSettings(use_mmap=m), repack=AVX2) for m in (True, False))
    assert read.repack_mib == 0
    assert read.weights_mib - mapped.weights_mib == 315


def test_lazy_embeddings_keep_only_the_rows_read() -> None:
    shape = e2b_like()
    resident = estimate(shape, EngineSettings(lazy_embeddings="off"), repack=AVX2)
    lazy = estimate(shape, EngineSettings(lazy_embeddings="on"), repack=AVX2)
    assert resident.per_layer_embd_mib == 1838
    assert 0 < lazy.per_layer_embd_mib < 100
    # llama.cpp's auto reads lazily only a table over 4 GiB; E2B's is 1.8 GiB
    assert estimate(shape, EngineSettings(), repack=AVX2).per_layer_embd_mib == 1838
    # llama.cpp maps the file for lazy tensors whatever the load mode: lazy without mmap is still lazy
    unmapped = estimate(shape, EngineSettings(lazy_embeddings="on", use_mmap=False), repack=AVX2)
    assert unmapped.per_layer_embd_mib == lazy.per_layer_embd_mib
    assert unmapped.repack_mib == 0  # read, not mapped: the repacked matrices are never resident twice


def test_shape_of_the_tiny_fixture(tiny_gguf: Path) -> None:
    layout = read_layout(tiny_gguf)
    shape = shape_of(layout)
    assert shape.tensor_bytes == sum(t.nbytes for t in layout.tensors)
    assert layout.info.data_offset + shape.tensor_bytes <= tiny_gguf.stat().st_size
    assert [layer.sliding for layer in shape.kv_layers] == [True, False]  # its sliding_window_pattern
    assert shape.n_swa == 128
    merges = layout.metadata["tokenizer.ggml.merges"]  # counted, not read: llama.cpp's map of them costs RAM
    assert isinstance(merges, int) and merges > 0
    assert shape.n_merges == merges
    assert type_bytes("F16", 64) == 128


def test_plan_follows_the_steps_in_order_and_stops_when_it_fits() -> None:
    shape, engine = e2b_like(), EngineSettings()
    full = estimate(shape, engine, repack=AVX2, projector_mib=1510).total_mib
    assert plan(shape, engine, full, repack=AVX2, projector_mib=1510).changes == ()
    first = plan(shape, engine, full - 1, repack=AVX2, projector_mib=1510)
    assert first.fits and [c.split(":")[0] for c in first.changes] == ["engine.lazy_embeddings"]
    tight = plan(shape, engine, 3600, repack=AVX2, projector_mib=1510)
    names = [c.split(":")[0].removeprefix("engine.") for c in tight.changes]
    assert names == sorted(names, key=STEPS.index)  # never out of order
    assert tight.fits and tight.text_only and names[-1] == "multimodal"
    assert tight.engine.lazy_embeddings == "on" and not tight.engine.weight_repack
    hopeless = plan(shape, engine, 500, repack=AVX2)
    assert not hopeless.fits and hopeless.engine.n_ctx == 2048


def test_parse_budget() -> None:
    assert parse_budget("4GiB") == 4096
    assert parse_budget("3500MiB") == 3500
    with pytest.raises(ValueError, match="not a size"):
        parse_budget("lots")


def _settings(tmp_path: Path, model: Path, budget: str | None, **engine: object) -> Settings:
    return Settings(
        state_dir=tmp_path,
        model=str(model),
        memory_budget=budget,
        engine=EngineSettings.model_validate({"n_threads": 1, "prefix_cache_persist": False, **engine}),
    )


def test_budget_at_the_prediction_changes_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, tiny_gguf, None, n_ctx=131072)
    predicted = estimate_file(tiny_gguf, settings.engine, repack=AVX2).total_mib
    fitted, _ = fit_settings(settings.model_copy(update={"memory_budget": f"{predicted}MiB"}), None, tiny_gguf, None)
    assert fitted.engine == settings.engine


def test_budget_below_the_prediction_changes_kv_and_the_model_loads(
    tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = EngineSettings(n_ctx=131072, n_threads=1, prefix_cache_persist=False)
    predicted = estimate_file(tiny_gguf, engine, repack={}).total_mib  # the fixture has no repackable matrix
    settings = _settings(tmp_path, tiny_gguf, f"{predicted - 1}MiB", n_ctx=131072)
    with caplog.at_level(logging.WARNING, logger="edgert.memory_plan"):
        runtime = open_runtime(settings)
    try:
        assert runtime.scheduler.config.n_ctx == 131072  # a q8_0 KV cache was enough; the context stays
    finally:
        runtime.close()
    assert any("engine.kv_cache_type: f16 -> q8_0" in record.message for record in caplog.records)


def test_budget_nothing_fits_refuses_with_the_breakdown(tiny_gguf: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, tiny_gguf, "100MiB")
    with pytest.raises(MemoryBudgetError, match=r"does not fit memory_budget 100 MiB.*process \d+"):
        open_runtime(settings)


def test_a_second_model_is_sized_by_the_memory_model(tiny_gguf: Path, tmp_path: Path) -> None:
    """An update's candidate loads beside the serving model: what it adds is the model's estimate without
    the process part (one interpreter), at the settings it loads with -- memory_budget's fit included."""
    settings = _settings(tmp_path, tiny_gguf, None, n_ctx=131072)
    whole = estimate_file(tiny_gguf, settings.engine, repack={})
    assert beside_mib(settings, tiny_gguf) == whole.total_mib - whole.process_mib
    fitted = settings.model_copy(update={"memory_budget": f"{whole.total_mib - 1}MiB"})
    beside_fitted = beside_mib(fitted, tiny_gguf)
    assert beside_fitted is not None
    assert beside_fitted < whole.total_mib - whole.process_mib  # the fit's q8_0 KV cache is counted


def test_a_folder_or_broken_header_falls_back_on_the_file_size(tmp_path: Path) -> None:
    settings = _settings(tmp_path, tmp_path, None)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    assert beside_mib(settings, broken) is None
    assert beside_mib(settings, tmp_path) is None
