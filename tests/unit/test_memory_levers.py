"""The memory levers on the real llama.cpp: lazy per-layer embeddings, weight repack, mmap, KV cache type.

Each lever is checked twice: that llama.cpp did what the setting asks (its load log names the
lazily read table, the repacked buffer, the mapped buffer, the KV buffer size), and that greedy
output is unchanged by it.

The committed tiny fixture has neither per-layer embeddings nor weights llama.cpp repacks (F16),
so the levers would be no-ops on it. The ``ple_gguf`` fixture derives a model from it that has
both: Gemma 4's per-layer input embeddings (width 16, the table llama.cpp marks for lazy reading)
and Q4_0 layer matrices (repacked to q4_0_8x8 on any AVX2 CPU).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from edgert.engine.base import SamplingParams
from edgert.engine.llama.process import set_verbose
from edgert.errors import ConfigError
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import Settings, load_settings

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hi", "Tell me about the sea.", "Count: one two three"]
N_PER_LAYER = 16


def _derive_ple_model(src: Path, dst: Path) -> Path:
    """``src`` (the tiny fixture) plus per-layer embeddings, its layer matrices quantized to Q4_0."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, "gemma4")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        vtype = field.types[0]
        value = N_PER_LAYER if key == "gemma4.embedding_length_per_layer_input" else field.contents()
        writer.add_key_value(key, value, vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    n_layer = int(reader.fields["gemma4.block_count"].contents())
    n_embd = int(reader.fields["gemma4.embedding_length"].contents())
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(17)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)

    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name.startswith("blk.") and data.ndim == 2:
            packed = quants.quantize(data.astype(np.float32), GGMLQuantizationType.Q4_0)
            writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(tensor.name, data)
    writer.add_tensor("per_layer_token_embd.weight", mat(n_vocab, N_PER_LAYER * n_layer))
    writer.add_tensor("per_layer_model_proj.weight", mat(N_PER_LAYER * n_layer, n_embd))
    writer.add_tensor("per_layer_proj_norm.weight", np.ones(N_PER_LAYER, np.float32))
    for block in range(n_layer):
        writer.add_tensor(f"blk.{block}.inp_gate.weight", mat(N_PER_LAYER, n_embd))
        writer.add_tensor(f"blk.{block}.proj.weight", mat(n_embd, N_PER_LAYER))
        writer.add_tensor(f"blk.{block}.post_norm.weight", np.ones(n_embd, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="session")
def ple_gguf(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _derive_ple_model(tiny_gguf, tmp_path_factory.mktemp("ple") / "tiny-gemma4-ple-q4_0.gguf")


def make_settings(tmp_path: Path, model: Path, **engine: object) -> Settings:
    base: dict[str, object] = {"n_ctx": 1024, "n_parallel": 2, "n_threads": 1, "n_threads_batch": 1, "n_batch": 256}
    base.update(engine)
    return load_settings(state_dir=tmp_path, model=str(model), engine=base)


@contextmanager
def logged_runtime(capsys: pytest.CaptureFixture[str], settings: Settings) -> Iterator[tuple[Runtime, str]]:
    """A runtime opened from ``settings`` and llama.cpp's log of loading it."""
    capsys.readouterr()
    set_verbose(True)
    try:
        rt = open_runtime(settings)
    finally:
        set_verbose(False)
    log = capsys.readouterr().out
    try:
        yield rt, log
    finally:
        rt.close()


def greedy_texts(rt: Runtime, max_tokens: int = 48) -> list[str]:
    async def run(text: str) -> str:
        prompt = rt.chat_prompt([{"role": "user", "content": text}])
        out, _ = await rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=max_tokens)).collect()
        return out

    return [asyncio.run(run(text)) for text in PROMPTS]


def kv_mib(log: str) -> float:
    return sum(float(m) for m in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", log))


@pytest.fixture(scope="module")
def baseline(ple_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Greedy outputs with every lever at llama.cpp's resident, repacked, mapped default."""
    rt = open_runtime(make_settings(tmp_path_factory.mktemp("base"), ple_gguf, lazy_embeddings="off"))
    try:
        return greedy_texts(rt)
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("lazy", "repack", "mmap"),
    [("on", True, True), ("on", False, True), ("off", False, True), ("on", False, False), ("off", True, False)],
)
def test_each_memory_setting_takes_effect_and_keeps_greedy_output(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    ple_gguf: Path,
    baseline: list[str],
    lazy: str,
    repack: bool,
    mmap: bool,
) -> None:
    settings = make_settings(tmp_path, ple_gguf, lazy_embeddings=lazy, weight_repack=repack, use_mmap=mmap)
    with logged_runtime(capsys, settings) as (rt, log):
        assert ("per_layer_token_embd.weight (size = 0 MiB) lazy read enabled" in log) == (lazy == "on")
        assert ("CPU_REPACK model buffer" in log) == repack
        # Without mmap only the lazy table is mapped (llama.cpp maps the file for it whatever the load mode).
        mapped = re.findall(r"CPU_Mapped model buffer size =\s+([0-9.]+) MiB", log)
        assert bool(mapped) == (mmap or lazy == "on")
        if not mmap:
            assert re.search(r"\bCPU model buffer size", log)
        # Lazy reading reads the same bytes; the repacked kernel sums the same int8 block products in
        # another order, which on this model changes no greedy pick (on the 270M it can flip a near-tie:
        # benchmarks/memory_levers.py measures how often).
        assert greedy_texts(rt) == baseline


def test_auto_keeps_a_small_per_layer_table_resident(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ple_gguf: Path
) -> None:
    # llama.cpp's "auto" reads lazily only a table over 4 GiB: E2B's 1.8 GiB and E4B's ~2.3 GiB stay resident.
    with logged_runtime(capsys, make_settings(tmp_path, ple_gguf)) as (_, log):
        assert "lazy read enabled" not in log


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_kv_cache_is_smaller_and_serves(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_gguf: Path, kv_type: str
) -> None:
    # the whole trained context, so the KV buffers are large enough for the log's 0.01 MiB rounding
    with logged_runtime(capsys, make_settings(tmp_path / "f16", tiny_gguf, n_ctx=8192)) as (_, log):
        f16 = kv_mib(log)
    settings = make_settings(tmp_path / kv_type, tiny_gguf, n_ctx=8192, kv_cache_type=kv_type)
    with logged_runtime(capsys, settings) as (rt, log):
        # q8_0 stores 34 bytes per 32 values, q4_0 18: 53 % and 28 % of f16's 64
        expected = {"q8_0": 34 / 64, "q4_0": 18 / 64}[kv_type]
        assert kv_mib(log) == pytest.approx(f16 * expected, rel=0.05)
        assert all(greedy_texts(rt, max_tokens=8))


def test_quantized_kv_cache_without_flash_attention_is_a_config_error(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"kv_cache_type = 'q4_0' needs flash_attn = true"):
        make_settings(tmp_path, tiny_gguf, kv_cache_type="q4_0", flash_attn=False)
    # the environment is refused the same way, before any model is read
    monkeypatch.setenv("EDGERT_ENGINE__KV_CACHE_TYPE", "q8_0")
    monkeypatch.setenv("EDGERT_ENGINE__FLASH_ATTN", "false")
    with pytest.raises(ConfigError, match=r"engine: .*flash_attn = true or kv_cache_type = 'f16'"):
        load_settings(state_dir=tmp_path)


def test_unknown_lazy_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine.lazy_embeddings"):
        load_settings(state_dir=tmp_path, engine={"lazy_embeddings": "sometimes"})
