"""``edgert update check|apply|status|rollback``: signed model updates on this device.

These commands work directly on the state directory (``<state_dir>/update``)
under the update lock; a running daemon's background loop uses the same code.
``apply`` loads and probes the new model with the real engine before it
commits (see :class:`edgert.model_switch.RuntimeModelSwitch`).

stdout carries the result (``--json`` for scripts), stderr the logs and the
progress bar. Errors print one ``error: <reason>: …`` line (the failure class of
:mod:`edgert.update.failures`) and exit with a code from
:mod:`edgert.cli.exitcodes`; a rollback after a failed health check exits 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from edgert.cli import exitcodes
from edgert.errors import EdgertError
from edgert.model_switch import RuntimeModelSwitch
from edgert.settings import load_settings
from edgert.update import failures
from edgert.update.orchestrator import ApplyResult, Updater

app = typer.Typer(
    name="update",
    help="Check for, install and roll back signed model updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("check")
def check(as_json: JsonOption = False) -> None:
    """Verify the registry's signed metadata and say what this device would install."""
    with _errors():
        result = Updater(load_settings()).check()
        offered = result.offered.key if result.offered else None
        if as_json:
            typer.echo(json.dumps({**asdict(result), "offered": offered}, default=str))
        else:
            action = f"install {offered}" if offered else "nothing to install"
            typer.echo(f"{result.channel}: {action} ({result.reason})")


@app.command("apply")
def apply(
    pin: Annotated[
        str | None, typer.Option("--pin", help="Install this signed version of the channel's model.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Download, verify, stage, load, health-check and commit what the channel offers (or roll back)."""
    with _errors():
        settings = load_settings()
        switch = RuntimeModelSwitch(settings)
        try:
            with _progress() as progress:
                result = Updater(settings, switch, progress=progress).apply(pin_version=pin)
        finally:
            switch.close()
        _report(result, as_json)
        if result.outcome == "rolled-back":
            raise typer.Exit(exitcodes.FAILURE)


@app.command("rollback")
def rollback(as_json: JsonOption = False) -> None:
    """Go back to the previous version kept on disk and blocklist the current one."""
    with _errors():
        settings = load_settings()
        switch = RuntimeModelSwitch(settings)
        try:
            result = Updater(settings, switch).rollback()
        finally:
            switch.close()
        _report(result, as_json)


@app.command("status")
def status(as_json: JsonOption = False) -> None:
    """Phase, current and previous versions, blocklist, last error."""
    with _errors():
        state = Updater(load_settings()).status()
        if as_json:
            typer.echo(state.model_dump_json(indent=2))
            return
        typer.echo(f"phase:     {state.phase}")
        typer.echo(f"current:   {state.current.key if state.current else '-'}")
        typer.echo(f"previous:  {state.previous.key if state.previous else '-'}")
        typer.echo(f"pending:   {state.pending.key if state.pending else '-'}")
        typer.echo(f"blocklist: {', '.join(state.blocklist) or '-'}")
        typer.echo(f"checked:   {state.last_check.isoformat() if state.last_check else 'never'}")
        if state.last_error:
            typer.echo(f"last error: {state.last_error}")


# --------------------------------------------------------------------------- helpers


def _report(result: ApplyResult, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(asdict(result)))
    else:
        typer.echo(f"{result.outcome}: {result.release or '-'} ({result.detail})")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield
    except EdgertError as exc:
        # one line, named by its failure class, URLs without credentials: what a hostile registry causes too
        generic = failures.reason_of(exc) is failures.FailureReason.UPDATE
        typer.echo(f"error: {failures.message_of(exc) if generic else failures.describe(exc)}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None
    except Exception as exc:  # a bug: still one line (its traceback at debug level), never a raw dump
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        typer.echo(f"error: {failures.describe(exc)} (unexpected: please report it)", err=True)
        raise typer.Exit(exitcodes.FAILURE) from None


class _Bar:
    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task = progress.add_task("download", total=None)

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)


@contextlib.contextmanager
def _progress() -> Iterator[_Bar]:
    console = Console(stderr=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield _Bar(progress)
