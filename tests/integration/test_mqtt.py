"""Serving over MQTT against a real mosquitto and real daemon subprocesses.

The serving tests (request/response, streaming, interop, bad payloads, duplicates, overload,
cancel, telemetry, CLI) run once per backend through the ``tiny_model`` fixture: the tiny Gemma 4
GGUF on llama.cpp, then the tiny Gemma 3 ONNX folder on onnxruntime-genai. The tests of the link
itself (last will, broker restart, reply buffer, shared subscriptions, TLS) keep the GGUF: they
exercise paho, mosquitto and the reply path, which no backend touches, and two of them need a
generation that outlasts a broker restart (seconds), longer than the ONNX fixture's 2048-token
context lasts (~0.2 s).
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgert.api.mqtt_schemas import (
    ALL_STATUS,
    DeviceStatus,
    ReplyChunk,
    ReplyError,
    ReplyFinal,
    Telemetry,
    Topics,
    json_schemas,
    schema_markdown,
)
from edgert.settings import MqttSettings
from edgert.transport.mqtt_client import MqttRequester, Reply
from edgert.transport.mqtt_delivery import ReplyCache
from edgert.transport.mqtt_link import Outgoing, backoff_delays
from tests.integration.daemon import DaemonProcess, start_daemon, wait_until_ready
from tests.integration.mosquitto import Broker, make_tls

PAYLOAD_DOCS = Path(__file__).parents[2] / "docs" / "mqtt-payloads.md"
DEV_A = Topics("dev-a")


def chat(max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, **extra}


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_status(watcher: MqttRequester, device: str, state: str, timeout: float = 10.0) -> DeviceStatus:
    def matches() -> bool:
        status = watcher.statuses.get(device)
        return status is not None and status.state == state

    wait_for(matches, timeout, f"{device} {state}")
    return watcher.statuses[device]


def mqtt_daemon(workdir: Path, model: Path, broker: Broker, device: str, **settings: str) -> DaemonProcess:
    """A device that hears requests: started, ready, and reported online over MQTT."""
    workdir.mkdir(parents=True, exist_ok=True)
    values = {"mqtt__device_id": device, "mqtt__reconnect_min_s": "0.1", "mqtt__reconnect_max_s": "1"}
    values.update(settings)
    daemon = start_daemon(workdir, model, **broker.daemon_settings(**values))
    try:
        wait_online(broker, device)
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon


def wait_online(broker: Broker, *devices: str, settings: MqttSettings | None = None) -> None:
    """Wait for each device's retained "online" status (as ``settings``' identity, default the broker's).

    The socket reports ready before the MQTT link is up, and a request published before the
    device subscribed is lost. A device subscribes to its request topics before it publishes
    "online" on the same connection, so once the status arrives, requests reach the device.
    """
    with MqttRequester(settings or broker.client_settings(), topics=(ALL_STATUS,)) as watcher:
        for device in devices:
            wait_status(watcher, device, "online")


def collect(replies: Iterator[tuple[float, Reply]]) -> list[Reply]:
    return [reply for _, reply in replies]


def check_stream(replies: list[Reply]) -> ReplyFinal:
    """Chunks numbered 0..n-1 in arrival order, then exactly one final with seq n."""
    *chunks, final = replies
    assert isinstance(final, ReplyFinal), final
    assert all(isinstance(chunk, ReplyChunk) for chunk in chunks)
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    assert final.seq == len(chunks)
    assert final.content is None
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
    return final


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def device_a(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, broker: Broker) -> Iterator[DaemonProcess]:
    """Two slots and no queue (so overload is easy to provoke), a 4 KiB message limit, fast telemetry.

    One per backend, one after the other under the same device id.
    """
    proc = mqtt_daemon(
        tmp_path_factory.mktemp("dev-a"),
        tiny_model,
        broker,
        "dev-a",
        engine__n_parallel="2",
        engine__max_queue="0",
        mqtt__max_message_bytes="4096",
        mqtt__telemetry_interval_s="0.2",
    )
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def watcher(broker: Broker) -> Iterator[MqttRequester]:
    """A client that keeps every device's latest status."""
    with MqttRequester(broker.client_settings(), topics=(ALL_STATUS,)) as client:
        yield client


@pytest.fixture(scope="module")
def client(broker: Broker, device_a: DaemonProcess, watcher: MqttRequester) -> Iterator[MqttRequester]:
    """A technician's client, once dev-a (on either backend) is online."""
    wait_status(watcher, "dev-a", "online")
    with MqttRequester(broker.client_settings()) as requester:
        yield requester


@pytest.fixture(scope="module")
def technician(broker: Broker) -> Iterator[MqttRequester]:
    """A client for the link tests, which start their own devices and need no dev-a."""
    with MqttRequester(broker.client_settings()) as requester:
        yield requester


# ---------------------------------------------------------------------------- request / response
def test_mqtt5_request_response(client: MqttRequester, device_a: DaemonProcess) -> None:
    [final] = client.ask(DEV_A.req, chat(8, temperature=0))
    assert isinstance(final, ReplyFinal)
    assert final.seq == 0
    assert final.device_id == "dev-a"
    assert final.model == device_a.model.name
    assert final.finish_reason in ("stop", "length")
    assert final.content
    assert 1 <= final.usage.completion_tokens <= 8
    assert final.timings is not None
    assert final.timings.total_s > 0


def test_streaming_chunks_arrive_in_order(client: MqttRequester) -> None:
    final = check_stream(client.ask(DEV_A.req, chat(300, stream=True)))
    assert final.finish_reason in ("stop", "length")
    assert final.usage.completion_tokens >= 1


def test_mqtt311_client_gets_replies_on_reply_to(broker: Broker, client: MqttRequester) -> None:
    with MqttRequester(broker.client_settings(protocol="3.1.1")) as old:
        [final] = old.ask(DEV_A.req, chat(6))
        assert isinstance(final, ReplyFinal)
        check_stream(old.ask(DEV_A.req, chat(40, stream=True)))


def test_mosquitto_pub_and_sub_interop(broker: Broker, client: MqttRequester) -> None:
    def subscriber(topic: str, *args: str) -> subprocess.Popen[str]:
        """mosquitto_sub, once the broker acknowledged its subscription: ``-d`` prints the SUBACK,
        ``stdbuf -oL`` makes it print at once instead of when the pipe's buffer fills."""
        cmd = ["stdbuf", "-oL", "mosquitto_sub", *broker.cli_args(), "-d", *args, "-q", "1", "-t", topic]
        proc = subprocess.Popen(
            [*cmd, "-C", "1", "-W", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        while "received SUBACK" not in (line := proc.stdout.readline()):
            assert line, "mosquitto_sub ended before its subscription was acknowledged"
        return proc

    def received(proc: subprocess.Popen[str]) -> tuple[str, str]:
        """The message mosquitto_sub printed (its -d lines left out), and its stderr."""
        assert proc.stdout is not None and proc.stderr is not None
        with proc:  # closes the pipes and waits
            out = proc.stdout.read()  # to its exit: -C 1 (the message) or -W 20 (none came)
            err = proc.stderr.read()
        message = [line for line in out.splitlines() if not line.startswith(("Client ", "Subscribed "))]
        return "\n".join(message), err

    def publish(*args: str) -> None:
        subprocess.run(["mosquitto_pub", *broker.cli_args(), "-q", "1", "-t", DEV_A.req, *args], check=True)

    # MQTT 3.1.1 both ways: the reply topic rides in the payload (within the device's reply space).
    sub311 = subscriber("edgert/v1/dev-a/reply/interop-311", "-V", "mqttv311")
    publish(
        "-V", "mqttv311", "-m", json.dumps(chat(4, id="interop-311", reply_to="edgert/v1/dev-a/reply/interop-311"))
    )  # fmt: skip
    out, err = received(sub311)
    final = ReplyFinal.model_validate_json(out)
    assert final.id == "interop-311", err

    # MQTT 5: Response Topic + Correlation Data properties, echoed back.
    sub5 = subscriber("edgert/v1/dev-a/reply/interop-5", "-V", "5", "-F", "%D|%p")
    publish(
        "-V", "5", "-D", "publish", "response-topic", "edgert/v1/dev-a/reply/interop-5",
        "-D", "publish", "correlation-data", "corr-42",
        "-m", json.dumps(chat(4, id="interop-5")),
    )  # fmt: skip
    out, err = received(sub5)
    correlation, _, payload = out.strip().partition("|")
    assert correlation == "corr-42", err
    assert ReplyFinal.model_validate_json(payload).id == "interop-5"

    # The retained status is readable by any client.
    status = subscriber(DEV_A.status)
    out, _ = received(status)
    assert DeviceStatus.model_validate_json(out).state == "online"


# ---------------------------------------------------------------------------- robustness
def test_bad_payloads_get_error_replies_and_serving_continues(client: MqttRequester, device_a: DaemonProcess) -> None:
    def error_for(payload: bytes, key: str) -> ReplyError:
        pending = client.expect(key)
        client.publish_raw(DEV_A.req, payload, correlation=key.encode())
        [reply] = collect(pending.replies(10))
        assert isinstance(reply, ReplyError), reply
        return reply

    assert error_for(b"{not json", "bad-json").error.code == "bad_request"
    assert error_for(b"[1, 2]", "bad-array").error.code == "bad_request"
    missing = error_for(json.dumps({"id": "bad-schema", "max_tokens": 3}).encode(), "bad-schema")
    assert (missing.id, missing.error.param) == ("bad-schema", "messages")
    unknown = error_for(json.dumps(chat(3, id="bad-model", model="gpt-9")).encode(), "bad-model")
    assert unknown.error.code == "model_not_found"
    two = error_for(json.dumps(chat(3, id="bad-n", n=2)).encode(), "bad-n")
    assert (two.error.code, two.error.param) == ("bad_request", "n")
    big = error_for(json.dumps(chat(3, id="too-big", user="x" * 5000)).encode(), "too-big")
    assert big.error.code == "payload_too_large"
    # A reply over the 4 KiB limit becomes an error reply (paho would otherwise re-send it forever).
    [huge] = client.ask(DEV_A.req, chat(2000, id="huge-reply", temperature=0))
    assert isinstance(huge, ReplyError)
    assert (huge.id, huge.error.code) == ("huge-reply", "payload_too_large")

    # No reply topic at all: only a log line. Malformed commands: a log line.
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(client.settings.port), "-q", "1", "-t", DEV_A.req,
         "-m", json.dumps(chat(3, id="nowhere-to-reply"))],
        check=True,
    )  # fmt: skip
    client.publish_raw(DEV_A.cmd, b"reboot please", reply=False)
    wait_for(lambda: "'nowhere-to-reply' dropped without a reply" in device_a.log(), what="the log line")
    wait_for(lambda: "malformed command" in device_a.log(), what="the command log line")

    [final] = client.ask(DEV_A.req, chat(4))
    assert isinstance(final, ReplyFinal)
    assert device_a.proc.poll() is None


def test_duplicate_id_runs_once(client: MqttRequester, device_a: DaemonProcess) -> None:
    first = collect(client.send(DEV_A.req, chat(30, id="dup-1", stream=True)).replies(10))
    check_stream(first)
    [again] = collect(client.send(DEV_A.req, chat(30, id="dup-1", stream=True)).replies(10))
    # Only the final, byte-identical (device timings included): answered from the cache, not re-run,
    # and the stream's chunks are not sent a second time.
    assert again.model_dump() == first[-1].model_dump()
    assert "request dup-1 seen before; resending its final reply" in device_a.log()

    # A redelivery while the first is still running is not run a second time either.
    pending = client.send(DEV_A.req, chat(1500, id="dup-2", stream=True, temperature=0))
    client.send(DEV_A.req, chat(1500, id="dup-2", stream=True, temperature=0))
    replies = collect(pending.replies(20))
    replies += collect(pending.replies(20)) if "dup-2 is already running" not in device_a.log() else []
    finals = [r for r in replies if isinstance(r, ReplyFinal)]
    assert finals
    assert all(f.model_dump() == finals[0].model_dump() for f in finals)


def test_overload_gets_error_reply_with_retry_after(client: MqttRequester) -> None:
    pendings = [client.send(DEV_A.req, chat(1500, stream=True, temperature=0)) for _ in range(8)]
    outcomes = [collect(p.replies(30))[-1] for p in pendings]
    refused = [r for r in outcomes if isinstance(r, ReplyError)]
    assert refused, "two slots and no queue must refuse some of eight simultaneous requests"
    assert all(r.error.code == "overloaded" and (r.error.retry_after or 0) > 0 for r in refused)
    assert any(isinstance(r, ReplyFinal) for r in outcomes)


def test_cancel_command_and_update_nudge(client: MqttRequester, device_a: DaemonProcess) -> None:
    pending = client.send(DEV_A.req, chat(2000, id="cancel-me", stream=True, temperature=0))
    replies = pending.replies(20)
    next(replies)  # generation is under way
    client.cancel(DEV_A.req, "cancel-me")
    final = [r for _, r in replies][-1]
    assert isinstance(final, ReplyFinal)
    assert final.finish_reason == "cancelled"
    client.publish_raw(DEV_A.cmd, b'{"action": "update_check"}', reply=False)
    wait_for(lambda: "update check nudge received" in device_a.log(), what="the nudge log line")


def test_telemetry_is_published(broker: Broker, client: MqttRequester) -> None:
    # its own request: the test does not lean on what earlier tests of the module asked
    [final] = client.ask(DEV_A.req, chat(6))
    assert isinstance(final, ReplyFinal), final

    def counted() -> Telemetry | None:
        # telemetry is retained: the first message may be a reading from before the request, so read again
        reading = Telemetry.model_validate(broker.retained(DEV_A.telemetry))
        return reading if reading.mqtt.requests >= 1 else None

    wait_for(counted, timeout=15, what="a telemetry reading that counts the request")
    reading = Telemetry.model_validate(broker.retained(DEV_A.telemetry))
    assert reading.device_id == "dev-a"
    assert reading.memory.rss_bytes > 0
    assert reading.mqtt.connected


def test_cli_ask_and_status(broker: Broker, client: MqttRequester, device_a: DaemonProcess) -> None:
    base = [sys.executable, "-m", "edgert", "mqtt"]
    where = ["--broker", f"127.0.0.1:{broker.port}"]
    ask = subprocess.run(
        [*base, "ask", *where, "--device", "dev-a", "-n", "6", "--json", "Hi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ask.returncode == 0, ask.stderr
    assert ReplyFinal.model_validate_json(ask.stdout).device_id == "dev-a"
    status = subprocess.run([*base, "status", *where, "--wait", "0.3"], capture_output=True, text=True, check=True)
    assert re.search(rf"^dev-a\s+online\s+{re.escape(device_a.model.name)}", status.stdout, re.MULTILINE), status.stdout
    missing = subprocess.run(
        [*base, "ask", *where, "--device", "nobody", "--timeout", "0.5", "Hi"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1
    assert "no reply" in missing.stderr


# ---------------------------------------------------------------------------- failures of the link
def test_last_will_then_request_sent_while_down_is_answered_after_start(
    tmp_path: Path, tiny_gguf: Path, broker: Broker, watcher: MqttRequester, technician: MqttRequester
) -> None:
    device = mqtt_daemon(tmp_path, tiny_gguf, broker, "dev-e")
    wait_status(watcher, "dev-e", "online")
    device.stop(signal.SIGKILL)
    assert wait_status(watcher, "dev-e", "offline").reason == "connection lost"  # the broker's last will

    # Acknowledged by the broker: it is queued in dev-e's persistent session before dev-e returns.
    pending = technician.send("edgert/v1/dev-e/req", chat(5, id="while-down"), acked_within_s=10)
    restarted = start_daemon(tmp_path, tiny_gguf, **broker.daemon_settings(mqtt__device_id="dev-e"))
    try:
        [final] = collect(pending.replies(20))
        assert isinstance(final, ReplyFinal)
        assert final.device_id == "dev-e"
        assert wait_status(watcher, "dev-e", "online").model is not None
    finally:
        assert restarted.stop() == 0, restarted.log()
    assert wait_status(watcher, "dev-e", "offline").reason == "shutdown"


def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    device = mqtt_daemon(tmp_path / "dev", tiny_gguf, broker, "dev-f")
    try:
        # A persistent client session, so replies published while the client reconnects wait for it.
        with MqttRequester(broker.client_settings(), client_id="tech-1", persistent=True) as requester:
            pending = requester.send("edgert/v1/dev-f/req", chat(2000, id="long", stream=True, temperature=0))
            replies = pending.replies(30)
            first = next(replies)[1]
            broker.stop()
            stopped_at = time.perf_counter()
            wait_for(lambda: "link to 127.0.0.1" in device.log(), 10, "dev-f to notice the broker is gone")
            broker.start()
            rest = list(replies)
    finally:
        assert device.stop() == 0, device.log()
        broker.stop()
    arrivals = [first, *(reply for _, reply in rest)]
    unique = {reply.seq: reply for reply in arrivals}  # QoS 1 is at-least-once: a re-sent chunk may repeat
    final = unique[max(unique)]
    assert isinstance(final, ReplyFinal)
    assert sorted(unique) == list(range(final.seq + 1)), "a chunk went missing"
    assert any(at > stopped_at for at, _ in rest), "the stream should span the outage"
    assert "link to 127.0.0.1" in device.log()


def test_reply_buffer_drops_oldest_and_counts_them(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    device = mqtt_daemon(
        tmp_path / "dev", tiny_gguf, broker, "dev-g", mqtt__reply_buffer_messages="10", mqtt__telemetry_interval_s="0.2"
    )
    try:
        with MqttRequester(broker.client_settings(), client_id="tech-2", persistent=True) as requester:
            pending = requester.send("edgert/v1/dev-g/req", chat(2000, id="long", stream=True, temperature=0))
            replies = pending.replies(30)
            next(replies)
            broker.stop()
            time.sleep(1.5)  # the rest of the generation happens while the broker is away
            broker.start()
            final = [reply for _, reply in replies][-1]
            telemetry = subprocess.run(
                ["mosquitto_sub", *broker.cli_args(), "-t", "edgert/v1/dev-g/telemetry", "-C", "1", "-W", "10"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
    finally:
        assert device.stop() == 0, device.log()
        broker.stop()
    assert isinstance(final, ReplyFinal)  # the newest replies survive, the final among them
    assert final.finish_reason == "length"
    counters = Telemetry.model_validate_json(telemetry).mqtt
    assert counters.dropped > 0
    assert counters.reconnects >= 1
    assert "reply buffer full; dropped" in device.log()


def test_shared_subscription_spreads_requests(
    tmp_path: Path, tiny_gguf: Path, broker: Broker, technician: MqttRequester
) -> None:
    devices = []
    for name in ("pool-1", "pool-2"):
        workdir = tmp_path / name
        workdir.mkdir()
        settings = broker.daemon_settings(mqtt__device_id=name, mqtt__group="pool")
        devices.append(start_daemon(workdir, tiny_gguf, wait_ready=False, **settings))
    try:
        for device in devices:
            wait_until_ready(device)
        wait_online(broker, "pool-1", "pool-2")  # both shared subscriptions in place
        fleet = Topics("x", "pool").fleet_req
        assert fleet == "edgert/v1/fleet/pool/req"
        pendings = [technician.send(fleet, chat(4)) for _ in range(12)]
        finals = [collect(p.replies(20))[-1] for p in pendings]
    finally:
        for device in devices:
            assert device.stop() == 0, device.log()
    answered = [f.device_id for f in finals if isinstance(f, ReplyFinal)]
    assert len(answered) == 12
    assert set(answered) == {"pool-1", "pool-2"}


def test_tls_client_certificate_and_password(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = Broker(tmp_path / "broker", tls=make_tls(tmp_path / "pki"), username="edge", password="s3cret!").start()
    # The device speaks MQTT 3.1.1 here; the technician's client speaks 5 through the same broker.
    device = mqtt_daemon(tmp_path / "dev", tiny_gguf, broker, "dev-t", mqtt__protocol="3.1.1")
    try:
        with MqttRequester(broker.client_settings()) as requester:
            [final] = requester.ask("edgert/v1/dev-t/req", chat(5))
            assert isinstance(final, ReplyFinal)
            check_stream(requester.ask("edgert/v1/dev-t/req", chat(30, stream=True)))
        with pytest.raises(ConnectionError, match="refused"):
            MqttRequester(broker.client_settings(password="wrong"), timeout_s=5).connect()
    finally:
        assert device.stop() == 0, device.log()
        broker.stop()
    assert "s3cret!" not in device.log()
    # a clean shutdown logs no ERROR (paho's "Client is not connected" after our own DISCONNECT)
    assert " ERROR " not in device.log(), device.log()


# ---------------------------------------------------------------------------- pure parts
def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    delays = list(itertools.islice(backoff_delays(0.5, 4.0), 8))
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    assert len(set(delays)) > 1


def test_reply_cache_is_bounded_and_counts_topic_and_correlation() -> None:
    cache = ReplyCache(max_entries=2, max_bytes=65536)
    out = Outgoing("t", b"x" * 100, correlation=b"c" * 50)
    for rid in ("a", "b", "c"):
        entry = cache.start(("t", rid))
        cache.finish(("t", rid), entry, out)
    assert cache.get(("t", "a")) is None  # the oldest finished entry went first
    assert len(cache) == 2
    # each entry: its key, and the whole message (payload, topic, Correlation Data, packet overhead)
    assert cache.nbytes == 2 * (len("t") + len("b") + out.size())
    cache = ReplyCache(max_entries=100, max_bytes=65536)
    big = Outgoing("t", b"x" * 20_000, correlation=b"c" * 20_000)
    for rid in "abcd":
        cache.finish(("t", rid), cache.start(("t", rid)), big)
    assert cache.nbytes <= 65536
    assert len(cache) == 1  # bounded in bytes: 40 kB a message leaves room for one


# ---------------------------------------------------------------------------- documentation
def test_docs_document_every_payload_schema() -> None:
    text = PAYLOAD_DOCS.read_text()
    for name in json_schemas():
        assert f"#### `{name}`" in text, name
    assert schema_markdown() == text, "stale: python -m edgert.api.mqtt_schemas > docs/mqtt-payloads.md"
