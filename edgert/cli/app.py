"""The ``edgert`` command line (typer). Exit codes: see :mod:`edgert.cli.exitcodes`."""

from __future__ import annotations

import sys

import typer

from edgert import __version__
from edgert.cli import exitcodes
from edgert.cli.bench import bench
from edgert.cli.doctor import doctor
from edgert.cli.models import app as models_app
from edgert.cli.run import run
from edgert.cli.serve import serve

app = typer.Typer(
    name="edgert",
    help="Edge and on-device LLM inference runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(help="Run the daemon: OpenAI-compatible HTTP on a Unix socket.")(serve)
app.command(help="Generate a reply from a model, streamed to stdout.")(run)
app.command(help="Show backend, devices, memory, the model edgert would pick, and problems.")(doctor)
app.command(help="Engine benchmark: edgert vs raw llama-cpp-python, and aggregate tok/s by concurrency.")(bench)
app.add_typer(models_app, name="models", help="List, download, verify and remove models.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgert {__version__}")
        raise typer.Exit(exitcodes.OK)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Edge and on-device LLM inference runtime."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(exitcodes.INTERRUPTED)
