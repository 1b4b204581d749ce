"""OpenAI's generation routes: ``/v1/chat/completions`` and ``/v1/completions``, plain or streamed (SSE).

Bodies are parsed by hand so each failure gets its own status: malformed JSON is a 400, a body
that does not match the schema a 400 naming the field (the same answer MQTT gives, from
:mod:`edgert.transport.shared`), a body over the limit a 413 (checked before it is read, by
``transport.http.BodyLimit``).

A client that disconnects cancels its generation: streaming responses notice when a write fails,
non-streaming ones watch the connection while they wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

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
    FinishReason,
    TextChoice,
    new_id,
    now,
)
from edgert.chat.events import ContentDelta, OutputEvent
from edgert.errors import BadRequestError, ClientDisconnectedError, RequestTimeoutError
from edgert.log import request_id
from edgert.serving.chat_output import ChatOutput, chat_delta
from edgert.serving.metrics import Metrics
from edgert.serving.scheduler import TextChunk, TokenStream
from edgert.serving.service import InferenceService
from edgert.transport.shared import ApiState, invalid_body, serving, usage

BodyT = TypeVar("BodyT", bound=BaseModel)


def router(state: ApiState) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, ChatCompletionRequest)

    @routes.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, CompletionRequest)

    @routes.post("/apply-template")
    async def apply_template(request: Request) -> Response:
        """llama-server's route of the same name: the prompt a chat request renders to, nothing generated."""
        svc = serving(state)
        body = await _parse(request, ChatCompletionRequest, state.max_json_depth, state.body_timeout_s)
        return JSONResponse({"prompt": await svc.render_chat(body)})

    async def _complete(request: Request, kind: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        svc = serving(state)
        body = await _parse(request, kind, state.max_json_depth, state.body_timeout_s)
        _apply_headers(request, body)
        tokens = await svc.generate(body, request_id.get())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chat = isinstance(body, ChatCompletionRequest)
        return await _respond(request, state.metrics, svc, tokens, body.stream, chat=chat, include_usage=include_usage)

    return routes


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


async def _parse(request: Request, model: type[BodyT], max_depth: int, body_timeout_s: float) -> BodyT:
    try:  # the connection guard's head deadline ends where the body starts; this bounds the body
        raw = await asyncio.wait_for(request.body(), body_timeout_s)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {body_timeout_s:g} s") from None
    too_deep = BadRequestError(f"request body nests arrays/objects deeper than {max_depth} levels")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # bad JSON, bad UTF-8, and integers longer than Python converts (as over MQTT)
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


async def _respond(
    request: Request,
    metrics: Metrics,
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
            output = tokens.chat or ChatOutput()
            output.feed(text)
            output.finish()
            message = AssistantMessage(
                content=output.content, reasoning_content=output.reasoning, tool_calls=output.tool_calls
            )
            return JSONResponse(
                ChatCompletion(
                    id=ident,
                    created=now(),
                    model=svc.model_id,
                    choices=[ChatChoice(message=message, finish_reason=output.finish_reason(result.reason))],
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
        _stream_events(metrics, svc, tokens, iterator, first, ident, chat=chat, include_usage=include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream_events(
    metrics: Metrics,
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

    def chunk(text: str | None, finish: FinishReason | None = None, *, role: bool = False) -> bytes:
        if chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            return _sse(
                ChatCompletionChunk(
                    id=ident,
                    created=created,
                    model=svc.model_id,
                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                )
            )
        return _sse(
            Completion(
                id=ident,
                created=created,
                model=svc.model_id,
                choices=[TextChoice(text=text or "", finish_reason=finish)],
            )
        )

    def event_chunks(event: OutputEvent, output: ChatOutput) -> Iterator[bytes]:
        delta = chat_delta(event, output)
        if delta is not None:
            choice = ChatChunkChoice(delta=delta)
            yield _sse(ChatCompletionChunk(id=ident, created=created, model=svc.model_id, choices=[choice]))

    # The hot path: one SSE event per token, so the constant JSON around the text is rendered once
    # (by the same pydantic models) instead of once per token.
    head, tail = _split_template(chunk(_SENTINEL))
    output = tokens.chat or ChatOutput()

    def text_events(text: str) -> Iterator[bytes]:
        if not chat:
            yield head + json.dumps(text, ensure_ascii=False).encode() + tail
            return
        for event in output.feed(text):
            if isinstance(event, ContentDelta):
                yield head + json.dumps(event.text, ensure_ascii=False).encode() + tail
            else:
                yield from event_chunks(event, output)

    try:
        if chat:
            yield chunk("", role=True)
        if first is not None:
            for event in text_events(first.text):
                yield event
            async for item in iterator:
                for event in text_events(item.text):
                    yield event
        for tail_event in output.finish() if chat else ():
            for data in event_chunks(tail_event, output):
                yield data
        result = tokens.result
        assert result is not None
        metrics.observe_finish(result.ttft_s, result.total_s, result.completion_tokens)
        yield chunk(None if chat else "", output.finish_reason(result.reason))
        if include_usage:
            totals = usage(result)
            if chat:
                yield _sse(ChatCompletionChunk(id=ident, created=created, model=svc.model_id, choices=[], usage=totals))
            else:
                yield _sse(Completion(id=ident, created=created, model=svc.model_id, choices=[], usage=totals))
        yield b"data: [DONE]\n\n"
    finally:
        tokens.cancel()  # a client that went away mid-stream frees its sequence at once


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
