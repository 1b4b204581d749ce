"""Serving over MQTT: requests in, replies, status and telemetry out (paho lives in :mod:`.mqtt_link`,
the reply cache and outbox in :mod:`.mqtt_delivery`).

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

    reply produced -> outbox (bounded in messages and bytes while the broker is away: resent
                      duplicates are dropped first, then the oldest replies, each counted)
                   -> paho (at most mqtt.max_queued_messages unacknowledged QoS 1 messages)
                   -> broker PUBACK

paho's own reconnect has no jitter, so it is off: :class:`MqttLink` reconnects with
exponential backoff and jitter. The session is persistent (MQTT 5 clean_start=False
+ session expiry; MQTT 3.1.1 clean_session=False), so requests published while the
device is offline are delivered when it returns, and unacknowledged replies are
re-sent by paho after a reconnect. Requests are acknowledged on receipt; a
redelivered request id (same reply topic) never runs twice: its cached final reply
is sent again instead, at most once per ``mqtt.duplicate_interval_s``.

Whoever may publish a request decides where the device publishes, with the device's
own broker credentials. So a reply topic must lie in the configured reply space
(``mqtt.reply_topics``, never a ``$`` topic or a device topic under ``edgert/v1/``),
and topic and Correlation Data are capped. A request without a safe reply topic is
dropped with a rate-limited log line and ``edgert_mqtt_dropped_total{reason}``.

Over ~400 lines on purpose: one class, the request/reply protocol, read top to bottom; what stands
alone is in :mod:`.mqtt_link` (paho) and :mod:`.mqtt_delivery` (reply cache, outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from edgert import __version__
from edgert.api.mqtt_schemas import (
    Command,
    DeployState,
    DeviceStatus,
    ErrorBody,
    LinkCounters,
    ModelRef,
    MqttChatRequest,
    ReplyChunk,
    ReplyError,
    ReplyFinal,
    Timings,
    Topics,
    in_reply_space,
)
from edgert.chat.events import OutputEvent
from edgert.errors import BadRequestError, EdgertError, OverloadedError, PayloadTooLargeError
from edgert.log import RateLimitedLog, request_id
from edgert.serving.chat_output import ChatOutput, chat_delta
from edgert.serving.scheduler import Finished, TokenStream
from edgert.serving.service import InferenceService
from edgert.settings import Settings
from edgert.transport.mqtt_delivery import CacheEntry, Outbox, ReplyCache
from edgert.transport.mqtt_link import (
    CLOSE_FLUSH_S,
    Incoming,
    MqttLink,
    Outgoing,
    Route,
    resolve_device_id,
    topic_matches,
    valid_topic,
)
from edgert.transport.mqtt_telemetry import TelemetrySampler
from edgert.transport.shared import ServingState, invalid_body, serving, usage

log = logging.getLogger("edgert.mqtt")


UpdateNudge = Callable[[], Awaitable[None] | None]


@dataclass
class _Counters:
    requests: int = 0
    duplicates: int = 0
    bad_payloads: int = 0
    dropped: int = 0


class _Running:
    """A request between admission and its final reply; cancellable before its tokens exist too."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.stream: TokenStream | None = None
        self.cancelled = False

    def attach(self, stream: TokenStream) -> None:
        self.stream = stream
        if self.cancelled:  # cancelled while its prompt was being tokenized
            stream.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


class _RejectedError(Exception):
    """A request that gets an error reply instead of running."""

    def __init__(self, error: EdgertError, request_id: str | None, route: Route) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id
        self.route = route


class _DroppedError(Exception):
    """A request with no safe place for a reply: dropped, logged (rate-limited) and counted."""

    def __init__(self, reason: str, detail: str, request_id: str | None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


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
        self._outbox = Outbox(self.settings.reply_buffer_messages, self.settings.reply_buffer_bytes)
        self._reply_filters = [
            topic_filter.replace("{device}", self.device_id).replace("{group}", self.settings.group or "")
            for topic_filter in self.settings.reply_topics
            if self.settings.group is not None or "{group}" not in topic_filter
        ]
        self._drop_log = RateLimitedLog(log)
        self._running: dict[tuple[str, str], _Running] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.link = MqttLink(self.settings, f"edgert-{self.device_id}", self, will=self._status("offline"))
        self._link_task: asyncio.Task[None] | None = None
        self._telemetry = TelemetrySampler(state, self.device_id)
        #: the latest deploy state: retained state, not a reply, so only the newest matters -- it never waits
        #: in the reply outbox (where an older one could follow a newer one out) and goes again at link_up
        self._deploy: Outgoing | None = None
        #: ``_deploy`` has not reached paho yet (the broker is away, or paho's queue was full): sent at the next
        #: link_up or acknowledgement
        self._deploy_unsent = False

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.state.service is not None:
            self.state.service.host.on_serve(self._model_changed)
        self._link_task = asyncio.create_task(self.link.run(), name="edgert-mqtt-link")
        if self.settings.telemetry_interval_s > 0:
            self._spawn(self._telemetry_loop())
        if self.settings.protocol != "5" and self.settings.group:
            log.warning("mqtt: fleet group %r needs MQTT 5 shared subscriptions; not subscribing", self.settings.group)

    async def stop(self, drain_timeout_s: float) -> None:
        """Let running requests finish (up to the timeout), flush replies, say offline, disconnect."""
        running = [entry.task for entry in self._running.values() if entry.task is not None]
        if running:
            log.info("mqtt: draining %d running request(s)", len(running))
            _, pending = await asyncio.wait(running, timeout=drain_timeout_s)
            for entry in list(self._running.values()):
                entry.cancel()
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
        # Retained state first, so a device that was away is current on the broker at once (offline catch-up).
        self.link.publish(self._status("online"), track=False)
        self._deploy_unsent = self._deploy is not None
        self._flush_deploy()
        if self.settings.telemetry_interval_s > 0:
            self._spawn(self._publish_telemetry())
        self._pump()

    def _model_changed(self, _served: object) -> None:
        """A swap or rollback: the retained status names the model now served (called on the event loop)."""
        if self.link.connected:
            self.link.publish(self._status("online"), track=False)

    def link_down(self) -> None:
        """Nothing to do: replies wait in the outbox and paho keeps its unacknowledged ones."""

    def acked(self) -> None:
        self._flush_deploy()
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
        """Retained deployment state, now if the broker is there, else the newest one when it is back.

        Called on the event loop in the order the update path saved its moves; paho sends QoS 1 messages
        of one connection in order (re-sent ones after a reconnect first), so the broker keeps the newest.
        """
        self._deploy = Outgoing(self.topics.deploy, _encode(state), retain=True)
        self._deploy_unsent = True
        self._flush_deploy()

    def _flush_deploy(self) -> None:
        if self._deploy_unsent and self._deploy is not None and self.link.connected:
            self._deploy_unsent = not self.link.publish(self._deploy, track=False)

    # ----------------------------------------------------------- outbox
    def _send(self, out: Outgoing, *, resent: bool = False) -> None:
        dropped = self._outbox.put(out, resent=resent)
        if dropped:
            self.counters.dropped += dropped
            self._drop_log.warning(
                "outbox", "mqtt: reply buffer full; dropped %d replies so far (resent duplicates first)",
                self.counters.dropped,
            )  # fmt: skip
        self._pump()

    def _pump(self) -> None:
        while self._outbox and self.link.has_room():
            out = self._outbox.pop()
            assert out is not None
            if out.size() > self.link.max_packet():
                out = self._oversize(out)
            if not self.link.publish(out):
                self._outbox.push_back(out)  # paho is full after all: try again on the next ack
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

    def _reply(self, route: Route, body: BaseModel, request: str | None) -> Outgoing:
        out = Outgoing(route.topic, _encode(body), correlation=route.correlation, request_id=request)
        self._send(out)
        return out

    def _error_reply(self, rejected: _RejectedError) -> None:
        if not isinstance(rejected.error, OverloadedError):
            self.counters.bad_payloads += 1
        # Shortened: a refusal may quote the request (an unknown model name), which its sender sizes.
        self._drop_log.log(
            logging.INFO, f"refused:{rejected.error.code}", "mqtt: request %s refused: %.300s",
            _printable(rejected.request_id), rejected.error.message,
        )  # fmt: skip
        body = ReplyError(id=rejected.request_id, error=ErrorBody.model_validate(rejected.error.to_dict()))
        self._reply(rejected.route, body, rejected.request_id)

    def _drop(self, dropped: _DroppedError) -> None:
        """No reply is possible or wanted: a rate-limited warning and a counted metric."""
        if dropped.reason != "duplicate":
            self.counters.bad_payloads += 1
        self.state.metrics.mqtt_dropped.labels(dropped.reason).inc()
        self._drop_log.warning(
            dropped.reason, "mqtt: request %s dropped without a reply (%s): %s",
            _printable(dropped.request_id), dropped.reason, dropped.detail,
        )  # fmt: skip

    def _reply_topic_problem(self, topic: str) -> str | None:
        """Why replies may not go to ``topic``; None when they may."""
        if _unicode(topic) is None:
            return "the reply topic is not valid Unicode"
        if len(topic.encode()) > self.settings.max_topic_bytes:
            return f"the reply topic is longer than {self.settings.max_topic_bytes} bytes"
        if not valid_topic(topic):
            return "the reply topic is not a topic name (empty, a wildcard or NUL)"
        if not in_reply_space(topic) or not any(topic_matches(f, topic) for f in self._reply_filters):
            return f"the reply topic {_printable(topic)} is outside the reply topics ({', '.join(self._reply_filters)})"
        return None

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
        except _DroppedError as dropped:
            self._drop(dropped)

    def _route(self, topic: str | None, correlation: bytes | None, rid: str | None) -> Route:
        """Where replies to this request may go, or _DroppedError when nowhere safe."""
        if topic is None:
            raise _DroppedError("no_reply_topic", "no reply topic: set the Response Topic or 'reply_to'", rid)
        problem = self._reply_topic_problem(topic)
        if problem is not None:
            raise _DroppedError("reply_topic", problem, rid)
        if correlation is not None and len(correlation) > self.settings.max_correlation_bytes:
            # Answer without it: echoing it on every chunk is the amplification this cap exists for.
            error = PayloadTooLargeError(
                f"the Correlation Data is {len(correlation)} bytes; at most {self.settings.max_correlation_bytes}",
                param="correlation_data",
            )
            raise _RejectedError(error, rid, Route(topic))
        return Route(topic, correlation)

    def _parse(self, incoming: Incoming) -> tuple[MqttChatRequest, Route]:
        rid: str | None = None
        early_error: EdgertError | None = None
        data: object = None
        if len(incoming.payload) > self.settings.max_message_bytes:
            early_error = PayloadTooLargeError(f"request exceeds {self.settings.max_message_bytes} bytes")
        else:
            try:
                data = json.loads(incoming.payload)
            except RecursionError:
                early_error = BadRequestError("request payload is nested too deeply")
            except ValueError as exc:  # also bad UTF-8, and integers longer than Python converts
                early_error = BadRequestError(f"request payload is not valid JSON: {exc}")
        if early_error is None and not isinstance(data, dict):
            early_error = BadRequestError("request payload must be a JSON object")
        topic = incoming.response_topic
        if isinstance(data, dict):
            rid = _unicode(data.get("id"))
            reply_to = data.get("reply_to")
            if topic is None and isinstance(reply_to, str):
                topic = reply_to
        route = self._route(topic, incoming.correlation, rid)
        if early_error is not None:
            raise _RejectedError(early_error, rid, route)
        try:
            return MqttChatRequest.model_validate(data), route
        except ValidationError as exc:
            raise _RejectedError(invalid_body(exc), rid, route) from None
        except EdgertError as exc:  # the schema's own checks (n, logprobs, stop) raise edgert errors
            raise _RejectedError(exc, rid, route) from None

    def _duplicate(self, key: tuple[str, str], rid: str) -> bool:
        """A redelivered id: the final reply again, at most once per interval (chunks never again)."""
        entry = self.cache.get(key)
        if entry is None:
            return False
        self.counters.duplicates += 1
        if entry.final is None:
            self._drop_log.log(
                logging.INFO, "running", "mqtt: request %s is already running; ignoring the redelivery", rid
            )
            return True
        now = time.monotonic()
        if entry.resent_at is not None and now - entry.resent_at < self.settings.duplicate_interval_s:
            interval = self.settings.duplicate_interval_s
            raise _DroppedError("duplicate", f"its final reply was resent less than {interval:g} s ago", rid)
        entry.resent_at = now
        log.info("mqtt: request %s seen before; resending its final reply", rid)
        self._send(entry.final, resent=True)
        return True

    def _admit(self, key: tuple[str, str], body: MqttChatRequest, route: Route) -> None:
        """The cheap checks here, on the loop; rendering and tokenizing in ``_respond``, on a worker thread."""
        try:
            service = serving(self.state)
            service.check_model(body.model)
            service.check_prompt_size(body)
        except EdgertError as exc:
            raise _RejectedError(exc, body.id, route) from None
        self.counters.requests += 1
        entry = self.cache.start(key)
        running = _Running()
        running.task = asyncio.create_task(self._respond(key, body, route, entry, service, running))
        self._running[key] = running

    async def _respond(
        self,
        key: tuple[str, str],
        body: MqttChatRequest,
        route: Route,
        entry: CacheEntry,
        service: InferenceService,
        running: _Running,
    ) -> None:
        request_id.set(body.id)
        model = service.model_id
        seq = 0
        parts: list[str] = []
        stream: TokenStream | None = None
        try:
            stream = await service.generate(body, body.id)
            running.attach(stream)
            output = stream.chat or ChatOutput()
            async for chunk in stream:
                if body.stream:
                    for event in output.feed(chunk.text):
                        seq = self._reply_chunk(route, body.id, seq, event, output)
                else:
                    parts.append(chunk.text)
            if body.stream:
                for event in output.finish():
                    seq = self._reply_chunk(route, body.id, seq, event, output)
            else:
                output.feed("".join(parts))
                output.finish()
        except EdgertError as exc:  # failed before any text: deadline in the queue, engine failure
            self.cache.forget(key)
            self._reply(route, ReplyError(id=body.id, seq=seq, error=ErrorBody.model_validate(exc.to_dict())), body.id)
            return
        finally:
            if stream is not None:
                stream.cancel()
            self._running.pop(key, None)
        result = stream.result
        assert result is not None
        self.state.metrics.observe_finish(result.ttft_s, result.total_s, result.completion_tokens)
        final = _final(body, seq, model, self.device_id, result, output)
        self.cache.finish(key, entry, self._reply(route, final, body.id))

    def _reply_chunk(self, route: Route, request: str, seq: int, event: OutputEvent, output: ChatOutput) -> int:
        """Publish one event of a streamed reply as a chunk; returns the next chunk's seq."""
        delta = chat_delta(event, output)
        if delta is None:
            return seq
        chunk = ReplyChunk(
            id=request,
            seq=seq,
            delta=delta.content or "",
            reasoning=delta.reasoning_content,
            tool_calls=delta.tool_calls,
        )
        self._reply(route, chunk, request)
        return seq + 1

    # ----------------------------------------------------------- commands
    def _on_command(self, incoming: Incoming) -> None:
        try:
            command = Command.model_validate_json(incoming.payload)
        except ValidationError as exc:
            self._drop(_DroppedError("command", f"malformed command: {exc.errors()[0]['msg']}", None))
            return
        if command.action == "cancel":
            self._cancel(command, incoming.response_topic)
        elif self.on_update_check is None:
            log.info("mqtt: update check nudge received, but this daemon has no updater wired")
        else:
            log.info("mqtt: update check nudge received")
            self._spawn(self._nudge(self.on_update_check))

    def _cancel(self, command: Command, response_topic: str | None) -> None:
        """Cancel one request of one requester: (reply topic, id), never every request with that id."""
        reply_topic = response_topic or command.reply_to
        if command.id is None or reply_topic is None:
            detail = "a cancel names the request's 'id' and its reply topic ('reply_to' or the Response Topic)"
            self._drop(_DroppedError("cancel", detail, command.id))
            return
        running = self._running.get((reply_topic, command.id))
        if running is not None:
            running.cancel()
        log.info("mqtt: cancel %s: %s", _printable(command.id), "cancelled" if running else "no such running request")

    async def _nudge(self, hook: UpdateNudge) -> None:
        try:
            outcome = hook()
            if outcome is not None:
                await outcome
        except EdgertError as exc:  # e.g. updates are off: the reason, in one line
            log.warning("mqtt: update check not run: %s", exc.message)
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
            backend=service.host.served.backend if service is not None and service.host.served else None,
            edgert_version=__version__,
            protocol=self.settings.protocol,
            uptime_s=round(time.monotonic() - self.state.started, 3),
            ts=time.time(),
        )
        return Outgoing(self.topics.status, _encode(status), retain=True)

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            await self._publish_telemetry()

    async def _publish_telemetry(self) -> None:
        """One reading, retained: the fleet reads every device's latest at once (QoS 0: the next one replaces
        a lost one, and the counters in it are cumulative)."""
        reading = await self._telemetry.reading(self.link_counters())
        if not self.link.connected:
            return  # stale telemetry is worthless: never buffered (link_up sends a fresh one)
        self.link.publish(Outgoing(self.topics.telemetry, _encode(reading), qos=0, retain=True), track=False)

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


def _unicode(value: object) -> str | None:
    """``value`` when it is a string that can travel in a reply; JSON's ``\\ud800`` escapes
    make strings with lone surrogates, which no UTF-8 topic or payload can carry."""
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def _printable(text: str | None, limit: int = 80) -> str:
    """A client-chosen string as it may appear in a log line: quoted, escaped, shortened."""
    if text is None:
        return "(no id)"
    shown = repr(text[:limit])
    return shown + f"... ({len(text)} chars)" if len(text) > limit else shown


def _seq_of(out: Outgoing) -> int:
    try:
        seq = json.loads(out.payload).get("seq", 0)
    except (json.JSONDecodeError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def _final(
    body: MqttChatRequest, seq: int, model: str, device_id: str, result: Finished, output: ChatOutput
) -> ReplyFinal:
    whole = not body.stream  # a streamed reply's text went out in its chunks
    return ReplyFinal(
        id=body.id,
        seq=seq,
        model=model,
        device_id=device_id,
        finish_reason=output.finish_reason(result.reason),
        usage=usage(result),
        content=output.content if whole else None,
        reasoning_content=output.reasoning if whole else None,
        tool_calls=output.tool_calls if whole else None,
        error=ErrorBody.model_validate(result.error.to_dict()) if result.error is not None else None,
        timings=Timings(ttft_s=result.ttft_s, total_s=result.total_s),
    )


def _model_ref(service: InferenceService) -> ModelRef | None:
    # Who is served comes from the model host (the signed release after a swap), never from a file name.
    served = service.host.served
    if served is None:
        return None
    return ModelRef(
        id=served.id,
        file=served.file,
        quant=served.quant,
        version=served.version,
        modalities=[kind for kind in served.modalities if kind in ("text", "image", "audio")],
    )
