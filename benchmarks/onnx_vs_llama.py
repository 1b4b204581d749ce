#!/usr/bin/env python3
"""Single-stream and 4-concurrent tok/s: the onnxruntime-genai backend vs llama.cpp, through edgert.

Both models run in this process through ``edgert.runtime.open_runtime`` (the same scheduler,
admission and token stream the daemon uses), greedy, ``ignore_eos`` so every request generates
exactly ``--tokens`` tokens. The systems are measured alternately, round by round (the order
rotates), so a CPU shared with other work hurts both alike; medians are reported.

Defaults compare the two committed test fixtures, which are the closest pair there is without
downloads: ``tests/fixtures/tiny-gemma3-onnx`` (Gemma 3, 2 layers, hidden 64, vocab 1024, fp32)
and ``tests/fixtures/tiny-gemma4.gguf`` (Gemma 4, 2 layers, hidden 64, vocab 8192, F16). At this
size both measure per-token overhead (Python, scheduler, library calls), not matrix math.

Usage::

    .venv/bin/python benchmarks/onnx_vs_llama.py [--onnx FOLDER] [--gguf FILE] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from edgert.engine.base import SamplingParams
from edgert.runtime import Runtime, open_runtime
from edgert.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0)
QUESTIONS = [
    "Tell me a story about the sea.",
    "What is the capital of France?",
    "Write a haiku about a kiosk.",
    "List three spare parts of a printer.",
]


def open_model(model: Path, state_dir: Path, threads: int, parallel: int) -> Runtime:
    engine = {"n_ctx": 2048, "n_parallel": parallel, "n_threads": threads, "n_threads_batch": threads}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, default=ROOT / "tests/fixtures/tiny-gemma3-onnx")
    parser.add_argument("--gguf", type=Path, default=ROOT / "tests/fixtures/tiny-gemma4.gguf")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        systems = {
            "onnxruntime-genai": open_model(args.onnx, Path(tmp) / "onnx", args.threads, 4),
            "llama.cpp": open_model(args.gguf, Path(tmp) / "gguf", args.threads, 4),
        }
        try:
            results: dict[tuple[str, int], list[float]] = {}
            names = list(systems)
            for name in names:  # warm-up
                measure(systems[name], 1, 16)
            for r in range(args.rounds):
                for name in names[r % 2 :] + names[: r % 2]:
                    for n_streams in (1, 4):
                        results.setdefault((name, n_streams), []).append(measure(systems[name], n_streams, args.tokens))
        finally:
            for rt in systems.values():
                rt.close()
    print(f"{args.tokens} tokens per stream, greedy, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'backend':<20}{'1 stream tok/s':>16}{'4 streams tok/s':>17}")
    for name in names:
        one, four = (statistics.median(results[(name, n)]) for n in (1, 4))
        print(f"{name:<20}{one:>16,.0f}{four:>17,.0f}")


if __name__ == "__main__":
    main()
