"""What the broker knows of every device: its retained status, deploy state and telemetry, kept current.

:class:`FleetObserver` subscribes to ``edgert/v1/+/status``, ``+/deploy`` and ``+/telemetry``. All three are
retained, so a fresh subscription gets every device's latest message at once (the "retained burst"), then
live changes. Each message costs one dict update (O(devices reporting), never a poll per device); a
payload that fails validation is counted and skipped with one warning naming the device, never raised.
:meth:`FleetObserver.changes` names the devices changed since a given message count, at O(changes): a
consumer that keeps its own picture (``fleet rollout``'s wave) re-reads only those, never the whole fleet.
The topic names the device: with per-device ACLs (packaging/mosquitto/edgert.acl) only that device may
write there, so a payload naming another device is refused as a bad payload.

:class:`DeviceView` is one device as last seen; its properties (``online``, ``release``, ``phase`` ...)
are what ``edgert fleet status`` shows and what ``edgert fleet rollout`` decides on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ValidationError

from edgert.api.mqtt_schemas import PREFIX, DeployState, DeviceStatus, Telemetry
from edgert.settings import MqttSettings
from edgert.transport.mqtt_client import TopicSubscriber

log = logging.getLogger("edgert.fleet")

Part = Literal["status", "deploy", "telemetry"]
_MODELS: dict[Part, type[BaseModel]] = {"status": DeviceStatus, "deploy": DeployState, "telemetry": Telemetry}
#: the filters of the three retained topic families
_PARTS: dict[str, Part] = {part: part for part in _MODELS}
#: shortest time between two evaluations of a wait_until predicate while messages pour in
BATCH_S = 0.05
FILTERS: tuple[str, ...] = tuple(f"{PREFIX}/+/{part}" for part in _MODELS)


@dataclass(frozen=True)
class DeviceView:
    """One device as the broker last showed it (any part may be missing: a device that never updated)."""

    device_id: str
    status: DeviceStatus | None = None
    deploy: DeployState | None = None
    telemetry: Telemetry | None = None
    #: unix time (this machine's clock) of the latest message from it
    seen: float = 0.0

    @property
    def group(self) -> str | None:
        return self.status.group if self.status else None

    @property
    def online(self) -> bool:
        """Its retained status says online (the broker's last will turns it offline when the link dies)."""
        return self.status is not None and self.status.state == "online"

    @property
    def since(self) -> float | None:
        """Unix time (the device's clock) it went online or offline, as its latest status says."""
        return self.status.ts if self.status else None

    @property
    def release(self) -> str | None:
        """``<model-id>@<version>`` served (``<model-id>`` for a model not from the registry).

        The status names what the daemon serves now; the deploy state what the update path committed
        (the same once a switch is done), used when the status has no model (offline, or still loading)."""
        model = self.status.model if self.status else None
        if model is not None:
            return f"{model.id}@{model.version}" if model.version else model.id
        return self.deploy.current if self.deploy else None

    @property
    def phase(self) -> str | None:
        """The update path's phase (idle, downloading, ..., rolling_back), None before any deploy state."""
        return self.deploy.phase if self.deploy else None

    @property
    def edgert_version(self) -> str | None:
        return self.status.edgert_version if self.status else None

    @property
    def uptime_s(self) -> float | None:
        """The freshest of the two readings (telemetry comes every interval, status at connect)."""
        if self.telemetry is not None:
            return self.telemetry.uptime_s
        return self.status.uptime_s if self.status else None


def parse_topic(topic: str) -> tuple[str, Part] | None:
    """``edgert/v1/<device>/<part>`` -> (device, part) for the three retained parts, else None."""
    levels = topic.split("/")
    if len(levels) != 4 or "/".join(levels[:2]) != PREFIX or not levels[2] or levels[2] == "fleet":
        return None
    part = _PARTS.get(levels[3])
    return None if part is None else (levels[2], part)


class FleetObserver:
    """A live, thread-safe picture of the fleet built from the broker's retained topics.

    Use it as a context manager (connects, subscribes; ConnectionError/OSError when the broker cannot be
    reached). :meth:`handle` is the message entry point, public so the picture can be built from
    synthetic payloads without a broker. ``group`` limits snapshots to the devices of one fleet group.
    """

    def __init__(self, mqtt: MqttSettings, *, group: str | None = None, timeout_s: float = 10) -> None:
        self.mqtt = mqtt
        self.group = group
        self.timeout_s = timeout_s
        self._devices: dict[str, DeviceView] = {}
        #: device id -> ``messages`` when it last changed, oldest change first (a change moves it to the end), so
        #: :meth:`changes` reads back from the end and stops at the first older one: O(changes), not O(fleet)
        self._changed_at: dict[str, int] = {}
        self._changed = threading.Condition()
        #: messages taken in, and payloads refused (unparseable, failed validation, or naming another device)
        self.messages = 0
        self.bad_payloads = 0
        self._warned: set[tuple[str, Part]] = set()
        self._last_retained = time.monotonic()
        self._subscriber: TopicSubscriber | None = None

    def __enter__(self) -> FleetObserver:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        subscriber = TopicSubscriber(self.mqtt, FILTERS, self.handle, timeout_s=self.timeout_s)
        with self._changed:
            self._last_retained = time.monotonic()  # quiet time counts from the subscription, not construction
        subscriber.connect()
        self._subscriber = subscriber

    def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    @property
    def connected(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    def publish(self, topic: str, payload: bytes) -> None:
        """Send one message (QoS 1) on the observer's connection, e.g. an ``update_check`` command."""
        if self._subscriber is None:
            raise ConnectionError("the fleet observer is not connected")
        self._subscriber.publish(topic, payload)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, DeviceView]:
        """Every device seen (of ``group``, when set), by id; the views are immutable."""
        with self._changed:
            devices = dict(self._devices)
        if self.group is None:
            return devices
        return {device_id: view for device_id, view in devices.items() if view.group == self.group}

    def changes(self, after: int) -> tuple[int, dict[str, DeviceView | None]]:
        """``(messages, {device: view})``: the devices changed since ``messages`` was ``after`` (0: every device
        seen), each as it is now; None for one gone from the broker (every part cleared) or outside ``group``.
        Pass the count returned as the next ``after``: a consumer reads each change once, however big the fleet."""
        with self._changed:
            count = self.messages
            changed: dict[str, DeviceView | None] = {}
            for device_id, at in reversed(self._changed_at.items()):
                if at <= after:
                    break
                changed[device_id] = self._devices.get(device_id)
        if self.group is not None:
            changed = {d: v if v is not None and v.group == self.group else None for d, v in changed.items()}
        return count, changed

    def wait_until(self, predicate: Callable[[dict[str, DeviceView]], bool], timeout_s: float) -> bool:
        """Whether ``predicate(snapshot)`` became true within ``timeout_s``; it is tried once now and then
        once per wake-up after new messages (a burst of messages costs one evaluation, not one each)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            seen = self.messages
        while True:
            evaluated = time.monotonic()
            if predicate(self.snapshot()):
                return True
            if time.monotonic() >= deadline:  # a steady stream of messages never leaves the wait below idle
                return False
            with self._changed:
                while self.messages == seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                seen = self.messages
            # a burst (thousands of retained messages in a second) costs one evaluation per BATCH_S, not one each
            time.sleep(max(min(BATCH_S - (time.monotonic() - evaluated), deadline - time.monotonic()), 0.0))
            with self._changed:
                seen = self.messages

    def wait_for_message(self, after: int, timeout_s: float) -> int:
        """Block until more than ``after`` messages were taken in (``messages``) or ``timeout_s`` passed;
        the count then (a live view redraws on a change, not on a timer)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.messages <= after and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return self.messages

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 5.0) -> dict[str, DeviceView]:
        """The snapshot once the retained burst is in: no retained message for ``quiet_s`` (or ``timeout_s``).

        Retained messages come right after the SUBACK with no end marker, so a gap is the only sign the burst
        is over. Only messages the broker flags as retained count: the live telemetry of a busy fleet never
        goes quiet, but it is not part of the burst."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._changed:
                quiet_until = self._last_retained + quiet_s
            now = time.monotonic()
            if now >= quiet_until or now >= deadline:
                return self.snapshot()
            # a timed wait, not a wake-up per message: 10,000 devices' burst would wake this 30,000 times
            time.sleep(min(quiet_until, deadline) - now)

    # ------------------------------------------------------------------ paho's thread
    def handle(self, topic: str, payload: bytes, retained: bool = True) -> None:
        """Take in one message (``retained``: part of the broker's retained burst); never raises on a bad
        payload (counts it, warns once per device and part)."""
        parsed = parse_topic(topic)
        if parsed is None:
            return
        device_id, part = parsed
        value: BaseModel | None = None
        if payload:  # an empty retained message clears the topic: forget that part
            try:
                value = _MODELS[part].model_validate_json(payload)
            except ValidationError as exc:
                self._refuse(
                    device_id, part, f"{exc.error_count()} validation error(s), first: {_first(exc)}", retained
                )
                return
            if getattr(value, "device_id", device_id) != device_id:
                named = getattr(value, "device_id", "")
                self._refuse(device_id, part, f"the payload names device {named!r}", retained)
                return
        now = time.time()
        with self._changed:
            view = self._devices.get(device_id) or DeviceView(device_id)
            view = _with(view, part, value, now)
            if view.status is None and view.deploy is None and view.telemetry is None:
                self._devices.pop(device_id, None)
            else:
                self._devices[device_id] = view
            self.messages += 1
            self._changed_at.pop(device_id, None)
            self._changed_at[device_id] = self.messages
            if retained:
                self._last_retained = time.monotonic()
            self._changed.notify_all()

    def _refuse(self, device_id: str, part: Part, why: str, retained: bool) -> None:
        with self._changed:
            self.bad_payloads += 1
            first = (device_id, part) not in self._warned
            self._warned.add((device_id, part))
            if retained:
                self._last_retained = time.monotonic()
        if first:
            log.warning("fleet: skipped a bad %s payload from device %s: %s", part, device_id, why)


def _with(view: DeviceView, part: Part, value: BaseModel | None, seen: float) -> DeviceView:
    """``view`` with ``part`` replaced (``value`` is None or that part's model). Built directly: it runs once
    per message, and dataclasses.replace costs 3x as much (11 us a call, a third of reading a message)."""
    status = (value if isinstance(value, DeviceStatus) else None) if part == "status" else view.status
    deploy = (value if isinstance(value, DeployState) else None) if part == "deploy" else view.deploy
    telemetry = (value if isinstance(value, Telemetry) else None) if part == "telemetry" else view.telemetry
    return DeviceView(view.device_id, status, deploy, telemetry, seen)


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(loc) for loc in error.get("loc", ())) or "payload"
    return f"{where}: {error.get('msg', '')}"
