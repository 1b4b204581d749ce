"""Fit for speed: estimated decode tok/s, the cached bandwidth, and engine.min_decode_tok_s in the auto pick."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edgert.catalog import Catalog, load_catalog
from edgert.engine.llama import capabilities
from edgert.gguf_file import read_layout
from edgert.hardware import detect
from edgert.memory_fit import choose_model
from edgert.memory_model import Matrix, ModelShape, shape_of
from edgert.settings import EngineSettings
from edgert.speed_fit import (
    BANDWIDTH_FILE,
    bytes_per_token,
    catalog_bytes_per_token,
    decode_tok_s,
    machine_bandwidth,
    speed_estimates,
)
from tests.unit.test_doctor import FIXTURES, env, install, run, run_json  # noqa: F401 - env is a fixture
from tests.unit.test_hardware import CATALOG, machine

GB = 1_000_000_000


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "speed-models.toml"
    path.write_text(CATALOG, encoding="utf-8")
    return load_catalog(path)


def test_the_estimate_falls_with_bytes_per_token_and_rises_with_bandwidth() -> None:
    rates = [decode_tok_s(n * GB // 4, 20 * GB) for n in range(1, 9)]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    by_bandwidth = [decode_tok_s(GB, bw * GB) for bw in (2, 5, 10, 20, 40)]
    assert by_bandwidth == sorted(by_bandwidth) and len(set(by_bandwidth)) == len(by_bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        decode_tok_s(GB, 0)


def test_a_token_reads_the_matrices_and_one_row_of_the_per_layer_table() -> None:
    matrices = (Matrix("blk.0.ffn_up.weight", "Q4_K", 4096, 3_000_000), Matrix("output.weight", "Q6_K", 8192, 900_000))
    shape = ModelShape(
        architecture="gemma4",
        tensor_bytes=3_900_000 + 50_000_000 + 100_000,
        n_vocab=8192,
        n_embd=1536,
        n_head=8,
        n_swa=512,
        kv_layers=(),
        matrices=matrices,
        per_layer_embd_bytes=50_000_000,
        per_layer_embd_row_bytes=6_100,
        tied_output=False,
    )
    assert bytes_per_token(shape) == 3_900_000 + 6_100  # the 50 MB table gives one row
    bigger_table = replace(shape, per_layer_embd_bytes=500_000_000, per_layer_embd_row_bytes=61_000)
    assert bytes_per_token(bigger_table) == 3_900_000 + 61_000
    # the tiny fixture (no per-layer table, tied output): every matrix, the tied output among them
    tiny = shape_of(read_layout(FIXTURES / "tiny-gemma4.gguf"))
    assert tiny.tied_embd_bytes > 0
    assert bytes_per_token(tiny) == sum(m.nbytes for m in tiny.matrices) >= tiny.tied_embd_bytes


def test_models_not_installed_count_the_dense_share_of_their_file(catalog: Catalog) -> None:
    specs = {spec.id: spec for spec in catalog}
    e2b = specs["gemma-4-e2b:q4_k_m"]
    small = specs["gemma-3-270m:q4_k_m"]
    assert catalog_bytes_per_token(small) == small.size_bytes  # no lookup table to leave out
    assert catalog_bytes_per_token(e2b) < e2b.size_bytes / 2  # the per-layer table is most of the file
    rates = speed_estimates(Path("/nonexistent"), catalog, set(), 20 * GB)
    assert set(rates) == set(specs)
    assert rates["gemma-3-270m:q4_k_m"] > rates["gemma-4-e2b:q4_k_m"] > rates["gemma-4-e4b:q8_0"]


def test_a_slow_candidate_is_passed_over_with_the_reason(catalog: Catalog) -> None:
    hw = machine(64 * 1024)
    rates = {spec.id: (5.0 if spec.id.startswith("gemma-4-e4b") else 12.0) for spec in catalog}
    choice = choose_model(catalog, hw, EngineSettings(), tok_s=rates)
    assert choice.chosen is not None and choice.chosen.id == "gemma-4-e2b:q8_0"
    slow = next(c for c in choice.candidates if c.spec.id == "gemma-4-e4b:q8_0")
    assert slow.fits and slow.eligible and not slow.fast_enough
    assert "~5.0 tok/s, below engine.min_decode_tok_s 8" in slow.line
    assert "Passed over as too slow" in choice.explanation and "gemma-4-e4b:q8_0" in choice.explanation
    fast = next(c for c in choice.candidates if c.spec.id == "gemma-4-e2b:q8_0")
    assert fast.fast_enough and fast.line.endswith("~12.0 tok/s")


def test_min_decode_tok_s_0_picks_by_memory_only(catalog: Catalog) -> None:
    rates = {spec.id: 1.0 for spec in catalog}
    choice = choose_model(catalog, machine(64 * 1024), EngineSettings(min_decode_tok_s=0), tok_s=rates)
    assert choice.chosen is not None and choice.chosen.id == "gemma-4-e4b:q8_0"
    assert all(c.fast_enough for c in choice.candidates)
    assert "too slow" not in choice.explanation


def test_when_nothing_is_fast_enough_the_fastest_that_fits_is_chosen(catalog: Catalog) -> None:
    rates = {spec.id: 2.0 for spec in catalog} | {"gemma-4-e2b:q4_k_m": 6.0}
    choice = choose_model(catalog, machine(64 * 1024), EngineSettings(), tok_s=rates)
    assert choice.chosen is not None and choice.chosen.id == "gemma-4-e2b:q4_k_m"
    assert "the fastest of them was chosen (~6.0 tok/s)" in choice.explanation


def test_the_bandwidth_is_measured_once_per_cpu_and_cached(tmp_path: Path) -> None:
    measured = machine_bandwidth(tmp_path, "cpu A")
    assert measured > 1e8  # any machine copies faster than 100 MB/s
    cached = json.loads((tmp_path / BANDWIDTH_FILE).read_text(encoding="utf-8"))
    assert cached == {"cpu_model": "cpu A", "bytes_per_s": measured}
    (tmp_path / BANDWIDTH_FILE).write_text(json.dumps({"cpu_model": "cpu A", "bytes_per_s": 123.0}), encoding="utf-8")
    assert machine_bandwidth(tmp_path, "cpu A") == 123.0  # read back, not re-measured
    assert machine_bandwidth(tmp_path, "cpu B") != 123.0  # another CPU: measured again
    assert json.loads((tmp_path / BANDWIDTH_FILE).read_text(encoding="utf-8"))["cpu_model"] == "cpu B"


def _cache_bandwidth(state: Path, bytes_per_s: float) -> None:
    """Pins doctor's bandwidth: the cache for this machine's CPU model."""
    state.mkdir(parents=True, exist_ok=True)
    cpu = detect(capabilities()).cpu.model
    (state / BANDWIDTH_FILE).write_text(json.dumps({"cpu_model": cpu, "bytes_per_s": bytes_per_s}), encoding="utf-8")


def test_doctor_shows_the_estimate_and_passes_over_a_slow_model(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("EDGERT_MODEL", "auto")
    monkeypatch.setenv("EDGERT_ENGINE__MIN_DECODE_TOK_S", "8")
    install(env, "gemma-3-270m.q4_k_m.gguf")
    install(env, "gemma-4-e2b.q4_k_m.gguf")
    _cache_bandwidth(env, 5 * GB)  # a slow board: E2B's ~1.5 GB per token gives ~3 tok/s
    code, report = run_json()
    assert code == 0
    auto = report["auto_model"]
    assert isinstance(auto, dict)
    by_id = {c["id"]: c for c in auto["candidates"]}
    assert by_id["gemma-4-e2b:q4_k_m"]["decode_tok_s_estimate"] < 8
    assert by_id["gemma-4-e2b:q4_k_m"]["fast_enough"] is False
    assert by_id["gemma-3-270m:q4_k_m"]["fast_enough"] is True
    assert auto["id"] == "gemma-3-270m:q4_k_m"
    table = run().stdout
    assert "est. tok/s" in table and "(slow)" in table

    monkeypatch.setenv("EDGERT_ENGINE__MIN_DECODE_TOK_S", "0")
    _, report = run_json()
    assert isinstance(report["auto_model"], dict) and report["auto_model"]["id"] == "gemma-4-e2b:q4_k_m"
