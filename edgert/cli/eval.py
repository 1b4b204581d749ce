"""``edgert eval FILE [--model ...]``: run an evaluation set locally, as a device runs it before committing.

The same code as the device's gate (:func:`edgert.serving.evaluation.run_eval_set`: each case the chat
request a client would send, greedy, checked as :mod:`edgert.evalset.checks` checks it), on the model
``edgert run`` would open. An operator runs it before ``edgert registry add --eval`` to see which cases a
build passes. Prints one row per case (pass/fail, the check that failed and why, latency, tokens) and
the score; ``--json`` prints one JSON document instead.

Exit codes: 0 the score meets ``--threshold``; 11 it is below; 1 the set is invalid (the error names the
file and line) or the run failed; 3 model unknown/not installed; 4 model file invalid; 6 bad config.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgert.cli import exitcodes
from edgert.errors import EdgertError
from edgert.evalset.cases import load_eval_set
from edgert.evalset.checks import EvalReport
from edgert.evalset.request import check_requests
from edgert.serving.evaluation import run_eval_set
from edgert.serving.runtime import open_runtime
from edgert.settings import load_settings


def eval_set(
    file: Annotated[Path, typer.Argument(help="The evaluation set (.jsonl, one case per line).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Catalog id or .gguf path (default: settings).")
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, max=1.0, help="Least fraction of cases that must pass.")
    ] = 1.0,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Cap every case's max_tokens (as update.eval_max_tokens does)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Seconds for the whole set; the cases left fail.")
    ] = 600.0,
    mmproj: Annotated[
        Path | None,
        typer.Option("--mmproj", help="Multimodal projector .gguf, for cases with images or audio (as edgert run)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Settings file (else EDGERT_CONFIG / defaults).")
    ] = None,
) -> None:
    """Exit codes: 0 score >= --threshold, 11 below it, 1 invalid set or failed run, 3/4 model, 6 config."""
    try:
        cases = load_eval_set(file)
        check_requests(cases)
        settings = load_settings(config_path=config)
        if mmproj is not None:
            engine = settings.engine.model_copy(update={"mmproj": mmproj.expanduser(), "multimodal": True})
            settings = settings.model_copy(update={"engine": engine})
        runtime = open_runtime(settings, model)
    except EdgertError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None
    try:
        run = run_eval_set(runtime, cases, threshold=threshold, budget_s=timeout, max_tokens_cap=max_tokens)
        report = asyncio.run(run)
    except EdgertError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None
    finally:
        runtime.close()
    if json_output:
        typer.echo(json.dumps(_as_json(report, runtime.model_id)))
    else:
        _print(report, runtime.model_id)
    raise typer.Exit(exitcodes.OK if report.ok else exitcodes.EVAL_BELOW_THRESHOLD)


def _print(report: EvalReport, model_id: str) -> None:
    table = Table(title=f"{model_id}", title_justify="left")
    for column in ("case", "result", "check", "latency", "tokens", "why"):
        table.add_column(column, justify="right" if column in ("latency", "tokens") else "left")
    for result in report.results:
        latency = f"{result.latency_s:.2f} s" if result.latency_s is not None else "-"
        verdict = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
        row = (result.case_id, verdict, result.failed or "", latency, str(result.completion_tokens), result.why or "")
        table.add_row(*row)
    console = Console(highlight=False)
    console.print(table)
    console.print(f"score {report.score:.3f} ({report.summary()})", markup=False)


def _as_json(report: EvalReport, model_id: str) -> dict[str, Any]:
    return {
        "model": model_id,
        "score": report.score,
        "passed": report.passed,
        "total": report.total,
        "threshold": report.threshold,
        "ok": report.ok,
        "summary": report.summary(),
        "cases": [
            {
                "id": result.case_id,
                "passed": result.passed,
                "failed": result.failed,
                "why": result.why,
                "latency_s": result.latency_s,
                "completion_tokens": result.completion_tokens,
            }
            for result in report.results
        ],
    }
