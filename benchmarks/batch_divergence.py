"""How far greedy outputs of concurrent requests agree with their sequential outputs.

llama.cpp's numerics depend on batch composition (a 136-token batch takes other
matmul paths than a 17-token one), so a near-tie between two tokens can flip when
a request runs beside others. This measures it instead of hiding it: for each
prompt, the number of leading generated characters that agree, sequential vs all
prompts at once.

    .venv/bin/python benchmarks/batch_divergence.py --model PATH [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from edgert.engine.base import SamplingParams
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import load_settings

PROMPTS = [
    "Write a short poem about the sea.",
    "Which sandwiches are vegetarian?",
    "Explain what a kiosk is.",
    "Name three colours.",
    "What is the capital of France?",
    "Count from one to ten.",
    "Describe a field-service technician's day.",
    "Give me a recipe for pancakes.",
]
GREEDY = SamplingParams(temperature=0.0)


async def generate(rt: Runtime, prompt: tuple[int, ...], n: int) -> str:
    text, _ = await rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=n, ignore_eos=True)).collect()
    return text


def agreeing_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def measure(rt: Runtime, n: int) -> list[dict[str, object]]:
    prompts = [rt.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    sequential = [await generate(rt, p, n) for p in prompts]
    together = await asyncio.gather(*(generate(rt, p, n) for p in prompts))
    return [
        {
            "prompt": text,
            "chars": len(seq),
            "agreeing_chars": agreeing_prefix(seq, conc),
            "identical": seq == conc,
        }
        for text, seq, conc in zip(PROMPTS, sequential, together, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = load_settings(
        model=str(args.model),
        engine={"n_threads": args.threads, "n_parallel": len(PROMPTS), "prefix_cache_entries": 0},
    )
    rt = open_runtime(settings)
    try:
        rows = asyncio.run(measure(rt, args.tokens))
    finally:
        rt.close()
    print(json.dumps(rows, indent=2))
    same = sum(bool(r["identical"]) for r in rows)
    print(f"identical: {same}/{len(rows)}; agreeing characters: {[r['agreeing_chars'] for r in rows]}")


if __name__ == "__main__":
    main()
