#!/usr/bin/env python3
"""What a cached prefix in the unified KV pool costs streams that do not use it.

llama.cpp attends over every cell up to the highest one in use, so a prefix-cache entry pinned
in the shared pool widens the attention of every later stream. This runs edgert's real engine
(``open_runtime``, no HTTP) in one configuration per process and prints the median decode
tok/s of story streams that share nothing with the entry:

    for cfg in "8 0" "8 150" "1 0"; do
        .venv/bin/python benchmarks/cached_prefix_cost.py --model M --slots ${cfg% *} --entry-repeats ${cfg#* }
    done

``--entry-repeats N`` caches a system prompt of N repeated sentences first (150 ~ 900 tokens);
0 caches nothing. Results: benchmarks/RESULTS.md ("Why the misses remain").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import Settings

STORY = "Once upon a time, in a small village by the sea, there lived"


async def measure(runtime: Runtime, entry_repeats: int, streams: int, tokens: int) -> list[float]:
    if entry_repeats:
        system = "You are a kiosk assistant. " * entry_repeats
        prompt = runtime.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": "hi"}])
        await runtime.scheduler.submit(runtime.request(prompt, max_tokens=4)).collect()
    rates = []
    for i in range(streams):
        story = runtime.completion_prompt(f"Chapter {i}{i}. {STORY}")
        request = runtime.request(story, max_tokens=tokens, ignore_eos=True)
        first: float | None = None
        count = 0
        async for _chunk in runtime.scheduler.submit(request):
            count += 1
            if first is None:
                first = time.perf_counter()
        assert first is not None
        rates.append((count - 1) / (time.perf_counter() - first))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--entry-repeats", type=int, default=0)
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(
            engine={"n_threads": args.threads, "n_ctx": args.ctx, "n_parallel": args.slots}, state_dir=state
        )
        runtime = open_runtime(settings, str(args.model))
        try:
            rates = asyncio.run(measure(runtime, args.entry_repeats, args.streams, args.tokens))
        finally:
            runtime.close()
    print(
        f"slots={args.slots} entry_repeats={args.entry_repeats}: median decode {statistics.median(rates):.1f} tok/s "
        f"{[round(r, 1) for r in rates]}"
    )


if __name__ == "__main__":
    main()
