"""The evaluation set format: one JSON object per line, each a case with its checks.

::

    {"id": "greet", "prompt": "Say hello.", "max_tokens": 16, "checks": [{"contains": "hello"}]}
    {"id": "stock", "messages": [{"role": "user", "content": "Is SKU 12 in stock?"}],
     "tools": [{"type": "function", "function": {"name": "check_stock", "parameters": {...}}}],
     "tool_choice": "required", "checks": [{"tool_call": {"name": "check_stock", "arguments": {"sku": "12"}}}]}

A case has an ``id`` (unique in the set), either ``prompt`` (one user message) or ``messages`` (an OpenAI
chat history), optionally ``tools`` and ``tool_choice`` (as in a chat request), ``max_tokens`` (default
:data:`DEFAULT_MAX_TOKENS`, at most :data:`MAX_CASE_TOKENS`) and one or more ``checks``, each an object
with exactly one of the keys :data:`CHECK_KINDS`. Blank lines are skipped. Every defect is refused with
the file, the line and the field at fault; nothing here does I/O but reading the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import jsonschema

from edgert.errors import EvalSetError

#: A signed companion of every release that carries one: small enough to read whole and run on a device.
MAX_EVAL_BYTES: Final = 1024 * 1024
MAX_CASES: Final = 256
MAX_CHECKS: Final = 16
DEFAULT_MAX_TOKENS: Final = 64
MAX_CASE_TOKENS: Final = 1024
CASE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
CheckKind = Literal["contains", "regex", "json_schema", "tool_call", "max_latency_s"]
CHECK_KINDS: Final[tuple[str, ...]] = get_args(CheckKind)
_CASE_FIELDS: Final = frozenset({"id", "prompt", "messages", "tools", "tool_choice", "max_tokens", "checks"})
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
#: the longest a max_latency_s check may allow (a case slower than this fails the set's time limit anyway)
_MAX_LATENCY_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class ToolCallCheck:
    """The reply calls ``name``; with ``arguments``, each given argument has exactly that value."""

    name: str
    arguments: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Check:
    kind: CheckKind
    #: contains: str; regex: the compiled pattern; json_schema: the schema; tool_call: ToolCallCheck;
    #: max_latency_s: float
    value: Any

    def describe(self) -> str:
        """One short phrase for tables and rollback reasons: ``contains 'hello'``."""
        if self.kind == "regex":
            return f"regex '{self.value.pattern}'"  # as written in the file: repr would double its backslashes
        if self.kind == "tool_call":
            return f"tool_call {self.value.name!r}"
        if self.kind == "json_schema":
            return "json_schema"
        if self.kind == "max_latency_s":
            return f"max_latency_s {self.value:g}"
        return f"contains {self.value!r}"


@dataclass(frozen=True, slots=True)
class EvalCase:
    id: str
    #: the line of the file it came from, for errors found later (a request the engine refuses)
    line: int
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None
    tool_choice: str | dict[str, Any] | None
    max_tokens: int
    checks: tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class EvalSet:
    #: where it came from (a file name), for messages
    source: str
    cases: tuple[EvalCase, ...]


def load_eval_set(path: Path) -> EvalSet:
    """Read and parse ``path``; EvalSetError (naming the file and line) when it is not a valid set."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_EVAL_BYTES + 1)
    except OSError as exc:
        raise EvalSetError(f"{path}: {exc.strerror or exc}") from None
    return parse_eval_set(data, str(path))


def parse_eval_set(data: bytes, source: str) -> EvalSet:
    """Parse a whole evaluation set; every case and check is validated here, once."""
    if len(data) > MAX_EVAL_BYTES:
        raise EvalSetError(f"{source}: larger than {MAX_EVAL_BYTES} bytes; an evaluation set must stay small")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    cases: list[EvalCase] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        case = _case(_json_object(line, where), number, where)
        if case.id in seen:
            raise EvalSetError(f"{where}: id {case.id!r} is already used on line {seen[case.id]}")
        seen[case.id] = number
        cases.append(case)
        if len(cases) > MAX_CASES:
            raise EvalSetError(f"{where}: more than {MAX_CASES} cases")
    if not cases:
        raise EvalSetError(f"{source}: no cases (one JSON object per line)")
    return EvalSet(source, tuple(cases))


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise EvalSetError(f"{where}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EvalSetError(f"{where}: a case is a JSON object, not {type(value).__name__}")
    return value


def _case(raw: dict[str, Any], number: int, where: str) -> EvalCase:
    unknown = sorted(set(raw) - _CASE_FIELDS)
    if unknown:
        raise EvalSetError(f"{where}: unknown field {unknown[0]!r} (a case has {', '.join(sorted(_CASE_FIELDS))})")
    case_id = raw.get("id")
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.fullmatch(case_id):
        raise EvalSetError(f"{where}: id must be 1-64 letters, digits and ._:- (not starting with one of ._:-)")
    where = f"{where} (case {case_id!r})"
    max_tokens = raw.get("max_tokens", DEFAULT_MAX_TOKENS)
    if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_CASE_TOKENS:
        raise EvalSetError(f"{where}: max_tokens must be an integer 1..{MAX_CASE_TOKENS}")
    messages = _messages(raw, where)
    tools, checks = _tools(raw.get("tools"), where), _checks(raw.get("checks"), where)
    declared = {tool["function"]["name"] for tool in tools or ()}
    for check in checks:
        if check.kind == "tool_call" and check.value.name not in declared:
            raise EvalSetError(f"{where}: {check.describe()} checks for a function the case's tools do not declare")
    return EvalCase(
        id=case_id,
        line=number,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(raw.get("tool_choice"), where),
        max_tokens=max_tokens,
        checks=checks,
    )


def _messages(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], ...]:
    if ("prompt" in raw) == ("messages" in raw):
        raise EvalSetError(f"{where}: give either prompt (a string) or messages (a chat history), not both or neither")
    if "prompt" in raw:
        prompt = raw["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise EvalSetError(f"{where}: prompt must be a non-empty string")
        return ({"role": "user", "content": prompt},)
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise EvalSetError(f"{where}: messages must be a non-empty list of chat messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise EvalSetError(f"{where}: messages[{index}] needs a role ({', '.join(sorted(_ROLES))})")
    return tuple(messages)


def _tools(tools: object, where: str) -> tuple[dict[str, Any], ...] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise EvalSetError(f"{where}: tools must be a non-empty list of OpenAI function tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise EvalSetError(f"{where}: tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
    return tuple(tools)


def _tool_choice(choice: object, where: str) -> str | dict[str, Any] | None:
    if choice is None or choice in ("auto", "required", "none"):
        return choice
    if isinstance(choice, dict):
        return choice
    raise EvalSetError(f"{where}: tool_choice must be auto, required, none or a named function object")


def _checks(checks: object, where: str) -> tuple[Check, ...]:
    if not isinstance(checks, list) or not 1 <= len(checks) <= MAX_CHECKS:
        raise EvalSetError(f"{where}: checks must be a list of 1..{MAX_CHECKS} checks")
    return tuple(_check(check, f"{where}: checks[{index}]") for index, check in enumerate(checks))


def _check(raw: object, where: str) -> Check:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise EvalSetError(f"{where}: a check is an object with exactly one of {', '.join(CHECK_KINDS)}")
    ((kind, value),) = raw.items()
    if kind == "contains":
        if not isinstance(value, str) or not value:
            raise EvalSetError(f"{where}: contains needs a non-empty string")
        return Check("contains", value)
    if kind == "regex":
        return Check("regex", _regex(value, where))
    if kind == "json_schema":
        return Check("json_schema", _schema(value, where))
    if kind == "tool_call":
        return Check("tool_call", _tool_call(value, where))
    if kind == "max_latency_s":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= _MAX_LATENCY_S:
            raise EvalSetError(f"{where}: max_latency_s needs a number of seconds in (0, {_MAX_LATENCY_S:g}]")
        return Check("max_latency_s", float(value))
    raise EvalSetError(f"{where}: unknown check {kind!r} (one of {', '.join(CHECK_KINDS)})")


def _regex(value: object, where: str) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise EvalSetError(f"{where}: regex needs a non-empty pattern string")
    try:
        return re.compile(value)
    except re.error as exc:
        raise EvalSetError(f"{where}: regex {value!r} does not compile ({exc})") from None


def _schema(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EvalSetError(f"{where}: json_schema needs a JSON Schema object")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise EvalSetError(f"{where}: json_schema is not a valid JSON Schema ({exc.message})") from None
    return value


def _tool_call(value: object, where: str) -> ToolCallCheck:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or set(value) - {"name", "arguments"}:
        raise EvalSetError(f"{where}: tool_call needs {{'name': ..., 'arguments': {{...}}?}}")
    arguments = value.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise EvalSetError(f"{where}: tool_call arguments must be an object (the values the call must carry)")
    return ToolCallCheck(value["name"], arguments)
