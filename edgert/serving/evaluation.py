"""Run an evaluation set (:mod:`edgert.evalset`) through a loaded model: the engine half of the gate.

Each case becomes the chat request a client would send (:func:`edgert.evalset.request.chat_request`:
greedy, its own max_tokens under a cap), is prepared as the socket API prepares it (template, tool
grammar) and runs on the runtime's own scheduler; its reply is parsed as the API parses it (content,
tool calls) and checked. Cases run one after another under one deadline for the whole set: a case still
running when it passes is cancelled, and it and every case after it fail as not run. The device runs
this on the candidate loaded beside the serving model (:class:`edgert.model_switch.RuntimeModelSwitch`),
``edgert eval`` on the model it opens.
"""

from __future__ import annotations

import asyncio
import time

from edgert.errors import EdgertError
from edgert.evalset.cases import EvalSet
from edgert.evalset.checks import CalledTool, CaseResult, EvalReport, Reply, check_reply, not_run, report
from edgert.evalset.request import chat_request
from edgert.serving.chat_output import ChatOutput
from edgert.serving.runtime import Runtime
from edgert.serving.scheduler import TokenStream
from edgert.serving.service import Limits, chat_output, prepare_request


async def run_eval_set(
    runtime: Runtime, eval_set: EvalSet, *, threshold: float, budget_s: float, max_tokens_cap: int | None = None
) -> EvalReport:
    """Every case of ``eval_set`` on ``runtime``, within ``budget_s`` seconds in all."""
    started = time.monotonic()
    spent = f"the evaluation's time limit of {budget_s:g} s was spent"
    results: list[CaseResult] = []
    for case in eval_set.cases:
        remaining = budget_s - (time.monotonic() - started)
        if remaining <= 0:
            results.append(not_run(case, spent))
            continue
        # the request's own deadline is the set's: one cut off in the queue or mid-reply is a case not run
        limits = Limits(default_timeout_s=remaining, max_tokens_cap=max_tokens_cap or runtime.default_max_tokens)
        try:
            body = chat_request(case, max_tokens_cap)
            request, plan = await asyncio.to_thread(prepare_request, runtime, body, limits, f"eval-{case.id}")
        except EdgertError as exc:
            results.append(not_run(case, f"the model refused the request: {exc.message}"))
            continue
        stream = runtime.scheduler.submit(request)
        try:
            reply = await asyncio.wait_for(_reply(stream, chat_output(plan) or ChatOutput()), remaining)
        except TimeoutError:
            stream.cancel()
            results.append(not_run(case, spent))
            continue
        if reply.error is not None and time.monotonic() - started >= budget_s:
            results.append(not_run(case, spent))
            continue
        results.append(check_reply(case, reply))
    return report(results, threshold)


async def _reply(stream: TokenStream, output: ChatOutput) -> Reply:
    """The whole reply, parsed as the API parses a non-streamed chat answer."""
    error: str | None = None
    try:
        async for chunk in stream:
            output.feed(chunk.text)
    except EdgertError as exc:  # failed before any text (a deadline in the queue, the engine)
        error = exc.message
    output.finish()
    result = stream.result
    if result is not None and result.error is not None:
        error = result.error.message
    calls = tuple(CalledTool(call.function.name, call.function.arguments) for call in output.tool_calls or ())
    return Reply(
        content=output.content or "",
        tool_calls=calls,
        latency_s=result.total_s if result is not None else 0.0,
        completion_tokens=result.completion_tokens if result is not None else 0,
        error=error,
    )
