#!/usr/bin/env python3
"""Build the mid-size model pair for ``onnx_vs_llama.py``: one random Gemma 3, as ONNX and as GGUF.

Random weights (torch seed 7) in Gemma 3 270M's layer shape (hidden 640, 4 query heads / 1 KV
head of dim 256, feed-forward 2048, sliding window 512 on five of every six layers, tied
embeddings) but 6 layers instead of 18, with the real Gemma 3 tokenizer (262,144 tokens, taken
from the Gemma 3 270M GGUF), so the embedding and LM head (168M of the 201M parameters) cost
what they cost in the real model. One checkpoint is exported four ways:

* ``onnx-fp32/``, ``onnx-int4/``: ``python -m onnxruntime_genai.models.builder -e cpu -p fp32|int4``
* ``gemma3-mid-F32.gguf``, ``-F16.gguf``: llama.cpp's ``convert_hf_to_gguf.py``; its Gemma 3 class
  reads a tokenizer only from ``tokenizer.model`` (sentencepiece) or a BPE ``tokenizer.json``
  whose pre-tokenizer hash it knows, so the vocabulary keys are copied from the 270M GGUF instead
  (the same tokens, scores and types the tokenizer.json was made from).
* ``gemma3-mid-Q8_0.gguf``, ``-Q4_K_M.gguf``, ``-Q4_0-pure.gguf``: ``llama-quantize`` from the F32
  file. Hidden 640 is not a multiple of 256, so Q4_K_M falls back to q5_0 for its 4-bit tensors
  and q8_0 for the tied embedding/LM head (as in the real 270M); ``--pure Q4_0`` makes every
  matrix 4-bit in blocks of 32, the nearest match for the builder's int4 (MatMulNBits and
  GatherBlockQuantized, block 32, LM head included).

Torch is not a project dependency, so this runs in the scratch venv that built the ONNX test
fixture (see ``tests/fixtures/make_tiny_onnx_gemma.py``), plus ``gguf`` for transformers' GGUF
tokenizer reader::

    /tmp/onnx-build-venv/bin/pip install 'gguf==0.19.0'
    /tmp/onnx-build-venv/bin/python benchmarks/make_mid_gemma3.py [--out ~/.cache/edgert-bench/gemma3-mid]

Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path.home() / ".cache/edgert-bench"
LLAMA_CPP = BENCH / "src/llama_cpp_python-0.3.36/vendor/llama.cpp"
QUANTIZE = BENCH / "build/llama.cpp-0.3.36-cpu/bin/llama-quantize"
VOCAB_GGUF = BENCH / "gemma-3-270m-Q4_K_M.gguf"
SEED = 7
N_LAYERS = 6
CONTEXT = 4096
FIXTURE_SCRIPT = Path(__file__).resolve().parents[1] / "tests/fixtures/make_tiny_onnx_gemma.py"


def chat_template() -> str:
    """Gemma 3's instruction-tuned template, as the tiny ONNX fixture's script holds it."""
    spec = importlib.util.spec_from_file_location("make_tiny_onnx_gemma", FIXTURE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level: constants and stdlib imports only
    return str(module.CHAT_TEMPLATE)


def write_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(VOCAB_GGUF.parent, gguf_file=VOCAB_GGUF.name)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = chat_template()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def write_hf_model(folder: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(SEED)
    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        max_position_embeddings=CONTEXT,
        pad_token_id=0,
        eos_token_id=[1, 106],
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config).eval()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    model.generation_config.eos_token_id = [1, 106]
    model.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text())
    rope = raw.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: flatten for the 0.18 builder (see the fixture script)
        raw["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": rope["full_attention"]["rope_theta"],
            "rope_local_base_freq": rope["sliding_attention"]["rope_theta"],
        }
    config_path.write_text(json.dumps(raw, indent=2) + "\n")


def export_onnx(hf: Path, out: Path, precision: str) -> None:
    if (out / "genai_config.json").exists():
        return
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    subprocess.run(cmd, check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, out / name)


CONVERT_WITH_270M_VOCAB = """
import sys
from pathlib import Path
sys.path[:0] = [{llama!r}, {llama!r} + '/gguf-py']  # its own gguf-py, not the venv's
sys.argv = {argv!r}
import gguf
import convert_hf_to_gguf as convert
from conversion.gemma import Gemma3Model

def set_vocab(self):
    reader = gguf.GGUFReader({vocab!r})
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            self.gguf_writer.add_array(key, list(field.contents()))
        else:
            self.gguf_writer.add_key_value(key, field.contents(), kind)

Gemma3Model.set_vocab = set_vocab
convert.main()
"""


def export_gguf(hf: Path, out: Path, outtype: str) -> None:
    if out.exists():
        return
    argv = ["convert_hf_to_gguf.py", str(hf), "--outtype", outtype, "--outfile", str(out)]
    script = CONVERT_WITH_270M_VOCAB.format(llama=str(LLAMA_CPP), argv=argv, vocab=str(VOCAB_GGUF))
    subprocess.run([sys.executable, "-c", script], check=True)


def quantize(source: Path, out: Path, kind: str, *flags: str) -> None:
    if not out.exists():
        cmd = [str(QUANTIZE), *flags, str(source), str(out), kind, str(os.cpu_count() or 1)]
        subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH / "gemma3-mid")
    args = parser.parse_args()
    hf = args.out / "hf"
    if not (hf / "model.safetensors").exists():
        hf.mkdir(parents=True, exist_ok=True)
        write_tokenizer(hf)
        write_hf_model(hf)
    export_gguf(hf, args.out / "gemma3-mid-F32.gguf", "f32")
    export_gguf(hf, args.out / "gemma3-mid-F16.gguf", "f16")
    quantize(args.out / "gemma3-mid-F32.gguf", args.out / "gemma3-mid-Q8_0.gguf", "Q8_0")
    quantize(args.out / "gemma3-mid-F32.gguf", args.out / "gemma3-mid-Q4_K_M.gguf", "Q4_K_M")
    quantize(args.out / "gemma3-mid-F32.gguf", args.out / "gemma3-mid-Q4_0-pure.gguf", "Q4_0", "--pure")
    export_onnx(hf, args.out / "onnx-fp32", "fp32")
    export_onnx(hf, args.out / "onnx-int4", "int4")
    for path in sorted(args.out.rglob("*")):
        if path.is_file() and path.suffix in (".gguf", ".onnx", ".data", ".json"):
            print(f"{path.stat().st_size / 2**20:>9.1f} MiB  {path.relative_to(args.out)}")


if __name__ == "__main__":
    main()
