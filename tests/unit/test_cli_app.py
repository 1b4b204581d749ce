"""The command line's lazy subcommands: every one is reachable, none is imported before it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgert.cli.app import _SUBCOMMANDS, app

runner = CliRunner()


def test_top_level_help_lists_every_subcommand_with_its_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in _SUBCOMMANDS:
        assert f" {name} " in result.output
    assert "Operate a signed (TUF) model registry" in result.output


@pytest.mark.parametrize("name", sorted(_SUBCOMMANDS))
def test_each_subcommand_loads_and_shows_its_own_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"edgert {name}" in result.output


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = runner.invoke(app, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


def test_importing_the_cli_loads_no_subcommand_and_no_heavy_library() -> None:
    probe = (
        "import sys, edgert.cli.app; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith("
        "('edgert.cli.', 'edgert.daemon', 'edgert.registry', 'edgert.update', 'llama_cpp', 'fastapi', 'rich', 'tuf'))"
        " and m not in ('edgert.cli.app', 'edgert.cli.exitcodes'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert loaded == [], loaded


def test_the_daemon_loads_neither_the_update_path_nor_mqtt_unless_configured() -> None:
    probe = (
        "import sys, edgert.daemon; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'tuf', 'securesystemslib', 'paho', 'httpx'})),"
        " ' '.join(sorted(m for m in sys.modules if m.startswith(('edgert.update', 'edgert.transport.mqtt')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert loaded == [], loaded
