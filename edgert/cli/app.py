"""The ``edgert`` command line (typer). Exit codes: see :mod:`edgert.cli.exitcodes`."""

from __future__ import annotations

import sys

import typer

from edgert import __version__
from edgert.cli import exitcodes
from edgert.cli.bench import bench
from edgert.cli.doctor import doctor
from edgert.cli.models import app as models_app
from edgert.cli.mqtt import app as mqtt_app
from edgert.cli.registry import app as registry_app
from edgert.cli.run import run
from edgert.cli.serve import serve
from edgert.cli.update import app as update_app

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
app.add_typer(mqtt_app, name="mqtt", help="Ask devices over MQTT; list the devices a broker has seen.")
app.add_typer(registry_app, name="registry", help="Operate a signed (TUF) model registry.")
app.add_typer(update_app, name="update", help="Check for, install and roll back signed model updates.")


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
