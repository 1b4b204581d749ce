"""The ``edgert`` command line (typer). Exit codes: see :mod:`edgert.cli.exitcodes`.

Subcommands are imported only when they run: ``edgert serve`` on a kiosk should not
pay for the registry, MQTT client, benchmark and rich imports (about half of its
cold start), and neither should its resident memory.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any

import typer
from typer import _click as click  # typer vendors click; its group speaks that click's types
from typer.core import TyperGroup

from edgert import __version__
from edgert.cli import exitcodes


@dataclass(frozen=True, slots=True)
class _Lazy:
    """A subcommand by where it lives: ``module:attribute``, a command function or a Typer app."""

    target: str
    #: For a command function; a Typer app brings its own help.
    help: str | None = None


_SUBCOMMANDS: dict[str, _Lazy] = {
    "serve": _Lazy("edgert.cli.serve:serve", "Run the daemon: OpenAI-compatible HTTP on a Unix socket."),
    "run": _Lazy("edgert.cli.run:run", "Generate a reply from a model, streamed to stdout."),
    "doctor": _Lazy(
        "edgert.cli.doctor:doctor", "Show backend, devices, memory, the model edgert would pick, and problems."
    ),
    "bench": _Lazy(
        "edgert.cli.bench:bench",
        "Engine benchmark: edgert vs raw llama-cpp-python, and aggregate tok/s by concurrency.",
    ),
    "fleet": _Lazy("edgert.cli.fleet:app"),
    "eval": _Lazy("edgert.cli.eval:eval_set", "Run an evaluation set on a model: per-case checks and the score."),
    "models": _Lazy("edgert.cli.models:app"),
    "mqtt": _Lazy("edgert.cli.mqtt:app"),
    "registry": _Lazy("edgert.cli.registry:app"),
    "update": _Lazy("edgert.cli.update:app"),
}


class _LazyGroup(TyperGroup):
    """Click's lazy-loading group pattern on top of typer's group."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_SUBCOMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        lazy = _SUBCOMMANDS.get(cmd_name)
        if lazy is None:
            return super().get_command(ctx, cmd_name)
        module, attribute = lazy.target.split(":")
        loaded: Any = getattr(importlib.import_module(module), attribute)
        if isinstance(loaded, typer.Typer):
            command = typer.main.get_command(loaded)
        else:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(name=cmd_name, help=lazy.help)(loaded)
            command = typer.main.get_command(single)
        command.name = cmd_name
        return command


app = typer.Typer(
    name="edgert",
    cls=_LazyGroup,
    help="Edge and on-device LLM inference runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
