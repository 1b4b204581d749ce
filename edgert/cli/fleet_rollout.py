"""``edgert fleet rollout``: promote a release in waves, halt on failures, resumable (registered by cli/fleet.py).

It signs with the registry's online keys (targets, snapshot, timestamp; never root: see the README's
"Rolling out in waves") and reads the fleet from the broker like ``edgert fleet status``.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from edgert.cli import exitcodes
from edgert.cli.fleet_connect import connected_observer, fail
from edgert.cli.mqtt import BROKER, CONFIG, PROTOCOL, TLS_CA, USERNAME, _settings
from edgert.errors import EdgertError, RolloutError
from edgert.fleet import rollout_state
from edgert.fleet.compare import parse_duration
from edgert.fleet.rollout_controller import RolloutController, RolloutRequest, check_waves
from edgert.fleet.rollout_state import Status
from edgert.registry.repository import Registry
from edgert.update.manifest import CHANNEL_PATTERN, MODEL_ID_PATTERN, VERSION_PATTERN


def _waves(text: str) -> tuple[int, ...]:
    try:
        return check_waves([int(part) for part in text.split(",")])
    except ValueError:
        raise typer.BadParameter(f"expected percentages such as 5,25,100, got {text!r}", param_hint="--waves") from None
    except RolloutError as exc:
        message = exc.message.removeprefix("--waves: ").removeprefix("--waves ")
        raise typer.BadParameter(message, param_hint="--waves") from None


def _check(value: str, pattern: str, what: str) -> None:
    if not re.match(pattern, value):
        raise typer.BadParameter(f"{value!r} is not a valid {what}", param_hint=what)


def rollout(
    model_id: str = typer.Argument(..., help="The model id, as registered (e.g. gemma-4-e2b-it:q4_k_m)."),
    version: str = typer.Argument(..., help="The version to roll out (published with `edgert registry publish`)."),
    channel: str = typer.Option(..., "--channel", "-c", help="The channel devices follow (update.channel)."),
    waves: str = typer.Option("5,25,100", "--waves", help="Increasing percentages of devices, one per wave."),
    max_failure_rate: float = typer.Option(
        0.1, "--max-failure-rate", min=0.0, max=1.0, help="Halt when failed / reported devices exceed this."
    ),
    min_devices: int = typer.Option(
        3, "--min-devices", min=1, help="Raise a wave's percentage until it holds this many of the devices seen."
    ),
    wave_wait: str = typer.Option("10m", "--wave-wait", help="Most time a wave waits for its devices (90s, 10m)."),
    eval_regression: float | None = typer.Option(
        None,
        "--eval-regression",
        min=0.0,
        max=1.0,
        help="Halt when the release's median evaluation score is this far below the previous release's.",
    ),
    registry_dir: Path = typer.Option(Path(), "--registry-dir", "-d", help="Registry directory."),
    out: Path | None = typer.Option(
        None, "--out", help="Also copy the published site here (as `edgert registry publish --out`)."
    ),
    state: Path | None = typer.Option(
        None, "--state", help="The controller's state file (default: <registry-dir>/rollouts/<channel>.json)."
    ),
    group: str | None = typer.Option(None, "--group", "-g", help="Only the devices of this fleet group."),
    no_nudge: bool = typer.Option(
        False, "--no-nudge", help="Do not send update_check to a wave's devices (they take it at their next poll)."
    ),
    abandon: bool = typer.Option(
        False, "--abandon", help="Give up another release's unfinished rollout on the channel (left as it is)."
    ),
    broker: str | None = BROKER,
    protocol: str | None = PROTOCOL,
    tls_ca: Path | None = TLS_CA,
    username: str | None = USERNAME,
    config: Path | None = CONFIG,
) -> None:
    """Promote MODEL_ID@VERSION on a channel in waves; halt and re-sign the channel back on failures.

    Each wave is signed (registry promote + publish), its devices nudged, and watched on the broker until
    every one reported (or --wave-wait passed). Failures (rolled back, blocklisted) over the devices that
    reported above --max-failure-rate, or an evaluation regression, halt the rollout: the channel is
    re-signed to the previous release at 100 %. Killed, it continues where it stopped when run again.

    Exit codes: 0 done, 1 failure, 2 bad arguments, 6 no broker configured, 7 broker unreachable,
    9 halted (the channel is back on the previous release), 10 a wave stalled (no device reported; run again),
    130 interrupted (run it again to continue).
    """
    _check(model_id, MODEL_ID_PATTERN, "MODEL_ID")
    _check(version, VERSION_PATTERN, "VERSION")
    _check(channel, CHANNEL_PATTERN, "--channel")
    try:
        wave_wait_s = parse_duration(wave_wait)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--wave-wait") from None

    # soft wrap: one event is one line in a log or a pipe, whatever the width; markup off: device reasons are text
    console = Console(highlight=False, soft_wrap=True)
    try:
        request = RolloutRequest(
            model_id=model_id,
            version=version,
            channel=channel,
            waves=_waves(waves),
            max_failure_rate=max_failure_rate,
            min_devices=min_devices,
            wave_wait_s=wave_wait_s,
            state_path=state or rollout_state.default_path(registry_dir, channel),
            eval_regression=eval_regression,
            group=group,
            out=out,
            nudge=not no_nudge,
            abandon=abandon,
        )
        _, mqtt = _settings(config, broker, protocol, tls_ca, username)
    except EdgertError as exc:
        raise fail(exc.message, exitcodes.for_error(exc)) from None
    try:
        with connected_observer(mqtt, group) as observer, console.status("") as live:
            controller = RolloutController(
                request,
                Registry(registry_dir),
                observer,
                say=lambda line: console.print(line, markup=False),
                progress=lambda line: live.update(Text(line)),
            )
            result = controller.run()
    except EdgertError as exc:
        raise fail(exc.message, exitcodes.for_error(exc)) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the state is in {request.state_path}; run the same command to continue", err=True)
        raise typer.Exit(exitcodes.INTERRUPTED) from None
    if result.status is Status.HALTED:
        raise typer.Exit(exitcodes.HALTED)
    if result.status is not Status.DONE:
        raise typer.Exit(exitcodes.STALLED)
