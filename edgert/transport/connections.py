"""Connection limits under the HTTP parser: a deadline for every request head and a cap on open connections.

uvicorn's parsers wait for a request head as long as a client likes and keep every connection they
accept (its keep-alive timer only starts after a first response), so 1,100 half-open connections
(slowloris) took every file descriptor the daemon had and ``/health`` stopped answering. uvicorn's
own ``limit_concurrency`` does not help there: it counts idle connections too and answers the one
legitimate request 503. So each connection is wrapped here (uvicorn's ``http=`` takes a protocol
class; the wrapper only relays the ``asyncio.Protocol`` calls to uvicorn's own protocol):

* **head deadline**: from the moment a connection opens, or its last response ends, it has
  ``header_timeout_s`` to deliver a complete request head; bytes trickling in do not extend it,
  after that it is closed. Like nginx's ``client_header_timeout``.
* **connection cap**: at ``max_connections`` the connection that has waited longest without a
  request is closed to make room (a connection busy with a request is never cut); when every one
  is busy, the newcomer is closed.

"A request has started" is known without parsing HTTP a second time: uvicorn creates the ASGI
task inside ``data_received``, so the task inherits a context variable set around that call, and
:class:`TrackRequests` (the outermost ASGI layer) reads it. The same variable tells the routes
whether a request came over TCP (:func:`over_tcp`).

Everything this logs about hostile clients is rate-limited: a flood must not become a flood of
log lines on a device's small disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, ClassVar, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from edgert.log import LogGate, RateLimitedLog

log = logging.getLogger("edgert.http.connections")

_connection: ContextVar[GuardedConnection | None] = ContextVar("edgert_connection", default=None)


class ConnectionGuard:
    """The open connections of one server (all its listeners) and the limits on them."""

    def __init__(self, *, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        #: connections with no request in progress, the longest-waiting first (dicts keep insertion order)
        self._waiting: dict[GuardedConnection, None] = {}
        self.timed_out = 0
        self.evicted = 0
        self.refused = 0
        self._log = RateLimitedLog(log)

    def protocol(self) -> type[asyncio.Protocol]:
        """The protocol class for ``uvicorn.Config(http=...)``: uvicorn's own, inside the guard."""
        return type("GuardedHTTPProtocol", (GuardedConnection,), {"guard": self})

    # ------------------------------------------------------------ called by the connections
    def opened(self, conn: GuardedConnection) -> None:
        self.open += 1
        if self.open > self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:  # every connection is busy with a request: no room for another
                self.refused += 1
                self._note("refuse", "connection limit (%d) reached with every connection busy: refusing new ones")
                conn.close()
                return
            self.evicted += 1
            self._note("evict", "connection limit (%d) reached: closing connections that sent no request")
            victim.close()
        self.wait_for_request(conn)

    def wait_for_request(self, conn: GuardedConnection) -> None:
        """``conn`` has no request in progress: start its head deadline, at the back of the eviction order."""
        if conn.closed:
            return
        conn.cancel_deadline()
        self._waiting.pop(conn, None)
        self._waiting[conn] = None
        conn.deadline = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expire, conn)

    def request_started(self, conn: GuardedConnection) -> None:
        self._waiting.pop(conn, None)
        conn.cancel_deadline()

    def closing(self, conn: GuardedConnection) -> None:
        """Forget ``conn`` (idempotent): from the moment we close it, or it is lost, whichever is first."""
        if conn.closed:
            return
        conn.closed = True
        conn.cancel_deadline()
        self._waiting.pop(conn, None)
        self.open -= 1

    def _expire(self, conn: GuardedConnection) -> None:
        self.timed_out += 1
        self._note("timeout", "closing connections that sent no complete request head within %g s")
        conn.close()

    def _note(self, kind: str, message: str) -> None:
        self._log.warning(kind, message, self.header_timeout_s if kind == "timeout" else self.max_connections)


class GuardCollector(Collector):
    """The guard's counts in /metrics, read at scrape time."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        guard = self._guard
        yield GaugeMetricFamily("edgert_http_connections", "Open HTTP connections (socket and TCP)", guard.open)
        closed = CounterMetricFamily(
            "edgert_http_connections_closed",
            "HTTP connections the daemon closed, by reason: no complete request head in time (header_timeout), "
            "closed for a newcomer at the connection cap (evicted), or refused at the cap with every one busy",
            labels=["reason"],
        )
        closed.add_metric(["header_timeout"], guard.timed_out)
        closed.add_metric(["evicted"], guard.evicted)
        closed.add_metric(["refused"], guard.refused)
        yield closed


class GuardedConnection(asyncio.Protocol):
    """One connection: uvicorn's protocol inside, the guard's deadline around it."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, **uvicorn_args: Any) -> None:
        # uvicorn passes config, server_state, app_state, _loop; its protocol takes them as they are
        self._inner = cast(Callable[..., asyncio.Protocol], AutoHTTPProtocol)(**uvicorn_args)
        self._transport: asyncio.BaseTransport | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.closed = False
        self.tcp = False
        #: the uid of the process at the other end of a Unix socket connection (SO_PEERCRED), else None
        self.peer_uid: int | None = None
        #: requests of this connection in progress (pipelining may overlap the end of one and the start of the next)
        self.active = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self.tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        if sock is not None and sock.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
            with contextlib.suppress(OSError):
                credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, self.peer_uid, _gid = struct.unpack("3i", credentials)
        self._inner.connection_made(transport)
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        token = _connection.set(self)  # inherited by the ASGI task uvicorn creates for a complete head
        try:
            self._inner.data_received(data)
        finally:
            _connection.reset(token)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closing(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def close(self) -> None:
        self.guard.closing(self)
        if self._transport is not None:
            self._transport.close()

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def over_tcp(scope: Scope) -> bool:
    """Did this request come in over the TCP listener (not the Unix socket)?"""
    conn = _connection.get()
    if conn is not None:
        return conn.tcp
    return scope.get("server") is not None  # no guard (an in-process test): uvicorn sets no address for a Unix socket


def peer_uid() -> int | None:
    """The uid of the local process that sent the current request over the Unix socket; None over TCP or unknown."""
    conn = _connection.get()
    return conn.peer_uid if conn is not None and not conn.tcp else None


class TrackRequests:
    """Outermost ASGI layer: tells the guard when a connection's request starts and ends."""

    def __init__(self, app: ASGIApp, guard: ConnectionGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        conn = _connection.get()
        if conn is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn.active += 1
        self.guard.request_started(conn)
        try:
            await self.app(scope, receive, send)
        finally:
            conn.active -= 1
            if conn.active == 0:
                self.guard.wait_for_request(conn)


class QuietFlood(logging.Filter):
    """Lets through one record per ``interval_s`` for each of ``messages``, which a library logs per bad request.

    uvicorn logs "Invalid HTTP request received." for every malformed request: 500 of them wrote 26 kB.
    """

    def __init__(self, messages: Iterable[str], interval_s: float = 10.0) -> None:
        super().__init__()
        self._gates = {message: LogGate(interval_s) for message in messages}

    def filter(self, record: logging.LogRecord) -> bool:
        gate = self._gates.get(record.getMessage())
        if gate is None:
            return True
        held = gate.allow()
        if held is None:
            return False
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more since the last such line)", ()
        return True


#: what uvicorn logs once per malformed request (h11 and httptools alike) or per upgrade attempt
UVICORN_PER_REQUEST = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library detected. Please use \"pip install 'uvicorn[standard]'\", or install "
    "'websockets' or 'wsproto' manually.",
)


def accept_error_handler() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler that rate-limits asyncio's 'socket.accept() out of system resource'.

    At the file limit asyncio retries the accept every second and reports each failure with a traceback;
    everything else goes to the default handler unchanged.
    """
    errors = RateLimitedLog(log, 30.0)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        errors.log(logging.ERROR, "accept", "cannot accept connections: %s", context.get("exception"))

    return handle
