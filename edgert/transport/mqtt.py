"""Serving over MQTT: the paho adapter (the only module that imports paho).

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
import queue
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, TypeAdapter, ValidationError

from edgert import __version__
from edgert.api.mqtt_schemas import (
    ALL_STATUS,
    Command,
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
    client_reply_topic,
)
from edgert.api.schemas import PromptTokensDetails, Usage
from edgert.engine.llama import capabilities
from edgert.errors import BadRequestError, EdgertError, OverloadedError, PayloadTooLargeError
from edgert.log import request_id
from edgert.serving.metrics import Metrics
from edgert.serving.scheduler import Finished, TokenStream
from edgert.serving.service import InferenceService
from edgert.settings import MqttSettings, Settings

log = logging.getLogger("edgert.mqtt")

QOS = 1
#: bytes a PUBLISH needs beyond payload and topic: fixed header, lengths, packet id, properties
_PACKET_OVERHEAD = 64
_CLOSE_FLUSH_S = 5.0


# ====================================================================== paho adapter
@dataclass(frozen=True, slots=True)
class Route:
    """Where replies to one request go."""

    topic: str
    #: MQTT 5 Correlation Data to echo; None for 3.1.1 clients
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = QOS
    retain: bool = False
    correlation: bytes | None = None
    #: the request this answers, so an oversize reply can be replaced by an error reply
    request_id: str | None = None

    def size(self) -> int:
        return len(self.payload) + len(self.topic.encode()) + len(self.correlation or b"") + _PACKET_OVERHEAD


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


def resolve_device_id(settings: Settings) -> str:
    """``mqtt.device_id``, else ``update.device_id``, else the host name (made topic-safe)."""
    chosen = settings.mqtt.device_id or settings.update.device_id or socket.gethostname()
    return "".join("_" if ch in "/+#" or ch.isspace() else ch for ch in chosen) or "edgert"


def valid_topic(topic: str) -> bool:
    """A topic one may publish to: non-empty, no wildcards, no NUL, within MQTT's length limit."""
    return bool(topic) and not any(ch in topic for ch in "+#\0") and len(topic.encode()) <= 65535


def new_client(settings: MqttSettings, client_id: str, *, persistent: bool, reconnect: bool) -> paho.Client:
    """A configured, unconnected paho client: protocol, TLS, credentials, queue bounds."""
    v5 = settings.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        # MQTT 5 takes clean_start at connect time instead
        clean_session=None if v5 else not persistent,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        reconnect_on_failure=reconnect,
    )
    if settings.tls or settings.ca_file is not None:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
        )
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password is not None else None
        client.username_pw_set(settings.username, password)
    # A safety net under our own accounting (MqttLink never hands paho more than this).
    client.max_queued_messages_set(settings.max_queued_messages + 16)
    client.on_socket_open = _no_delay
    return client


def _no_delay(_client: paho.Client, _userdata: object, sock: Any) -> None:
    """Turn Nagle off: a streamed chunk written while the previous one is unacknowledged
    would otherwise wait for the peer's delayed ACK (~40 ms) on every hop."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_properties(settings: MqttSettings, *, persistent: bool) -> Properties | None:
    if settings.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        props.SessionExpiryInterval = settings.session_expiry_s
    # The broker drops (rather than sends) anything larger: a bound on what we buffer per message.
    props.MaximumPacketSize = settings.max_message_bytes + 65536
    return props


def publish_properties(correlation: bytes | None, response_topic: str | None = None) -> Properties | None:
    if correlation is None and response_topic is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation is not None:
        props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props


def _incoming(message: paho.MQTTMessage) -> Incoming:
    props = getattr(message, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    return Incoming(
        topic=message.topic,
        payload=bytes(message.payload),
        response_topic=response_topic if isinstance(response_topic, str) else None,
        correlation=bytes(correlation) if isinstance(correlation, bytes | bytearray) else None,
    )


def backoff_delays(min_s: float, max_s: float) -> Iterator[float]:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so a fleet
    that lost the same broker does not come back in lockstep."""
    step = min_s
    while True:
        yield step / 2 + random.uniform(0, step / 2)  # noqa: S311 - jitter, not cryptography
        step = min(step * 2, max_s)


class LinkListener(Protocol):
    """What MqttLink tells its owner, always on the event loop."""

    def link_up(self, session_present: bool) -> None: ...

    def link_down(self) -> None: ...

    def message(self, incoming: Incoming) -> None: ...

    def acked(self) -> None: ...


class MqttLink:
    """One persistent connection to the broker, kept up with backoff + jitter.

    Call its methods from the event loop only; paho's callbacks are turned into
    :class:`LinkListener` calls there.
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        listener: LinkListener,
        *,
        will: Outgoing | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._listener = listener
        self._client = new_client(settings, client_id, persistent=True, reconnect=False)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.connect_async(
            settings.broker or "localhost",
            settings.port,
            keepalive=settings.keepalive_s,
            clean_start=False if settings.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_properties(settings, persistent=True),
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        # An exception escaping a callback would end paho's thread silently; paho logs it instead.
        self._client.suppress_exceptions = True
        self._client.enable_logger(logging.getLogger("edgert.mqtt.paho"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended = asyncio.Event()
        self._closing = False
        self._unacked: set[int] = set()
        self.connected = False
        self._session_was_up = False
        self._receive_max: int | None = None
        self.reconnects = 0
        #: the broker's Maximum Packet Size (MQTT 5 CONNACK), when it announced one
        self.broker_max_packet: int | None = None

    # ----------------------------------------------------------- event loop side
    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def has_room(self) -> bool:
        return self.connected and len(self._unacked) < self.settings.max_queued_messages

    def max_packet(self) -> int:
        limit = self.settings.max_message_bytes
        return min(limit, self.broker_max_packet) if self.broker_max_packet else limit

    def publish(self, out: Outgoing, *, track: bool = True) -> paho.MQTTMessageInfo:
        """Hand one message to paho (never blocks: paho's thread writes it)."""
        info = self._client.publish(
            out.topic, out.payload, qos=out.qos, retain=out.retain, properties=publish_properties(out.correlation)
        )
        if track and out.qos > 0 and info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN: the link dropped a moment ago; paho keeps QoS 1 messages and re-sends them.
            self._unacked.add(info.mid)
        return info

    def subscribe(self, topics: list[str]) -> None:
        if topics:
            self._client.subscribe([(topic, QOS) for topic in topics])

    async def run(self) -> None:
        """Connect, and reconnect whenever the link drops, until :meth:`close`."""
        self._loop = asyncio.get_running_loop()
        delays = backoff_delays(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        while not self._closing:
            self._ended.clear()
            self._session_was_up = False
            if self._receive_max is not None:
                self._client.max_inflight_messages_set(self._receive_max)
            try:
                # DNS, TCP and the TLS handshake block: keep them off the event loop.
                await asyncio.to_thread(self._client.reconnect)
            except (OSError, ValueError) as exc:
                delay = next(delays)
                log.warning("mqtt: cannot reach %s:%d (%s); retrying in %.1f s", *self._where(), exc, delay)
                await asyncio.sleep(delay)
                continue
            self._client.loop_start()
            await self._ended.wait()
            # paho's thread has ended (reconnect_on_failure is off); join it before the next start.
            await asyncio.to_thread(self._client.loop_stop)
            if self._closing:
                break
            if self._session_was_up:
                delays = backoff_delays(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
            delay = next(delays)
            log.warning("mqtt: link to %s:%d lost; reconnecting in %.1f s", *self._where(), delay)
            await asyncio.sleep(delay)

    async def close(self, last: Outgoing | None = None) -> None:
        """Publish ``last`` (the offline status), wait briefly for acks, disconnect cleanly."""
        self._closing = True
        if self.connected and last is not None:
            info = self.publish(last, track=False)
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, _CLOSE_FLUSH_S)
        # A normal DISCONNECT: the broker discards the will (we just said offline ourselves)
        # and keeps the session for session_expiry_s.
        self._client.disconnect()
        self._ended.set()
        await asyncio.to_thread(self._client.loop_stop)

    def _where(self) -> tuple[str, int]:
        return self.settings.broker or "localhost", self.settings.port

    # ----------------------------------------------------------- paho thread side
    def _hop(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        # RuntimeError: the loop has closed (process exiting); nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._hop(self._refused, str(reason))
            return
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if isinstance(receive_max, int) and receive_max < client.max_inflight_messages:
            # More unacknowledged QoS 1 messages than the broker's Receive Maximum is a protocol
            # error; paho cannot shrink its window on a live connection, so the next one uses it.
            self._receive_max = receive_max
        max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._hop(self._up, flags.session_present, max_packet if isinstance(max_packet, int) else None)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._hop(self._down, str(reason))

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self._hop(self._listener.message, _incoming(message))

    def _on_publish(
        self, _client: paho.Client, _userdata: object, mid: int, _reason: ReasonCode, _props: Properties | None
    ) -> None:
        self._hop(self._acked, mid)

    # ----------------------------------------------------------- back on the event loop
    def _up(self, session_present: bool, max_packet: int | None) -> None:
        self.connected = True
        self._session_was_up = True
        self.broker_max_packet = max_packet
        log.info(
            "mqtt: connected to %s:%d",
            *self._where(),
            extra={"fields": {"session_present": session_present, "client_id": self.client_id}},
        )
        self._listener.link_up(session_present)

    def _refused(self, reason: str) -> None:
        log.error("mqtt: broker %s:%d refused the connection: %s", *self._where(), reason)

    def _down(self, reason: str) -> None:
        was_up = self.connected
        self.connected = False
        if was_up and self._closing:
            log.info("mqtt: disconnected (%s)", reason)
        elif was_up:
            self.reconnects += 1
            log.warning("mqtt: disconnected (%s)", reason)
            self._listener.link_down()
        self._ended.set()

    def _acked(self, mid: int) -> None:
        if mid in self._unacked:
            self._unacked.discard(mid)
            self._listener.acked()


# ====================================================================== serving
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
        self.backend = backend_name()
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
        deadline = time.monotonic() + _CLOSE_FLUSH_S
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
            info = self.link.publish(out)
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
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
            backend=self.backend,
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


def backend_name() -> str:
    caps = capabilities()
    return f"{caps.name} {caps.version} ({'gpu offload' if caps.gpu_offload else 'cpu'})"


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


# ====================================================================== client side
Reply = ReplyChunk | ReplyFinal | ReplyError
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)


class PendingReply:
    """The replies to one request, as they arrive (thread-safe queue filled by paho's thread)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.sent_at = time.perf_counter()
        self._queue: queue.Queue[tuple[float, Reply]] = queue.Queue()

    def put(self, reply: Reply) -> None:
        self._queue.put((time.perf_counter(), reply))

    def replies(self, timeout_s: float) -> Iterator[tuple[float, Reply]]:
        """(arrival time, reply) until the final or error reply; TimeoutError when the device is silent."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise TimeoutError(f"no reply to {self.request_id} within {timeout_s:g} s") from None
            yield item
            if not isinstance(item[1], ReplyChunk):
                return


class MqttRequester:
    """A small blocking client of edgert devices: ``edgert mqtt ask|status``, tests, benchmarks.

    Replies come to ``edgert/v1/client/<client-id>/reply``; MQTT 5 requests carry it as
    the Response Topic (with the request id as Correlation Data), 3.1.1 requests as
    ``reply_to``. With ``persistent`` the broker keeps the client's session (and its
    replies) across a broker restart or a client reconnect.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        timeout_s: float = 10,
        topics: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.client_id = client_id or f"edgert-cli-{uuid.uuid4().hex[:12]}"
        self.reply_topic = client_reply_topic(self.client_id)
        self.persistent = persistent
        self.timeout_s = timeout_s
        self._client = new_client(settings, self.client_id, persistent=persistent, reconnect=True)
        # paho's delays are whole seconds (no jitter): fine for one interactive client
        min_s, max_s = max(1, round(settings.reconnect_min_s)), max(1, round(settings.reconnect_max_s))
        self._client.reconnect_delay_set(min_s, max_s)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._ready = threading.Event()
        self._refused: str | None = None
        self._pending: dict[str, PendingReply] = {}
        self._lock = threading.Lock()
        #: subscribed besides the reply topic (``edgert mqtt status``: every device's status)
        self.topics = topics
        self.statuses: dict[str, DeviceStatus] = {}
        #: replies that matched no pending request (duplicates after a resend, strays)
        self.unmatched: list[Reply] = []

    def __enter__(self) -> MqttRequester:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and subscribe (blocking); raises OSError/ConnectionError when that fails."""
        v5 = self.settings.protocol == "5"
        self._client.connect(
            self.settings.broker or "localhost",
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=not self.persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_properties(self.settings, persistent=self.persistent),
        )
        self._client.loop_start()
        if not self._ready.wait(self.timeout_s) or self._refused:
            self.close()
            raise ConnectionError(self._refused or f"no answer from the broker within {self.timeout_s:g} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def send(self, topic: str, body: dict[str, Any], *, request_id: str | None = None) -> PendingReply:
        """Publish one chat request (QoS 1); the returned PendingReply yields its replies."""
        rid = request_id or str(body.get("id") or uuid.uuid4().hex)
        payload = dict(body, id=rid)
        pending = self.expect(rid)
        # reply_to in the payload too: a 3.1.1 device never sees MQTT 5 properties.
        payload["reply_to"] = self.reply_topic
        props = publish_properties(rid.encode(), self.reply_topic) if self.settings.protocol == "5" else None
        self._client.publish(topic, json.dumps(payload).encode(), qos=QOS, properties=props)
        return pending

    def publish_raw(self, topic: str, payload: bytes, *, correlation: bytes | None = None, reply: bool = True) -> None:
        """Publish bytes as they are (tests of malformed requests)."""
        props = publish_properties(correlation, self.reply_topic if reply else None)
        self._client.publish(topic, payload, qos=QOS, properties=props)

    def expect(self, request_id: str) -> PendingReply:
        """The replies for ``request_id`` (or, MQTT 5, for that Correlation Data), collected
        from now on; a second request with the same id shares them."""
        with self._lock:
            return self._pending.setdefault(request_id, PendingReply(request_id))

    def ask(self, topic: str, body: dict[str, Any], timeout_s: float = 60) -> list[Reply]:
        return [reply for _, reply in self.send(topic, body).replies(timeout_s)]

    # ----------------------------------------------------------- paho thread
    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = f"the broker refused the connection: {reason}"
            self._ready.set()
            return
        client.subscribe([(topic, QOS) for topic in [self.reply_topic, *self.topics]])

    def _on_subscribe(
        self, _client: paho.Client, _userdata: object, _mid: int, _codes: list[ReasonCode], _props: Properties | None
    ) -> None:
        self._ready.set()

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        if message.topic.endswith("/status"):
            with contextlib.suppress(ValidationError):
                status = DeviceStatus.model_validate_json(message.payload)
                self.statuses[status.device_id] = status
            return
        try:
            reply = _REPLY.validate_json(message.payload)
        except ValidationError:
            log.warning("mqtt: unreadable reply on %s", message.topic)
            return
        # MQTT 5 replies are matched by Correlation Data (a reply to an unreadable payload has no id).
        correlation = getattr(getattr(message, "properties", None), "CorrelationData", None)
        key = correlation.decode(errors="replace") if isinstance(correlation, bytes) else reply.id or ""
        with self._lock:
            pending = self._pending.get(key)
        if pending is None:
            self.unmatched.append(reply)
        else:
            pending.put(reply)


def device_statuses(settings: MqttSettings, wait_s: float) -> dict[str, DeviceStatus]:
    """Every device's retained status, as the broker has it."""
    requester = MqttRequester(settings, topics=(ALL_STATUS,))
    requester.connect()
    try:
        time.sleep(wait_s)  # retained messages arrive right after the subscription; live ones may follow
    finally:
        requester.close()
    return dict(requester.statuses)
