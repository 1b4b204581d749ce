"""A bounded, seeded fuzz pass over MQTT requests: hostile payloads and properties at a real daemon
through a real mosquitto (issue 13: "zero daemon deaths, clear errors").

Every message either gets one clear ``ReplyError`` or, when it names no safe reply topic, is dropped
as documented (counted in ``edgert_mqtt_dropped_total``); afterwards the daemon still answers a
legitimate request and its log holds no traceback and no ERROR line. ``EDGERT_FUZZ_SEED`` replays a
run; ``EDGERT_FUZZ_SECONDS`` (default 15) bounds it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgert.api.mqtt_schemas import ReplyError, ReplyFinal, Topics
from edgert.transport.mqtt_client import MqttRequester, PendingReply
from tests.integration.daemon import DaemonProcess
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import mqtt_daemon, wait_for
from tests.integration.test_mqtt_hardening import dropped

SEED = int(os.environ.get("EDGERT_FUZZ_SEED", "1313"))
BUDGET_S = float(os.environ.get("EDGERT_FUZZ_SECONDS", "15"))
MAX_MESSAGE = 65536
DEV_Z = Topics("dev-z")
ERROR_CODES = {"bad_request", "payload_too_large", "model_not_found", "context_length_exceeded"}

#: values no field of a chat request accepts, per field
WRONG: dict[str, list[object]] = {
    "messages": [5, "hi", {}, [], [1], [{"role": "wizard", "content": "x"}], [{"content": "x"}], None,
                 [{"role": "user", "content": [{"type": "image", "url": "x"}]}], [{"role": "user", "content": 7}]],
    "max_tokens": ["many", -5, 0, 1.5, [], {}],
    "temperature": ["hot", -1, 3, [], {}],
    "top_p": [0, 2, "x", []],
    "n": [0, 2, "x"],
    "stream": [{}, [], 5, "perhaps"],
    "stop": [5, [1, 2], {"a": 1}],
    "priority": ["urgent", 1],
    "model": ["gpt-9", 5, [], "\ud800"],
    "response_format": [{"type": "xml"}, "json", {"type": "json_schema"}, 5],
    "timeout": [-1, "soon", 0],
    "logprobs": [True],
    "seed": ["s", 1.5],
}  # fmt: skip


@dataclass
class Case:
    kind: str
    payload: bytes
    #: MQTT 5 properties; None leaves the reply topic to the payload's reply_to
    response_topic: str | None
    correlation: bytes | None
    #: the key replies are matched by (Correlation Data, else the payload id); None: a drop is expected
    key: str | None

    def describe(self) -> str:
        correlation = repr(self.correlation)[:40]
        return f"{self.kind}: {self.payload[:200]!r} (topic {self.response_topic!r}, correlation {correlation})"


def _valid(rid: str) -> dict[str, object]:
    return {"id": rid, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _nest(rng: random.Random, depth: int) -> str:
    opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
    return opener * depth + "1" + closer * depth


def generate(rng: random.Random, n: int, reply_topic: str) -> Case:
    rid = f"fz-{n}"
    kind = rng.choice(["bytes", "truncated", "wrong_type", "huge", "nested", "correlation", "reply_topic", "odd"])
    body = _valid(rid)
    corr = rid.encode()
    if kind == "bytes":
        payload = rng.randbytes(rng.randrange(0, 2000))
        if payload[:1] == b"{":  # could by chance be an object without a reply_to: keep it invalid JSON
            payload = b"\xff" + payload
        return Case(kind, payload, reply_topic, corr, rid)
    if kind == "truncated":
        text = json.dumps(body | {"reply_to": reply_topic})
        return Case(kind, text[: rng.randrange(0, len(text) - 1)].encode(), reply_topic, corr, rid)
    if kind == "wrong_type":
        for name in rng.sample(sorted(WRONG), rng.randrange(1, 4)):
            body[name] = rng.choice(WRONG[name])
        return Case(kind, json.dumps(body).encode(), reply_topic, corr, rid)
    if kind == "huge":
        choice = rng.randrange(3)
        if choice == 0:
            body["messages"] = [{"role": "user", "content": "x" * (MAX_MESSAGE + rng.randrange(10_000))}]
        elif choice == 1:
            body["id"] = "i" * rng.randrange(201, 5000)
        else:
            body["stop"] = ["s"] * rng.randrange(5000, 9000)
        return Case(kind, json.dumps(body).encode(), reply_topic, corr, rid)
    if kind == "nested":
        depth = rng.randrange(500, 9000)  # deeper ones exceed the packet size the device announces
        if rng.random() < 0.5:
            return Case(kind, _nest(rng, depth).encode(), reply_topic, corr, rid)
        text = json.dumps(body)[:-1] + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
        return Case(kind, (text + _nest(rng, depth) + "}}}").encode(), reply_topic, corr, rid)
    if kind == "correlation":  # over the 256-byte cap: answered without it, matched by the payload id
        body["max_tokens"] = rng.choice(WRONG["max_tokens"])
        return Case(kind, json.dumps(body).encode(), reply_topic, rng.randbytes(rng.randrange(257, 20_000)), rid)
    if kind == "reply_topic":  # nowhere safe to answer (3.1.1 reply_to): dropped and counted
        body["reply_to"] = rng.choice(
            ["$SYS/x", "edgert/v1/dev-y/cmd", "edgert/v1/dev-z/status", "a/+/b", "#", "", "t" * 400, 5, None,
             "edgert/v1/fleet/g/req", "edgert/v1/dev-z/reply/" + "c" * 300, "\u0000", "edgert/v1/dev-z/reply/\ud800"]
        )  # fmt: skip
        return Case(kind, json.dumps(body).encode(), None, None, None)
    # odd: NaN and infinities, surrogates, duplicate keys, a non-object top level
    odd = rng.choice([
        json.dumps(body).replace('"max_tokens": 3', '"max_tokens": NaN'),
        json.dumps(body).replace('"max_tokens": 3', '"max_tokens": 3, "temperature": Infinity, "n": 5'),
        json.dumps(body).replace('"hello"', '"\\ud800"').replace('"max_tokens": 3', '"max_tokens": -1'),
        json.dumps(body).replace(f'"{rid}"', '"\\udc00"'),
        json.dumps(body).replace('"max_tokens": 3', '"max_tokens": 3, "max_tokens": "x"'),
        json.dumps([body]), json.dumps(rid), "null", "1e999",
    ])  # fmt: skip
    return Case(kind, odd.encode(), reply_topic, corr, rid)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, broker: Broker) -> Iterator[DaemonProcess]:
    proc = mqtt_daemon(
        tmp_path_factory.mktemp("dev-z"), tiny_gguf, broker, "dev-z", mqtt__max_message_bytes=str(MAX_MESSAGE)
    )
    yield proc
    proc.stop(signal.SIGTERM)


def test_hostile_mqtt_payloads_get_clear_errors_and_the_daemon_survives(broker: Broker, device: DaemonProcess) -> None:
    rng = random.Random(SEED)
    drops_before = dropped(device, "reply_topic") + dropped(device, "no_reply_topic")
    expected_drops = 0
    sent = 0
    deadline = time.monotonic() + BUDGET_S
    with MqttRequester(broker.client_settings(), client_id="fuzzer") as client:
        reply_topic = client.reply_topic(DEV_Z.req)
        while time.monotonic() < deadline:
            batch: list[tuple[Case, PendingReply | None]] = []
            for _ in range(40):
                case = generate(rng, sent, reply_topic)
                sent += 1
                pending = client.expect(case.key) if case.key is not None else None
                expected_drops += case.key is None
                client.publish_raw(
                    DEV_Z.req, case.payload, correlation=case.correlation, reply=case.response_topic is not None
                )
                batch.append((case, pending))
            for case, pending in batch:
                if pending is None:
                    continue
                try:
                    replies = [reply for _, reply in pending.replies(20)]
                except TimeoutError:
                    pytest.fail(f"seed {SEED}: no reply to {case.describe()}\n{device.log()[-3000:]}")
                assert len(replies) == 1, f"seed {SEED}: {case.describe()} -> {replies}"
                reply = replies[0]
                assert isinstance(reply, ReplyError), f"seed {SEED}: {case.describe()} -> {str(reply)[:300]}"
                assert reply.error.code in ERROR_CODES, f"seed {SEED}: {case.describe()} -> {str(reply)[:300]}"
                assert reply.error.message
            assert device.proc.poll() is None, f"seed {SEED}: the daemon died\n{device.log()[-3000:]}"
        [final] = client.ask(DEV_Z.req, _valid("after-fuzz"))
    assert isinstance(final, ReplyFinal)
    total: Callable[[], float] = lambda: dropped(device, "reply_topic") + dropped(device, "no_reply_topic")  # noqa: E731
    wait_for(lambda: total() - drops_before == expected_drops, what=f"{expected_drops} counted drops (seed {SEED})")
    log = device.log()
    assert "Traceback" not in log, f"seed {SEED}:\n{log[-5000:]}"
    assert " ERROR " not in log, f"seed {SEED}:\n{log[-5000:]}"
    # refusals and drops are logged at most once per reason per 10 s: thousands of messages, a few lines
    assert len(log.splitlines()) < 200, f"seed {SEED}: {len(log.splitlines())} log lines for {sent} messages"
    assert sent >= 40
