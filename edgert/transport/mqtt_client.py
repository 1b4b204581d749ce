"""A small blocking MQTT client of edgert devices: ``edgert mqtt ask|status``, tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import TypeAdapter, ValidationError

from edgert.api.mqtt_schemas import (
    ALL_STATUS,
    DeviceStatus,
    ReplyChunk,
    ReplyError,
    ReplyFinal,
    client_reply_filters,
    reply_topic_for,
)
from edgert.settings import MqttSettings
from edgert.transport.mqtt_link import QOS, connect_properties, new_client, publish_properties

log = logging.getLogger("edgert.mqtt")

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


def _reconnecting_client(settings: MqttSettings, client_id: str, *, persistent: bool) -> paho.Client:
    """A paho client that reconnects on its own; paho's delays are whole seconds (no jitter): fine for one
    operator's or technician's client."""
    client = new_client(settings, client_id, persistent=persistent, reconnect=True)
    client.reconnect_delay_set(max(1, round(settings.reconnect_min_s)), max(1, round(settings.reconnect_max_s)))
    return client


def _start(client: paho.Client, settings: MqttSettings, *, persistent: bool) -> None:
    """Connect (blocking; OSError when the broker cannot be reached) and start paho's network thread."""
    client.connect(
        settings.broker or "localhost",
        settings.port,
        keepalive=settings.keepalive_s,
        clean_start=not persistent if settings.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=connect_properties(settings, persistent=persistent),
    )
    client.loop_start()


class MqttRequester:
    """A small blocking client of edgert devices: ``edgert mqtt ask|status``, tests, benchmarks.

    Replies to a request sent to ``edgert/v1/<device>/req`` come to
    ``edgert/v1/<device>/reply/<client-id>`` (fleet requests: ``edgert/v1/fleet/<group>/reply/<client-id>``),
    the reply space a device accepts by default and a broker ACL can give each client
    alone (packaging/mosquitto/edgert.acl). MQTT 5 requests carry it as the Response Topic
    (with the request id as Correlation Data), 3.1.1 requests as ``reply_to``. With
    ``persistent`` the broker keeps the client's session (and its replies) across a broker
    restart or a client reconnect.
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
        self.persistent = persistent
        self.timeout_s = timeout_s
        self._client = _reconnecting_client(settings, self.client_id, persistent=persistent)
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
        _start(self._client, self.settings, persistent=self.persistent)
        if not self._ready.wait(self.timeout_s) or self._refused:
            self.close()
            raise ConnectionError(self._refused or f"no answer from the broker within {self.timeout_s:g} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def send(
        self, topic: str, body: dict[str, Any], *, request_id: str | None = None, acked_within_s: float | None = None
    ) -> PendingReply:
        """Publish one chat request (QoS 1); the returned PendingReply yields its replies.

        With ``acked_within_s``, return only once the broker acknowledged it (PUBACK: it holds the
        request, for an offline device too), TimeoutError when it did not in that time."""
        rid = request_id or str(body.get("id") or uuid.uuid4().hex)
        payload = dict(body, id=rid)
        pending = self.expect(rid)
        reply_topic = self.reply_topic(topic)
        # reply_to in the payload too: a 3.1.1 device never sees MQTT 5 properties.
        payload["reply_to"] = reply_topic
        props = publish_properties(rid.encode(), reply_topic) if self.settings.protocol == "5" else None
        sent = self._client.publish(topic, json.dumps(payload).encode(), qos=QOS, properties=props)
        if acked_within_s is not None:
            sent.wait_for_publish(acked_within_s)
            if not sent.is_published():
                raise TimeoutError(f"the broker did not acknowledge request {rid} within {acked_within_s:g} s")
        return pending

    def reply_topic(self, request_topic: str) -> str:
        """Where the replies to a request sent to ``request_topic`` come."""
        return reply_topic_for(request_topic, self.client_id)

    def cancel(self, request_topic: str, request_id: str) -> None:
        """Ask the device to stop a running request of ours (sent to ``edgert/v1/<device>/req``)."""
        cmd_topic = request_topic.removesuffix("/req") + "/cmd"
        body = {"action": "cancel", "id": request_id, "reply_to": self.reply_topic(request_topic)}
        self._client.publish(cmd_topic, json.dumps(body).encode(), qos=QOS)

    def publish_raw(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        reply: bool = True,
        response_topic: str | None = None,
    ) -> None:
        """Publish bytes as they are (tests of malformed requests); MQTT 5 Response Topic is this
        client's reply topic for ``topic`` unless ``response_topic`` names another (or ``reply`` is False)."""
        if reply and response_topic is None:
            response_topic = self.reply_topic(topic)
        props = publish_properties(correlation, response_topic if reply else None)
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
        client.subscribe([(topic, QOS) for topic in [*client_reply_filters(self.client_id), *self.topics]])

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


class TopicSubscriber:
    """Every message on some topic filters, handed to ``on_message(topic, payload, retained)`` on paho's thread.

    A clean session: the broker sends the retained message of every matching topic right after each
    SUBACK, so after a reconnect (paho's own, with backoff) the reader is current again without a
    replay of what it missed. ``retained`` is the RETAIN flag as delivered: set on what the broker sends
    because of a new subscription (the retained burst), clear on live traffic (MQTT 3.1.1 section 3.3.1.3,
    MQTT 5 without Retain As Published). ``edgert fleet`` reads the fleet's retained status/deploy/telemetry
    through it; :meth:`publish` lets an operator tool send a command on the same connection.
    """

    def __init__(
        self,
        settings: MqttSettings,
        filters: tuple[str, ...],
        on_message: Callable[[str, bytes, bool], None],
        *,
        client_id: str | None = None,
        timeout_s: float = 10,
    ) -> None:
        self.settings = settings
        self.filters = filters
        self.client_id = client_id or f"edgert-fleet-{uuid.uuid4().hex[:12]}"
        self.timeout_s = timeout_s
        self._handler = on_message
        self._client = _reconnecting_client(settings, self.client_id, persistent=False)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._acked = threading.Condition()
        self._acks = 0
        self._subscribed = threading.Event()
        self._refused: str | None = None
        #: SUBACKs received: one per (re)connection, so a caller can tell a fresh retained burst began
        self.subscriptions = 0

    def __enter__(self) -> TopicSubscriber:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected())

    def connect(self) -> None:
        """Connect and subscribe (blocking until the SUBACK); OSError/ConnectionError when that fails."""
        _start(self._client, self.settings, persistent=False)
        if not self._subscribed.wait(self.timeout_s) or self._refused:
            self.close()
            raise ConnectionError(self._refused or f"no answer from the broker within {self.timeout_s:g} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue one QoS 1 message (paho sends it, and resends it after a reconnect).

        paho holds at most ``max_queued_messages`` unacknowledged messages and refuses the next one: a
        command to a thousand devices waits here for acknowledgements instead of being dropped;
        TimeoutError when none comes within ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            with self._acked:
                acks = self._acks
            # not under self._acked: paho calls on_publish holding its own queue lock, which publish takes
            if self._client.publish(topic, payload, qos=QOS, retain=retain).rc != paho.MQTT_ERR_QUEUE_SIZE:
                return
            with self._acked:
                while self._acks == acks:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"the broker acknowledged none of our messages within {self.timeout_s:g} s")
                    self._acked.wait(left)

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
            self._subscribed.set()
            return
        client.subscribe([(topic, QOS) for topic in self.filters])

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt: lost the broker (%s); reconnecting", reason)

    def _on_subscribe(
        self, _client: paho.Client, _userdata: object, _mid: int, codes: list[ReasonCode], _props: Properties | None
    ) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused and not self._subscribed.is_set():
            # an ACL that denies the filters: say so instead of showing an empty fleet
            self._refused = f"the broker refused the subscription to {', '.join(self.filters)}: {refused[0]}"
        self.subscriptions += 1
        self._subscribed.set()

    def _on_publish(
        self, _client: paho.Client, _userdata: object, _mid: int, _reason: ReasonCode, _props: Properties | None
    ) -> None:
        with self._acked:
            self._acks += 1
            self._acked.notify_all()

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self._handler(message.topic, bytes(message.payload), bool(message.retain))


def device_statuses(settings: MqttSettings, wait_s: float) -> dict[str, DeviceStatus]:
    """Every device's retained status, as the broker has it."""
    requester = MqttRequester(settings, topics=(ALL_STATUS,))
    requester.connect()
    try:
        time.sleep(wait_s)  # retained messages arrive right after the subscription; live ones may follow
    finally:
        requester.close()
    return dict(requester.statuses)
