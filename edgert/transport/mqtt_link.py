"""The paho-mqtt adapter: the only place (with :mod:`edgert.transport.mqtt_client`) that imports paho.

Threads: paho runs its network loop on its own thread. Its callbacks only copy
what they need out of the packet and hop onto the asyncio loop with
``loop.call_soon_threadsafe``; ``publish`` only queues bytes for paho's thread.
paho's own reconnect has no jitter, so it is off: :class:`MqttLink` reconnects with
exponential backoff and jitter, on a persistent session (MQTT 5 clean_start=False +
session expiry; MQTT 3.1.1 clean_session=False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgert import device
from edgert.settings import MqttSettings, Settings

log = logging.getLogger("edgert.mqtt")


class _DropLoopAfterClose(logging.Filter):
    """paho's network thread runs one more loop after the socket has closed and logs that at
    ERROR ("Client is not connected ...") -- after every clean DISCONNECT, and after a lost link,
    which edgert reports itself ("link ... lost; reconnecting"). Nothing to act on; an ERROR line
    at every shutdown would send an operator looking for a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


_paho_log = logging.getLogger("edgert.mqtt.paho")
_paho_log.addFilter(_DropLoopAfterClose())

QOS = 1
#: bytes a PUBLISH needs beyond payload and topic: fixed header, lengths, packet id, properties
_PACKET_OVERHEAD = 64
CLOSE_FLUSH_S = 5.0


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
    """``mqtt.device_id``, else the id the update path uses (:mod:`edgert.device`)."""
    return device.resolve_device_id(settings.mqtt.device_id, settings.update.device_id)


def valid_topic(topic: str) -> bool:
    """A topic one may publish to: non-empty, no wildcards, no NUL, within MQTT's length limit."""
    return bool(topic) and not any(ch in topic for ch in "+#\0") and len(topic.encode()) <= 65535


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+``, ``#``), by paho's own rules."""
    return bool(paho.topic_matches_sub(topic_filter, topic))


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
        self._client.enable_logger(_paho_log)
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

    def publish(self, out: Outgoing, *, track: bool = True) -> bool:
        """Hand one message to paho (never blocks: paho's thread writes it). False: paho's queue is full."""
        return self._publish(out, track=track).rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE

    def _publish(self, out: Outgoing, *, track: bool) -> paho.MQTTMessageInfo:
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
            info = self._publish(last, track=False)
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, CLOSE_FLUSH_S)
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
