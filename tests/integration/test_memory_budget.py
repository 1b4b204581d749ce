"""``memory_budget`` through ``edgert serve``: the daemon adapts its settings to fit, or refuses to start."""

from __future__ import annotations

from pathlib import Path

from edgert.memory_model import estimate_file, machine_repack
from edgert.settings import EngineSettings
from tests.integration.daemon import start_daemon


def test_a_budget_nothing_fits_refuses_to_start_with_the_breakdown(tiny_gguf: Path, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, tiny_gguf, wait_ready=False, memory_budget="100MiB")
    assert daemon.proc.wait(timeout=120) == 1
    log = daemon.log()
    assert "does not fit memory_budget 100 MiB" in log
    assert "weights" in log and "process" in log  # the breakdown, part by part


def test_a_budget_just_below_the_prediction_serves_with_a_q8_0_kv_cache(tiny_gguf: Path, tmp_path: Path) -> None:
    engine = EngineSettings(n_ctx=131072, n_parallel=4, n_threads=1)
    predicted = estimate_file(tiny_gguf, engine, repack=machine_repack()).total_mib
    daemon = start_daemon(
        tmp_path, tiny_gguf, memory_budget=f"{predicted - 1}MiB", engine__n_ctx="131072", engine__n_parallel="4"
    )
    try:
        with daemon.client() as client:
            reply = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert reply.status_code == 200, reply.text
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "engine.kv_cache_type: f16 -> q8_0" in daemon.log()
