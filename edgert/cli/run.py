"""``edgert run "prompt"``: one reply, streamed to stdout (or one JSON object with ``--json``).

``--image`` / ``--audio`` put media before the prompt in the user message, as content parts, so they
pass the same decoding and limits as over the socket (the model needs its projector: ``--mmproj`` /
``engine.mmproj`` or the catalog model's installed one).

The prompt goes through the same request preparation as the socket API (chat plan, template,
sampling defaults), so ``--tools`` behaves as a request with ``tools`` would: a model without tool
support is refused with the same message. Tool calls print as one JSON line each, once complete;
thinking (``--think``) goes to stderr so stdout stays the answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from edgert.api.schemas import ChatCompletionRequest, CompletionRequest
from edgert.chat.events import ContentDelta, ReasoningDelta, ToolCallEnd
from edgert.cli import exitcodes
from edgert.errors import BadRequestError, EdgertError
from edgert.media.inputs import MediaLimits
from edgert.serving.chat_output import ChatOutput
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.scheduler import Finished, GenerationRequest
from edgert.serving.service import Limits, chat_output, prepare_request
from edgert.settings import load_settings


def fail(error: EdgertError) -> typer.Exit:
    """Print the one-line error and return the Exit to raise."""
    typer.echo(f"error: {error.message}", err=True)
    return typer.Exit(exitcodes.for_error(error))


def run(
    prompt: str = typer.Argument(..., help="The user message (or raw text with --raw). '-' reads stdin."),
    model: str | None = typer.Option(None, "--model", "-m", help="Catalog id or .gguf path (default: settings)."),
    system: str | None = typer.Option(None, "--system", "-s", help="A system message."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float | None = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed for reproducible output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    tools: Path | None = typer.Option(
        None,
        "--tools",
        help="JSON file with OpenAI tools (a list, or an object with 'tools'); calls print as JSON lines.",
    ),
    tool_choice: str = typer.Option("auto", "--tool-choice", help="auto, required, none, or a function name."),
    think: bool | None = typer.Option(
        None, "--think/--no-think", help="Thinking mode (Gemma 4); thoughts go to stderr."
    ),
    images: list[Path] = typer.Option([], "--image", help="An image (JPEG, PNG, WebP) before the prompt (repeatable)."),
    audios: list[Path] = typer.Option([], "--audio", help="An audio clip (WAV, MP3) before the prompt (repeatable)."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="Multimodal projector .gguf (as edgert serve --mmproj)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    config: Path | None = typer.Option(None, "--config", help="Settings file (else EDGERT_CONFIG / defaults)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's own log."),
) -> None:
    """Exit codes: 0 ok, 1 failure (a bad --tools file, tools on a model without tool support...), 3 model
    unknown/not installed, 4 model file invalid, 6 bad config."""
    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        content = _content(prompt, images, audios)
    except EdgertError as exc:
        raise fail(exc) from None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    fields: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stop": stop or None}
    try:
        body: ChatCompletionRequest | CompletionRequest
        if raw:
            body = _validated(CompletionRequest, {"prompt": prompt, **fields})
        else:
            declared = _read_tools(tools) if tools is not None else None
            choice: object = tool_choice if tool_choice in ("auto", "required", "none") else _named(tool_choice)
            chat = {
                "messages": messages,
                "tools": declared,
                "tool_choice": choice if declared else None,
                "think": think,
            }
            body = _validated(ChatCompletionRequest, {**chat, **fields})
        settings = load_settings(config_path=config)
        if mmproj is not None:
            engine = settings.engine.model_copy(update={"mmproj": mmproj.expanduser(), "multimodal": True})
            settings = settings.model_copy(update={"engine": engine})
        if verbose:
            from edgert.engine.llama import set_verbose  # noqa: PLC0415 - only needed for --verbose

            set_verbose(True)
        runtime = open_runtime(settings, model)
    except EdgertError as exc:
        raise fail(exc) from None
    try:
        limits = Limits(
            default_timeout_s=86400.0,
            max_tokens_cap=settings.serve.max_tokens_cap,
            media=MediaLimits.from_settings(settings.serve),
        )
        request, plan = prepare_request(runtime, body, limits)
        output = chat_output(plan) or ChatOutput()
        result = asyncio.run(_generate(runtime, request, output, stream=not json_output))
    except EdgertError as exc:
        raise fail(exc) from None
    finally:
        runtime.close()
    if json_output:
        typer.echo(json.dumps(_as_json(runtime, output, result)))
    else:
        typer.echo("")
    if result.error is not None:
        raise fail(result.error)


def _validated(kind: type[ChatCompletionRequest | CompletionRequest], data: dict[str, Any]) -> Any:
    try:
        return kind.model_validate({key: value for key, value in data.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadRequestError(f"{where}: {first['msg']}", param=where) from None


def _content(prompt: str, images: list[Path], audios: list[Path]) -> str | list[dict[str, Any]]:
    """The user message: the prompt alone, or media parts (images, then clips) followed by the prompt."""
    if not images and not audios:
        return prompt
    parts: list[dict[str, Any]] = []
    for path in images:
        kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}.get(path.suffix.lower(), "jpeg")
        url = f"data:image/{kind};base64,{_base64(path)}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    for path in audios:
        fmt = "mp3" if path.suffix.lower() == ".mp3" else "wav"
        parts.append({"type": "input_audio", "input_audio": {"data": _base64(path), "format": fmt}})
    return [*parts, {"type": "text", "text": prompt}]


def _base64(path: Path) -> str:
    try:
        return base64.b64encode(path.read_bytes()).decode()
    except OSError as exc:
        raise BadRequestError(f"{path}: {exc.strerror or exc}", param="messages") from None


def _read_tools(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"--tools {path}: {exc}", param="tools") from None
    declared = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(declared, list):
        raise BadRequestError(f"--tools {path}: expected a list of tools or an object with 'tools'", param="tools")
    return declared


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


async def _generate(runtime: Runtime, request: GenerationRequest, output: ChatOutput, *, stream: bool) -> Finished:
    token_stream = runtime.scheduler.submit(request)
    try:
        async for chunk in token_stream:
            for event in output.feed(chunk.text):
                if stream:
                    _print(event, output)
        for event in output.finish():
            if stream:
                _print(event, output)
    finally:
        token_stream.cancel()
    assert token_stream.result is not None
    return token_stream.result


def _print(event: object, output: ChatOutput) -> None:
    if isinstance(event, ContentDelta):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif isinstance(event, ReasoningDelta):
        sys.stderr.write(event.text)
        sys.stderr.flush()
    elif isinstance(event, ToolCallEnd):
        calls = output.tool_calls or []
        call = calls[event.index]
        line = {"type": "tool_call", "id": call.id, "name": call.function.name}
        sys.stdout.write(json.dumps({**line, "arguments": json.loads(call.function.arguments)}) + "\n")
        sys.stdout.flush()


def _as_json(runtime: Runtime, output: ChatOutput, result: Finished) -> dict[str, object]:
    reply: dict[str, object] = {
        "model": runtime.model_id,
        "text": output.content or "",
        "finish_reason": output.finish_reason(result.reason),
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "timings": {
            "load_s": round(runtime.load_seconds, 4),
            "ttft_s": None if result.ttft_s is None else round(result.ttft_s, 4),
            "total_s": round(result.total_s, 4),
        },
    }
    if output.reasoning is not None:
        reply["reasoning_content"] = output.reasoning
    if output.tool_calls is not None:
        reply["tool_calls"] = [call.model_dump() for call in output.tool_calls]
    return reply
