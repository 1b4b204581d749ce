"""The MQTT outbox while the broker is away (issue 13, finding 1): bounded in bytes, and resent
duplicates never push out a first reply.

The transport runs in-process with the real tiny GGUF; its link is simply not started until the
"broker returns" (a real mosquitto), so every reply produced before that waits in the outbox --
the state a broker outage leaves it in, without racing a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgert.api.mqtt_schemas import ReplyError, ReplyFinal, Topics
from edgert.serving.host import ModelHost
from edgert.serving.metrics import Metrics
from edgert.serving.runtime import open_runtime
from edgert.serving.scheduler import SchedulerStats
from edgert.serving.service import InferenceService, Limits
from edgert.settings import Settings
from edgert.transport.mqtt import MqttTransport
from edgert.transport.mqtt_client import MqttRequester
from edgert.transport.mqtt_link import Incoming
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import chat, collect

DEV_O = Topics("dev-o")
REPLY_TOPIC = "edgert/v1/dev-o/reply/tech-o"


@dataclass
class _State:
    """What the daemon shares with its transports (transport.mqtt.ServingState)."""

    service: InferenceService | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics(lambda: (SchedulerStats(), 1)))
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)


def _settings(tmp_path: Path, port: int, **mqtt: object) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        engine={"n_threads": 1, "n_ctx": 2048, "n_parallel": 2},
        mqtt={"broker": "127.0.0.1", "port": port, "device_id": "dev-o", "telemetry_interval_s": 0, **mqtt},
    )


def _request(transport: MqttTransport, rid: str, **body: object) -> None:
    payload = json.dumps(chat(id=rid, **body)).encode()
    transport.message(Incoming(DEV_O.req, payload, response_topic=REPLY_TOPIC, correlation=rid.encode()))


async def _until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_outbox_is_bounded_in_bytes(tmp_path: Path) -> None:
    settings = _settings(tmp_path, 1, reply_buffer_messages=10_000, reply_buffer_bytes=65536)

    async def scenario() -> tuple[int, int]:
        transport = MqttTransport(settings, _State())  # no model: every request gets an 'overloaded' error
        for n in range(1000):  # over 300 bytes each: over 300 kB, far under 10,000 messages
            _request(transport, f"req-{n:04d}-" + "x" * 150)
        counters = transport.link_counters()
        return counters.buffered, counters.dropped

    buffered, dropped = asyncio.run(scenario())
    assert dropped > 0, "300 kB of replies in a 64 KiB outbox"
    assert buffered + dropped == 1000
    assert 0 < buffered <= 65536 // 300, buffered  # what 64 KiB holds, not what 10,000 messages would


def test_resent_duplicates_never_evict_first_replies(tmp_path: Path, tiny_gguf: Path) -> None:
    broker = Broker(tmp_path / "broker").start()
    settings = _settings(tmp_path, broker.port, reply_buffer_messages=60)
    runtime = open_runtime(settings, str(tiny_gguf))
    service = InferenceService(ModelHost.serving_runtime(runtime), Limits(default_timeout_s=60, max_tokens_cap=4096))
    service.ready = True

    async def scenario(requester: MqttRequester) -> list[ReplyFinal | ReplyError]:
        transport = MqttTransport(settings, _State(service=service))
        running = transport._running  # the transport's own record of running requests
        # While the broker is away: a finished 30-chunk stream, then a legitimate client's request ...
        _request(transport, "old", max_tokens=30, stream=True, temperature=0)
        await _until(lambda: not running)
        _request(transport, "victim", max_tokens=4)
        await _until(lambda: not running)
        # ... then 200 redeliveries of the old one (a broker delivers a session's backlog in a burst).
        for _ in range(200):
            _request(transport, "old", max_tokens=30, stream=True, temperature=0)
        victim = requester.expect("victim")
        await transport.start()  # the broker is back
        try:
            replies = await asyncio.to_thread(lambda: collect(victim.replies(20)))
        finally:
            await transport.stop(5)
        return [r for r in replies if isinstance(r, ReplyFinal | ReplyError)]

    try:
        with MqttRequester(broker.client_settings(), client_id="tech-o") as requester:
            [final] = asyncio.run(scenario(requester))
    finally:
        service.runtime.close()
        broker.stop()
    assert isinstance(final, ReplyFinal)
    assert final.id == "victim"
