#!/usr/bin/env python3
"""Single-stream and 4-concurrent tok/s: the onnxruntime-genai backend vs llama.cpp, through edgert.

Both models run in this process through ``edgert.serving.runtime.open_runtime`` (the same scheduler,
admission and token stream the daemon uses), greedy, ``ignore_eos`` so every request generates
exactly ``--tokens`` tokens. The systems are measured alternately, round by round (the order
rotates), so a CPU shared with other work hurts both alike; medians are reported.

Defaults compare the two committed test fixtures, which are the closest pair there is without
downloads: ``tests/fixtures/tiny-gemma3-onnx`` (Gemma 3, 2 layers, hidden 64, vocab 1024, fp32)
and ``tests/fixtures/tiny-gemma4.gguf`` (Gemma 4, 2 layers, hidden 64, vocab 8192, F16). At this
size both measure per-token overhead (Python, scheduler, library calls), not matrix math.

``--onnx`` and ``--gguf`` may each be given several times to measure more models in the same
alternating rounds; ``benchmarks/make_mid_gemma3.py`` builds a mid-size random Gemma 3
(6 layers, hidden 640, the real 262,144-token vocabulary) as ONNX fp32/int4 and GGUF
F32/F16/Q8_0/Q4_K_M from one checkpoint, so precisions can be compared side by side.

Usage::

    .venv/bin/python benchmarks/onnx_vs_llama.py [--onnx FOLDER ...] [--gguf FILE ...] \\
        [--tokens 128] [--rounds 5] [--threads 1]

"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from edgert.engine.base import SamplingParams
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 2048
GREEDY = SamplingParams(temperature=0.0)
QUESTIONS = [
    "Tell me a story about the sea.",
    "What is the capital of France?",
    "Write a haiku about a kiosk.",
    "List three spare parts of a printer.",
]


def open_model(model: Path, state_dir: Path, threads: int, parallel: int) -> Runtime:
    engine = {"n_ctx": N_CTX, "n_parallel": parallel, "n_threads": threads, "n_threads_batch": threads}
    return open_runtime(load_settings(state_dir=state_dir, model=str(model), engine=engine))


async def _generate(rt: Runtime, n_streams: int, tokens: int) -> tuple[int, float]:
    prompts = [rt.chat_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n_streams)]
    started = time.perf_counter()
    streams = [rt.scheduler.submit(rt.request(p, sampling=GREEDY, max_tokens=tokens, ignore_eos=True)) for p in prompts]
    await asyncio.gather(*(s.collect() for s in streams))
    return n_streams * tokens, time.perf_counter() - started


def measure(rt: Runtime, n_streams: int, tokens: int) -> float:
    """Aggregate generated tok/s (prompt processing included in the wall time)."""
    generated, seconds = asyncio.run(_generate(rt, n_streams, tokens))
    return generated / seconds


def size_on_disk(model: Path) -> int:
    return sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) if model.is_dir() else model.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, action="append", help="ONNX GenAI folder (repeatable)")
    parser.add_argument("--gguf", type=Path, action="append", help="GGUF file (repeatable)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = [("onnxruntime-genai", m) for m in args.onnx or [ROOT / "tests/fixtures/tiny-gemma3-onnx"]]
    models += [("llama.cpp", m) for m in args.gguf or [ROOT / "tests/fixtures/tiny-gemma4.gguf"]]
    names = [f"{backend} {model.name}" for backend, model in models]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        systems: dict[str, Runtime] = {}
        try:
            for i, (name, (_, model)) in enumerate(zip(names, models, strict=True)):
                systems[name] = open_model(model, Path(tmp) / str(i), args.threads, 4)
            for name in names:  # warm-up
                measure(systems[name], 1, 16)
            for r in range(args.rounds):
                shift = r % len(names)  # each round starts with the next system
                for name in names[shift:] + names[:shift]:
                    for n_streams in (1, 4):
                        results.setdefault((name, n_streams), []).append(measure(systems[name], n_streams, args.tokens))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for rt in systems.values():
                rt.close()
    print(f"{args.tokens} tokens per stream, greedy, {args.threads} thread(s), median of {args.rounds} rounds")
    width = max(len(name) for name in names) + 2
    print(f"{'backend model':<{width}}{'MiB':>8}{'1 stream tok/s':>16}{'4 streams tok/s':>17}   (min - max)")
    for name, (_, model) in zip(names, models, strict=True):
        one, four = (results[(name, n)] for n in (1, 4))
        spread = f"{min(one):,.1f}-{max(one):,.1f} / {min(four):,.1f}-{max(four):,.1f}"
        mib = size_on_disk(model) / 2**20
        print(
            f"{name:<{width}}{mib:>8,.0f}{statistics.median(one):>16,.1f}{statistics.median(four):>17,.1f}   ({spread})"
        )


if __name__ == "__main__":
    main()
