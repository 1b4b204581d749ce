#!/usr/bin/env python3
"""Write a shape-exact Gemma 4 E2B multimodal projector (mmproj, vision + audio) with random weights.

It has the tensor names, shapes, storage types and hyperparameters that llama.cpp's converter
(``conversion/gemma.py`` ``Gemma4VisionAudioModel`` over ``conversion/base.py`` ``MmprojModel``, BF16
mode, i.e. like the published ``mmproj-BF16.gguf``) writes for ``google/gemma-4-E2B-it``, and it pairs
with ``gemma-4-E2B-shape-Q4_K_M.gguf`` from ``benchmarks/make_e2b_shape.py`` (both encoders project into
the text embedding, 1536). libmtmd and ``llama-server --mmproj`` load it; encode time and memory are the
real projector's, the embeddings are noise.

Where each dimension comes from (no network access to the Hub from the build machine, so config.json
itself was not read):

* Vision tower (``gemma4v``): hidden 768, 16 layers, 12 heads (head dim 64), feed-forward 3072,
  patch 16, position table 10240 rows per axis, 3x3 pooling. These are the ``Gemma4VisionConfig``
  defaults (public re-implementations of ``transformers.models.gemma4`` carry the same numbers);
  patch 16, 3x3 pooling and 10240 rows are also what ``tools/mtmd/clip.cpp`` assumes for gemma4v
  (``n_merge = 3``; 48 px per token; ``set_limit_image_tokens(70, 1120)``).
* Audio tower (``gemma4a``): hidden 1024, 12 conformer layers, 8 heads (head dim 128), feed-forward
  4096 (the converter writes ``intermediate_size = 4 * hidden_size``), 128 mel bins (the converter's
  default ``input_feat_size``), subsampling convolutions with 128 and 32 channels (3x3, stride 2),
  depthwise kernel 5 (``models/gemma4a.cpp`` pads 4 frames), output projection 1536
  (``output_proj_dims``): the ``Gemma4AudioConfig`` defaults.
* Projections: ``mm.input_projection`` 768 -> 1536 and ``mm.a.input_projection`` 1536 -> 1536; libmtmd
  compares their ``ne[1]`` with the text model's ``n_embd`` (1536).
* Check: the written file is 986,804,480 bytes, the published E2B ``mmproj-BF16.gguf`` 986,833,728
  (models.toml): 29 KB (0.003%) apart, far less than the smallest matrix here (768 x 768 BF16, 1.2 MB),
  so no matrix is missing or extra; the difference is header metadata and small vectors or scalars
  (``--check-size`` prints the tensor-data comparison). That the dimensions multiply out to the
  published size is the confirmation; the exact split between
  the towers is not confirmed independently, and neither is whether the audio linears carry
  ClippableLinear bounds (clip.cpp reads them optionally; this file writes them for vision only).

Storage types follow the converter in BF16 mode: matrices BF16; vectors, norms and scalars F32; the
patch embedding F32 (``MmprojModel.tensor_force_quant``); the position table and every audio tensor
whose Hugging Face name has ``.conv``/``_conv`` (the subsampling convolutions, their input projection,
the depthwise convolutions) F32 (``Gemma4VisionAudioModel.tensor_force_quant``).

From the repository root (output defaults to the benchmark cache, beside the text model)::

    .venv/bin/python benchmarks/make_e2b_mmproj_shape.py
    # -> ~/.cache/edgert-bench/gemma-4-E2B-shape-mmproj-BF16.gguf (last stdout line)

Weights: N(0, 0.02) truncated to BF16, norms around 1, from a fixed seed (deterministic output).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_e2b_shape import default_cache_dir, default_llama_src, import_gguf

PUBLISHED_E2B_MMPROJ_BF16_BYTES = 986_833_728  # models.toml, unsloth/gemma-4-E2B-it-GGUF mmproj-BF16.gguf
WEIGHT_STD = 0.02
TEXT_N_EMBD = 1536  # gemma-4-E2B text hidden size (make_e2b_shape.py)


@dataclass(frozen=True)
class Dims:
    """Encoder dimensions of one Gemma 4 projector."""

    v_n_embd: int = 768
    v_n_head: int = 12
    v_n_ff: int = 3072
    v_n_layer: int = 16
    v_patch: int = 16
    v_pos_size: int = 10240
    a_n_embd: int = 1024
    a_n_head: int = 8
    a_n_layer: int = 12
    a_n_mel: int = 128
    a_conv_channels: tuple[int, int] = (128, 32)
    a_conv_kernel: int = 3
    a_dw_kernel: int = 5
    a_out_dim: int = 1536
    projection_dim: int = TEXT_N_EMBD

    @property
    def a_n_ff(self) -> int:
        return 4 * self.a_n_embd

    def a_freq_bins(self) -> int:
        """Mel bins left after two stride-2, pad-1, kernel-3 convolutions (clip.cpp's formula)."""
        n = self.a_n_mel
        for _ in range(2):
            n = (n - 1) // 2 + 1
        return n


@dataclass(frozen=True)
class Spec:
    """One tensor: GGUF name, numpy shape (ggml shape reversed), how it is filled and stored."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "bf16" random matrix, "f32" random, "norm" ~1 (F32), "clamp" scalar bound (F32)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (2 if self.kind == "bf16" else 4)


def _clamps(weight: str) -> list[Spec]:
    stem = weight.removesuffix(".weight")
    return [Spec(f"{stem}.{k}", (1,), "clamp") for k in ("input_min", "input_max", "output_min", "output_max")]


def vision_specs(d: Dims) -> list[Spec]:
    """The gemma4v tensors (names from gguf's TENSOR_NAMES, as the tiny fixture writes them)."""
    e, hd = d.v_n_embd, d.v_n_embd // d.v_n_head
    specs = [
        Spec("v.patch_embd.weight", (e, 3, d.v_patch, d.v_patch), "f32"),
        Spec("v.position_embd.weight", (2, d.v_pos_size, e), "f32"),
    ]
    for i in range(d.v_n_layer):
        p = f"v.blk.{i}."
        linears = [
            Spec(p + "attn_q.weight", (e, e), "bf16"),
            Spec(p + "attn_k.weight", (e, e), "bf16"),
            Spec(p + "attn_v.weight", (e, e), "bf16"),
            Spec(p + "attn_out.weight", (e, e), "bf16"),
            Spec(p + "ffn_gate.weight", (d.v_n_ff, e), "bf16"),
            Spec(p + "ffn_up.weight", (d.v_n_ff, e), "bf16"),
            Spec(p + "ffn_down.weight", (e, d.v_n_ff), "bf16"),
        ]
        specs += linears
        for lin in linears:
            specs += _clamps(lin.name)
        specs += [
            Spec(p + "ln1.weight", (e,), "norm"),
            Spec(p + "attn_q_norm.weight", (hd,), "norm"),
            Spec(p + "attn_k_norm.weight", (hd,), "norm"),
            Spec(p + "attn_post_norm.weight", (e,), "norm"),
            Spec(p + "ln2.weight", (e,), "norm"),
            Spec(p + "ffn_post_norm.weight", (e,), "norm"),
            Spec(p + "out_scale.weight", (1,), "norm"),
        ]
    specs += [
        Spec("v.std_bias", (e,), "f32"),
        Spec("v.std_scale", (e,), "norm"),
        Spec("mm.input_projection.weight", (d.projection_dim, e), "bf16"),
    ]
    return specs


def audio_specs(d: Dims) -> list[Spec]:
    """The gemma4a tensors."""
    e, hd, ff = d.a_n_embd, d.a_n_embd // d.a_n_head, d.a_n_ff
    c0, c1 = d.a_conv_channels
    k = d.a_conv_kernel
    specs = [
        Spec("a.conv1d.0.weight", (c0, 1, k, k), "f32"),
        Spec("a.conv1d.0.norm.weight", (c0,), "norm"),
        Spec("a.conv1d.1.weight", (c1, c0, k, k), "f32"),
        Spec("a.conv1d.1.norm.weight", (c1,), "norm"),
        Spec("a.input_projection.weight", (e, c1 * d.a_freq_bins()), "f32"),
    ]
    for i in range(d.a_n_layer):
        p = f"a.blk.{i}."
        specs += [
            Spec(p + "ffn_norm.weight", (e,), "norm"),
            Spec(p + "ffn_up.weight", (ff, e), "bf16"),
            Spec(p + "ffn_down.weight", (e, ff), "bf16"),
            Spec(p + "ffn_post_norm.weight", (e,), "norm"),
            Spec(p + "attn_pre_norm.weight", (e,), "norm"),
            Spec(p + "attn_q.weight", (e, e), "bf16"),
            Spec(p + "attn_k.weight", (e, e), "bf16"),
            Spec(p + "attn_v.weight", (e, e), "bf16"),
            Spec(p + "attn_out.weight", (e, e), "bf16"),
            Spec(p + "attn_k_rel.weight", (e, e), "bf16"),
            Spec(p + "per_dim_scale.weight", (hd,), "norm"),
            Spec(p + "per_dim_k_scale.weight", (hd,), "norm"),
            Spec(p + "attn_post_norm.weight", (e,), "norm"),
            Spec(p + "conv_norm.weight", (e,), "norm"),
            Spec(p + "conv_pw1.weight", (2 * e, e), "bf16"),
            Spec(p + "conv_dw.weight", (e, d.a_dw_kernel), "f32"),
            Spec(p + "norm_conv.weight", (e,), "norm"),
            Spec(p + "conv_pw2.weight", (e, e), "bf16"),
            Spec(p + "ffn_norm_1.weight", (e,), "norm"),
            Spec(p + "ffn_up_1.weight", (ff, e), "bf16"),
            Spec(p + "ffn_down_1.weight", (e, ff), "bf16"),
            Spec(p + "ffn_post_norm_1.weight", (e,), "norm"),
            Spec(p + "ln2.weight", (e,), "norm"),
        ]
    specs += [
        Spec("a.pre_encode.out.weight", (d.a_out_dim, e), "bf16"),
        Spec("a.pre_encode.out.bias", (d.a_out_dim,), "f32"),
        Spec("mm.a.input_projection.weight", (d.projection_dim, d.a_out_dim), "bf16"),
    ]
    return specs


def check_names(gguf: object, specs: list[Spec]) -> None:
    """Fail early if a name is not one gguf-py (hence clip.cpp) knows; guards typos in the lists above."""
    patterns = [
        re.compile(re.escape(base).replace(re.escape("{bid}"), r"\d+"))
        for base in gguf.TENSOR_NAMES.values()  # type: ignore[attr-defined]
        if "{" not in base.replace("{bid}", "")
    ]
    for s in specs:
        head, _, last = s.name.rpartition(".")
        stem = head if last in _SUFFIXES else s.name
        if not any(p.fullmatch(stem) for p in patterns):
            raise SystemExit(f"unknown tensor name {s.name!r}")


_SUFFIXES = {"weight", "bias", "input_min", "input_max", "output_min", "output_max"}


def fill(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """The tensor's data in its storage type (BF16 as uint16 bit patterns)."""
    n = int(np.prod(spec.shape))
    if spec.kind == "clamp":
        bound = 1.0e4 if spec.name.endswith("_max") else -1.0e4
        return np.array([bound], dtype=np.float32)
    if spec.kind == "norm":
        # Around 1 rather than exactly 1, as in the tiny fixture.
        return (1.0 + rng.standard_normal(n, dtype=np.float32) * 0.1).reshape(spec.shape)
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(WEIGHT_STD)
    if spec.kind == "f32":
        return values.reshape(spec.shape)
    # BF16 = the upper half of the F32 bits (truncation; fine for random weights).
    return (values.view(np.uint32) >> 16).astype(np.uint16).reshape(spec.shape)


def _tensors(specs: list[Spec], seed: int) -> Iterator[tuple[Spec, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for s in specs:
        yield s, fill(s, rng)


def write(gguf: object, out: Path, d: Dims, seed: int) -> tuple[int, int]:
    """Stream the projector to ``out``; return (tensor count, tensor data bytes)."""
    g = gguf  # the gguf module, imported late (see import_gguf)
    specs = vision_specs(d) + audio_specs(d)
    check_names(g, specs)
    writer = g.GGUFWriter(str(out), "clip")  # type: ignore[attr-defined]
    writer.add_type(g.GGUFType.MMPROJ)  # type: ignore[attr-defined]
    writer.add_name("gemma-4-E2B-shape-mmproj-random")
    writer.add_description("Shape-exact Gemma 4 E2B projector, RANDOM weights (edgert make_e2b_mmproj_shape.py)")
    writer.add_file_type(g.LlamaFileType.MOSTLY_BF16)  # type: ignore[attr-defined]

    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(d.projection_dim)
    writer.add_vision_image_size(224)  # the converter writes 224 (unused by gemma4v)
    writer.add_vision_patch_size(d.v_patch)
    writer.add_vision_embedding_length(d.v_n_embd)
    writer.add_vision_feed_forward_length(d.v_n_ff)
    writer.add_vision_block_count(d.v_n_layer)
    writer.add_vision_head_count(d.v_n_head)
    writer.add_vision_image_mean([0.0, 0.0, 0.0])
    writer.add_vision_image_std([1.0, 1.0, 1.0])

    writer.add_clip_has_audio_encoder(True)
    writer.add_audio_projection_dim(d.projection_dim)
    writer.add_audio_embedding_length(d.a_n_embd)
    writer.add_audio_feed_forward_length(d.a_n_ff)
    writer.add_audio_block_count(d.a_n_layer)
    writer.add_audio_head_count(d.a_n_head)

    writer.add_clip_vision_projector_type(g.VisionProjectorType.GEMMA4V)  # type: ignore[attr-defined]
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_clip_audio_projector_type(g.VisionProjectorType.GEMMA4A)  # type: ignore[attr-defined]
    writer.add_audio_num_mel_bins(d.a_n_mel)
    writer.add_audio_attention_layernorm_eps(1e-6)

    bf16 = g.GGMLQuantizationType.BF16  # type: ignore[attr-defined]
    for s in specs:
        dtype = np.dtype(np.uint16 if s.kind == "bf16" else np.float32)
        writer.add_tensor_info(s.name, s.shape, dtype, s.nbytes, raw_dtype=bf16 if s.kind == "bf16" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]  # single shard: stream tensor data ourselves, one tensor at a time
    writer.write_padding(fout, fout.tell())
    total = 0
    for s, data in _tensors(specs, seed):
        data.tofile(fout)
        writer.write_padding(fout, s.nbytes)
        total += s.nbytes
    writer.close()
    return len(specs), total


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; the last stdout line is the output path."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the edgert-bench cache dir")
    parser.add_argument("--llama-src", type=Path, default=None, help="vendored llama.cpp (for its gguf-py)")
    parser.add_argument("--projection-dim", type=int, default=TEXT_N_EMBD, help="text embedding to project into")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--force", action="store_true", help="rewrite an existing output")
    parser.add_argument("--check-size", action="store_true", help="only compare the size with the published file")
    args = parser.parse_args(argv)

    cache = args.out_dir or default_cache_dir()
    gguf = import_gguf(args.llama_src or default_llama_src(default_cache_dir()))
    dims = Dims(projection_dim=args.projection_dim)
    specs = vision_specs(dims) + audio_specs(dims)
    data_bytes = sum(-(-s.nbytes // 32) * 32 for s in specs)  # each tensor padded to GGUF's 32-byte alignment
    v_params = sum(int(np.prod(s.shape)) for s in vision_specs(dims))
    a_params = sum(int(np.prod(s.shape)) for s in audio_specs(dims))
    print(
        f"vision {v_params / 1e6:.1f} M params, audio {a_params / 1e6:.1f} M params; tensor data {data_bytes:,} "
        f"bytes vs published mmproj-BF16.gguf {PUBLISHED_E2B_MMPROJ_BF16_BYTES:,} "
        f"({(data_bytes / PUBLISHED_E2B_MMPROJ_BF16_BYTES - 1) * 100:+.3f}%, the rest is header)"
    )
    if args.check_size:
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "gemma-4-E2B-shape-mmproj-BF16.gguf"
    if out.exists() and not args.force:
        print(f"exists (use --force to rewrite): {out}")
        print(out)
        return 0
    start = time.monotonic()
    tmp = out.with_suffix(".gguf.part")
    n, total = write(gguf, tmp, dims, args.seed)
    tmp.replace(out)
    print(
        f"wrote {n} tensors, {total:,} data bytes, file {out.stat().st_size:,} bytes in {time.monotonic() - start:.0f} s"
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
