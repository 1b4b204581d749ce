"""A case as the chat request the engine runs: the API's own validation, greedy sampling, bounded tokens.

Apart from :mod:`~edgert.evalset.cases` because it imports the API schemas, which the update path may not:
the runner (:mod:`edgert.serving.evaluation`), ``edgert eval`` and ``edgert registry add --eval`` use it,
so a case the engine would refuse is refused when the set is loaded, with its line.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edgert.api.schemas import ChatCompletionRequest
from edgert.errors import BadRequestError, EvalSetError
from edgert.evalset.cases import EvalCase, EvalSet


def chat_request(case: EvalCase, max_tokens_cap: int | None = None) -> ChatCompletionRequest:
    """The case's request: temperature 0 (greedy, so a set scores the same on every run) and its max_tokens,
    lowered to ``max_tokens_cap`` when one is given. EvalSetError names the case's line when it is invalid."""
    limit = case.max_tokens if max_tokens_cap is None else min(case.max_tokens, max_tokens_cap)
    body: dict[str, Any] = {"messages": list(case.messages), "max_tokens": limit, "temperature": 0.0, "seed": 0}
    if case.tools is not None:
        body["tools"] = list(case.tools)
    if case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise EvalSetError(f"line {case.line} (case {case.id!r}): {where}: {first['msg']}") from None
    except BadRequestError as exc:
        raise EvalSetError(f"line {case.line} (case {case.id!r}): {exc.message}") from None


def check_requests(eval_set: EvalSet) -> None:
    """Every case makes a valid chat request (EvalSetError naming the file and line of the first that does not)."""
    for case in eval_set.cases:
        try:
            chat_request(case)
        except EvalSetError as exc:
            raise EvalSetError(f"{eval_set.source}:{exc.message.removeprefix('line ')}") from None
