"""A fleet on one machine: N real ``edgert serve`` daemons, one mosquitto, one signed registry behind nginx.

Used by tests/integration/test_fleet_sim.py (a few devices) and benchmarks/fleet_sim.py (24). Every
device is a real daemon subprocess (tiny fixture, 1 thread, small context) with its own state dir,
socket, MQTT identity and group. The registry is update_support.Fleet's (signed with edgert.registry,
published into ``site/``); nginx serves the site under a per-device prefix ``/dev/<id>/`` so that its
access log says what every device fetched (bytes, Range, status), and throttles ``targets/``
(``limit_rate``) so a download lasts long enough to be interrupted. ``BrokerWatch`` subscribes to
``edgert/v1/#`` and keeps every device's latest status/deploy/telemetry and a count of every message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgert.api.mqtt_schemas import PREFIX
from tests.integration.daemon import DaemonProcess, start_daemon, wait_until_ready
from tests.integration.fleet_host import FleetHost
from tests.integration.mosquitto import Broker
from tests.integration.update_support import MODEL_ID, Fleet

CHAT = "/v1/chat/completions"


class BrokerWatch:
    """A wildcard subscriber on ``edgert/v1/#``: the latest JSON per (device, kind) and every message counted.

    ``messages`` holds (arrival time, device, kind, payload bytes, retained-on-subscribe) for every message;
    the retained burst a (re)subscription receives is marked, so live rates leave it out.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.lock = threading.Lock()
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.messages: list[tuple[float, str, str, int, bool]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-watch-{time.monotonic_ns()}")
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, *_args: object) -> None:
        client.subscribe(f"{PREFIX}/#", qos=1)

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        parts = message.topic.removeprefix(f"{PREFIX}/").split("/")
        if len(parts) != 2 or parts[0] == "fleet":
            return
        device_id, kind = parts
        now = time.time()
        try:
            body = json.loads(message.payload) if message.payload else None
        except ValueError:
            body = None
        with self.lock:
            self.messages.append((now, device_id, kind, len(message.payload), bool(message.retain)))
            if isinstance(body, dict):
                self.latest[(device_id, kind)] = body

    def start(self) -> BrokerWatch:
        self.client.connect("127.0.0.1", self.broker.port, keepalive=10)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def get(self, device_id: str, kind: str) -> dict[str, Any] | None:
        with self.lock:
            return self.latest.get((device_id, kind))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> float:
        """Poll ``predicate`` until it holds; the seconds it took. ``what`` explains a timeout."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not within {timeout:.0f}s: {what()}")
            time.sleep(0.1)
        return time.monotonic() - start


@dataclass
class Device:
    device_id: str
    group: str
    workdir: Path
    settings: dict[str, str]
    env: dict[str, str]
    daemon: DaemonProcess | None = None
    #: daemons started for this device (a restart after kill -9 adds one)
    starts: int = 0

    def start(self) -> None:
        settings = {f"EDGERT_{key.upper()}": value for key, value in self.settings.items()}
        self.daemon = start_daemon(self.workdir, None, wait_ready=False, env_extra={**self.env, **settings})
        self.starts += 1

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.daemon is not None
        wait_until_ready(self.daemon, timeout)

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.stop(signal.SIGKILL)

    def part_bytes(self) -> int:
        """Bytes in the device's unfinished downloads (``*.part`` under its state dir)."""
        return sum(p.stat().st_size for p in (self.workdir / "state").rglob("*.part") if p.is_file())


@dataclass
class SimFleet:
    """The whole fleet. ``start()`` brings up broker, registry host (v1 published at 100 %) and N daemons."""

    workdir: Path
    model: Path
    size: int
    rate: int | None = 150_000
    groups: tuple[str, ...] = ("lobby", "kiosk")
    #: extra device settings (EDGERT_<KEY> style keys as start_daemon takes them)
    device_settings: dict[str, str] = field(default_factory=dict)
    channel: str = "stable"
    broker: Broker = field(init=False)
    registry: Fleet = field(init=False)
    host: FleetHost = field(init=False)
    watch: BrokerWatch = field(init=False)
    devices: list[Device] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(self.workdir / "broker")
        self.registry = Fleet(self.workdir, self.model)
        self.host = FleetHost(self.registry.site, self.workdir / "nginx", rate=self.rate)
        self.watch = BrokerWatch(self.broker)

    def start(self, first_version: str = "1.0.0", *, ready_timeout: float = 600) -> float:
        """Everything up, every daemon ready and on ``first_version``; returns the daemons' start-up seconds."""
        self.broker.start()
        self.host.start()
        self.watch.start()
        self.registry.release(first_version, channel=self.channel)
        for index in range(self.size):
            self.devices.append(self._device(index))
        began = time.monotonic()
        for device in self.devices:
            device.start()
        for device in self.devices:
            device.wait_ready(ready_timeout)
        self.wait_online(ready_timeout)
        self.wait_current(self.devices, first_version, ready_timeout)
        return time.monotonic() - began

    def _device(self, index: int) -> Device:
        device_id = f"dev-{index:02d}"
        group = self.groups[index % len(self.groups)]
        workdir = self.workdir / "devices" / device_id
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        settings = {
            "engine__n_threads": "1",
            "engine__n_threads_batch": "1",
            "engine__n_ctx": "512",
            "engine__n_parallel": "2",
            "engine__n_batch": "128",
            "engine__swa_full": "false",
            "update__registry_url": self.host.url_for(device_id),
            "update__trusted_root": str(self.registry.trusted_root),
            "update__device_id": device_id,
            "update__channel": self.channel,
            "update__disk_reserve_bytes": "0",
            "update__health_check_timeout_s": "120",
            "update__check_interval_s": "60",
            "update__check_jitter_s": "10",
            "update__retry_initial_s": "5",
            **self.broker.daemon_settings(mqtt__device_id=device_id, mqtt__group=group),
            **self.device_settings,
        }
        # no --model: the daemon serves its committed release, else this fallback until the first round commits
        return Device(device_id, group, workdir, settings, {"EDGERT_MODEL": str(self.model)})

    def stop(self) -> None:
        for device in self.devices:
            if device.daemon is not None:
                device.daemon.stop()
        self.watch.stop()
        self.host.stop()
        self.broker.stop()

    # ------------------------------------------------------------------ what the broker says
    def deploy(self, device: Device) -> dict[str, Any]:
        return self.watch.get(device.device_id, "deploy") or {}

    def online(self, device: Device) -> bool:
        status = self.watch.get(device.device_id, "status") or {}
        return status.get("state") == "online"

    def wait_online(self, timeout: float) -> float:
        return self.watch.wait(
            lambda: all(self.online(d) for d in self.devices),
            timeout,
            lambda: "offline: " + ", ".join(d.device_id for d in self.devices if not self.online(d)),
        )

    def on(self, device: Device, version: str) -> bool:
        return self.deploy(device).get("current") == f"{MODEL_ID}@{version}"

    def wait_current(self, devices: list[Device], version: str, timeout: float) -> float:
        return self.watch.wait(
            lambda: all(self.on(d, version) for d in devices),
            timeout,
            lambda: (
                "not on "
                + version
                + ": "
                + ", ".join(f"{d.device_id}={self.deploy(d)}" for d in devices if not self.on(d, version))
            ),
        )

    def rejected(self, device: Device, version: str) -> bool:
        """The device tried ``version`` and refused it: blocklisted (rolled back or failed its health check)."""
        return f"{MODEL_ID}@{version}" in self.deploy(device).get("blocklist", [])

    # ------------------------------------------------------------------ operator actions (today's signed path)
    def nudge(self, devices: list[Device]) -> None:
        """The ``update_check`` command on each device's cmd topic, as an operator identity sends it."""
        for device in devices:
            self.watch.client.publish(f"{PREFIX}/{device.device_id}/cmd", json.dumps({"action": "update_check"}), 1)

    def add(self, version: str, model: Path) -> None:
        """``edgert registry add`` + ``publish``: the release is on the host, offered to no device yet."""
        self.registry.registry.add(model, model_id=MODEL_ID, version=version)
        self.registry.registry.publish(out=self.registry.site)

    def rollout(self, version: str, *args: str) -> OperatorCommand:
        """``edgert fleet rollout`` of ``version`` on this fleet's channel, started as a real subprocess."""
        cmd = [
            *("fleet", "rollout", MODEL_ID, version, "--channel", self.channel),
            *("--registry-dir", str(self.registry.registry.directory), "--out", str(self.registry.site)),
            *("--broker", f"127.0.0.1:{self.broker.port}", *args),
        ]
        return OperatorCommand(cmd, self.workdir)

    def fleet_status(self) -> CommandRun:
        """``edgert fleet status --json`` on this fleet's broker, as the operator runs it."""
        args = ["fleet", "status", "--json", "--broker", f"127.0.0.1:{self.broker.port}"]
        return OperatorCommand(args, self.workdir).finish(120)

    def promote(self, version: str, rollout: int) -> None:
        """``edgert registry promote --rollout`` + publish: a re-signed channel pointer on the host."""
        self.registry.registry.promote(MODEL_ID, version, channel=self.channel, rollout=rollout)
        self.registry.registry.publish(out=self.registry.site)

    def kill_mid_download(self, devices: list[Device], size: int, timeout: float) -> dict[str, int]:
        """kill -9 each of ``devices`` as soon as its download of a ``size``-byte file is under way (its
        ``.part`` holds some but not all of it); the bytes each kept."""
        kept: dict[str, int] = {}

        def kill_the_downloading() -> bool:
            for device in devices:
                if device.device_id not in kept and 0 < device.part_bytes() < size:
                    device.kill()
                    kept[device.device_id] = device.part_bytes()
            return len(kept) == len(devices)

        self.watch.wait(kill_the_downloading, timeout, lambda: f"killed mid-download only {kept}")
        return kept

    def bytes_by_device(self, version: str, since: float = 0.0) -> dict[str, int]:
        """Model-file bytes nginx sent each device for ``version`` (after unix time ``since``)."""
        counts = {d.device_id: 0 for d in self.devices}
        needle = f"/targets/models/{MODEL_ID}/{version}/"
        for fetch in self.host.fetches():
            if fetch.at >= since and fetch.path.startswith(needle) and fetch.path.endswith(".gguf"):
                counts[fetch.device_id] = counts.get(fetch.device_id, 0) + fetch.body_bytes
        return counts


class Load:
    """Streamed chat requests over the socket of a few devices, in threads, until stopped; failures kept."""

    def __init__(self, devices: list[Device], max_tokens: int = 16) -> None:
        self.devices, self.max_tokens = devices, max_tokens
        self.stop_event = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(d,), daemon=True) for d in devices]

    def _run(self, device: Device) -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": self.max_tokens, "stream": True}
        while not self.stop_event.is_set():
            assert device.daemon is not None
            try:
                with device.daemon.client(timeout=120) as client, client.stream("POST", CHAT, json=body) as reply:
                    lines = [line for line in reply.iter_lines() if line]
                if reply.status_code != 200 or not lines or lines[-1] != "data: [DONE]":
                    self.failures.append(f"{device.device_id}: {reply.status_code} {lines[-2:]}")
                else:
                    self.ok += 1
            except httpx.HTTPError as exc:
                self.failures.append(f"{device.device_id}: {type(exc).__name__}: {exc}")

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(180)


@dataclass(frozen=True)
class CommandRun:
    returncode: int
    #: (seconds since the start, line) for every line the controller printed
    lines: list[tuple[float, str]]
    wall_s: float
    #: user + system CPU seconds of the controller process (its rusage)
    cpu_s: float
    max_rss_bytes: int

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


class OperatorCommand:
    """An operator's ``edgert ...`` command (``fleet rollout``, ``fleet status``) as a subprocess: its lines
    timestamped as they arrive, its rusage at the end."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgert", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def wait_line(self, needle: str, timeout: float) -> float:
        """Seconds since the start at which a line containing ``needle`` was printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if needle in line:
                    return at
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"the command printed no line with {needle!r}:\n" + "\n".join(t for _, t in self.lines))

    def finish(self, timeout: float) -> CommandRun:
        self.reader.join(timeout)
        if self.reader.is_alive():
            self.proc.kill()
            self.reader.join(10)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        wall = time.monotonic() - self.started
        cpu = usage.ru_utime + usage.ru_stime
        return CommandRun(self.proc.returncode, list(self.lines), wall, cpu, usage.ru_maxrss * 1024)
