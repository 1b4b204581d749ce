"""The OpenAI-compatible HTTP API (FastAPI): routes translate HTTP <-> api.schemas.

Bodies are parsed by hand so each failure gets its own status: malformed JSON is
a 400, a body that does not match the schema a 400 naming the field (the same
answer MQTT gives, from :mod:`.shared`), a body over the limit a 413 (checked
before it is read). Every error uses OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}``.

A client that disconnects cancels its generation: streaming responses notice when
a write fails, non-streaming ones watch the connection while they wait.

The optional TCP listener is open to anything that can reach the port, a kiosk's own
browser included, so requests that arrive over TCP (never those on the Unix socket,
which its file mode guards and where ``curl -d`` without a content type keeps working)
pass :class:`TcpPolicy` first: a Host header naming this daemon (DNS rebinding),
``Content-Type: application/json`` on every POST (a cross-site form or ``no-cors``
fetch cannot send it without a CORS preflight, which is never answered), and the
bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgert.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionRequest,
    ModelList,
    TextChoice,
    new_id,
    now,
)
from edgert.errors import (
    BadRequestError,
    ClientDisconnectedError,
    EdgertError,
    ForbiddenError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    UpdateError,
)
from edgert.log import request_id
from edgert.serving.metrics import CONTENT_TYPE, Metrics
from edgert.serving.scheduler import Finished, TextChunk, TokenStream
from edgert.serving.service import InferenceService
from edgert.transport.connections import over_tcp, peer_uid
from edgert.transport.shared import invalid_body, not_ready, serving, usage

log = logging.getLogger("edgert.http")
BodyT = TypeVar("BodyT", bound=BaseModel)


@dataclass
class ApiState:
    """What the routes need; the daemon fills ``service`` once the model is loaded."""

    metrics: Metrics
    max_body_bytes: int
    max_json_depth: int = 64
    body_timeout_s: float = 30.0
    service: InferenceService | None = None
    stopping: bool = False
    #: wired by the daemon when a registry is configured
    on_update_check: Callable[[], None] | None = None
    update_status: Callable[[], dict[str, Any]] | None = None
    #: runs `edgert update check|apply|rollback` as a round of the daemon's update loop (action, pinned version)
    update_run: Callable[[str, str | None], Awaitable[dict[str, Any]]] | None = None
    started: float = field(default_factory=time.monotonic)


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


async def _parse(request: Request, model: type[BodyT], max_depth: int, body_timeout_s: float) -> BodyT:
    try:  # the connection guard's head deadline ends where the body starts; this bounds the body
        raw = await asyncio.wait_for(request.body(), body_timeout_s)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {body_timeout_s:g} s") from None
    too_deep = BadRequestError(f"request body nests arrays/objects deeper than {max_depth} levels")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses per level: ~1,000 '[' were a 500 with a traceback
        raise too_deep from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    # Below the parser's own limit, depth still costs recursion later (validation, a JSON schema turned
    # into a grammar), so bodies deeper than any real request are refused here, by an iterative walk.
    if nesting_exceeds(data, max_depth):
        raise too_deep
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def nesting_exceeds(data: object, limit: int) -> bool:
    """Does ``data`` (parsed JSON) nest lists/dicts more than ``limit`` levels deep? No recursion."""
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


T = TypeVar("T")


async def _or_disconnect(request: Request, work: Awaitable[T], stream: TokenStream) -> T:
    """Await ``work``; if the client goes away first, cancel the generation and raise ClientDisconnectedError."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        stream.cancel()
        task.cancel()
        raise ClientDisconnectedError("the client closed the connection")
    finally:
        watcher.cancel()


def _sse(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json(exclude_none=False).encode() + b"\n\n"


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


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(title="edgert", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics

    app.add_middleware(RequestContext, metrics=metrics)

    @app.exception_handler(EdgertError)
    async def on_edgert_error(_request: Request, exc: EdgertError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientDisconnectedError)
    async def on_client_gone(_request: Request, _exc: ClientDisconnectedError) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest.
        return Response(status_code=499)

    def service() -> InferenceService:
        return serving(state)

    def _apply_headers(request: Request, body: ChatCompletionRequest | CompletionRequest) -> None:
        priority = request.headers.get("x-edgert-priority")
        if priority is not None:
            if priority not in ("interactive", "batch"):
                raise BadRequestError("X-Edgert-Priority must be 'interactive' or 'batch'", param="priority")
            body.priority = priority  # type: ignore[assignment]
        timeout = request.headers.get("x-edgert-timeout")
        if timeout is not None:
            try:
                body.timeout = float(timeout)
            except ValueError:
                raise BadRequestError("X-Edgert-Timeout must be a number of seconds", param="timeout") from None
            if not 0 < body.timeout <= 86400:
                raise BadRequestError("X-Edgert-Timeout must be within (0, 86400] seconds", param="timeout")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.monotonic() - state.started, 3)}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status = not_ready(state)
        if status is not None:
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": serving(state).model_id})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/update/check", status_code=202)
    async def update_check() -> dict[str, str]:
        if state.on_update_check is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        state.on_update_check()
        return {"status": "update check scheduled"}

    @app.get("/update/status")
    async def update_status() -> dict[str, Any]:
        if state.update_status is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        return await asyncio.to_thread(state.update_status)

    # `edgert update check|apply|rollback` while this daemon runs: it stays the only driver of the update path.
    # The reply is the round's outcome; an error also names its failure class ("reason") for the CLI's line.
    async def update_round(action: str, version: str | None = None) -> Any:
        if state.update_run is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        if action != "check" and peer_uid() not in {0, os.getuid()}:
            # what `edgert update apply|rollback` did on the state directory before: the daemon's user or root
            # only, never a kiosk app that may merely use the socket, nor anyone over TCP
            raise ForbiddenError(f"only root or the daemon's user may {action} model updates (edgert update {action})")
        try:
            return await state.update_run(action, version)
        except UpdateError as exc:
            return JSONResponse({"error": {**exc.to_dict(), "reason": exc.reason}}, status_code=exc.http_status)

    @app.get("/update/offer")
    async def update_offer() -> Any:
        return await update_round("check")

    @app.post("/update/apply")
    async def update_apply(version: str | None = None) -> Any:
        return await update_round("apply", version)

    @app.post("/update/rollback")
    async def update_rollback() -> Any:
        return await update_round("rollback")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=service().models())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        svc = service()
        svc.check_model(model_id)
        return svc.models()[0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, CompletionRequest)

    async def _complete(request: Request, kind: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        svc = service()
        body = await _parse(request, kind, state.max_json_depth, state.body_timeout_s)
        _apply_headers(request, body)
        tokens = await svc.generate(body, request_id.get())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chat = isinstance(body, ChatCompletionRequest)
        return await _respond(request, svc, tokens, body.stream, chat=chat, include_usage=include_usage)

    async def _respond(
        request: Request,
        svc: InferenceService,
        tokens: TokenStream,
        stream: bool,
        *,
        chat: bool,
        include_usage: bool,
    ) -> Response:
        ident = new_id("chatcmpl" if chat else "cmpl")
        if not stream:
            text, result = await _or_disconnect(request, tokens.collect(), tokens)
            metrics.observe_finish(result.ttft_s, result.total_s, result.completion_tokens)
            if chat:
                return JSONResponse(
                    ChatCompletion(
                        id=ident,
                        created=now(),
                        model=svc.model_id,
                        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=result.reason)],
                        usage=usage(result),
                    ).model_dump()
                )
            return JSONResponse(
                Completion(
                    id=ident,
                    created=now(),
                    model=svc.model_id,
                    choices=[TextChoice(text=text, finish_reason=result.reason)],
                    usage=usage(result),
                ).model_dump()
            )
        # Wait for the first chunk before sending headers, so an error that happens before
        # any text (deadline in the queue, engine failure) still gets its own status code.
        iterator = tokens.__aiter__()
        first = await _or_disconnect(request, _first(iterator), tokens)
        return StreamingResponse(
            _stream_events(svc, tokens, iterator, first, ident, chat=chat, include_usage=include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream_events(
        svc: InferenceService,
        tokens: TokenStream,
        iterator: AsyncIterator[TextChunk],
        first: TextChunk | None,
        ident: str,
        *,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = now()

        def chunk(text: str | None, finish: Finished | None = None, *, role: bool = False) -> bytes:
            reason = finish.reason if finish else None
            if chat:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                return _sse(
                    ChatCompletionChunk(
                        id=ident,
                        created=created,
                        model=svc.model_id,
                        choices=[ChatChunkChoice(delta=delta, finish_reason=reason)],
                    )
                )
            return _sse(
                Completion(
                    id=ident,
                    created=created,
                    model=svc.model_id,
                    choices=[TextChoice(text=text or "", finish_reason=reason)],
                )
            )

        try:
            if chat:
                yield chunk("" if first is None else first.text, role=True)
            elif first is not None:
                yield chunk(first.text)
            if first is not None:
                # The hot path: one SSE event per token, so the constant JSON around the text is
                # rendered once (by the same pydantic models) instead of once per token.
                head, tail = _split_template(chunk(_SENTINEL))
                async for item in iterator:
                    yield head + json.dumps(item.text, ensure_ascii=False).encode() + tail
            result = tokens.result
            assert result is not None
            metrics.observe_finish(result.ttft_s, result.total_s, result.completion_tokens)
            yield chunk(None if chat else "", result)
            if include_usage:
                totals = usage(result)
                if chat:
                    yield _sse(
                        ChatCompletionChunk(id=ident, created=created, model=svc.model_id, choices=[], usage=totals)
                    )
                else:
                    yield _sse(Completion(id=ident, created=created, model=svc.model_id, choices=[], usage=totals))
            yield b"data: [DONE]\n\n"
        finally:
            tokens.cancel()  # a client that went away mid-stream frees its sequence at once

    return app


_SENTINEL = "\u2063edgert-text\u2063"


def _split_template(event: bytes) -> tuple[bytes, bytes]:
    """An SSE event rendered with ``_SENTINEL`` as its text -> the bytes before and after the text."""
    head, _, tail = event.partition(json.dumps(_SENTINEL, ensure_ascii=False).encode())
    assert tail, "the sentinel must appear in the rendered event"
    return head, tail


async def _first(iterator: AsyncIterator[TextChunk]) -> TextChunk | None:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


def with_body_limit(app: FastAPI, limit: int) -> ASGIApp:
    return BodyLimit(app, limit)
