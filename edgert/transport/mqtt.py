"""Serving over MQTT: requests in, replies, status and telemetry out (paho lives in :mod:`.mqtt_link`).

Topics and payloads are in :mod:`edgert.api.mqtt_schemas`. Requests reach the
same :class:`~edgert.serving.service.InferenceService` as the socket API, so the
admission rules are the same: an overloaded device answers an error reply with
``retry_after`` instead of dropping the request.

Threads: paho runs its network loop on its own thread. Its callbacks only copy
what they need out of the packet and hop onto the asyncio loop with
``loop.call_soon_threadsafe``; everything else (parsing, admission, token streams,
publishing) happens on the event loop, which never blocks on the network either:
``publish`` only queues bytes for paho's thread.

Reliability::

    reply produced -> outbox (bounded; oldest dropped + counted while the broker is away)
                   -> paho (at most mqtt.max_queued_messages unacknowledged QoS 1 messages)
                   -> broker PUBACK

paho's own reconnect has no jitter, so it is off: :class:`MqttLink` reconnects with
exponential backoff and jitter. The session is persistent (MQTT 5 clean_start=False
+ session expiry; MQTT 3.1.1 clean_session=False), so requests published while the
device is offline are delivered when it returns, and unacknowledged replies are
re-sent by paho after a reconnect. Requests are acknowledged on receipt; a
redelivered request id (same reply topic) never runs twice: the cached replies are
sent again instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
from pydantic import BaseModel, ValidationError

from edgert import __version__
from edgert.api.mqtt_schemas import (
    Command,
    DeployState,
    DeviceStatus,
    ErrorBody,
    LinkCounters,
    MemoryReading,
    ModelRef,
    MqttChatRequest,
    ReplyChunk,
    ReplyError,
    ReplyFinal,
    Telemetry,
    Timings,
    Topics,
)
from edgert.api.schemas import PromptTokensDetails, Usage
from edgert.errors import BadRequestError, EdgertError, OverloadedError, PayloadTooLargeError
from edgert.log import request_id
from edgert.serving.metrics import Metrics
from edgert.serving.scheduler import Finished, TokenStream
from edgert.serving.service import InferenceService
from edgert.settings import Settings
from edgert.transport.mqtt_link import (
    CLOSE_FLUSH_S,
    Incoming,
    MqttLink,
    Outgoing,
    Route,
    resolve_device_id,
    valid_topic,
)

log = logging.getLogger("edgert.mqtt")


class ServingState(Protocol):
    """What the daemon shares with every transport (``transport.http.ApiState`` fits)."""

    metrics: Metrics
    service: InferenceService | None
    stopping: bool
    started: float


UpdateNudge = Callable[[], Awaitable[None] | None]


@dataclass
class _CacheEntry:
    replies: list[Outgoing] = field(default_factory=list)
    done: bool = False
    nbytes: int = 0
    overflow: bool = False


class ReplyCache:
    """Recent request keys -> the replies they produced; bounded in entries and in bytes.

    A key is (reply topic, request id): two clients that both number their requests
    from 1 never collide. Only requests that ran are cached; a refusal (overloaded)
    is not, so a retry with the same id after ``retry_after`` does run.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, str], _CacheEntry] = OrderedDict()

    def get(self, key: tuple[str, str]) -> _CacheEntry | None:
        return self._entries.get(key)

    def start(self, key: tuple[str, str]) -> _CacheEntry:
        entry = _CacheEntry()
        self._entries[key] = entry
        self._evict()
        return entry

    def add(self, entry: _CacheEntry, out: Outgoing) -> None:
        if entry.overflow:
            return
        if entry.nbytes + len(out.payload) > self.max_bytes // 4:
            # One huge reply must not flush the whole cache; keep only its final message.
            entry.overflow = True
            self.nbytes -= entry.nbytes
            entry.replies.clear()
            entry.nbytes = 0
            return
        entry.replies.append(out)
        entry.nbytes += len(out.payload)
        self.nbytes += len(out.payload)

    def finish(self, entry: _CacheEntry, final: Outgoing) -> None:
        entry.done = True
        if entry.overflow:
            entry.replies = [final]
            entry.nbytes = len(final.payload)
            self.nbytes += entry.nbytes
        self._evict()

    def forget(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def _evict(self) -> None:
        # Oldest finished entries go first; running ones are bounded by the scheduler's queue.
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries and self.nbytes <= self.max_bytes:
                return
            if self._entries[key].done:
                self.forget(key)


@dataclass
class _Counters:
    requests: int = 0
    duplicates: int = 0
    bad_payloads: int = 0
    dropped: int = 0


class _RejectedError(Exception):
    """A request that gets an error reply (when it has a route) instead of running."""

    def __init__(self, error: EdgertError, request_id: str | None, route: Route | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id
        self.route = route


class MqttTransport:
    """Requests in from MQTT, through the InferenceService, replies (streamed) back out."""

    def __init__(
        self,
        settings: Settings,
        state: ServingState,
        *,
        on_update_check: UpdateNudge | None = None,
    ) -> None:
        self.settings = settings.mqtt
        self.state = state
        self.device_id = resolve_device_id(settings)
        self.topics = Topics(self.device_id, self.settings.group)
        #: the daemon may set this; an update nudge without it is only logged
        self.on_update_check = on_update_check
        self.counters = _Counters()
        self.cache = ReplyCache(self.settings.dedupe_entries, self.settings.dedupe_bytes)
        self._outbox: deque[Outgoing] = deque()
        self._running: dict[tuple[str, str], tuple[TokenStream, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.link = MqttLink(self.settings, f"edgert-{self.device_id}", self, will=self._status("offline"))
        self._link_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._link_task = asyncio.create_task(self.link.run(), name="edgert-mqtt-link")
        if self.settings.telemetry_interval_s > 0:
            self._spawn(self._telemetry_loop())
        if self.settings.protocol != "5" and self.settings.group:
            log.warning("mqtt: fleet group %r needs MQTT 5 shared subscriptions; not subscribing", self.settings.group)

    async def stop(self, drain_timeout_s: float) -> None:
        """Let running requests finish (up to the timeout), flush replies, say offline, disconnect."""
        running = [task for _, task in self._running.values()]
        if running:
            log.info("mqtt: draining %d running request(s)", len(running))
            _, pending = await asyncio.wait(running, timeout=drain_timeout_s)
            for stream, _task in list(self._running.values()):
                stream.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        deadline = time.monotonic() + CLOSE_FLUSH_S
        while (self._outbox or self.link.unacked) and self.link.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await self.link.close(self._status("offline", reason="shutdown"))
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
        if self._outbox:
            log.warning("mqtt: %d replies were never delivered (broker unreachable at shutdown)", len(self._outbox))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------- LinkListener
    def link_up(self, session_present: bool) -> None:
        topics = [self.topics.req, self.topics.cmd]
        if self.settings.protocol == "5" and self.topics.fleet_share is not None:
            topics.append(self.topics.fleet_share)
        # Re-subscribing is harmless when the session survived, and required when it did not.
        self.link.subscribe(topics)
        if not session_present:
            log.info("mqtt: new broker session (requests published while offline, if any, were not kept)")
        self.link.publish(self._status("online"), track=False)
        self._pump()

    def link_down(self) -> None:
        """Nothing to do: replies wait in the outbox and paho keeps its unacknowledged ones."""

    def acked(self) -> None:
        self._pump()

    def message(self, incoming: Incoming) -> None:
        try:
            if incoming.topic == self.topics.cmd:
                self._on_command(incoming)
            else:
                self._on_request(incoming)
        except Exception:
            # The daemon never crashes on a message; this is a bug worth a traceback.
            log.exception("mqtt: unexpected failure handling a message on %s", incoming.topic)

    def publish_deploy(self, state: DeployState) -> None:
        """Retained deployment state (sent once the broker is back if it is away now)."""
        self._send(Outgoing(self.topics.deploy, _encode(state), retain=True))

    # ----------------------------------------------------------- outbox
    def _send(self, out: Outgoing) -> None:
        if len(self._outbox) >= self.settings.reply_buffer_messages:
            self._outbox.popleft()
            self.counters.dropped += 1
            if self.counters.dropped == 1 or self.counters.dropped % 1000 == 0:
                log.warning("mqtt: reply buffer full; dropped %d oldest replies so far", self.counters.dropped)
        self._outbox.append(out)
        self._pump()

    def _pump(self) -> None:
        while self._outbox and self.link.has_room():
            out = self._outbox.popleft()
            if out.size() > self.link.max_packet():
                out = self._oversize(out)
            if not self.link.publish(out):
                self._outbox.appendleft(out)  # paho is full after all: try again on the next ack
                return

    def _oversize(self, out: Outgoing) -> Outgoing:
        """Publishing it would get us disconnected (and paho would re-send it forever)."""
        limit = self.link.max_packet()
        log.warning("mqtt: reply of %d bytes exceeds the %d-byte limit; sending an error instead", out.size(), limit)
        error = PayloadTooLargeError(
            f'the reply exceeds the {limit}-byte message limit; ask for a streamed reply ("stream": true)'
        )
        body = ReplyError(id=out.request_id, seq=_seq_of(out), error=ErrorBody.model_validate(error.to_dict()))
        return Outgoing(out.topic, _encode(body), correlation=out.correlation, request_id=out.request_id)

    def _reply(self, route: Route, body: BaseModel, request: str | None, entry: _CacheEntry | None = None) -> Outgoing:
        out = Outgoing(route.topic, _encode(body), correlation=route.correlation, request_id=request)
        if entry is not None:
            self.cache.add(entry, out)
        self._send(out)
        return out

    def _error_reply(self, rejected: _RejectedError) -> None:
        if not isinstance(rejected.error, OverloadedError):
            self.counters.bad_payloads += 1
        if rejected.route is None:
            log.warning("mqtt: request %s dropped without a reply (no reply topic): %s", rejected.request_id, rejected)
            return
        log.info("mqtt: request %s refused: %s", rejected.request_id, rejected.error.message)
        body = ReplyError(id=rejected.request_id, error=ErrorBody.model_validate(rejected.error.to_dict()))
        self._reply(rejected.route, body, rejected.request_id)

    # ----------------------------------------------------------- requests
    def _on_request(self, incoming: Incoming) -> None:
        try:
            body, route = self._parse(incoming)
            key = (route.topic, body.id)
            if self._duplicate(key, body.id):
                return
            self._admit(key, body, route)
        except _RejectedError as rejected:
            self._error_reply(rejected)

    def _parse(self, incoming: Incoming) -> tuple[MqttChatRequest, Route]:
        route = Route(incoming.response_topic, incoming.correlation) if incoming.response_topic else None
        if route is not None and not valid_topic(route.topic):
            raise _RejectedError(BadRequestError("the Response Topic is not a valid topic"), None, None)
        if len(incoming.payload) > self.settings.max_message_bytes:
            error = PayloadTooLargeError(f"request exceeds {self.settings.max_message_bytes} bytes")
            raise _RejectedError(error, None, route)
        try:
            data = json.loads(incoming.payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _RejectedError(BadRequestError(f"request payload is not valid JSON: {exc}"), None, route) from None
        if not isinstance(data, dict):
            raise _RejectedError(BadRequestError("request payload must be a JSON object"), None, route)
        rid = data.get("id") if isinstance(data.get("id"), str) else None
        reply_to = data.get("reply_to")
        if route is None and isinstance(reply_to, str) and valid_topic(reply_to):
            route = Route(reply_to)
        if route is None:
            raise _RejectedError(BadRequestError("no reply topic: set the Response Topic or 'reply_to'"), rid, None)
        try:
            return MqttChatRequest.model_validate(data), route
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise _RejectedError(BadRequestError(f"{where}: {first['msg']}", param=where), rid, route) from None
        except EdgertError as exc:  # the schema's own checks (n, logprobs, stop) raise edgert errors
            raise _RejectedError(exc, rid, route) from None

    def _duplicate(self, key: tuple[str, str], rid: str) -> bool:
        entry = self.cache.get(key)
        if entry is None:
            return False
        self.counters.duplicates += 1
        if entry.done:
            log.info("mqtt: request %s seen before; resending its %d cached replies", rid, len(entry.replies))
            for out in entry.replies:
                self._send(out)
        else:
            log.info("mqtt: request %s is already running; ignoring the redelivery", rid)
        return True

    def _service(self) -> InferenceService:
        if self.state.stopping:
            raise OverloadedError("the daemon is shutting down", retry_after_s=5)
        service = self.state.service
        if service is None or not service.ready:
            raise OverloadedError("the model is still loading", retry_after_s=2)
        return service

    def _admit(self, key: tuple[str, str], body: MqttChatRequest, route: Route) -> None:
        try:
            service = self._service()
            stream = service.submit(service.prepare_chat(body, body.id))
        except EdgertError as exc:
            raise _RejectedError(exc, body.id, route) from None
        self.counters.requests += 1
        entry = self.cache.start(key)
        task = asyncio.create_task(self._respond(key, body, route, entry, stream, service.model_id))
        self._running[key] = (stream, task)

    async def _respond(
        self,
        key: tuple[str, str],
        body: MqttChatRequest,
        route: Route,
        entry: _CacheEntry,
        stream: TokenStream,
        model: str,
    ) -> None:
        request_id.set(body.id)
        seq = 0
        parts: list[str] = []
        try:
            async for chunk in stream:
                if body.stream:
                    self._reply(route, ReplyChunk(id=body.id, seq=seq, delta=chunk.text), body.id, entry)
                    seq += 1
                else:
                    parts.append(chunk.text)
        except EdgertError as exc:  # failed before any text: deadline in the queue, engine failure
            self.cache.forget(key)
            self._reply(route, ReplyError(id=body.id, seq=seq, error=ErrorBody.model_validate(exc.to_dict())), body.id)
            return
        finally:
            stream.cancel()
            self._running.pop(key, None)
        result = stream.result
        assert result is not None
        self.state.metrics.observe_finish(result.ttft_s, result.total_s, result.completion_tokens)
        final = _final(body, seq, model, self.device_id, result, None if body.stream else "".join(parts))
        self.cache.finish(entry, self._reply(route, final, body.id, entry))

    # ----------------------------------------------------------- commands
    def _on_command(self, incoming: Incoming) -> None:
        try:
            command = Command.model_validate_json(incoming.payload)
        except ValidationError as exc:
            self.counters.bad_payloads += 1
            log.warning("mqtt: ignoring a malformed command: %s", exc.errors()[0]["msg"])
            return
        if command.action == "cancel":
            hits = [stream for (_, rid), (stream, _) in self._running.items() if rid == command.id]
            for stream in hits:
                stream.cancel()
            log.info("mqtt: cancel %s: %d running request(s) cancelled", command.id, len(hits))
        elif self.on_update_check is None:
            log.info("mqtt: update check nudge received, but this daemon has no updater wired")
        else:
            log.info("mqtt: update check nudge received")
            self._spawn(self._nudge(self.on_update_check))

    async def _nudge(self, hook: UpdateNudge) -> None:
        try:
            outcome = hook()
            if outcome is not None:
                await outcome
        except Exception:
            log.exception("mqtt: the update check hook failed")

    # ----------------------------------------------------------- status, telemetry
    def _status(self, state: str, *, reason: str | None = None) -> Outgoing:
        service = self.state.service
        status = DeviceStatus(
            state="online" if state == "online" else "offline",
            device_id=self.device_id,
            reason=reason if state == "online" else (reason or "connection lost"),
            group=self.settings.group,
            model=_model_ref(service) if service is not None else None,
            backend=service.runtime.backend_name if service is not None else None,
            edgert_version=__version__,
            protocol=self.settings.protocol,
            uptime_s=round(time.monotonic() - self.state.started, 3),
            ts=time.time(),
        )
        return Outgoing(self.topics.status, _encode(status), retain=True)

    async def _telemetry_loop(self) -> None:
        interval = self.settings.telemetry_interval_s
        last_tokens, last_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            service = self.state.service
            stats = service.stats()[0] if service is not None else None
            now = time.monotonic()
            tokens = stats.generated_tokens if stats is not None else 0
            rate = (tokens - last_tokens) / max(now - last_at, 1e-9)
            last_tokens, last_at = tokens, now
            memory, temperature = await asyncio.to_thread(_readings)
            if not self.link.connected:
                continue  # stale telemetry is worthless: never buffered
            reading = Telemetry(
                ts=time.time(),
                device_id=self.device_id,
                uptime_s=round(now - self.state.started, 3),
                tokens_per_s=round(rate, 2),
                queue_depth=stats.queue_depth if stats else 0,
                active=stats.active if stats else 0,
                requests_finished=sum(stats.finished.values()) if stats else 0,
                rejected=stats.rejected if stats else 0,
                memory=memory,
                temperature_c=temperature,
                mqtt=self.link_counters(),
            )
            self.link.publish(Outgoing(self.topics.telemetry, _encode(reading), qos=0), track=False)

    def link_counters(self) -> LinkCounters:
        return LinkCounters(
            connected=self.link.connected,
            reconnects=self.link.reconnects,
            buffered=len(self._outbox),
            dropped=self.counters.dropped,
            duplicates=self.counters.duplicates,
            bad_payloads=self.counters.bad_payloads,
            requests=self.counters.requests,
        )


def _encode(body: BaseModel) -> bytes:
    return body.model_dump_json().encode()


def _seq_of(out: Outgoing) -> int:
    try:
        seq = json.loads(out.payload).get("seq", 0)
    except (json.JSONDecodeError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def _final(
    body: MqttChatRequest, seq: int, model: str, device_id: str, result: Finished, content: str | None
) -> ReplyFinal:
    return ReplyFinal(
        id=body.id,
        seq=seq,
        model=model,
        device_id=device_id,
        finish_reason=result.reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
        ),
        content=content,
        error=ErrorBody.model_validate(result.error.to_dict()) if result.error is not None else None,
        timings=Timings(ttft_s=result.ttft_s, total_s=result.total_s),
    )


def _model_ref(service: InferenceService) -> ModelRef:
    runtime = service.runtime
    # The update path installs files as versions/<model-id>@<version>.gguf behind a symlink.
    name = runtime.path.resolve().name
    version = name.removesuffix(".gguf").rpartition("@")[2] if "@" in name else None
    return ModelRef(id=service.model_id, file=runtime.path.name, quant=runtime.quant, version=version)


def _readings() -> tuple[MemoryReading, float | None]:
    """RAM and the hottest readable temperature sensor (reads /proc and /sys: run off the loop)."""
    vm = psutil.virtual_memory()
    memory = MemoryReading(
        rss_bytes=psutil.Process().memory_info().rss, available_bytes=vm.available, total_bytes=vm.total
    )
    temperature: float | None = None
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        with contextlib.suppress(OSError, RuntimeError):
            readings = [entry.current for group in sensors().values() for entry in group if entry.current]
            temperature = max(readings) if readings else None
    return memory, temperature
