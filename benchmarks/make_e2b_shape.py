#!/usr/bin/env python3
"""Write a shape-exact Gemma 4 E2B (or E4B) GGUF with random weights and quantize it to Q4_K_M.

The file has exactly the tensor names, shapes and hyperparameters of the real
``google/gemma-4-E2B-it`` text decoder as llama.cpp's ``gemma4`` loader expects
them (35 layers, hidden 1536, 8 query heads / 1 KV head, head dim 256 on
sliding-window layers and 512 on the full-attention layer every 5th layer,
sliding window 512, the last 20 layers reuse earlier layers' KV cache,
per-layer input embeddings of width 256, vocab 262144, FFN 6144 and 12288
("double-wide MLP") on the KV-shared layers, tied output embedding). Speed
and memory use therefore match the real model; the generated text is
garbage. ``--variant e4b`` writes the E4B shape instead (42 layers, hidden
2560, 8/2 heads, full attention every 6th layer, 18 KV-shared layers,
FFN 10240).

Steps:

1. Stream an F16 GGUF tensor by tensor (never more than one chunk of random
   data in RAM; deterministic for a given ``--seed``). Weights are random
   FP16 values with magnitude in [2**-7, 2**-5) and random sign (std ~0.019),
   generated directly as bit patterns, which is ~20x faster than sampling a
   normal distribution. Norm weights are 1, ``rope_freqs`` holds the real
   proportional-RoPE factors.
2. Copy the tokenizer metadata (``tokenizer.*``) from llama.cpp's
   ``models/ggml-vocab-gemma-4.gguf``. That file ships inside the
   llama-cpp-python sdist under ``vendor/llama.cpp/models/``;
   ``benchmarks/build_llama_tools.sh`` downloads and unpacks that sdist into
   ``$CACHE/src/llama_cpp_python-<version>/``, which is the default location.
3. Run ``llama-quantize <f16> <q4_k_m> Q4_K_M`` (binary built by
   ``build_llama_tools.sh``) and delete the F16 file unless ``--keep-f16``.

Output defaults to ``${XDG_CACHE_HOME:-~/.cache}/edgert-bench/`` (override
with ``--out-dir`` or ``EDGERT_BENCH_CACHE``). The files are never meant to be
committed. Requires ``numpy`` and ``gguf`` (the vendored ``gguf-py`` of the
sdist is used when present, so the constants match the llama.cpp that loads
the file).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CHUNK_ELEMENTS = 32 * 1024 * 1024  # random values generated per chunk (64 MiB of F16)


def default_cache_dir() -> Path:
    """Return the edgert benchmark cache dir (``EDGERT_BENCH_CACHE`` or XDG cache)."""
    env = os.environ.get("EDGERT_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgert-bench"


def default_llama_src(cache: Path) -> Path:
    """Return the vendored llama.cpp dir unpacked by ``build_llama_tools.sh``."""
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"


def import_gguf(llama_src: Path) -> Any:
    """Import gguf-py, preferring the copy vendored with the llama.cpp that will load the file."""
    vendored = llama_src / "gguf-py"
    if (vendored / "gguf" / "__init__.py").is_file():
        sys.path.insert(0, str(vendored))
    gguf = importlib.import_module("gguf")  # imported late: its location depends on the sdist path

    if not hasattr(gguf.MODEL_ARCH, "GEMMA4"):
        raise SystemExit(f"gguf {gguf.__file__} has no GEMMA4 arch; need gguf-py >= 0.19")
    return gguf


@dataclass(frozen=True)
class Shape:
    """Text-decoder hyperparameters of one Gemma 4 variant."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_swa: int
    head_dim_full: int
    full_every: int  # layer i is full attention when (i + 1) % full_every == 0
    n_swa: int
    n_kv_shared: int
    n_embd_per_layer: int
    n_vocab: int
    n_ff: int
    double_wide_mlp: bool  # KV-shared layers use 2 * n_ff
    n_ctx_train: int = 131072
    rope_base_full: float = 1_000_000.0
    rope_base_swa: float = 10_000.0
    partial_rotary_full: float = 0.25
    rms_eps: float = 1e-6
    final_logit_softcap: float = 30.0

    def __post_init__(self) -> None:
        """Check the KV-sharing layout llama.cpp assumes.

        Shared layers reuse the cache of layer ``first_shared - 1`` (full attention) or
        ``first_shared - 2`` (sliding window), see ``llama_model::create_memory``.
        """
        first_shared = self.n_layer - self.n_kv_shared
        if self.n_kv_shared and (self.is_swa(first_shared - 1) or not self.is_swa(first_shared - 2)):
            raise ValueError(f"{self.name}: layers before the first KV-shared one must be [swa, full]")

    def is_swa(self, il: int) -> bool:
        """Whether layer ``il`` is a sliding-window layer."""
        return (il + 1) % self.full_every != 0

    def has_kv(self, il: int) -> bool:
        """Whether layer ``il`` computes its own K/V (the rest reuse earlier caches)."""
        return il < self.n_layer - self.n_kv_shared

    def head_dim(self, il: int) -> int:
        """Per-head dimension of layer ``il``."""
        return self.head_dim_swa if self.is_swa(il) else self.head_dim_full

    def ff(self, il: int) -> int:
        """FFN width of layer ``il``."""
        if self.double_wide_mlp and not self.has_kv(il):
            return 2 * self.n_ff
        return self.n_ff


VARIANTS: dict[str, Shape] = {
    # google/gemma-4-E2B-it text_config
    "e2b": Shape(
        name="E2B",
        n_layer=35,
        n_embd=1536,
        n_head=8,
        n_head_kv=1,
        head_dim_swa=256,
        head_dim_full=512,
        full_every=5,
        n_swa=512,
        n_kv_shared=20,
        n_embd_per_layer=256,
        n_vocab=262144,
        n_ff=6144,
        double_wide_mlp=True,
    ),
    # google/gemma-4-E4B-it text_config
    "e4b": Shape(
        name="E4B",
        n_layer=42,
        n_embd=2560,
        n_head=8,
        n_head_kv=2,
        head_dim_swa=256,
        head_dim_full=512,
        full_every=6,
        n_swa=512,
        n_kv_shared=18,
        n_embd_per_layer=256,
        n_vocab=262144,
        n_ff=10240,
        double_wide_mlp=False,
    ),
    # tiny pipeline self-test (same layer pattern and tokenizer, ~150 MB F16; not a real model size)
    "tiny": Shape(
        name="tiny",
        n_layer=10,
        n_embd=128,
        n_head=2,
        n_head_kv=1,
        head_dim_swa=64,
        head_dim_full=128,
        full_every=5,
        n_swa=512,
        n_kv_shared=5,
        n_embd_per_layer=16,
        n_vocab=262144,
        n_ff=256,
        double_wide_mlp=True,
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: GGUF name, ggml ``ne`` (fastest dim first) and how to fill it."""

    name: str
    ne: tuple[int, ...]
    kind: str  # "weight" (random F16), "ones" (F32), "rope_freqs" (F32)

    @property
    def np_shape(self) -> tuple[int, ...]:
        """Numpy (row-major) shape: ggml ``ne`` reversed."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        """Total element count."""
        return int(np.prod(self.ne, dtype=np.int64))

    @property
    def dtype(self) -> type[np.generic]:
        """Numpy dtype of the stored data."""
        return np.float16 if self.kind == "weight" else np.float32


def tensor_specs(s: Shape) -> list[TensorSpec]:
    """List every tensor llama.cpp's gemma4 loader reads for shape ``s`` (tied output)."""
    n_pl_total = s.n_embd_per_layer * s.n_layer
    specs = [
        TensorSpec("rope_freqs.weight", (s.head_dim_full // 2,), "rope_freqs"),
        TensorSpec("token_embd.weight", (s.n_embd, s.n_vocab), "weight"),
        TensorSpec("per_layer_token_embd.weight", (n_pl_total, s.n_vocab), "weight"),
        TensorSpec("per_layer_model_proj.weight", (s.n_embd, n_pl_total), "weight"),
        TensorSpec("per_layer_proj_norm.weight", (s.n_embd_per_layer,), "ones"),
        TensorSpec("output_norm.weight", (s.n_embd,), "ones"),
    ]
    for il in range(s.n_layer):
        hd = s.head_dim(il)
        ff = s.ff(il)
        p = f"blk.{il}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (s.n_embd,), "ones"),
            TensorSpec(p + "attn_q.weight", (s.n_embd, hd * s.n_head), "weight"),
        ]
        if s.has_kv(il):
            # KV-shared layers have no K/V projections (they read an earlier layer's cache)
            specs += [
                TensorSpec(p + "attn_k.weight", (s.n_embd, hd * s.n_head_kv), "weight"),
                TensorSpec(p + "attn_v.weight", (s.n_embd, hd * s.n_head_kv), "weight"),
                TensorSpec(p + "attn_k_norm.weight", (hd,), "ones"),
            ]
        specs += [
            TensorSpec(p + "attn_output.weight", (hd * s.n_head, s.n_embd), "weight"),
            TensorSpec(p + "attn_q_norm.weight", (hd,), "ones"),
            TensorSpec(p + "post_attention_norm.weight", (s.n_embd,), "ones"),
            TensorSpec(p + "layer_output_scale.weight", (1,), "ones"),
            TensorSpec(p + "ffn_norm.weight", (s.n_embd,), "ones"),
            TensorSpec(p + "ffn_gate.weight", (s.n_embd, ff), "weight"),
            TensorSpec(p + "ffn_up.weight", (s.n_embd, ff), "weight"),
            TensorSpec(p + "ffn_down.weight", (ff, s.n_embd), "weight"),
            TensorSpec(p + "post_ffw_norm.weight", (s.n_embd,), "ones"),
            TensorSpec(p + "inp_gate.weight", (s.n_embd, s.n_embd_per_layer), "weight"),
            TensorSpec(p + "proj.weight", (s.n_embd_per_layer, s.n_embd), "weight"),
            TensorSpec(p + "post_norm.weight", (s.n_embd,), "ones"),
        ]
    return specs


def rope_freqs(s: Shape) -> np.ndarray:
    """Proportional-RoPE freq factors of the full-attention layers (as convert_hf_to_gguf writes them)."""
    n_rot = int(s.head_dim_full * s.partial_rotary_full / 2)
    n_unrot = s.head_dim_full // 2 - n_rot
    return np.array([1.0] * n_rot + [1e30] * n_unrot, dtype=np.float32)


def random_f16_chunks(n: int, seed: int, name: str) -> Iterator[np.ndarray]:
    """Yield ``n`` random F16 values in chunks; |x| in [2**-7, 2**-5), random sign.

    Bits: random sign and mantissa, exponent field 8 or 9 (bias 15).
    Seeded per tensor name so the output does not depend on tensor order.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    done = 0
    while done < n:
        m = min(CHUNK_ELEMENTS, n - done)
        bits = rng.integers(0, 1 << 16, size=m, dtype=np.uint16)
        bits &= 0x87FF
        bits |= 0x2000
        yield bits.view(np.float16)
        done += m


def copy_tokenizer(gguf: Any, writer: Any, vocab_path: Path) -> int:
    """Copy all ``tokenizer.*`` keys of ``vocab_path`` into ``writer``; return the token count."""
    reader = gguf.GGUFReader(str(vocab_path))
    n_tokens = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                n_tokens = len(field.data)
        else:
            writer.add_key_value(key, field.contents(), vtype)
    if n_tokens == 0:
        raise SystemExit(f"{vocab_path}: no tokenizer.ggml.tokens")
    return n_tokens


def write_f16(gguf: Any, s: Shape, path: Path, vocab_path: Path, seed: int) -> None:
    """Stream the F16 GGUF for shape ``s`` to ``path``."""
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA4]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"gemma-4-{s.name}-shape-random")
    writer.add_description(
        f"Shape-exact Gemma 4 {s.name} text decoder with RANDOM weights (edgert benchmarks/make_e2b_shape.py)"
    )
    writer.add_size_label(s.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    swa_pattern = [s.is_swa(il) for il in range(s.n_layer)]
    ff_arr = [s.ff(il) for il in range(s.n_layer)]
    writer.add_context_length(s.n_ctx_train)
    writer.add_embedding_length(s.n_embd)
    writer.add_block_count(s.n_layer)
    if len(set(ff_arr)) == 1:
        writer.add_feed_forward_length(ff_arr[0])
    else:
        writer.add_feed_forward_length(ff_arr)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_head_kv)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_key_length(s.head_dim_full)
    writer.add_value_length(s.head_dim_full)
    writer.add_key_length_swa(s.head_dim_swa)
    writer.add_value_length_swa(s.head_dim_swa)
    writer.add_rope_freq_base(s.rope_base_full)
    writer.add_rope_freq_base_swa(s.rope_base_swa)
    writer.add_rope_dimension_count(s.head_dim_full)
    writer.add_rope_dimension_count_swa(s.head_dim_swa)
    writer.add_final_logit_softcapping(s.final_logit_softcap)
    writer.add_sliding_window(s.n_swa)
    writer.add_sliding_window_pattern(swa_pattern)
    writer.add_shared_kv_layers(s.n_kv_shared)
    writer.add_embedding_length_per_layer_input(s.n_embd_per_layer)

    n_tokens = copy_tokenizer(gguf, writer, vocab_path)
    if n_tokens != s.n_vocab:
        raise SystemExit(f"vocab has {n_tokens} tokens, expected {s.n_vocab}")

    specs = tensor_specs(s)
    for t in specs:
        nbytes = t.n_elements * np.dtype(t.dtype).itemsize
        writer.add_tensor_info(t.name, t.np_shape, np.dtype(t.dtype), nbytes)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]  # single shard: stream tensor data ourselves, chunk by chunk

    total = sum(t.n_elements * np.dtype(t.dtype).itemsize for t in specs)
    written = 0
    t0 = time.monotonic()
    for i, t in enumerate(specs):
        writer.write_padding(fout, fout.tell())
        nbytes = t.n_elements * np.dtype(t.dtype).itemsize
        if t.kind == "weight":
            for chunk in random_f16_chunks(t.n_elements, seed, t.name):
                chunk.tofile(fout)
        elif t.kind == "rope_freqs":
            rope_freqs(s).tofile(fout)
        else:
            np.ones(t.n_elements, dtype=np.float32).tofile(fout)
        writer.write_padding(fout, nbytes)
        written += nbytes
        if nbytes >= 256 * 1024 * 1024 or i == len(specs) - 1:
            rate = written / max(time.monotonic() - t0, 1e-6) / 2**20
            print(
                f"  [{i + 1}/{len(specs)}] {t.name}: {written / 2**30:.2f}/{total / 2**30:.2f} GiB ({rate:.0f} MiB/s)",
                flush=True,
            )
    writer.close()


def find_quantize(explicit: str | None, cache: Path) -> Path:
    """Locate ``llama-quantize``: explicit path, the build_llama_tools.sh CPU build, or PATH."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    build = cache / "build" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-cpu"
    candidates.append(build / "bin" / "llama-quantize")
    on_path = shutil.which("llama-quantize")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise SystemExit("llama-quantize not found; run benchmarks/build_llama_tools.sh or pass --llama-quantize")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cache = default_cache_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="e2b")
    ap.add_argument("--out-dir", type=Path, default=cache, help=f"output dir (default {cache})")
    ap.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="ggml-vocab-gemma-4.gguf (default: <llama-src>/models/ggml-vocab-gemma-4.gguf)",
    )
    ap.add_argument(
        "--llama-src",
        type=Path,
        default=default_llama_src(cache),
        help="vendored llama.cpp dir of the sdist (for the vocab and gguf-py)",
    )
    ap.add_argument("--llama-quantize", default=None, help="path to llama-quantize")
    ap.add_argument("--qtype", default="Q4_K_M", help="llama-quantize type (default Q4_K_M)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-f16", action="store_true", help="keep the F16 intermediate")
    ap.add_argument("--force", action="store_true", help="regenerate even if the output exists")
    ap.add_argument("--f16-only", action="store_true", help="write the F16 file only, no quantization")
    args = ap.parse_args(argv)

    shape = VARIANTS[args.variant]
    vocab = args.vocab or args.llama_src / "models" / "ggml-vocab-gemma-4.gguf"
    if not vocab.is_file():
        raise SystemExit(f"vocab not found: {vocab} (run benchmarks/build_llama_tools.sh or pass --vocab)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gemma-4-{shape.name}-shape"
    f16_path = args.out_dir / f"{stem}-F16.gguf"
    q_path = args.out_dir / f"{stem}-{args.qtype}.gguf"
    final = f16_path if args.f16_only else q_path

    if final.is_file() and not args.force:
        print(f"exists: {final} (use --force to regenerate)", file=sys.stderr)
        print(final)
        return 0

    quantize = None if args.f16_only else find_quantize(args.llama_quantize, cache)
    gguf = import_gguf(args.llama_src)
    print(f"gguf-py: {gguf.__file__}", file=sys.stderr)

    if args.force or not f16_path.is_file():
        tmp = f16_path.with_suffix(".gguf.partial")
        print(f"writing {f16_path}", flush=True)
        t0 = time.monotonic()
        write_f16(gguf, shape, tmp, vocab, args.seed)
        tmp.replace(f16_path)
        print(f"F16 written in {time.monotonic() - t0:.0f} s", flush=True)

    if quantize is not None:
        tmp_q = q_path.with_suffix(".gguf.partial")
        t0 = time.monotonic()
        cmd = [str(quantize), str(f16_path), str(tmp_q), args.qtype, str(args.threads)]
        print("running: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        tmp_q.replace(q_path)
        print(f"quantized in {time.monotonic() - t0:.0f} s", flush=True)
        if not args.keep_f16:
            f16_path.unlink()

    print(f"{final.stat().st_size / 2**30:.2f} GiB", file=sys.stderr)
    print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
