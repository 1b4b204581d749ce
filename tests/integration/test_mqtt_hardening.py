"""Issue 13, finding 1: a requester must not steer, amplify or cancel through a device (real mosquitto, real daemon).

Each test here failed on the code before the fix: replies went to any topic the requester named
(another device's ``cmd``, the device's own ``status``, ``$SYS``...), Correlation Data of any size
was echoed on every chunk, a redelivered id replayed its whole stream every time, and a cancel
matched the id alone. The outbox, which a unit can drive without a broker, is tested in
tests/unit/test_mqtt_outbox.py.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgert.api.mqtt_schemas import ReplyChunk, ReplyError, ReplyFinal, Topics
from edgert.transport.mqtt_client import MqttRequester
from tests.integration.daemon import DaemonProcess
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import chat, check_stream, collect, mqtt_daemon, wait_for

DEV_H = Topics("dev-h")


def dropped(daemon: DaemonProcess, reason: str) -> float:
    """``edgert_mqtt_dropped_total{reason=...}`` from the daemon's /metrics (0 when never counted)."""
    with daemon.client(timeout=10) as http:
        text = http.get("/metrics").text
    match = re.search(rf'^edgert_mqtt_dropped_total{{reason="{reason}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Spy:
    """Every message the broker delivers on ``#`` (and the named ``$`` topics), with its topic."""

    def __init__(self, broker: Broker, *dollar_topics: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
        self._client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.on_connect = lambda client, *_args: client.subscribe([("#", 1), *((t, 1) for t in dollar_topics)])
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        assert subscribed.wait(10), "the spy could not subscribe"

    def until(self, topic: str, timeout: float = 20) -> list[tuple[str, bytes]]:
        """Everything delivered up to and including the first message on ``topic``."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1][0] != topic:
            seen.append(self.messages.get(timeout=max(deadline - time.monotonic(), 0.01)))
        return seen

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, broker: Broker) -> Iterator[DaemonProcess]:
    """Default MQTT limits (256 KiB messages, 256-byte topic and Correlation Data caps); a context long
    enough that a 6000-token job outlasts everything the cancel test does meanwhile."""
    proc = mqtt_daemon(
        tmp_path_factory.mktemp("dev-h"),
        tiny_gguf,
        broker,
        "dev-h",
        engine__n_parallel="2",
        engine__n_ctx="8192",
        mqtt__group="pool",
    )
    yield proc
    assert proc.stop(signal.SIGTERM) == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(broker: Broker, device: DaemonProcess) -> Iterator[MqttRequester]:
    with MqttRequester(broker.client_settings(), client_id="tech-h") as requester:
        yield requester


HOSTILE_REPLY_TOPICS = [
    "edgert/v1/dev-x/cmd",  # another device's commands, with this device's credentials
    "edgert/v1/dev-x/req",  # another device's requests
    "edgert/v1/dev-h/status",  # its own retained status
    "edgert/v1/dev-h/cmd",
    "edgert/v1/dev-h/deploy",
    "edgert/v1/fleet/pool/req",  # the fleet request topic: a reply loop through the group
    "edgert/v1/dev-x/reply/tech-h",  # another device's reply space
    "edgert/v1/dev-h/reply",  # the reply space itself, with no client level
    "$SYS/broker/edgert",
    "factory/line-3/conveyor/stop",  # outside edgert: not in mqtt.reply_topics
    "edgert/v1/dev-h/reply/" + "x" * 300,  # over mqtt.max_topic_bytes (256)
]


def test_reply_topics_outside_the_reply_space_are_refused(
    broker: Broker, device: DaemonProcess, client: MqttRequester
) -> None:
    spy = Spy(broker, "$SYS/broker/edgert")
    try:
        before = dropped(device, "reply_topic")
        for n, topic in enumerate(HOSTILE_REPLY_TOPICS):
            # MQTT 5 Response Topic ...
            body = json.dumps(chat(3, id=f"hostile-{n}")).encode()
            client.publish_raw(DEV_H.req, body, correlation=b"c", response_topic=topic)
            # ... and MQTT 3.1.1 reply_to
            body = json.dumps(chat(3, id=f"hostile-311-{n}", reply_to=topic)).encode()
            client.publish_raw(DEV_H.req, body, reply=False)
        [final] = client.ask(DEV_H.req, chat(3, id="after-hostile"))
        assert isinstance(final, ReplyFinal)
        # The device answers in order on one connection: all it published before this reply is in.
        seen = spy.until(client.reply_topic(DEV_H.req))
    finally:
        spy.close()
    replies = [(topic, payload) for topic, payload in seen if b'"type":' in payload]
    assert [topic for topic, _ in replies] == [client.reply_topic(DEV_H.req)], replies
    wait_for(lambda: dropped(device, "reply_topic") - before == 2 * len(HOSTILE_REPLY_TOPICS), what="the drop count")
    assert "outside the reply topics" in device.log()


def test_fleet_replies_go_to_the_groups_reply_space(client: MqttRequester) -> None:
    fleet = Topics("x", "pool").fleet_req
    assert fleet is not None
    assert client.reply_topic(fleet) == "edgert/v1/fleet/pool/reply/tech-h"
    [final] = client.ask(fleet, chat(3))
    assert isinstance(final, ReplyFinal)
    assert final.device_id == "dev-h"


def test_correlation_data_is_capped_and_never_echoed(device: DaemonProcess, client: MqttRequester) -> None:
    # 64 KiB of Correlation Data (the most MQTT 5 carries) on a 50-token stream was ~3 MB back; now: one small error.
    pending = client.expect("big-correlation")
    body = json.dumps(chat(50, id="big-correlation", stream=True, temperature=0)).encode()
    client.publish_raw(DEV_H.req, body, correlation=b"x" * 65_535)  # the most MQTT 5 can carry
    [error] = collect(pending.replies(20))
    assert isinstance(error, ReplyError), error
    assert (error.id, error.error.code) == ("big-correlation", "payload_too_large")
    assert error.error.param == "correlation_data"
    assert "256" in error.error.message
    # At the cap it is echoed as before (the reply is matched by it).
    check_stream(client.ask(DEV_H.req, chat(5, id="c" * 200, stream=True)))
    assert device.proc.poll() is None


def test_a_redelivered_id_gets_only_its_final_once_per_interval(device: DaemonProcess, client: MqttRequester) -> None:
    first = collect(client.send(DEV_H.req, chat(12, id="dup-h", stream=True, temperature=0)).replies(20))
    final = check_stream(first)
    before = dropped(device, "duplicate")
    copy = json.dumps(chat(12, id="dup-h", stream=True, temperature=0)).encode()
    for _ in range(30):  # 30 replays of one request used to be 30 whole streams
        client.publish_raw(DEV_H.req, copy, correlation=b"dup-h")
    [again] = collect(client.expect("dup-h").replies(20))
    assert again.model_dump() == final.model_dump()  # the cached final, not a second run
    # the other 29 within duplicate_interval_s (10 s) are dropped and counted, not answered
    wait_for(lambda: dropped(device, "duplicate") - before == 29, what="29 dropped duplicates")
    [sentinel] = client.ask(DEV_H.req, chat(2, id="after-dups"))
    assert isinstance(sentinel, ReplyFinal)
    assert not [r for r in client.unmatched if r.id == "dup-h"]
    assert "request 'dup-h' dropped without a reply (duplicate)" in device.log()


def test_cancel_reaches_only_the_requesters_own_request(
    broker: Broker, device: DaemonProcess, client: MqttRequester
) -> None:
    long_job = chat(6000, id="job-1", stream=True, temperature=0)
    replies = client.send(DEV_H.req, long_job).replies(60)
    next(replies)  # running
    before = dropped(device, "cancel")
    with MqttRequester(broker.client_settings(), client_id="intruder") as intruder:
        intruder.cancel(DEV_H.req, "job-1")  # same id, the intruder's own reply topic: not this request
        intruder.publish_raw(DEV_H.cmd, b'{"action": "cancel", "id": "job-1"}', reply=False)  # id alone: refused
        [sentinel] = intruder.ask(DEV_H.req, chat(2, id="intruder-done"))
        assert isinstance(sentinel, ReplyFinal)
    intruder_done = time.perf_counter()
    wait_for(lambda: dropped(device, "cancel") - before == 1, what="the unscoped cancel dropped")
    client.cancel(DEV_H.req, "job-1")
    rest = list(replies)
    final = rest[-1][1]
    assert isinstance(final, ReplyFinal)
    assert final.finish_reason == "cancelled"
    # job-1 kept streaming after both of the intruder's cancels had been handled
    assert any(at > intruder_done and isinstance(r, ReplyChunk) for at, r in rest), "the intruder cancelled job-1"


def test_deeply_nested_overlong_and_unencodable_json_get_error_replies(
    device: DaemonProcess, client: MqttRequester
) -> None:
    cases = {
        "deep-array": b"[" * 100_000,
        "deep-object": b'{"id": "deep", "messages": ' + b'{"a": ' * 30_000 + b"1" + b"}" * 30_001,
        "huge-int": b'{"id": "n", "max_tokens": ' + b"9" * 5000 + b"}",
        "lone-surrogate-id": b'{"id": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    }
    for key, payload in cases.items():
        pending = client.expect(key)
        client.publish_raw(DEV_H.req, payload, correlation=key.encode())
        [reply] = collect(pending.replies(20))
        assert isinstance(reply, ReplyError), (key, reply)
        assert reply.error.code == "bad_request", (key, reply)
    [final] = client.ask(DEV_H.req, chat(3))
    assert isinstance(final, ReplyFinal)
    assert "Traceback" not in device.log()
