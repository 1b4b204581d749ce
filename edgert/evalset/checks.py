"""Checking one reply against its case, and scoring a set: pure functions on plain data.

A case passes when every one of its checks passes (the first that fails is the one reported); the score
is passed / total and a set meets its threshold when ``score >= threshold``. The reply's text is the
chat answer's content (thoughts excluded; empty when the reply is only tool calls).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import jsonschema

from edgert.evalset.cases import Check, EvalCase

#: a score this close under the threshold meets it (7/10 against 0.7 is not refused by a float's last bit)
_EPSILON: Final = 1e-9
#: how much of a reply a failure quotes
_QUOTE_CHARS: Final = 60


@dataclass(frozen=True, slots=True)
class CalledTool:
    name: str
    #: the arguments as the model wrote them (JSON text)
    arguments: str


@dataclass(frozen=True, slots=True)
class Reply:
    """What the engine answered to one case."""

    content: str
    tool_calls: tuple[CalledTool, ...]
    #: seconds from submitting the request to its last token
    latency_s: float
    completion_tokens: int = 0
    #: the generation failed (the engine's one-line error); every check then fails
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CaseResult:
    case_id: str
    passed: bool
    #: the first check that failed (``contains 'hello'``), or what stopped the case (``generation``)
    failed: str | None = None
    #: why it failed, quoting the reply
    why: str | None = None
    latency_s: float | None = None
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EvalReport:
    results: tuple[CaseResult, ...]
    threshold: float

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.results)

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.score + _EPSILON >= self.threshold

    def summary(self) -> str:
        """``evaluation 2/5 below threshold 0.8: case 'greet' failed contains 'hello'`` (the rollback reason)."""
        head = f"evaluation {self.passed}/{self.total}"
        if self.ok:
            return f"{head} meets threshold {self.threshold:g}"
        failures = [result for result in self.results if not result.passed]
        first = failures[0]
        more = f" (and {len(failures) - 1} more failed cases)" if len(failures) > 1 else ""
        return f"{head} below threshold {self.threshold:g}: case {first.case_id!r} failed {first.failed}{more}"


def check_reply(case: EvalCase, reply: Reply) -> CaseResult:
    """The case's verdict on ``reply``: passed, or the first failing check and why."""
    if reply.error is not None:
        return CaseResult(case.id, False, "generation", reply.error, reply.latency_s, reply.completion_tokens)
    for check in case.checks:
        why = _failure(check, reply)
        if why is not None:
            return CaseResult(case.id, False, check.describe(), why, reply.latency_s, reply.completion_tokens)
    return CaseResult(case.id, True, latency_s=reply.latency_s, completion_tokens=reply.completion_tokens)


def not_run(case: EvalCase, why: str) -> CaseResult:
    """A case that never got its answer (the set's time limit was spent, the request was refused)."""
    return CaseResult(case.id, False, "not run", why)


def _failure(check: Check, reply: Reply) -> str | None:
    """Why ``reply`` fails ``check``; None when it passes."""
    if check.kind == "contains":
        return None if check.value in reply.content else f"the reply was {_quote(reply.content)}"
    if check.kind == "regex":
        return None if check.value.search(reply.content) else f"no match in {_quote(reply.content)}"
    if check.kind == "json_schema":
        return _schema_failure(check.value, reply.content)
    if check.kind == "tool_call":
        return _tool_failure(check.value.name, check.value.arguments, reply.tool_calls)
    limit: float = check.value
    return None if reply.latency_s <= limit else f"took {reply.latency_s:.2f} s"


def _schema_failure(schema: dict[str, Any], content: str) -> str | None:
    text = _unfenced(content)
    try:
        document = json.loads(text)
    except ValueError:
        return f"the reply is not JSON: {_quote(content)}"
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(document))
    if error is None:
        return None
    at = "/".join(str(part) for part in error.absolute_path) or "the document"
    return f"{at}: {error.message}"


def _unfenced(content: str) -> str:
    """A JSON answer in a Markdown code fence (```json ... ```), as chat models often write it, is its JSON."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        return text[text.index("\n") + 1 : -3].strip()
    return text


def _tool_failure(name: str, arguments: dict[str, Any] | None, calls: tuple[CalledTool, ...]) -> str | None:
    named = [call for call in calls if call.name == name]
    if not named:
        made = ", ".join(call.name for call in calls) or "none"
        return f"no call to {name} (calls: {made})"
    if arguments is None:
        return None
    for call in named:
        try:
            given = json.loads(call.arguments)
        except ValueError:
            continue
        if isinstance(given, dict) and all(key in given and given[key] == want for key, want in arguments.items()):
            return None
    return f"{name} was called with {_quote(named[0].arguments)}, not {json.dumps(arguments, sort_keys=True)}"


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "...")


def report(results: list[CaseResult] | tuple[CaseResult, ...], threshold: float) -> EvalReport:
    return EvalReport(tuple(results), threshold)
