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
   drafter, with ``speculative = auto`` and with ``on``. The drafter, the verify batches and the sampling run
   for real (every cost is paid); each draft row is then declared accepted with probability alpha
   (:class:`SyntheticAcceptance`), so the acceptance per position is alpha.
3. ``llama-server``: one greedy completion from llama-server of the same sdist, without and with
   ``--spec-type draft-mtp -md <drafter> --spec-draft-n-max 3`` (its acceptance is the random drafter's, ~0).

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
import resource
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

            def step(k: int, seqs: range = seqs, every_row: bool = True) -> None:
                batch = [
                    BatchToken(seq, rng.randrange(1000, vocab), context + j, every_row or j == k)
                    for seq in seqs
                    for j in range(k + 1)
                ]
                backend.decode(batch)
                for seq in seqs:  # the next rep starts from the same context length
                    backend.seq_remove(seq, context, -1)

            plain = _median_s(lambda: step(0), reps)
            verify = {k: _median_s(lambda k=k: step(k), reps) for k in KS}
            # the same batches with logits for each stream's last row only (what llama-bench's ppN measures):
            # the difference is the output head (vocab x hidden) run once per verified row
            last_only = {k: _median_s(lambda k=k: step(k, every_row=False), reps) for k in KS}
            requests = [DraftRequest(seq, rng.randrange(1000, vocab), context, 1) for seq in seqs]
            draft = _median_s(lambda requests=requests: backend.draft(requests), reps)
            result["streams"][s] = {
                "plain_s": plain, "verify_s": verify, "verify_last_row_logits_s": last_only, "draft_step_s": draft,
            }  # fmt: skip
            print(
                f"S={s}: plain {plain * 1e3:.1f} ms, verify "
                + ", ".join(f"k={k} {v * 1e3:.1f}" for k, v in verify.items())
                + f" ms (last-row logits only: {', '.join(f'{v * 1e3:.1f}' for v in last_only.values())})"
                + f", draft step {draft * 1e3:.1f} ms",
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
    """Real drafts, real verify batches, real sampling -- then each draft row is declared right with probability alpha.

    Wraps the backend's ``decode`` (to see each batch) and ``sample``: when the row sampled is followed by a
    draft of the same stream, the sample is replaced by that draft with probability ``alpha`` (accepted) or
    made to differ from it (rejected). Every cost of speculation is paid as in serving; only the model's
    agreement is set. (With random weights the model's logits are nearly flat, so its own agreement with a
    random drafter is ~0 and its greedy picks flip on llama.cpp's batch-size-dependent rounding; the
    output-identity guarantee is tested on the tiny fixture, where no such near-ties occur.)
    """

    def __init__(self, backend: LlamaBackend, alpha: float, seed: int = 3) -> None:
        self.alpha = alpha
        self.rng = random.Random(seed)
        self.batch: list[BatchToken] = []
        self.real_decode = backend.decode
        self.real_sample = backend.sample
        backend.decode = self.decode  # type: ignore[method-assign]
        backend.sample = self.sample  # type: ignore[method-assign]

    def decode(self, batch: list[BatchToken]) -> None:
        self.batch = batch
        self.real_decode(batch)

    def sample(self, sampler: Any, index: int) -> int:
        token = int(self.real_sample(sampler, index))
        row = self.batch[index]
        after = self.batch[index + 1] if index + 1 < len(self.batch) else None
        if after is None or after.seq != row.seq or after.pos != row.pos + 1:
            return token  # no draft follows this row
        if self.rng.random() < self.alpha:
            return after.token
        return token if token != after.token else token + 1


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


def _cpu_s() -> float:
    """This process's CPU seconds: unlike wall time, not inflated by other processes on the shared cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(rt: Runtime, prompts: list[tuple[int, ...]], tokens: int) -> tuple[list[str], float]:
    async def go() -> list[str]:
        reqs = [rt.request(p, sampling=GREEDY, max_tokens=tokens, ignore_eos=True) for p in prompts]
        streams = [rt.scheduler.submit(r) for r in reqs]
        return [(await s.collect())[0] for s in streams]

    started = time.perf_counter()
    texts = asyncio.run(go())
    return texts, time.perf_counter() - started


def _one_run(
    model: Path, drafter: Path | None, mode: str, alpha: float, s: int, tokens: int, threads: int, state: Path,
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    rt = _engine(model, drafter, mode, s, threads, state)
    try:
        if drafter is not None:
            backend = rt.backend
            assert isinstance(backend, LlamaBackend)
            SyntheticAcceptance(backend, alpha, seed)
        prompts = _prompts(rt, s)
        _run(rt, prompts[:1], 8)  # warm up (and the policy's first measurements)
        before = (rt.scheduler.stats.draft_tokens, rt.scheduler.stats.draft_accepted, rt.scheduler.stats.steps)
        cpu = _cpu_s()
        _, seconds = _run(rt, prompts, tokens)
        cpu = _cpu_s() - cpu
        stats = rt.scheduler.stats
        return {
            "seconds": seconds, "tok_s": s * tokens / seconds, "cpu_s": cpu, "drafted": stats.draft_tokens - before[0],
            "accepted": stats.draft_accepted - before[1], "steps": stats.steps - before[2],
        }  # fmt: skip
    finally:
        rt.close()


def measure_e2e(
    model: Path,
    drafter: Path,
    alphas: list[float],
    streams: list[int],
    tokens: int,
    threads: int,
    state: Path,
    rounds: int,
) -> list[dict[str, Any]]:
    """Rounds of plain, then auto and on at each alpha, alternating; speedups paired with the round's plain run."""
    rows = []
    for s in streams:
        runs: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
        for round_no in range(rounds):
            # auto and on see the same acceptance draws within a round, new ones each round
            plain = _one_run(model, None, "off", 0.0, s, tokens, threads, state, round_no)
            runs.setdefault(("plain", None), []).append(plain)
            for alpha in alphas:
                for mode in ("auto", "on"):
                    run = _one_run(model, drafter, mode, alpha, s, tokens, threads, state, round_no)
                    run["speedup"] = plain["seconds"] / run["seconds"]
                    run["cpu_speedup"] = plain["cpu_s"] / run["cpu_s"]
                    runs.setdefault((mode, alpha), []).append(run)
                    print(f"S={s} {mode} alpha={alpha}: {run}", flush=True)
        for (mode, alpha), got in runs.items():
            row = {
                "streams": s, "mode": mode, "alpha": alpha, "rounds": got,
                "tok_s": statistics.median(r["tok_s"] for r in got),
                "speedup": statistics.median(r.get("speedup", 1.0) for r in got),
                "cpu_speedup": statistics.median(r.get("cpu_speedup", 1.0) for r in got),
                "tokens_per_step": statistics.median((r["accepted"] + r["steps"]) / max(r["steps"], 1) for r in got),
                "accepted_per_drafted": statistics.median(r["accepted"] / max(r["drafted"], 1) for r in got),
            }  # fmt: skip
            rows.append(row)
            print(
                f"S={s} {mode:5} alpha={alpha}: median {row['tok_s']:.2f} tok/s, speedup {row['speedup']:.2f}x"
                f" wall / {row['cpu_speedup']:.2f}x CPU time (paired with the round's plain run), accepted/drafted"
                f" {row['accepted_per_drafted']:.2f}, tokens/step {row['tokens_per_step']:.2f}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ llama-server side by side
def llama_server_run(
    bin_dir: Path, model: Path, drafter: Path | None, tokens: int, threads: int, port: int = 18931
) -> dict[str, Any]:
    """One greedy completion of ``tokens`` from llama-server (``--spec-type draft-mtp`` with a drafter), its timings."""
    import subprocess

    import httpx

    cmd = [
        str(bin_dir / "llama-server"), "-m", str(model), "-c", "4096", "-np", "1", "-t", str(threads),
        "-fa", "on", "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip
    if drafter is not None:
        cmd += ["-md", str(drafter), "--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited: {proc.stderr.read() if proc.stderr else ''}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("llama-server did not become healthy")
                time.sleep(0.2)
            body = {
                "prompt": "Tell me about the sea.", "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                "cache_prompt": False,
            }  # fmt: skip
            timings = client.post("/completion", json=body).json()["timings"]
        return {
            "decode_tok_s": timings["predicted_per_second"],
            "draft_n": timings.get("draft_n", 0),
            "draft_n_accepted": timings.get("draft_n_accepted", 0),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["costs", "e2e", "llama-server"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--streams", type=int, action="append")
    parser.add_argument("--context", type=int, default=256, help="costs: prompt tokens each stream holds")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, action="append", help="e2e: acceptance per draft position")
    parser.add_argument("--tokens", type=int, default=64, help="e2e: tokens generated per stream")
    parser.add_argument("--rounds", type=int, default=2, help="e2e: rounds of plain/auto/on, alternating")
    parser.add_argument("--state", type=Path, default=Path("/tmp/edgert-spec-bench"))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--bin", type=Path, help="llama-server: the tools' bin dir (build_llama_tools.sh)")
    args = parser.parse_args()
    model, drafter = args.model.expanduser(), args.drafter.expanduser()
    if args.what == "costs":
        costs = measure_costs(model, drafter, args.streams or [1, 2, 4, 8], args.context, args.reps, args.threads)
        table = curve(costs)
        print_curve(costs, table)
        result: Any = {"costs": costs, "curve": table}
    elif args.what == "llama-server":
        if args.bin is None:
            raise SystemExit("--bin is required: BIN=$(benchmarks/build_llama_tools.sh | tail -n1)")
        result = {}
        for name, used in (("plain", None), ("draft-mtp", drafter)):
            result[name] = llama_server_run(args.bin, model, used, args.tokens, args.threads)
            print(f"llama-server {name}: {result[name]}", flush=True)
    else:
        args.state.mkdir(parents=True, exist_ok=True)
        result = measure_e2e(
            model,
            drafter,
            args.alpha or [0.63, 0.82],
            args.streams or [1, 8],
            args.tokens,
            args.threads,
            args.state,
            args.rounds,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
