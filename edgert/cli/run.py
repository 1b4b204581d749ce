"""``edgert run "prompt"``: one reply, streamed to stdout (or one JSON object with ``--json``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import typer

from edgert.cli import exitcodes
from edgert.engine.base import SamplingParams
from edgert.errors import EdgertError
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.scheduler import Finished, GenerationRequest
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
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    config: Path | None = typer.Option(None, "--config", help="Settings file (else EDGERT_CONFIG / defaults)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's own log."),
) -> None:
    """Exit codes: 0 ok, 1 failure, 3 model unknown/not installed, 4 model file invalid, 6 bad config."""
    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        settings = load_settings(config_path=config)
        if verbose:
            from edgert.engine.llama import set_verbose  # noqa: PLC0415 - only needed for --verbose

            set_verbose(True)
        runtime = open_runtime(settings, model)
    except EdgertError as exc:
        raise fail(exc) from None
    try:
        sampling = runtime.defaults
        if temperature is not None or seed is not None:
            sampling = SamplingParams(
                temperature=runtime.defaults.temperature if temperature is None else temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repeat_penalty,
                seed=seed,
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tokens = runtime.completion_prompt(prompt) if raw else runtime.chat_prompt(messages)
        request = runtime.request(tokens, sampling=sampling, max_tokens=max_tokens, stop=tuple(stop))
        text, result = asyncio.run(_generate(runtime, request, stream=not json_output))
    except EdgertError as exc:
        raise fail(exc) from None
    finally:
        runtime.close()
    if json_output:
        typer.echo(json.dumps(_as_json(runtime, text, result)))
    else:
        typer.echo("")
    if result.error is not None:
        raise fail(result.error)


async def _generate(runtime: Runtime, request: GenerationRequest, *, stream: bool) -> tuple[str, Finished]:
    token_stream = runtime.scheduler.submit(request)
    parts: list[str] = []
    try:
        async for chunk in token_stream:
            parts.append(chunk.text)
            if stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    finally:
        token_stream.cancel()
    assert token_stream.result is not None
    return "".join(parts), token_stream.result


def _as_json(runtime: Runtime, text: str, result: Finished) -> dict[str, object]:
    return {
        "model": runtime.model_id,
        "text": text,
        "finish_reason": result.reason,
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
