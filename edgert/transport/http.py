"""The OpenAI-compatible HTTP API (FastAPI): the app, its middleware and its error answers.

:func:`create_app` composes the routers of :mod:`edgert.transport.routes` (generation, models,
health/readiness/metrics, the update driver) with what every request passes through: the request
context (id, access log, metrics), the body limit (413 before a body is read) and, on the optional
TCP listener, :class:`TcpPolicy`. Every error uses OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with the status its class in
:mod:`edgert.errors` names.

The optional TCP listener is open to anything that can reach the port, a kiosk's own
browser included, so requests that arrive over TCP (never those on the Unix socket,
which its file mode guards and where ``curl -d`` without a content type keeps working)
pass :class:`TcpPolicy` first: a Host header naming this daemon (DNS rebinding),
``Content-Type: application/json`` on every POST (a cross-site form or ``no-cors``
fetch cannot send it without a CORS preflight, which is never answered), and the
bearer token when one is configured.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgert.errors import (
    BadRequestError,
    ClientDisconnectedError,
    EdgertError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from edgert.log import request_id
from edgert.serving.metrics import Metrics
from edgert.transport.connections import over_tcp
from edgert.transport.routes import completions, health, models, update
from edgert.transport.shared import ApiState

__all__ = ["ApiState", "BodyLimit", "RequestContext", "TcpGuard", "TcpPolicy", "create_app", "is_loopback"]

log = logging.getLogger("edgert.http")


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(title="edgert", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestContext, metrics=state.metrics)
    app.add_exception_handler(EdgertError, _on_edgert_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnectedError, _on_client_gone)  # type: ignore[arg-type]
    for routes in (completions, models, health, update):
        app.include_router(routes.router(state))
    return app


async def _on_edgert_error(_request: Request, exc: EdgertError) -> JSONResponse:
    return error_response(exc)


async def _on_client_gone(_request: Request, _exc: ClientDisconnectedError) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest.
    return Response(status_code=499)


def error_response(error: EdgertError) -> JSONResponse:
    headers = {}
    if isinstance(error, OverloadedError):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    if isinstance(error, UnauthorizedError):
        headers["WWW-Authenticate"] = 'Bearer realm="edgert"'
    return JSONResponse({"error": error.to_dict()}, status_code=error.http_status, headers=headers)


class BodyLimit:
    """Refuse bodies over the limit with 413 before reading them into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = PayloadTooLargeError(f"request body exceeds {self.limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


@dataclass(frozen=True, slots=True)
class TcpPolicy:
    """What a request over the TCP listener must carry (see the module docstring)."""

    #: Host header names (lower case, no port) that mean this daemon
    allowed_hosts: frozenset[str]
    #: a wildcard bind answers on every address of the machine: any IP literal is fine (rebinding needs a name)
    any_ip_literal: bool
    token: SecretStr | None = None

    @classmethod
    def for_bind(cls, bind_host: str, extra_hosts: Iterable[str] = (), token: SecretStr | None = None) -> TcpPolicy:
        host = _host_name(bind_host)
        names = {host, *(_host_name(name) for name in extra_hosts)}
        wildcard = host in ("0.0.0.0", "::", "")  # noqa: S104 - naming the wildcard, not binding it
        if wildcard or is_loopback(host):  # a page can only make a browser send "localhost" from this machine
            names |= {"localhost", "127.0.0.1", "::1"}
        return cls(frozenset(names), any_ip_literal=wildcard, token=token)

    def check(self, scope: Scope) -> EdgertError | None:
        headers = {key: value.decode("latin-1") for key, value in scope["headers"]}
        host = _host_name(headers.get(b"host", ""))
        if host not in self.allowed_hosts and not (self.any_ip_literal and _is_ip(host)):
            return BadRequestError(
                f"Host {host!r} does not name this daemon (serve.tcp_allowed_hosts lists extra names)", param="host"
            )
        if self.token is not None and scope["path"] != "/health":
            scheme, _, given = headers.get(b"authorization", "").partition(" ")
            expected = self.token.get_secret_value().encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                return UnauthorizedError("this listener needs 'Authorization: Bearer <serve.tcp_auth_token>'")
        if scope["method"] == "POST":
            media = headers.get(b"content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                return UnsupportedMediaTypeError(
                    f"POST over TCP needs Content-Type: application/json, not {media or 'none'}", param="content-type"
                )
        return None


def is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_name(value: str) -> str:
    """A Host header or bind address without its port and brackets: ``[::1]:8080`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


class TcpGuard:
    """Applies a :class:`TcpPolicy` to requests that came over TCP; the Unix socket passes untouched."""

    def __init__(self, app: ASGIApp, policy: TcpPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and over_tcp(scope):
            error = self.policy.check(scope)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestContext:
    """Request id, metrics and the access log as a pure ASGI middleware.

    (Starlette's ``BaseHTTPMiddleware`` -- ``@app.middleware("http")`` -- relays every body chunk of a
    streaming response through an extra task and memory stream: per-token cost on SSE.)
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")
                break
        rid = rid or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            if path.startswith("/v1/"):
                log.info(
                    "%s %s %d",
                    scope["method"],
                    path,
                    status,
                    extra={"fields": {"request_id": rid, "ms": round((time.perf_counter() - started) * 1000, 1)}},
                )


def with_body_limit(app: FastAPI, limit: int) -> ASGIApp:
    return BodyLimit(app, limit)
