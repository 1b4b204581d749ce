"""``edgert bench``: the engine against raw llama-cpp-python on the same GGUF, in one run.

Measures, with greedy decoding and a fixed output length (end-of-generation ignored):

* single stream: decode tok/s and TTFT for raw ``llama_cpp.Llama`` and for edgert's
  scheduler, alternating runs and keeping the median of each;
* aggregate tok/s (and mean TTFT) at each requested concurrency.

Speed is reported as ratios against the baseline measured in the same run; nothing
here asserts a wall-clock limit.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import typer
from rich.console import Console
from rich.table import Table

from edgert import __version__
from edgert.catalog import load_catalog
from edgert.cli.exitcodes import for_error
from edgert.engine.base import SamplingParams
from edgert.engine.llama import reference_generate
from edgert.errors import EdgertError
from edgert.serving.runtime import Runtime, load_options, open_runtime, resolve
from edgert.settings import load_settings

BENCH_PROMPT = (
    "You are the assistant of a retail kiosk. Answer the customer's question in a friendly way. "
    "Question: which of your sandwiches are vegetarian, and do you have anything without gluten?"
)
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttft_s: float
    decode_tok_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class AggregateTiming:
    streams: int
    aggregate_tok_s: float
    mean_ttft_s: float
    wall_s: float
    tokens: int


async def _one_stream(runtime: Runtime, prompt: tuple[int, ...], n_tokens: int) -> StreamTiming:
    request = runtime.request(prompt, sampling=GREEDY, max_tokens=n_tokens, ignore_eos=True)
    started = time.perf_counter()
    first = last = started
    count = 0
    async for _chunk in runtime.scheduler.submit(request):
        last = time.perf_counter()
        if count == 0:
            first = last
        count += 1
    decode = (n_tokens - 1) / (last - first) if last > first else 0.0
    return StreamTiming(first - started, decode, n_tokens)


async def _aggregate(runtime: Runtime, prompt: tuple[int, ...], n_tokens: int, streams: int) -> AggregateTiming:
    started = time.perf_counter()
    timings = await asyncio.gather(*(_one_stream(runtime, prompt, n_tokens) for _ in range(streams)))
    wall = time.perf_counter() - started
    tokens = sum(t.tokens for t in timings)
    return AggregateTiming(streams, tokens / wall, statistics.mean(t.ttft_s for t in timings), wall, tokens)


def _median_timing(runs: list[StreamTiming]) -> StreamTiming:
    return StreamTiming(
        ttft_s=statistics.median(r.ttft_s for r in runs),
        decode_tok_s=statistics.median(r.decode_tok_s for r in runs),
        tokens=runs[0].tokens,
    )


def bench(
    model: str | None = typer.Option(None, "--model", "-m", help="Catalog id or .gguf path (default: settings)."),
    tokens: int = typer.Option(128, "--tokens", "-n", min=8, help="Tokens generated per stream."),
    concurrency: str = typer.Option("1,2,4,8", "--concurrency", help="Comma-separated stream counts."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Single-stream runs per side (median kept)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the results as JSON here."),
    config: Path | None = typer.Option(None, "--config", help="Settings file."),
) -> None:
    """Exit codes: 0 ok, 1 failure, 3 model unknown/not installed, 4 model file invalid."""
    levels = sorted({int(part) for part in concurrency.split(",") if part.strip()})
    try:
        settings = load_settings(config_path=config)
        # Every run sends the same prompt: with the prefix cache on, edgert would skip the prefill
        # that raw llama-cpp-python pays, so the comparison runs without it.
        engine = {"n_parallel": max([settings.engine.n_parallel, *levels]), "prefix_cache_entries": 0}
        settings = settings.model_copy(update={"engine": settings.engine.model_copy(update=engine)})
        _, path = resolve(settings, load_catalog(settings.catalog), model or settings.model)
        runtime = open_runtime(settings, model)
    except EdgertError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(for_error(exc)) from None
    console = Console(stderr=True)
    try:
        prompt = runtime.chat_prompt([{"role": "user", "content": BENCH_PROMPT}])
        options = load_options(settings.engine)
        raw_runs: list[StreamTiming] = []
        ours: list[StreamTiming] = []
        asyncio.run(_one_stream(runtime, prompt, 8))  # warm-up: page in weights, build graphs
        for i in range(repeats):
            console.print(f"single stream, run {i + 1}/{repeats}")
            ref = reference_generate(path, options, list(prompt), tokens, ignore_eos=True)
            raw_runs.append(StreamTiming(ref.ttft_s, ref.decode_tok_s, len(ref.tokens)))
            ours.append(asyncio.run(_one_stream(runtime, prompt, tokens)))
        aggregates = []
        for level in levels:
            console.print(f"{level} concurrent streams")
            aggregates.append(asyncio.run(_aggregate(runtime, prompt, tokens, level)))
    finally:
        runtime.close()
    results = _results(
        runtime,
        settings.engine.n_ctx,
        options.n_threads,
        len(prompt),
        tokens,
        _median_timing(raw_runs),
        _median_timing(ours),
        aggregates,
    )
    _print(results)
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _results(
    runtime: Runtime,
    n_ctx: int,
    threads: int,
    prompt_tokens: int,
    tokens: int,
    raw: StreamTiming,
    ours: StreamTiming,
    aggregates: list[AggregateTiming],
) -> dict[str, object]:
    single_agg = next((a.aggregate_tok_s for a in aggregates if a.streams == 1), ours.decode_tok_s)
    return {
        "edgert_version": __version__,
        "model": runtime.model_id,
        "model_file": str(runtime.path),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores_physical": psutil.cpu_count(logical=False),
            "cores_logical": psutil.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "threads": threads,
        "n_ctx": n_ctx,
        "prompt_tokens": prompt_tokens,
        "tokens_per_stream": tokens,
        "raw_llama_cpp_python": asdict(raw),
        "edgert": asdict(ours),
        "ratio_decode_vs_raw": round(ours.decode_tok_s / raw.decode_tok_s, 3) if raw.decode_tok_s else None,
        "ratio_ttft_vs_raw": round(ours.ttft_s / raw.ttft_s, 3) if raw.ttft_s else None,
        "aggregate": [{**asdict(a), "ratio_vs_single": round(a.aggregate_tok_s / single_agg, 3)} for a in aggregates],
    }


def _print(results: dict[str, object]) -> None:
    console = Console()
    raw = results["raw_llama_cpp_python"]
    ours = results["edgert"]
    assert isinstance(raw, dict)
    assert isinstance(ours, dict)
    single = Table(title=f"single stream — {results['model']}, {results['threads']} threads")
    for column in ("engine", "decode tok/s", "TTFT ms", "ratio vs raw"):
        single.add_column(column, justify="right")
    single.add_row("raw llama-cpp-python", f"{raw['decode_tok_s']:.1f}", f"{raw['ttft_s'] * 1000:.1f}", "1.000")
    single.add_row(
        "edgert",
        f"{ours['decode_tok_s']:.1f}",
        f"{ours['ttft_s'] * 1000:.1f}",
        "—" if results["ratio_decode_vs_raw"] is None else f"{results['ratio_decode_vs_raw']:.3f}",
    )
    console.print(single)
    aggregate = Table(title="aggregate by concurrency")
    for column in ("streams", "aggregate tok/s", "mean TTFT ms", "vs 1 stream"):
        aggregate.add_column(column, justify="right")
    rows = results["aggregate"]
    assert isinstance(rows, list)
    for row in rows:
        aggregate.add_row(
            str(row["streams"]),
            f"{row['aggregate_tok_s']:.1f}",
            f"{row['mean_ttft_s'] * 1000:.1f}",
            f"{row['ratio_vs_single']:.2f}x",
        )
    console.print(aggregate)
