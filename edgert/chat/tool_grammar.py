"""A GBNF grammar for Gemma 4 tool calls, derived from each declared function's JSON Schema.

llama-server's Gemma 4 grammar accepts any argument dict; this one lets a constrained call name only
a declared function and write only arguments that validate against that function's schema. The text
follows the official template's ``format_argument(..., escape_keys=False)`` written compactly:
``<|tool_call>call:NAME{key:value,...}<tool_call|>`` with bare keys in sorted order (the template
renders history arguments with ``dictsort``, so constrained calls look like those the model has seen),
strings ``<|"|>raw text<|"|>``, JSON numbers, ``true``/``false``/``null`` and ``[a,b]``.

Honoured: ``type`` (string, integer, number, boolean, null, object, array, and lists of them),
``nullable: true``, ``enum``, ``const``, ``anyOf``, ``oneOf``, ``allOf`` of one schema, local ``$ref``
(``#/$defs/...``, ``#/definitions/...``, any pointer into the schema; recursion allowed), ``properties``,
``required``, ``additionalProperties`` (an object without ``properties`` is any dict unless it says
``false``; with ``properties``, extra keys only when it says ``true`` or gives a schema, as llama.cpp's
json-schema-to-grammar does), ``items``, ``minItems``/``maxItems`` and ``minLength``/``maxLength``.

``minimum``/``maximum`` (and their exclusive forms) where the range stays small, see
:mod:`edgert.chat.number_range`: small integer ranges, integer-bounded number ranges, sign bounds.
Not enforced (accepted, and the grammar is the same as without them): the other keywords that only
narrow values within a shape -- :data:`NOT_ENFORCED` (``pattern``, ``format``, ``multipleOf``, wide or
fractional bounds, ...). ``oneOf`` is enforced as ``anyOf``: a value matching two branches is possible
when they overlap.
Refused with a :class:`~edgert.errors.BadRequestError` naming the tool: a non-object parameters schema,
a ``$ref`` that goes nowhere or is not local, a reference cycle that consumes no text, keywords that
change the shape in ways the grammar cannot follow (``not``, ``if``, ``patternProperties``, tuple
``items``, ...), values the Gemma syntax cannot carry (a key with ``:``, a string holding ``<|"|>``),
and bounds above :data:`MAX_BOUND` (llama.cpp expands ``x{m,n}`` into n rules and silently drops
bounds above 2000). A schema whose only values are infinite (a required key holding its own type) is
not detected: the call runs to ``max_tokens``.

Over 400 lines: one schema walk plus the few GBNF writers (literal, automaton) only it uses.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgert.chat.number_range import range_rule
from edgert.errors import BadRequestError

STRING_DELIMITER = '<|"|>'
#: Keywords accepted but not enforced: they narrow values, never the shape the grammar draws.
NOT_ENFORCED = frozenset(
    {"pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
     "uniqueItems", "minProperties", "maxProperties", "contentEncoding", "contentMediaType"}
)  # fmt: skip
#: Keywords that annotate and never constrain.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "example", "$comment", "$schema", "$id", "$defs",
     "definitions", "deprecated", "readOnly", "writeOnly", "propertyOrdering"}
)  # fmt: skip
_HANDLED = frozenset(
    {"type", "nullable", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
     "additionalProperties", "items", "minItems", "maxItems", "minLength", "maxLength"}
)  # fmt: skip
#: Largest minItems/maxItems/minLength/maxLength honoured; larger is refused rather than silently widened.
MAX_BOUND = 1000
_MAX_DEPTH = 48  # nesting of schemas inside one another; deeper is an attack, not a tool
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's names, plus '.'; the call text ends them at '{'
_KEY_CLASS = r'[^:,{}\[\]<>|"\x00-\x20]'  # keys of free-form dicts: nothing structural, no special token

# Values anywhere a schema allows anything: the Gemma argument syntax itself.
_PRIMITIVES: dict[str, str] = {
    "g-string": '"<|\\"|>" g-str "<|\\"|>"',
    "g-int": '"-"? ("0" | [1-9] [0-9]{0,15})',
    "g-number": '"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?',  # < 1e100: finite
    "g-bool": '"true" | "false"',
    "g-null": '"null"',
    "g-key": f"{_KEY_CLASS}{{1,64}}",
    "g-kv": 'g-key ":" g-value',
    "g-dict": '"{" (g-kv ("," g-kv)*)? "}"',
    "g-array": '"[" (g-value ("," g-value)*)? "]"',
    "g-value": "g-string | g-number | g-bool | g-null | g-dict | g-array",
}
_SCALARS = {"integer": "g-int", "number": "g-number", "boolean": "g-bool", "null": "g-null"}
_PRIMITIVE_DEPS = {"g-string": ("g-str",), "g-kv": ("g-key", "g-value"), "g-dict": ("g-kv",),
                   "g-array": ("g-value",),
                   "g-value": ("g-string", "g-number", "g-bool", "g-null", "g-dict", "g-array")}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A declared function: its name and the JSON Schema of its arguments (``{}``: no arguments)."""

    name: str
    parameters: Mapping[str, Any]


def tool_call_grammar(
    tools: Sequence[ToolSpec], *, min_calls: int = 1, max_calls: int | None = 1, thought: bool = False
) -> str:
    """GBNF whose ``root`` is ``[thought] call{min_calls,max_calls}``, each call one of ``tools``.

    ``thought``: an optional leading ``<|channel>thought\\n...<channel|>`` (for thinking mode, where
    the model thinks before it calls). The grammar starts with ``<|tool_call>`` otherwise, so it can be
    triggered lazily on that token.
    """
    if not tools or min_calls < 0 or (max_calls is not None and max_calls < max(min_calls, 1)):
        raise ValueError(f"no tools or bad call bounds ({len(tools)}, {min_calls}, {max_calls})")
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequestError("two tools share one name", param="tools")
    rules: dict[str, str] = {}
    primitives: set[str] = set()
    choices = []
    for tool in tools:
        tool_rules, used = _tool_rules(tool.name, _schema_key(tool.name, tool.parameters))
        rules.update(tool_rules)
        primitives |= used
        choices.append(f"{_literal(tool.name)} {_prefix(tool.name)}")
    upper = "" if max_calls is None else str(max_calls)
    head = ["root ::= " + ("thought? " if thought else "") + f"call{{{min_calls},{upper}}}"]
    head.append(f"call ::= {_literal('<|tool_call>call:')} ({' | '.join(choices)}) {_literal('<tool_call|>')}")
    if thought:
        head.append(f"thought ::= {_literal('<|channel>thought' + chr(10))} thought-text {_literal('<channel|>')}")
        rules.update(_excluding("thought-text", ["<channel|>"]))
    for name in sorted(_with_deps(primitives)):
        rules.update(_excluding("g-str", [STRING_DELIMITER]) if name == "g-str" else {name: _PRIMITIVES[name]})
    return "\n".join([*head, *(f"{name} ::= {body}" for name, body in rules.items())]) + "\n"


def check_parameters_schema(name: str, schema: Any) -> None:
    """Raise BadRequestError naming the tool unless the grammar can honour ``schema`` for tool ``name``."""
    _tool_rules(name, _schema_key(name, schema))


def _schema_key(name: str, schema: Any) -> str:
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise BadRequestError(
            f"tool name {name!r}: give a name of 1 to 64 letters, digits, '_', '-' or '.'", param="tools"
        )
    try:
        return json.dumps(schema, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise BadRequestError(f"tool {name!r}: parameters are not a JSON schema ({exc})", param="tools") from exc


@functools.lru_cache(maxsize=256)
def _tool_rules(name: str, schema_json: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """The rules drawing tool ``name``'s arguments object (rule ``_prefix(name)``), and the primitives used."""
    schema = json.loads(schema_json)
    converter = _Converter(name, schema)
    if schema == {}:
        converter.rules[converter.prefix] = '"{}"'
    elif not isinstance(schema, dict) or not (
        schema.get("type") == "object" or ("type" not in schema and "properties" in schema)
    ):
        raise BadRequestError(f"tool {name!r}: parameters must be an object schema", param="tools")
    else:
        converter.rules[converter.prefix] = converter.expression(schema, "#", 0, frozenset())
    return tuple(converter.rules.items()), frozenset(converter.primitives)


def _prefix(name: str) -> str:
    # GBNF rule names allow only letters, digits and '-': escape the rest injectively as -XX (hex).
    return "t-" + "".join(c if c.isascii() and c.isalnum() else f"-{ord(c):02x}" for c in name)


class _Converter:
    """Turns one tool's schema into GBNF rules, each value a rule named ``<prefix>-<n>``."""

    def __init__(self, name: str, root: Any) -> None:
        self.tool, self.root, self.prefix = name, root, _prefix(name)
        self.rules: dict[str, str] = {}
        self.primitives: set[str] = set()
        self._refs: dict[str, str] = {}

    def refuse(self, path: str, why: str) -> BadRequestError:
        return BadRequestError(f"tool {self.tool!r}: parameters at {path}: {why}", param="tools")

    def add(self, body: str) -> str:
        name = f"{self.prefix}-{len(self.rules)}"
        self.rules[name] = body
        return name

    def primitive(self, name: str) -> str:
        self.primitives.add(name)
        return name

    def expression(self, schema: Any, path: str, depth: int, head: frozenset[str]) -> str:
        """GBNF for values valid under ``schema``; ``head``: $refs entered since the last character."""
        if depth > _MAX_DEPTH:
            raise self.refuse(path, f"nested deeper than {_MAX_DEPTH} levels")
        if schema is True or schema == {}:
            return self.primitive("g-value")
        if not isinstance(schema, dict):
            raise self.refuse(path, "a schema must be an object (or true)")
        unknown = sorted(k for k in schema if k not in _HANDLED | NOT_ENFORCED | _ANNOTATIONS)
        if unknown:
            raise self.refuse(path, f"{', '.join(unknown)} cannot be enforced by the tool-call grammar")
        alternatives = self._alternatives(schema, path, depth, head)
        if schema.get("nullable") is True:
            alternatives.append(self.primitive("g-null"))
        return alternatives[0] if len(alternatives) == 1 else self.add(" | ".join(dict.fromkeys(alternatives)))

    def _alternatives(self, schema: dict[str, Any], path: str, depth: int, head: frozenset[str]) -> list[str]:
        combinators = [k for k in ("$ref", "anyOf", "oneOf", "allOf") if k in schema]
        if combinators:
            shape = [k for k in schema if k in _HANDLED and k != "nullable" and k not in combinators]
            if len(combinators) > 1 or shape:
                raise self.refuse(path, f"{', '.join(combinators + shape)} together cannot be enforced")
            return [self._combinator(combinators[0], schema[combinators[0]], path, depth, head)]
        if "const" in schema or "enum" in schema:
            return [self._enum(schema, path)]
        kinds = self._kinds(schema.get("type", _implied_type(schema)), path)
        if kinds is None:
            return [self.primitive("g-value")]
        return [self._typed(kind, schema, path, depth) for kind in kinds]

    def _kinds(self, types: Any, path: str) -> list[str] | None:
        kinds = [types] if isinstance(types, str) else types
        if kinds is not None and (not isinstance(kinds, list) or not kinds):
            raise self.refuse(path, "type must be a name or a non-empty list of names")
        for kind in kinds or []:
            if kind not in ("string", "array", "object", *_SCALARS):
                raise self.refuse(path, f"unknown type {kind!r}")
        return kinds

    def _typed(self, kind: str, schema: dict[str, Any], path: str, depth: int) -> str:
        if kind == "string":
            return self.string(schema, path)
        if kind == "array":
            return self.array(schema, path, depth)
        if kind == "object":
            return self.object(schema, path, depth)
        if kind in ("integer", "number"):
            try:
                bounded = range_rule(kind, schema)
            except ValueError as exc:
                raise self.refuse(path, str(exc)) from None
            if bounded is not None:
                return self.add(bounded)
        return self.primitive(_SCALARS[kind])

    def _combinator(self, keyword: str, value: Any, path: str, depth: int, head: frozenset[str]) -> str:
        if keyword == "$ref":
            return self._ref(value, path, depth, head)
        if not isinstance(value, list) or not value or (keyword == "allOf" and len(value) != 1):
            raise self.refuse(path, f"{keyword} must be a non-empty list" + (" of one schema" * (keyword == "allOf")))
        branches = [self.expression(s, f"{path}/{keyword}/{i}", depth + 1, head) for i, s in enumerate(value)]
        return branches[0] if len(branches) == 1 else self.add(" | ".join(dict.fromkeys(branches)))

    def _ref(self, ref: Any, path: str, depth: int, head: frozenset[str]) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.refuse(path, f"$ref {ref!r} is not local (#/$defs/...)")
        if ref in head:
            raise self.refuse(path, f"$ref {ref!r} refers to itself without any text in between")
        if ref in self._refs:
            return self._refs[ref]
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise self.refuse(path, f"$ref {ref!r} goes nowhere")
        name = self._refs[ref] = f"{self.prefix}-ref{len(self._refs)}"
        self.rules[name] = ""  # reserved now, so a recursive reference inside finds it
        self.rules[name] = self.expression(target, ref, depth + 1, head | {ref})
        return name

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values or ("const" in schema and "enum" in schema):
            raise self.refuse(path, "give enum (a non-empty list) or const")
        kinds = self._kinds(schema.get("type"), path)
        kept = [v for v in values if kinds is None or (v is None and schema.get("nullable")) or _of_kind(v, kinds)]
        if not kept:
            raise self.refuse(path, "no value satisfies both enum/const and type")
        return self.add(" | ".join(dict.fromkeys(_literal(self._gemma_text(v, path)) for v in kept)))

    def _gemma_text(self, value: Any, path: str) -> str:
        """``value`` as the template's format_argument(escape_keys=False) writes it, compactly."""
        if isinstance(value, str):
            if STRING_DELIMITER in value:
                raise self.refuse(path, f"a string cannot contain {STRING_DELIMITER}")
            return STRING_DELIMITER + value + STRING_DELIMITER
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise self.refuse(path, "numbers must be finite")
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ",".join(self._gemma_text(v, path) for v in value) + "]"
        for key in value:
            self.check_key(key, path)
        return "{" + ",".join(f"{k}:{self._gemma_text(value[k], path)}" for k in sorted(value)) + "}"

    def check_key(self, key: str, path: str) -> None:
        if not _key_ok(key):
            raise self.refuse(path, f"key {key!r}: Gemma's call syntax cannot carry it (empty, or has :,{{}}[])")

    def string(self, schema: dict[str, Any], path: str) -> str:
        low, high = self._bound(schema, "minLength", path) or 0, self._bound(schema, "maxLength", path)
        if high is not None and high < low:
            raise self.refuse(path, "maxLength is below minLength")
        if low == 0 and high is None:
            return self.primitive("g-string")
        if high is None:
            self.primitives.add("g-str")  # the unbounded tail past minLength
        delimiter = _literal(STRING_DELIMITER)
        return self.add(f"{delimiter} {self._counted(low, high)} {delimiter}")

    def _counted(self, low: int, high: int | None) -> str:
        """String content of ``low``..``high`` characters: the g-str automaton unrolled with a counter."""
        automaton = _automaton([STRING_DELIMITER])
        last = high if high is not None else low
        base = self.add("")
        for i in range(last, -1, -1):
            for state, moves in enumerate(automaton):
                if i == last and high is None:
                    body = _state_name("g-str", state)
                else:
                    alternatives = [""] if i >= low else []
                    if i < last:
                        alternatives += [f"{cls} {base}-{i + 1}-{to}" for cls, to in moves]
                    body = _choice(alternatives)
                self.rules[f"{base}-{i}-{state}"] = body
        self.rules[base] = f"{base}-0-0"
        return base

    def _bound(self, schema: dict[str, Any], keyword: str, path: str) -> int | None:
        value = schema.get(keyword)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise self.refuse(path, f"{keyword} must be a non-negative integer")
        if value is not None and value > MAX_BOUND:
            raise self.refuse(path, f"{keyword} above {MAX_BOUND} is not supported")
        return value

    def array(self, schema: dict[str, Any], path: str, depth: int) -> str:
        low, high = self._bound(schema, "minItems", path) or 0, self._bound(schema, "maxItems", path)
        if high is not None and high < low:
            raise self.refuse(path, "maxItems is below minItems")
        items = schema.get("items", True)
        if items is False or high == 0:
            if low > 0:
                raise self.refuse(path, "no array satisfies items: false with minItems")
            return self.add('"[]"')
        if isinstance(items, list):
            raise self.refuse(path, "tuple items (a list of schemas) cannot be enforced")
        item = self.expression(items, f"{path}/items", depth + 1, frozenset())
        more = "" if high == 1 else f'("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        return self.add(f'"[" {item} {more} "]"' if low > 0 else f'"[" ({item} {more})? "]"')

    def object(self, schema: dict[str, Any], path: str, depth: int) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", "properties" not in schema)
        if (
            not isinstance(properties, dict)
            or not isinstance(required, list)
            or not all(isinstance(key, str) for key in required)
        ):
            raise self.refuse(path, "properties must be an object and required a list of names")
        declared = {k: v for k, v in properties.items() if v is not False}
        for key in required:
            if key not in declared:
                if key in properties or extra is False:
                    raise self.refuse(path, f"required key {key!r} is not allowed")
                declared[key] = extra
        if extra is True and not declared:
            return self.primitive("g-dict")
        members = []
        for key in sorted(declared):
            self.check_key(key, path)
            value = self.expression(declared[key], f"{path}/properties/{key}", depth + 1, frozenset())
            members.append((f"{_literal(key + ':')} {value}", key in required))
        if extra is not False:
            value = self.expression(extra, f"{path}/additionalProperties", depth + 1, frozenset())
            key_rule = self.add(_not_keys(sorted(declared))) if declared else self.primitive("g-key")
            members.append((f'{key_rule} ":" {value}', False))
        return self.add(f'"{{" {self._members(members, extra is not False)} "}}"')

    def _members(self, members: list[tuple[str, bool]], repeat_last: bool) -> str:
        """Members in order, optional ones skippable, with a comma between any two present (no leading one)."""
        # tails[i]: members i.. each led by a comma; start: members i.. with no comma before the first,
        # built back from the first required member (before it, each optional one may be the first).
        tails = [""] * (len(members) + 1)
        for i in range(len(members) - 1, -1, -1):
            member, needed = members[i]
            repeat = "*" if repeat_last and i == len(members) - 1 else ("" if needed else "?")
            tails[i] = f'("," {member}){repeat} {tails[i + 1]}'.strip()
        firsts = [f"{m} {tails[i] if repeat_last and i == len(members) - 1 else tails[i + 1]}".strip()
                  for i, (m, _) in enumerate(members)]  # fmt: skip
        required = next((i for i, (_, needed) in enumerate(members) if needed), len(members))
        start = firsts[required] if required < len(members) else ""
        for i in range(required - 1, -1, -1):
            start = self.add(_choice([firsts[i], start]))
        return start


def _implied_type(schema: dict[str, Any]) -> str | None:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "minItems", "maxItems")):
        return "array"
    return "string" if any(k in schema for k in ("minLength", "maxLength")) else None


def _of_kind(value: Any, kinds: list[str]) -> bool:
    """Whether ``value`` has one of the JSON Schema types (a whole float is an integer, an int a number)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return any(
        {"string": isinstance(value, str), "null": value is None, "boolean": isinstance(value, bool),
         "object": isinstance(value, dict), "array": isinstance(value, list), "number": number,
         "integer": number and float(value).is_integer()}.get(kind, False)
        for kind in kinds
    )  # fmt: skip


def _key_ok(key: Any) -> bool:
    return (
        isinstance(key, str)
        and key == key.strip()
        and key != ""
        and not any(c in key for c in ":,{}[]")
        and STRING_DELIMITER not in key
        and key.isprintable()
    )


def _with_deps(names: set[str]) -> set[str]:
    todo, done = list(names), set()
    while todo:
        name = todo.pop()
        if name not in done:
            done.add(name)
            todo.extend(_PRIMITIVE_DEPS.get(name, ()))
    return done


def _not_keys(keys: list[str]) -> str:
    """A free-form dict key that is none of ``keys`` (a trie: leave it on a letter, or go past its end)."""

    def node(prefix: str) -> str:
        nexts = sorted({k[len(prefix)] for k in keys if k.startswith(prefix) and len(k) > len(prefix)})
        alternatives = [f"{_literal(c)} ({node(prefix + c)})" for c in nexts]
        other = _KEY_CLASS[:-1] + "".join(_class_char(c) for c in nexts) + "]"
        alternatives.append(f"{other} {_KEY_CLASS}{{0,63}}")
        if prefix and prefix not in keys:
            alternatives.append("")  # a proper prefix of a declared key is a key of its own
        return _choice(alternatives)

    return node("")


def _choice(alternatives: list[str]) -> str:
    # An empty alternative is written "": a bare one at a line's end would make llama.cpp's parser read on.
    return " | ".join(a or '""' for a in alternatives)


def _automaton(patterns: list[str]) -> list[list[tuple[str, int]]]:
    """For each Aho-Corasick state (a proper prefix of a pattern, "" first), its moves as (class, state).

    Text that never completes a pattern: each character either leads to a longer prefix or restarts;
    a character that completes a pattern has no move. Every state may end, so a string may end with a
    prefix of the delimiter (``a<|``).
    """
    states = sorted({p[:i] for p in patterns for i in range(len(p))}, key=lambda s: (len(s), s))
    alphabet = sorted(set("".join(patterns)))
    moves: list[list[tuple[str, int]]] = []
    for state in states:
        buckets: dict[int, list[str]] = {}
        specific = []
        for c in alphabet:
            text = state + c
            if any(text.endswith(p) for p in patterns):
                specific.append(c)
                continue
            target = next(text[i:] for i in range(len(text) + 1) if text[i:] in states)
            if target:
                buckets.setdefault(states.index(target), []).append(c)
                specific.append(c)
        row = [("[" + "".join(map(_class_char, cs)) + "]", to) for to, cs in sorted(buckets.items())]
        row.append(("[^" + "".join(map(_class_char, specific)) + "]", 0))
        moves.append(row)
    return moves


def _state_name(prefix: str, state: int) -> str:
    return prefix if state == 0 else f"{prefix}-{state:02d}"


def _excluding(prefix: str, patterns: list[str]) -> dict[str, str]:
    """Rules for any text that contains none of ``patterns``, starting at rule ``prefix``."""
    return {
        _state_name(prefix, state): _choice(["", *(f"{cls} {_state_name(prefix, to)}" for cls, to in moves)])
        for state, moves in enumerate(_automaton(patterns))
    }


def _escape(c: str, specials: str) -> str:
    if c in specials:
        return "\\" + c
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{ord(c):02X}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _class_char(c: str) -> str:
    return "\\x5E" if c == "^" else _escape(c, "\\]-[")


#: Gemma 4's call and channel markers: the grammar asks for the special token itself (GBNF's ``<|x>``
#: syntax), never for its text spelled in ordinary tokens -- the model was trained on the token, and a
#: spelled marker costs a dozen. Not the string delimiter ``<|"|>``: this llama.cpp checks a token
#: element against a candidate even after the candidate's first characters went to a string's content,
#: so a string with minLength could accept ``<|"|>`` in apply and then abort the process in accept.
#: The call and channel markers only follow fixed text or text that may end anywhere, where that
#: cannot happen.
_MARKERS = re.compile(r"(<\|tool_call>|<tool_call\|>|<\|channel>|<channel\|>)")


def _literal(text: str) -> str:
    parts = []
    for index, piece in enumerate(_MARKERS.split(text)):
        if index % 2:
            parts.append(piece)
        elif piece:
            parts.append('"' + "".join(_escape(c, '\\"') for c in piece) + '"')
    return " ".join(parts) if parts else '""'
