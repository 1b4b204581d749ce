"""What every ``edgert fleet`` command does to reach the broker: one error line, one connected observer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from edgert.cli import exitcodes
from edgert.fleet.observe import FleetObserver
from edgert.log import scrub_urls
from edgert.settings import MqttSettings


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: <message>`` on one line (URLs scrubbed of credentials) and give the exit to raise."""
    typer.echo(f"error: {scrub_urls(' '.join(message.split()))}", err=True)
    return typer.Exit(code)


@contextmanager
def connected_observer(mqtt: MqttSettings, group: str | None) -> Iterator[FleetObserver]:
    """A FleetObserver connected to ``mqtt``'s broker, closed on the way out; exit 7 when it cannot connect."""
    observer = FleetObserver(mqtt, group=group)
    try:
        observer.connect()
    except (OSError, ConnectionError) as exc:
        raise fail(f"cannot reach the broker {mqtt.broker}:{mqtt.port}: {exc}", exitcodes.UNREACHABLE) from None
    try:
        yield observer
    finally:
        observer.close()
