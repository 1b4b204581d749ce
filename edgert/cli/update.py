"""``edgert update check|apply|status|rollback``: signed model updates on this device.

While a daemon answers on ``serve.socket`` it is the only driver of the update path
(issue 14): these commands are thin clients of its socket routes (``GET /update/offer``,
``POST /update/apply``, ``POST /update/rollback``, ``GET /update/status``) and the daemon
runs the round, swapping the model it serves. Only when no daemon answers do they work
directly on the state directory (``<state_dir>/update``) under the update lock; ``apply``
then loads and probes the new model with the real engine before it commits (see
:class:`edgert.model_switch.RuntimeModelSwitch`). A daemon keeps that lock while it runs, so
a lock held with no socket answering (a daemon on another socket, or still starting) ends
the command with exit code 5 instead of committing a release beside that daemon.

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
from collections.abc import Callable, Iterator
from dataclasses import asdict
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from edgert.api.client import answers, unix_client
from edgert.cli import exitcodes
from edgert.errors import EdgertError, UpdateBusyError
from edgert.model_switch import RuntimeModelSwitch
from edgert.settings import Settings, load_settings
from edgert.update import failures
from edgert.update.orchestrator import Updater
from edgert.update.state import UpdateState

T = TypeVar("T")

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
    with _errors() as settings:
        if answers(settings.serve.socket):
            data = _ask(settings, "GET", "/update/offer")
        else:
            result = _local(settings, lambda: Updater(settings).check())
            data = {**asdict(result), "offered": result.offered.key if result.offered else None}
        if as_json:
            typer.echo(json.dumps(data, default=str))
        else:
            offered = data["offered"]
            action = f"install {offered}" if offered else "nothing to install"
            typer.echo(f"{data['channel']}: {action} ({data['reason']})")


@app.command("apply")
def apply(
    pin: Annotated[
        str | None, typer.Option("--pin", help="Install this signed version of the channel's model.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Download, verify, stage, load, health-check and commit what the channel offers (or roll back)."""
    with _errors() as settings:
        if answers(settings.serve.socket):
            result = _ask(settings, "POST", "/update/apply", params={"version": pin} if pin else None)
        else:
            switch = RuntimeModelSwitch(settings)
            try:
                with _progress() as progress:
                    updater = Updater(settings, switch, progress=progress)
                    result = asdict(_local(settings, lambda: updater.apply(pin_version=pin)))
            finally:
                switch.close()
        _report(result, as_json)
        if result["outcome"] == "rolled-back":
            raise typer.Exit(exitcodes.FAILURE)


@app.command("rollback")
def rollback(as_json: JsonOption = False) -> None:
    """Go back to the previous version kept on disk and blocklist the current one."""
    with _errors() as settings:
        if answers(settings.serve.socket):
            result = _ask(settings, "POST", "/update/rollback")
        else:
            switch = RuntimeModelSwitch(settings)
            try:
                result = asdict(_local(settings, lambda: Updater(settings, switch).rollback()))
            finally:
                switch.close()
        _report(result, as_json)


@app.command("status")
def status(as_json: JsonOption = False) -> None:
    """Phase, current and previous versions, blocklist, last error."""
    with _errors() as settings:
        if answers(settings.serve.socket):
            # the daemon's view: the state file plus what it knows of its rounds (loop, disabled)
            data = _ask(settings, "GET", "/update/status")
            if as_json:
                typer.echo(json.dumps(data, indent=2))
                return
            if data.get("phase") is None:  # the daemon cannot read its state: it says why
                typer.echo(f"phase:     -\nlast error: {data.get('last_error')}")
                return
            state = UpdateState.model_validate({key: data[key] for key in UpdateState.model_fields if key in data})
        else:
            state = Updater(settings).status()
            if as_json:
                typer.echo(state.model_dump_json(indent=2))
                return
        typer.echo(f"phase:     {state.phase}")
        typer.echo(f"current:   {state.current.key if state.current else '-'}")
        typer.echo(f"previous:  {state.previous.key if state.previous else '-'}")
        typer.echo(f"pending:   {state.pending.key if state.pending else '-'}")
        typer.echo(f"blocklist: {', '.join(state.blocklist) or '-'}")
        typer.echo(f"checked:   {state.last_check.isoformat() if state.last_check else 'never'}")
        if (scored := state.evaluation) is not None:
            verdict = "meets" if scored.met else "below"
            typer.echo(
                f"evaluated: {scored.release} {scored.passed}/{scored.total} {verdict} threshold {scored.threshold:g}"
            )
        if state.last_error:
            typer.echo(f"last error: {state.last_error}")


# --------------------------------------------------------------------------- helpers


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{result['outcome']}: {result['release'] or '-'} ({result['detail']})")


class _CommandError(Exception):
    """The command cannot go on: the line to print and the exit code to leave with."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.line, self.exit_code = line, exit_code


def _ask(settings: Settings, method: str, path: str, *, params: dict[str, str] | None = None) -> dict[str, Any]:
    """One request to the daemon on ``serve.socket``; no read timeout: the daemon bounds its own rounds."""
    socket = settings.serve.socket
    try:
        with unix_client(socket) as client:
            response = client.request(method, path, params=params, timeout=httpx.Timeout(10.0, read=None))
    except httpx.TransportError as exc:
        raise _CommandError(f"the daemon on {socket} stopped answering: {exc}", exitcodes.FAILURE) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _CommandError(f"the daemon on {socket} answered {response.status_code}", exitcodes.FAILURE)
    if response.is_success:
        return body
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    message, reason = str(error.get("message", response.reason_phrase)), error.get("reason")
    line = message if reason in (None, failures.FailureReason.UPDATE) else f"{reason}: {message}"
    busy = response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    raise _CommandError(line, exitcodes.BUSY if busy else exitcodes.FAILURE)


def _local(settings: Settings, work: Callable[[], T]) -> T:
    """Run the updater in this process: no daemon answers on ``serve.socket``.

    A held lock then means a daemon this command cannot reach (another socket, or still starting):
    driving the update beside it would commit a release that daemon does not serve (issue 14).
    """
    try:
        return work()
    except UpdateBusyError:
        raise _CommandError(
            f"the update state in {settings.state_dir / 'update'} is held by another edgert process (a daemon "
            f"still starting or on another socket, or another update); no daemon answers on {settings.serve.socket} "
            "(or this user may not connect to it): run this command with that daemon's serve.socket, "
            "or retry when the other update is done",
            exitcodes.BUSY,
        ) from None


@contextlib.contextmanager
def _errors() -> Iterator[Settings]:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        yield load_settings()
    except _CommandError as exc:
        typer.echo(f"error: {exc.line}", err=True)
        raise typer.Exit(exc.exit_code) from None
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
