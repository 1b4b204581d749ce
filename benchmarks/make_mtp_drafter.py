#!/usr/bin/env python3
"""Write a random-weight Gemma 4 MTP drafter (llama.cpp architecture ``gemma4-assistant``) for a Gemma 4 target GGUF.

Google ships a multi-token-prediction drafter beside each Gemma 4 model (``google/gemma-4-E2B-it-assistant``):
a small Q-only transformer that reads the target's KV cache (its last sliding-window and last full-attention
layer), takes ``[embed(last token), target hidden state]`` through ``nextn.pre_projection`` and hands its own
hidden state back through ``nextn.post_projection`` for the next draft step. This script writes a drafter with
exactly the tensor names and hyperparameters llama.cpp's ``gemma4-assistant`` loader expects, sized to match a
given target (hidden size, head dims, KV heads, sliding window, RoPE, vocabulary and tokenizer are copied from
the target file), with random weights. Its acceptance rate is therefore meaningless; what it is for:

* tests: a drafter for ``tests/fixtures/tiny-gemma4.gguf`` (``--preset tiny``, ~0.6 MB, committed as
  ``tests/fixtures/tiny-gemma4-assistant.gguf``) so the speculative path runs against real llama.cpp;
* benchmarks: the shape of the E2B assistant (``--preset e2b``: 4 layers, hidden 256, as described in
  llama.cpp PR #22738 "4-layer Q-only transformer (~78M params)"; 4 query heads and FFN 2048 are our
  assumption, they give ~77M parameters) so the cost of a draft step is measured honestly.

The real E2B/E4B assistants also carry ``masked_embd_centroids``/``masked_embd_ordering`` (a clustered
output head); llama.cpp 0.3.36 loads them as optional and computes the dense head, so they are left out.

Usage::

    .venv/bin/python benchmarks/make_mtp_drafter.py --target tests/fixtures/tiny-gemma4.gguf --preset tiny \\
        --output tests/fixtures/tiny-gemma4-assistant.gguf
    .venv/bin/python benchmarks/make_mtp_drafter.py --target ~/.cache/edgert-bench/gemma-4-E2B-shape-Q4_K_M.gguf \\
        --preset e2b --output ~/.cache/edgert-bench/gemma-4-E2B-shape-assistant-F16.gguf

Deterministic for a given ``--seed``. Quantize with ``llama-quantize <f16> <q8_0> Q8_0`` if wanted
(published GGUF conversions of the E2B assistant are Q8_0 / Q4_0).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

ARCH = "gemma4-assistant"
TARGET_ARCH = "gemma4"


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int


PRESETS = {
    "tiny": Shape(n_layer=2, n_embd=32, n_head=2, n_ff=64),
    "e2b": Shape(n_layer=4, n_embd=256, n_head=4, n_ff=2048),
}

_ARRAY_TYPES = {
    str: GGUFValueType.STRING,
    float: GGUFValueType.FLOAT32,
    int: GGUFValueType.INT32,
    bool: GGUFValueType.BOOL,
}


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise SystemExit(f"target has no {key!r}")
    return field.contents()


def _copy_tokenizer(writer: GGUFWriter, reader: GGUFReader) -> None:
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)


def _swa_pattern(n_layer: int) -> list[bool]:
    """Sliding-window on all but the last layer, like the target's "last of each kind" it reads KV from."""
    return [True] * (n_layer - 1) + [False]


def build(target: Path, output: Path, shape: Shape, seed: int) -> int:
    reader = GGUFReader(target)
    arch = _field(reader, "general.architecture")
    if arch != TARGET_ARCH:
        raise SystemExit(f"{target} is a {arch!r} model; the MTP drafter needs a {TARGET_ARCH!r} target")
    p = f"{TARGET_ARCH}."
    backbone = int(_field(reader, p + "embedding_length"))
    head_full = int(_field(reader, p + "attention.key_length"))
    head_swa = int(_field(reader, p + "attention.key_length_swa"))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")

    writer = GGUFWriter(output, ARCH)
    writer.add_type("model")
    writer.add_name(f"edgert random {ARCH} drafter for {target.name}")
    writer.add_description("Random weights, shape of a Gemma 4 MTP assistant. Not a usable drafter.")
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_block_count(shape.n_layer)
    writer.add_nextn_predict_layers(shape.n_layer)
    writer.add_context_length(int(_field(reader, p + "context_length")))
    writer.add_embedding_length(shape.n_embd)
    writer.add_embedding_length_out(backbone)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(int(_field(reader, p + "attention.head_count_kv")))
    writer.add_key_length(head_full)
    writer.add_value_length(head_full)
    writer.add_key_length_swa(head_swa)
    writer.add_value_length_swa(head_swa)
    writer.add_rope_dimension_count(int(_field(reader, p + "rope.dimension_count")))
    writer.add_rope_dimension_count_swa(int(_field(reader, p + "rope.dimension_count_swa")))
    writer.add_rope_freq_base(float(_field(reader, p + "rope.freq_base")))
    writer.add_rope_freq_base_swa(float(_field(reader, p + "rope.freq_base_swa")))
    writer.add_layer_norm_rms_eps(float(_field(reader, p + "attention.layer_norm_rms_epsilon")))
    writer.add_sliding_window(int(_field(reader, p + "attention.sliding_window")))
    writer.add_sliding_window_pattern(_swa_pattern(shape.n_layer))
    _copy_tokenizer(writer, reader)

    rng = np.random.default_rng(seed)
    std = 0.02

    def mat(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    def ones(n: int) -> np.ndarray[Any, Any]:
        return np.ones(n, dtype=np.float32)

    n_params = 0

    def add(name: str, data: np.ndarray[Any, Any]) -> None:
        nonlocal n_params
        n_params += int(data.size)
        writer.add_tensor(name, data)

    # numpy shapes are (rows, cols) = the reversed ggml shapes the loader names
    add("token_embd.weight", mat(n_vocab, shape.n_embd))
    add("output_norm.weight", ones(shape.n_embd))
    add("rope_freqs.weight", np.array(rope.data, dtype=np.float32).reshape(-1))
    add("nextn.pre_projection.weight", mat(shape.n_embd, 2 * backbone))
    add("nextn.post_projection.weight", mat(backbone, shape.n_embd))
    for il, swa in enumerate(_swa_pattern(shape.n_layer)):
        head = head_swa if swa else head_full
        b = f"blk.{il}."
        add(b + "attn_norm.weight", ones(shape.n_embd))
        add(b + "attn_q.weight", mat(shape.n_head * head, shape.n_embd))
        add(b + "attn_output.weight", mat(shape.n_embd, shape.n_head * head))
        add(b + "attn_q_norm.weight", ones(head))
        add(b + "post_attention_norm.weight", ones(shape.n_embd))
        add(b + "layer_output_scale.weight", ones(1))
        add(b + "ffn_norm.weight", ones(shape.n_embd))
        add(b + "ffn_gate.weight", mat(shape.n_ff, shape.n_embd))
        add(b + "ffn_up.weight", mat(shape.n_ff, shape.n_embd))
        add(b + "ffn_down.weight", mat(shape.n_embd, shape.n_ff))
        add(b + "post_ffw_norm.weight", ones(shape.n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True, help="the Gemma 4 target GGUF the drafter serves")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    n_params = build(args.target.expanduser(), args.output.expanduser(), PRESETS[args.preset], args.seed)
    size = args.output.expanduser().stat().st_size
    print(f"{args.output}: {n_params / 1e6:.1f}M parameters, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
