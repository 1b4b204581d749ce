"""``edgert doctor``: what this machine can run, what edgert would load, and what is wrong.

The command gathers everything into one frozen :class:`~edgert.cli.doctor_report.Report` (settings,
build, hardware, model choice, problems), then renders it either as rich tables or as one JSON
object (:mod:`edgert.cli.doctor_output`); this module owns the command, its exit status and
loading the llama.cpp build. Exit
status (see :mod:`edgert.cli.exitcodes`): 0 = no problem of severity "error", so ``edgert serve``
should be able to start; 1 = at least one such problem, or the served model does not fit ``--budget``
whatever the planner changes; 6 = the settings or the catalog are invalid
(nothing else could be checked).
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from edgert.catalog import load_catalog
from edgert.cli import exitcodes
from edgert.cli.doctor_budget import budget_json, budget_report, budget_table
from edgert.cli.doctor_output import render, report_json
from edgert.cli.doctor_report import build_report
from edgert.engine.base import BackendCapabilities
from edgert.errors import ConfigError
from edgert.hardware import Problem, detect
from edgert.memory_plan import parse_budget
from edgert.settings import config_file_path, ignored_local_config, load_settings


def doctor(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="Memory budget (e.g. 4GiB): print the served model's memory breakdown and the settings that fit it "
        "(default: the memory_budget setting).",
    ),
) -> None:
    """Check this machine and edgert's setup: backend, devices, memory, model fit, config."""
    try:
        settings = load_settings()
        catalog = load_catalog(settings.catalog)
        wanted = budget or settings.memory_budget
        budget_mib = parse_budget(wanted) if wanted else None
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None
    except ValueError as exc:
        typer.echo(f"error: --budget: {exc}", err=True)
        raise typer.Exit(exitcodes.USAGE) from None
    caps, load_problem = _capabilities()
    ignored = ignored_local_config()
    config_problem = Problem("warning", ignored) if ignored else None
    report = build_report(
        settings,
        catalog,
        caps,
        detect(caps),
        config_file_path(),
        load_problem=load_problem,
        config_problem=config_problem,
    )
    fits = True
    if budget_mib is not None:
        result = budget_report(report, budget_mib)
        fits = not isinstance(result, str) and result.plan.fits
    if json_output:
        data = report_json(report)
        if budget_mib is not None:
            data["memory_budget"] = budget_json(result, budget_mib)
        typer.echo(json.dumps(data, indent=2))
    else:
        console = Console()
        render(report, console)
        if budget_mib is not None:
            console.print(budget_table(result, budget_mib))
    raise typer.Exit(exitcodes.OK if report.ok and fits else exitcodes.FAILURE)


def _capabilities() -> tuple[BackendCapabilities, Problem | None]:
    """The llama.cpp build's capabilities; a broken install is a problem to report, not a crash."""
    try:
        # Imported here: loading llama_cpp maps the native library, which other commands never need.
        from edgert.engine.llama import capabilities  # noqa: PLC0415

        return capabilities(), None
    except (ImportError, OSError) as exc:
        problem = Problem(
            "error",
            f"llama-cpp-python cannot be loaded: {exc}",
            "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36",
        )
        return BackendCapabilities("llama.cpp", "unavailable", gpu_offload=False, system_info=""), problem
