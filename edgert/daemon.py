"""Composition root of ``edgert serve``: settings -> objects, lifecycle, signals, sd_notify.

Order of events:

1. bind the Unix socket (0660; refuse if a live daemon owns the path) — before
   anything slow, so a second daemon fails at once;
2. start answering HTTP (``/health`` works, ``/ready`` and ``/v1/*`` say 503 loading);
3. load the model on a worker thread, run one probe generation, then mark ready
   and send ``READY=1`` to systemd;
4. while serving, ping the systemd watchdog only if the engine thread is making
   progress, so a wedged engine gets the service restarted; while a model switch
   has unloaded the engine, only while the switch's current step is within its own
   time limit (a long load on a memory-tight device is not a wedge);
5. on SIGTERM/SIGINT: ``STOPPING=1``, refuse new requests (503), let in-flight
   ones finish up to ``serve.drain_timeout_s``, stop the engine, remove the
   socket, exit 0. A second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import sdnotify
import uvicorn
from starlette.types import ASGIApp

from edgert import __version__
from edgert.errors import EdgertError
from edgert.identity import ReleaseIdentity
from edgert.log import redact
from edgert.media.inputs import MediaLimits
from edgert.serving.host import ModelHost, probe
from edgert.serving.metrics import Metrics
from edgert.serving.runtime import open_runtime
from edgert.serving.service import InferenceService, Limits
from edgert.settings import Settings
from edgert.transport.connections import (
    UVICORN_PER_REQUEST,
    ConnectionGuard,
    GuardCollector,
    QuietFlood,
    TrackRequests,
    accept_error_handler,
)
from edgert.transport.http import ApiState, BodyLimit, TcpGuard, TcpPolicy, create_app, is_loopback
from edgert.transport.uds import bind_unix_socket

if TYPE_CHECKING:  # imported when configured: a kiosk without MQTT or updates never loads them
    from edgert.transport.mqtt import MqttTransport
    from edgert.update_service import UpdateService

log = logging.getLogger("edgert.daemon")


class _Server(uvicorn.Server):
    """uvicorn, minus its habit of re-raising the caught signal after shutdown:
    edgert decides process behaviour (drain, then exit 0)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._handle, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _handle(self, sig: int) -> None:
        if self.should_exit:
            log.warning("second %s: cutting the drain short", signal.Signals(sig).name)
            self.force_exit = True
            return
        log.info("%s: draining in-flight requests, then exiting", signal.Signals(sig).name)
        self.should_exit = True
        self._on_signal()


class Daemon:
    def __init__(self, settings: Settings, model: str | None) -> None:
        self.settings = settings
        self.model = model
        self.notifier = sdnotify.SystemdNotifier()
        #: the one owner of loaded models: everything else asks it (issue 14)
        self.host = ModelHost()
        self.state = ApiState(
            metrics=Metrics(self.host.stats, lambda: self.host.served),
            max_body_bytes=settings.serve.max_body_bytes,
            max_json_depth=settings.serve.max_json_depth,
            body_timeout_s=settings.serve.body_timeout_s,
        )
        self.exit_code = 0
        self.updates: UpdateService | None = None
        if settings.update.registry_url:
            from edgert.update_service import UpdateService  # noqa: PLC0415 - only when configured

            self.updates = UpdateService(settings, self.state.metrics.registry)
            self.state.on_update_check = self.updates.request_check
            self.state.update_status = self.updates.status
            self.state.update_run = self.updates.run

    def _notify(self, message: str) -> None:
        if self.settings.notify_socket:
            self.notifier.notify(message)

    def _on_signal(self) -> None:
        self.state.stopping = True
        self._notify("STOPPING=1")

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        serve = self.settings.serve
        bound = bind_unix_socket(serve.socket, mode=serve.socket_mode, group=serve.socket_group)
        sockets = [bound.sock]
        if serve.tcp_host:
            sockets.append(_tcp_socket(serve.tcp_host, serve.tcp_port))
            if not is_loopback(serve.tcp_host):
                log.warning(
                    "the TCP listener %s:%d is reachable from the network%s",
                    serve.tcp_host,
                    serve.tcp_port,
                    ""
                    if serve.tcp_auth_token
                    else "; anyone who reaches it can use the model (set serve.tcp_auth_token, or bind 127.0.0.1)",
                )
        _check_file_limit(serve.max_connections)
        log.info(
            "edgert %s listening on %s%s",
            __version__,
            serve.socket,
            f" and tcp {serve.tcp_host}:{serve.tcp_port}" if serve.tcp_host else " (no TCP listener)",
            extra={"fields": {"settings": redact(self.settings.model_dump(mode="json"))}},
        )
        try:
            asyncio.run(self._main(sockets))
        finally:
            bound.remove()
        return self.exit_code

    async def _main(self, sockets: list[socket.socket]) -> None:
        serve = self.settings.serve
        asyncio.get_running_loop().set_exception_handler(accept_error_handler())
        logging.getLogger("uvicorn.error").addFilter(QuietFlood(UVICORN_PER_REQUEST))
        guard = ConnectionGuard(max_connections=serve.max_connections, header_timeout_s=serve.header_timeout_s)
        self.state.metrics.registry.register(GuardCollector(guard))
        app: ASGIApp = BodyLimit(create_app(self.state), serve.max_body_bytes)
        if serve.tcp_host:
            app = TcpGuard(app, TcpPolicy.for_bind(serve.tcp_host, serve.tcp_allowed_hosts, serve.tcp_auth_token))
        _freeze_startup_objects()
        config = uvicorn.Config(
            TrackRequests(app, guard),
            http=guard.protocol(),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(serve.drain_timeout_s),
            timeout_keep_alive=5,
        )
        server = _Server(config, self._on_signal)
        serving = asyncio.create_task(server.serve(sockets=sockets))
        watchdog = asyncio.create_task(self._watchdog())
        mqtt: MqttTransport | None = None
        updates: asyncio.Task[None] | None = None
        try:
            await self._load_and_probe(server)
            mqtt = await self._start_mqtt()
            updates = self._start_updates(mqtt)
            await serving
        finally:
            watchdog.cancel()
            if updates is not None:
                updates.cancel()  # a round already running in its daemon thread cannot keep us alive (crash-safe)
            if self.updates is not None:
                self.updates.stop()  # and a download in it ends between two reads, its .part kept
            self.state.stopping = True
            if mqtt is not None:  # drain its requests, publish offline status, disconnect
                await mqtt.stop(self.settings.serve.drain_timeout_s)
            await asyncio.to_thread(self.host.close_all)
            log.info("stopped")

    def _start_updates(self, mqtt: MqttTransport | None) -> asyncio.Task[None] | None:
        """Signed model updates in the background: on start, every interval (+ jitter), and when nudged."""
        service = self.state.service
        if self.updates is None or service is None or not service.ready:
            return None
        if mqtt is None:
            return self.updates.start(self.host, None, "")
        return self.updates.start(self.host, mqtt.publish_deploy, mqtt.device_id)

    def _initial_model(self) -> tuple[str | None, ReleaseIdentity | None]:
        """An explicit --model wins; else the release the update path committed (and who it is); else
        settings.model."""
        if self.model is not None or self.updates is None:
            return self.model, None
        return self.updates.initial_model() or (None, None)

    async def _load_and_probe(self, server: _Server) -> None:
        try:
            model, release = self._initial_model()
            runtime = await asyncio.to_thread(open_runtime, self.settings, model)
        except EdgertError as exc:
            log.error("cannot load the model: %s", exc.message)  # noqa: TRY400 - one clear line, no traceback
            self.exit_code = 1
            server.should_exit = True
            return
        self.host.serve(runtime, release)
        service = InferenceService(
            self.host,
            Limits(
                default_timeout_s=self.settings.serve.request_timeout_s,
                max_tokens_cap=self.settings.serve.max_tokens_cap,
                prompt_length_factor=self.settings.serve.prompt_length_factor,
                media=MediaLimits.from_settings(self.settings.serve),
            ),
        )
        self.state.service = service
        started = time.perf_counter()
        try:
            if self.settings.engine.warm_prefixes:
                cached = await runtime.warm_prefixes(self.settings.engine.warm_prefixes)
                log.info("prefix cache warm: %d entries", cached)
            await probe(runtime, self.settings.serve.probe_prompt, self.settings.engine.load_timeout_s)
        except EdgertError as exc:
            log.error("not ready: %s", exc.message)  # noqa: TRY400
            self.exit_code = 1
            server.should_exit = True
            return
        service.ready = True
        self._notify("READY=1")
        log.info(
            "ready: %s",
            service.model_id,
            extra={
                "fields": {
                    "load_s": round(runtime.load_seconds, 3),
                    "probe_s": round(time.perf_counter() - started, 3),
                    "slots": runtime.scheduler.config.n_slots,
                    "n_ctx": runtime.scheduler.config.n_ctx,
                }
            },
        )

    async def _start_mqtt(self) -> MqttTransport | None:
        """MQTT serving, once the model has answered its probe: requests the broker kept
        for this device while it was away then meet a ready engine, not a 'loading' refusal."""
        service = self.state.service
        if not self.settings.mqtt.broker or service is None or not service.ready:
            return None
        from edgert.transport.mqtt import MqttTransport  # noqa: PLC0415 - only when configured

        transport = MqttTransport(
            self.settings, self.state, on_update_check=self.updates.request_check if self.updates else None
        )
        await transport.start()
        return transport

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog only while the engine thread (or a model switch's step) shows progress."""
        usec = self.settings.watchdog_usec
        if not usec or not self.settings.notify_socket:
            return
        interval = usec / 1_000_000
        while True:
            await asyncio.sleep(interval / 3)
            stall = self.host.stall(time.monotonic(), interval)  # None while loading: the load has its own timeout
            if stall is None:
                self._notify("WATCHDOG=1")
            else:
                log.error("%s; withholding the watchdog ping", stall)


def _freeze_startup_objects() -> None:
    """Move everything built so far (modules, classes, the app's routes and schemas) out of the
    cyclic GC's reach; runtimes are created after this, so a switch can still collect the one it
    replaces. Why and the measurements: docs/adr/0002-gc-freeze-startup-objects.md."""
    gc.freeze()


def _check_file_limit(max_connections: int) -> None:
    """Warn when serve.max_connections could run the process out of file descriptors.

    The soft limit is not raised here: paho-mqtt's network loop uses select(), which fails on a
    descriptor above 1023, so the unit pins LimitNOFILE=1024 and the connection cap stays below it.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = 128  # the model, logs, MQTT, downloads, and a burst of accepts before the cap closes them
    if soft != resource.RLIM_INFINITY and max_connections + reserve > soft:
        log.warning(
            "serve.max_connections = %d leaves too few of the %d file descriptors this process may open; "
            "lower it below %d",
            max_connections,
            soft,
            soft - reserve,
        )


def _tcp_socket(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), reuse_port=False)
    sock.setblocking(False)
    return sock


def serve(settings: Settings, model: str | None) -> int:
    return Daemon(settings, model).run()
