#!/usr/bin/env python3
"""Speculative decoding with a Gemma 4 MTP drafter: measured costs, the speedup curve, and end-to-end runs.

Random shape-exact weights make the acceptance rate meaningless, so this measures what does not depend on
the weights -- the costs -- and puts acceptance in as a parameter:

1. ``costs``: on the real llama.cpp backend (the target, e.g. the shape-exact E2B Q4_K_M, and a shape-exact
   drafter from ``make_mtp_drafter.py --preset e2b``), with S = 1/2/4/8 streams each holding a prompt of
   ``--context`` tokens: the median time of a plain decode step (one token per stream), of a verify step
   (k + 1 tokens per stream, k = 1..4) and of one MTP draft step over S streams. From these, the speedup of
   drafting k at acceptance alpha (per position) is ``E(alpha, k) * T_plain / (T_verify(k) + k * T_draft)``
   with ``E = 1 + alpha + ... + alpha^k``; the break-even alpha solves speedup = 1.
2. ``e2e``: the serving engine itself (scheduler + policy), greedy, S streams, ``--tokens`` each, without a
   drafter, with ``speculative = auto`` and with ``on``. The drafter runs for real (its cost is paid), then
   its tokens are replaced: each draft position holds the model's true next token with probability alpha
   (known from a plain run), else a wrong one -- so the acceptance is alpha per position, the costs are real,
   and the output must equal the plain output (checked).

Usage (under the shared lock: the machine has 2 cores)::

    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/speculative.py costs \\
        --model ~/.cache/edgert-bench/gemma-4-E2B-shape-Q4_K_M.gguf \\
        --drafter ~/.cache/edgert-bench/gemma-4-E2B-shape-assistant-Q8_0.gguf --json /tmp/spec-costs.json
    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/speculative.py e2e --model ... --drafter ... \\
        --alpha 0.63 --alpha 0.82 --streams 1 --streams 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgert.engine.base import BatchToken, DraftRequest, LoadOptions, SamplingParams
from edgert.engine.llama import LlamaBackend
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.speculation import expected_speedup
from edgert.settings import load_settings

GREEDY = SamplingParams(temperature=0.0)
KS = (1, 2, 3, 4)
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.63, 0.7, 0.8, 0.82, 0.9)


# ------------------------------------------------------------------ costs
def _median_s(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_costs(
    model: Path, drafter: Path, streams: list[int], context: int, reps: int, threads: int
) -> dict[str, Any]:
    n_seq = max(streams)
    options = LoadOptions(
        n_ctx=max(4096, n_seq * (context + 16)), n_seq_max=n_seq, n_batch=512, n_ubatch=512,
        n_threads=threads, n_threads_batch=threads, drafter=drafter,
    )  # fmt: skip
    backend = LlamaBackend(model, options)
    try:
        rng = random.Random(1)
        vocab = backend.info.n_vocab
        for seq in range(n_seq):  # a prompt per stream, in chunks of n_batch
            prompt = [rng.randrange(1000, vocab) for _ in range(context)]
            for start in range(0, context, 512):
                chunk = prompt[start : start + 512]
                backend.decode([BatchToken(seq, t, start + i, start + i == context - 1) for i, t in enumerate(chunk)])
            backend.keep_draft_state(seq, len(chunk) - 1)
        result: dict[str, Any] = {"context": context, "reps": reps, "threads": threads, "streams": {}}
        for s in streams:
            seqs = range(s)

            def step(k: int, seqs: range = seqs) -> None:
                batch = [
                    BatchToken(seq, rng.randrange(1000, vocab), context + j, True) for seq in seqs for j in range(k + 1)
                ]
                backend.decode(batch)
                for seq in seqs:  # the next rep starts from the same context length
                    backend.seq_remove(seq, context, -1)

            plain = _median_s(lambda: step(0), reps)
            verify = {k: _median_s(lambda k=k: step(k), reps) for k in KS}
            requests = [DraftRequest(seq, rng.randrange(1000, vocab), context, 1) for seq in seqs]
            draft = _median_s(lambda requests=requests: backend.draft(requests), reps)
            result["streams"][s] = {"plain_s": plain, "verify_s": verify, "draft_step_s": draft}
            print(
                f"S={s}: plain {plain * 1e3:.1f} ms, verify "
                + ", ".join(f"k={k} {v * 1e3:.1f}" for k, v in verify.items())
                + f" ms, draft step {draft * 1e3:.1f} ms",
                flush=True,
            )
        return result
    finally:
        backend.close()


def curve(costs: dict[str, Any]) -> dict[str, Any]:
    """Speedup per (streams, k, alpha), the best k per alpha, and the break-even alpha per (streams, k)."""
    out: dict[str, Any] = {}
    for s, c in costs["streams"].items():
        plain = c["plain_s"]
        rows = {}
        for k in KS:
            verify = c["verify_s"][k] / plain
            draft = c["draft_step_s"] / plain
            speedups = {a: expected_speedup(a, k, verify, draft) for a in ALPHAS}
            lo, hi = 0.0, 0.999
            for _ in range(40):  # speedup grows with alpha: bisect for 1.0
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if expected_speedup(mid, k, verify, draft) < 1.0 else (lo, mid)
            rows[k] = {"speedup": speedups, "break_even_alpha": hi if hi < 0.998 else None}
        out[s] = rows
    return out


def print_curve(costs: dict[str, Any], table: dict[str, Any]) -> None:
    print("\nspeedup (per stream, all streams drafting k) by acceptance per position alpha")
    print("S  k  break-even  " + "  ".join(f"a={a:<4}" for a in ALPHAS))
    for s, rows in table.items():
        for k, row in rows.items():
            be = row["break_even_alpha"]
            cells = "  ".join(f"{row['speedup'][a]:6.2f}" for a in ALPHAS)
            print(f"{s:<2} {k}  {be if be is None else round(be, 2)!s:<10}  {cells}")
    del costs


# ------------------------------------------------------------------ end to end
class SyntheticAcceptance:
    """Runs the real drafter, then makes each draft position right with probability ``alpha``."""

    def __init__(self, backend: LlamaBackend, alpha: float, references: list[list[int]], seed: int = 3) -> None:
        self.backend = backend
        self.real_draft = backend.draft
        self.alpha = alpha
        self.references = references
        self.rng = random.Random(seed)

    def draft(self, requests: list[DraftRequest]) -> list[list[int]]:
        drafts = self.real_draft(requests)  # the cost is real
        out = []
        for r, d in zip(requests, drafts, strict=True):
            truth = next((ref for ref in self.references if r.pos < len(ref) and ref[r.pos] == r.last_token), [])
            made = []
            for j in range(len(d)):
                right = truth[r.pos + 1 + j] if r.pos + 1 + j < len(truth) else None
                if right is not None and self.rng.random() < self.alpha:
                    made.append(right)
                else:
                    made.append((right or d[j]) + 1)  # wrong on purpose
            out.append(made)
        return out


def _engine(model: Path, drafter: Path | None, mode: str, streams: int, threads: int, state: Path) -> Runtime:
    engine: dict[str, object] = {
        "n_ctx": 4096, "n_parallel": max(streams, 1), "n_threads": threads, "n_threads_batch": threads,
        "prefix_cache_entries": 0, "speculative": mode,
    }  # fmt: skip
    if drafter is not None:
        engine["drafter"] = str(drafter)
    return open_runtime(load_settings(state_dir=state, model=str(model), engine=engine))


def _prompts(rt: Runtime, streams: int) -> list[tuple[int, ...]]:
    topics = ["the sea", "a kiosk", "trains", "bread", "rain", "maps", "bees", "clocks"]
    return [rt.chat_prompt([{"role": "user", "content": f"Tell me about {topics[i % 8]}."}]) for i in range(streams)]


def _run(rt: Runtime, prompts: list[tuple[int, ...]], tokens: int) -> tuple[list[str], float]:
    async def go() -> list[str]:
        reqs = [rt.request(p, sampling=GREEDY, max_tokens=tokens, ignore_eos=True) for p in prompts]
        streams = [rt.scheduler.submit(r) for r in reqs]
        return [(await s.collect())[0] for s in streams]

    started = time.perf_counter()
    texts = asyncio.run(go())
    return texts, time.perf_counter() - started


def measure_e2e(
    model: Path, drafter: Path, alphas: list[float], streams: list[int], tokens: int, threads: int, state: Path
) -> list[dict[str, Any]]:
    rows = []
    for s in streams:
        plain = _engine(model, None, "off", s, threads, state)
        try:
            prompts = _prompts(plain, s)
            backend = plain.backend
            assert isinstance(backend, LlamaBackend)
            original = backend.sample
            order: list[int] = []

            def recording(sampler: Any, index: int, original: Any = original, order: list[int] = order) -> int:
                token = int(original(sampler, index))
                order.append(token)
                return token

            references = []
            for p in prompts:  # one at a time, so the recorded tokens are this prompt's
                order.clear()
                backend.sample = recording  # type: ignore[method-assign]
                _run(plain, [p], tokens)
                backend.sample = original  # type: ignore[method-assign]
                references.append(list(p) + list(order))
            expected, plain_s = _run(plain, prompts, tokens)
        finally:
            plain.close()
        rows.append({"streams": s, "mode": "plain", "alpha": None, "seconds": plain_s, "tok_s": s * tokens / plain_s})
        print(f"S={s} plain: {s * tokens / plain_s:.2f} tok/s", flush=True)
        for alpha in alphas:
            for mode in ("auto", "on"):
                rt = _engine(model, drafter, mode, s, threads, state)
                try:
                    spec_backend = rt.backend
                    assert isinstance(spec_backend, LlamaBackend)
                    synthetic = SyntheticAcceptance(spec_backend, alpha, references)
                    spec_backend.draft = synthetic.draft  # type: ignore[method-assign]
                    texts, seconds = _run(rt, prompts, tokens)
                    stats = rt.scheduler.stats
                    same = texts == expected
                    row = {
                        "streams": s, "mode": mode, "alpha": alpha, "seconds": seconds,
                        "tok_s": s * tokens / seconds, "speedup": plain_s / seconds, "identical": same,
                        "drafted": stats.draft_tokens, "accepted": stats.draft_accepted, "steps": stats.steps,
                    }  # fmt: skip
                finally:
                    rt.close()
                rows.append(row)
                print(
                    f"S={s} {mode} alpha={alpha}: {row['tok_s']:.2f} tok/s ({row['speedup']:.2f}x), drafted"
                    f" {row['drafted']} accepted {row['accepted']}, identical output: {same}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["costs", "e2e"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--streams", type=int, action="append")
    parser.add_argument("--context", type=int, default=256, help="costs: prompt tokens each stream holds")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, action="append", help="e2e: acceptance per draft position")
    parser.add_argument("--tokens", type=int, default=64, help="e2e: tokens generated per stream")
    parser.add_argument("--state", type=Path, default=Path("/tmp/edgert-spec-bench"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    model, drafter = args.model.expanduser(), args.drafter.expanduser()
    if args.what == "costs":
        costs = measure_costs(model, drafter, args.streams or [1, 2, 4, 8], args.context, args.reps, args.threads)
        table = curve(costs)
        print_curve(costs, table)
        result: Any = {"costs": costs, "curve": table}
    else:
        args.state.mkdir(parents=True, exist_ok=True)
        result = measure_e2e(
            model, drafter, args.alpha or [0.63, 0.82], args.streams or [1, 8], args.tokens, args.threads, args.state
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
