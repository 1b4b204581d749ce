"""``edgert mqtt ask|status``: a technician's client of devices that serve over MQTT.

Connection options default to the ``mqtt`` settings group (EDGERT_MQTT__* or the
TOML file), so on a device ``edgert mqtt ask "hi"`` asks the device itself. The
password is read from settings only (EDGERT_MQTT__PASSWORD), never from a flag that
would show in ``ps``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from edgert.api.mqtt_schemas import ReplyChunk, ReplyError, ReplyFinal, Topics
from edgert.cli import exitcodes
from edgert.errors import ConfigError, EdgertError, ModelNotFoundError, OverloadedError
from edgert.settings import MqttSettings, Settings, load_settings
from edgert.transport.mqtt_client import MqttRequester, device_statuses
from edgert.transport.mqtt_link import resolve_device_id

app = typer.Typer(no_args_is_help=True, help="Ask devices over MQTT and list the devices a broker has seen.")


def _settings(
    config: Path | None,
    broker: str | None,
    protocol: str | None,
    tls_ca: Path | None,
    username: str | None,
) -> tuple[Settings, MqttSettings]:
    """Settings with the command's flags laid over the ``mqtt`` group."""
    settings = load_settings(config_path=config)
    update: dict[str, object] = {}
    if broker is not None:
        host, _, port = broker.rpartition(":") if ":" in broker else (broker, "", "")
        if port and not port.isdigit():
            raise typer.BadParameter("expected HOST or HOST:PORT", param_hint="--broker")
        update["broker"] = host
        if port:
            update["port"] = int(port)
    if protocol is not None:
        if protocol not in ("5", "3.1.1"):
            raise typer.BadParameter("expected 5 or 3.1.1", param_hint="--protocol")
        update["protocol"] = protocol
    if tls_ca is not None:
        update["ca_file"] = tls_ca
    if username is not None:
        update["username"] = username
    try:
        mqtt = MqttSettings.model_validate(settings.mqtt.model_dump() | update)
    except ValueError as exc:
        raise ConfigError(f"invalid MQTT option: {exc}") from None
    if not mqtt.broker:
        raise ConfigError("no broker: pass --broker HOST[:PORT] or set EDGERT_MQTT__BROKER")
    return settings, mqtt


def _fail(error: EdgertError) -> typer.Exit:
    typer.echo(f"error: {error.message}", err=True)
    return typer.Exit(exitcodes.for_error(error))


def _exit_code(reply: ReplyError) -> int:
    code = reply.error.code
    if code == OverloadedError.code:
        return exitcodes.BUSY
    if code == ModelNotFoundError.code:
        return exitcodes.MODEL_NOT_FOUND
    return exitcodes.FAILURE


BROKER = typer.Option(None, "--broker", "-b", help="Broker HOST[:PORT] (default: mqtt.broker / mqtt.port).")
PROTOCOL = typer.Option(None, "--protocol", help="MQTT protocol: 5 or 3.1.1 (default: mqtt.protocol).")
TLS_CA = typer.Option(None, "--tls-ca", help="CA file for a TLS broker (cert/key: mqtt.cert_file/key_file).")
USERNAME = typer.Option(None, "--username", "-u", help="Broker user (password: EDGERT_MQTT__PASSWORD).")
CONFIG = typer.Option(None, "--config", help="Settings file (else EDGERT_CONFIG / defaults).")


def ask(
    prompt: str = typer.Argument(..., help="The user message. '-' reads stdin."),
    device: str | None = typer.Option(None, "--device", "-d", help="Device id (default: this device's id)."),
    group: str | None = typer.Option(None, "--group", "-g", help="Ask the fleet group instead (any one device)."),
    system: str | None = typer.Option(None, "--system", "-s", help="A system message."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float | None = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Ask for one reply message instead of chunks."),
    json_output: bool = typer.Option(False, "--json", help="Print the final reply as one JSON object."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.1, help="Give up after this many seconds of silence."),
    broker: str | None = BROKER,
    protocol: str | None = PROTOCOL,
    tls_ca: Path | None = TLS_CA,
    username: str | None = USERNAME,
    config: Path | None = CONFIG,
) -> None:
    """Send a chat request to a device and stream the reply to stdout.

    Replies come on edgert/v1/<device>/reply/<client id> (a fleet group: edgert/v1/fleet/<group>/reply/<client id>),
    the reply space devices accept by default and packaging/mosquitto/edgert.acl lets this client alone read.

    Exit codes: 0 ok, 1 failure or no reply, 3 model unknown, 5 device busy (retry later), 6 bad config.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        settings, mqtt = _settings(config, broker, protocol, tls_ca, username)
    except EdgertError as exc:
        raise _fail(exc) from None
    topics = Topics(device or resolve_device_id(settings), group)
    topic = topics.fleet_req if group else topics.req
    assert topic is not None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body: dict[str, object] = {"messages": messages, "stream": not no_stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    final = _ask(mqtt, topic, body, timeout, echo=not json_output)
    if isinstance(final, ReplyError):
        typer.echo(f"error: {final.error.message} ({final.error.code})", err=True)
        raise typer.Exit(_exit_code(final))
    if json_output:
        typer.echo(final.model_dump_json())
    elif final.content is not None:
        typer.echo(final.content)
    else:
        typer.echo("")


def _ask(
    mqtt: MqttSettings, topic: str, body: dict[str, object], timeout: float, *, echo: bool
) -> ReplyFinal | ReplyError:
    try:
        with MqttRequester(mqtt, timeout_s=min(timeout, 30.0)) as requester:
            for _, reply in requester.send(topic, body).replies(timeout):
                if isinstance(reply, ReplyChunk) and echo:
                    sys.stdout.write(reply.delta)
                    sys.stdout.flush()
                elif isinstance(reply, ReplyFinal | ReplyError):
                    return reply
    except TimeoutError:
        typer.echo(
            f"error: no reply on {topic} within {timeout:g} s (is the device online? `edgert mqtt status`)", err=True
        )
        raise typer.Exit(exitcodes.FAILURE) from None
    except (OSError, ConnectionError) as exc:
        typer.echo(f"error: cannot reach the broker {mqtt.broker}:{mqtt.port}: {exc}", err=True)
        raise typer.Exit(exitcodes.FAILURE) from None
    raise AssertionError("replies() ends with a final or error reply")


def status(
    wait: float = typer.Option(1.0, "--wait", "-w", min=0.05, help="Seconds to listen for status messages."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per device."),
    broker: str | None = BROKER,
    protocol: str | None = PROTOCOL,
    tls_ca: Path | None = TLS_CA,
    username: str | None = USERNAME,
    config: Path | None = CONFIG,
) -> None:
    """List the devices the broker has a (retained) status for: online/offline, model, uptime."""
    try:
        _, mqtt = _settings(config, broker, protocol, tls_ca, username)
        statuses = device_statuses(mqtt, wait)
    except EdgertError as exc:
        raise _fail(exc) from None
    except (OSError, ConnectionError) as exc:
        typer.echo(f"error: cannot reach the broker {mqtt.broker}:{mqtt.port}: {exc}", err=True)
        raise typer.Exit(exitcodes.FAILURE) from None
    now = time.time()
    for device_id in sorted(statuses):
        entry = statuses[device_id]
        if json_output:
            typer.echo(json.dumps(entry.model_dump(mode="json")))
            continue
        model = entry.model.id if entry.model else "-"
        since = f"{now - entry.ts:.0f}s ago"
        detail = f"up {entry.uptime_s:.0f}s" if entry.state == "online" and entry.uptime_s else entry.reason or ""
        typer.echo(f"{device_id:<24} {entry.state:<8} {model:<28} {detail:<18} {since}")
    if not statuses and not json_output:
        typer.echo("no devices have published a status on this broker", err=True)


app.command(help="Send a prompt to a device over MQTT and stream the reply.")(ask)
app.command(help="List devices seen on edgert/v1/+/status.")(status)
