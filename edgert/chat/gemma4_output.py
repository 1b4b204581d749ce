"""Gemma 4's output text -> content, thoughts and tool calls, incrementally, as the model writes it.

The serving path calls :meth:`Gemma4OutputParser.feed` once per generated token with that token's
text (any split of the output: a marker such as ``<|tool_call>`` may arrive whole or in pieces) and
gets the :mod:`~edgert.chat.events` that are certain so far. Only a tail that could still be the start
of a marker is held back, so content and thoughts stream as they are written.

The grammar (llama.cpp ``common/parsers/gemma4.cpp`` and the official template's ``format_argument``):

- thinking: ``<|channel>thought`` + whitespace + thought + ``<channel|>`` -> :class:`ReasoningDelta`;
  a ``<|channel>`` not followed by ``thought`` and a lone ``<channel|>`` are dropped, as llama.cpp does.
- a call (``tools=True``): ``<|tool_call>call:NAME{ARGS}<tool_call|>`` -> :class:`ToolCallStart` when
  ``{`` ends the name, :class:`ToolArgumentsDelta` JSON pieces while ARGS arrive (a string's characters
  as they come), :class:`ToolCallEnd` at ``<tool_call|>``. Whitespace between calls is dropped.
- ARGS are not JSON: ``{key:value,...}`` with bare keys (or keys quoted as ``<|"|>key<|"|>``), strings
  delimited by ``<|"|>`` with raw content (only ``<|"|>`` ends one, even ``<tool_call|>`` is text inside),
  JSON numbers, ``true``/``false``/``null``, ``[...]``. The JSON written is compact, keeps non-ASCII.
- everything else is content; control markers never reach content or thoughts.

The model may be unconstrained (random weights, ``tool_choice: "none"`` leaks): nothing here raises and
every finished call's JSON is valid. Repairs: a bare word that is no JSON number or literal becomes a
string; a key without a value gets ``null``; ``<tool_call|>`` (or a new ``<|tool_call>``) closes what is
open; a closer closes up to its matching container and a closer with none is dropped, as is any other
stray text between values; a call with an empty name is dropped whole; ``call:NAME<tool_call|>`` is a
call with ``{}``; ``<|tool_call>`` inside a thought ends the thought (the lazy grammar triggers on it
there too, so the call must not vanish into reasoning).

A call cut off by the end of generation (``max_tokens``): :meth:`~Gemma4OutputParser.finish` emits the
arguments as far as generated -- the text of an open string or bare word, never invented closers -- and
no :class:`ToolCallEnd`, so the client gets a JSON prefix, like OpenAI's ``finish_reason: "length"``.
That prefix is a prefix of :func:`arguments_json` of the cut text. A call whose outer ``}`` arrived
but not its ``<tool_call|>`` is complete and ends.

Cost: each character is looked at a bounded number of times (held tails are shorter than a marker);
bare words, keys and names are collected in lists until they end, never re-scanned.

Longer than our usual 400 lines: the argument converter and the parser read one shared buffer and
hand it back and forth at each marker, and every repair above is a line or two in one of them.
"""

from __future__ import annotations

import json
import re
from typing import Final

from edgert.chat.events import ContentDelta, OutputEvent, ReasoningDelta, ToolArgumentsDelta, ToolCallEnd, ToolCallStart

QUOTE: Final = '<|"|>'
CALL_OPEN: Final = "<|tool_call>"
CALL_CLOSE: Final = "<tool_call|>"
CHANNEL_OPEN: Final = "<|channel>"
CHANNEL_CLOSE: Final = "<channel|>"
MARKERS: Final = (
    QUOTE,
    CHANNEL_OPEN,
    CHANNEL_CLOSE,
    CALL_OPEN,
    CALL_CLOSE,
    "<|tool>",
    "<tool|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
)
_LONGEST: Final = max(map(len, MARKERS))
_PREFIXES: Final = frozenset(m[:k] for m in MARKERS for k in range(1, len(m)))
_PARTIAL: Final = ""  # _marker_at: the text ends inside what may still become a marker
_JSON_WS: Final = " \t\n\r"
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS: Final = frozenset(("true", "false", "null"))
_BARE_KEY_END: Final = re.compile(r"[:}<]")  # llama.cpp's gemma4-dict-key-name is [^:}]+
_BARE_VALUE_END: Final = re.compile(r"[,}\]<]")
_NAME_END: Final = re.compile(r"[{<]")


def _marker_at(buf: str, i: int, final: bool) -> str | None:
    """The marker starting at ``buf[i]`` (a ``<``), ``_PARTIAL`` if more text may make one, else None."""
    rest = buf[i : i + _LONGEST]
    for marker in MARKERS:
        if rest.startswith(marker):
            return marker
    return _PARTIAL if not final and rest in _PREFIXES else None


def _quote_tail(buf: str, i: int, final: bool) -> int:
    """Where ``buf[i:]`` stops being surely string content: before a tail that may begin ``<|"|>``."""
    if not final:
        for k in range(len(QUOTE) - 1, 0, -1):
            if len(buf) - k >= i and buf.endswith(QUOTE[:k]):
                return len(buf) - k
    return len(buf)


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _scalar(word: str) -> str:
    return word if word in _LITERALS or _NUMBER.fullmatch(word) else f'"{_escape(word)}"'


# _ArgsConverter states
_ROOT, _KEY, _BARE_KEY, _QUOTED_KEY, _AFTER_KEY, _VALUE, _BARE, _STRING, _AFTER_VALUE, _DONE = range(10)


class _ArgsConverter:
    """Gemma argument text -> compact JSON, piece by piece; writes JSON pieces to ``out``."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.ended: str | None = None  # the marker outside strings that ended the call
        self._state = _ROOT
        self._stack: list[str] = []  # closers of the open containers
        self._comma = False  # a "," seen, written with the next member so a trailing one vanishes
        self._need_value = False  # a key and ":" written, no value yet
        self._word: list[str] = []  # the bare word, bare key or quoted key being collected
        # states that read runs of text rather than single tokens
        self._readers: Final = {
            _STRING: self._string,
            _QUOTED_KEY: self._quoted_key,
            _BARE_KEY: self._bare,
            _BARE: self._bare,
        }

    @property
    def complete(self) -> bool:
        return self._state == _DONE

    def step(self, buf: str, i: int, final: bool) -> int | None:
        """Consume from ``buf[i]``; the next index, or None to wait for more text."""
        reader = self._readers.get(self._state)
        if reader is not None:
            return reader(buf, i, final)
        c = buf[i]
        marker = _marker_at(buf, i, final) if c == "<" else None
        if marker == _PARTIAL:
            return None
        if marker is not None:
            self._marker(marker)
            return i + len(marker)
        return i + 1 if c in _JSON_WS else self._structural(c, i)

    def _marker(self, marker: str) -> None:
        if marker in (CALL_CLOSE, CALL_OPEN):
            self.ended = marker
        elif marker == QUOTE and self._state == _KEY:
            self._state, self._word = _QUOTED_KEY, []
        elif marker == QUOTE and self._state == _VALUE:
            self._begin_value('"')
            self._state = _STRING
        # any other marker between tokens is dropped

    def _structural(self, c: str, i: int) -> int:
        state = self._state
        if state == _ROOT:
            if c == "{":
                self._open("{")
        elif c in "}]" and state != _DONE:
            self._close(c)
        elif state == _KEY and c != ",":
            self._state, self._word = _BARE_KEY, []
            return i
        elif state == _AFTER_KEY:
            if c == ":":
                self._state = _VALUE
            elif c == ",":
                self._write("null")
                self._need_value, self._comma, self._state = False, True, _KEY
        elif state == _VALUE:
            if c in "{[":
                self._open(c)
            elif c == "," and self._stack[-1] == "}":
                self._write("null")
                self._need_value, self._comma, self._state = False, True, _KEY
            elif c != ",":
                self._state, self._word = _BARE, []
                return i
        elif state == _AFTER_VALUE and c == ",":
            self._comma = True
            self._state = _KEY if self._stack[-1] == "}" else _VALUE
        return i + 1  # anything else here is stray text between tokens: dropped

    def _bare(self, buf: str, i: int, final: bool) -> int | None:
        in_key = self._state == _BARE_KEY
        found = (_BARE_KEY_END if in_key else _BARE_VALUE_END).search(buf, i)
        if found is None:
            self._word.append(buf[i:])
            return len(buf)
        j = found.start()
        self._word.append(buf[i:j])
        if buf[j] == "<":
            marker = _marker_at(buf, j, final)
            if marker == _PARTIAL:
                return j if j > i else None
            if marker is None:
                self._word.append("<")
                return j + 1
        if in_key and buf[j] == ":":
            self._key("".join(self._word).strip())
            self._state = _VALUE
            return j + 1
        if in_key:  # "}" or a marker before ":": no key after all
            self._state = _KEY
        else:
            self._begin_value(_scalar("".join(self._word).strip()))
            self._state = _AFTER_VALUE
        return j

    def _quoted_key(self, buf: str, i: int, final: bool) -> int | None:
        j = buf.find(QUOTE, i)
        if j < 0:
            end = _quote_tail(buf, i, final)
            self._word.append(buf[i:end])
            return end if end > i else None
        self._word.append(buf[i:j])
        self._key("".join(self._word))
        self._state = _AFTER_KEY
        return j + len(QUOTE)

    def _string(self, buf: str, i: int, final: bool) -> int | None:
        j = buf.find(QUOTE, i)
        if j < 0:
            end = _quote_tail(buf, i, final)
            self._write(_escape(buf[i:end]))
            return end if end > i else None
        self._write(_escape(buf[i:j]) + '"')
        self._state = _AFTER_VALUE
        return j + len(QUOTE)

    def _write(self, text: str) -> None:
        if text:
            self.out.append(text)

    def _key(self, key: str) -> None:
        self._write(("," if self._comma else "") + f'"{_escape(key)}":')
        self._comma, self._need_value = False, True

    def _begin_value(self, text: str) -> None:
        self._write(("," if self._comma else "") + text)
        self._comma = self._need_value = False

    def _open(self, opener: str) -> None:
        self._begin_value(opener)
        self._stack.append("}" if opener == "{" else "]")
        self._state = _KEY if opener == "{" else _VALUE

    def _close(self, closer: str) -> None:
        if closer not in self._stack:
            return  # nothing of its kind is open: stray
        if self._need_value:
            self._write("null")
        self._comma = self._need_value = False
        while True:
            top = self._stack.pop()
            self._write(top)
            if top == closer:
                break
        self._state = _AFTER_VALUE if self._stack else _DONE

    def cut(self) -> None:
        """Generation ended inside the arguments: write what was generated, invent no closer."""
        if self._state == _BARE:
            word = "".join(self._word).strip()
            self._begin_value(word if _scalar(word) == word else f'"{_escape(word)}')
        self._state = _DONE

    def close(self) -> None:
        """The arguments are over: finish the open value and close every open container."""
        if self._state == _STRING:
            self._write('"')
        elif self._state == _BARE:
            self._begin_value(_scalar("".join(self._word).strip()))
        if self._need_value:
            self._write("null")
        self._comma = self._need_value = False
        while self._stack:
            self._write(self._stack.pop())
        self._state = _DONE


def arguments_json(gemma_args: str) -> str:
    """The JSON of a call's whole argument text, e.g. ``{k:<|"|>v<|"|>}`` -> ``{"k":"v"}``.

    The same conversion the streaming parser does: its pieces for a call concatenate to this. Text
    before the first ``{`` and after the matching ``}`` is ignored; with no ``{`` at all it is ``{}``.
    """
    converter = _ArgsConverter()
    i = 0
    while i < len(gemma_args) and converter.ended is None and not converter.complete:
        j = converter.step(gemma_args, i, final=True)
        assert j is not None  # with final=True no tail is held back
        i = j
    converter.close()
    return "".join(converter.out) or "{}"


# Gemma4OutputParser states; _CONTENT, _THOUGHT and _ARGS also tag the text being queued
_CONTENT, _CHANNEL, _THOUGHT_START, _THOUGHT, _NAME, _ARGS, _AFTER_CALL = range(7)
_THOUGHT_WORD: Final = "thought"


class Gemma4OutputParser:
    """One reply's output text -> events; feed it each token's text, then call :meth:`finish`."""

    def __init__(self, *, tools: bool) -> None:
        self._tools = tools
        self._state = _CONTENT
        self._held = ""  # a tail that may still become a marker (or "thought")
        self._events: list[OutputEvent] = []
        self._text_kind = _CONTENT
        self._text: list[str] = []  # queued text of kind _text_kind: one event, not one per piece
        self._index = 0  # of the next call
        self._name: list[str] = []
        self._space: list[str] = []  # whitespace after a call, content only if text follows
        self._args = _ArgsConverter()
        self._silent = False  # the call being read has no name: its arguments go nowhere
        self._readers: Final = {
            _CONTENT: self._prose,
            _THOUGHT: self._prose,
            _CHANNEL: self._channel,
            _THOUGHT_START: self._space_before,
            _AFTER_CALL: self._space_before,
            _NAME: self._call_name,
            _ARGS: self._call_args,
        }

    def feed(self, text: str) -> list[OutputEvent]:
        """The events that ``text`` (the next piece of output) makes certain."""
        return self._run(self._held + text, final=False)

    def finish(self) -> list[OutputEvent]:
        """Generation ended: flush what was held back; a call cut off here gets no :class:`ToolCallEnd`."""
        self._run(self._held, final=True)
        if self._state == _ARGS:
            if self._args.complete:  # "}" came, "<tool_call|>" did not: the arguments are whole
                self._end_call()
            else:
                self._args.cut()
                self._drain_args()
        self._state = _CONTENT
        self._flush_text()
        events, self._events = self._events, []
        return events

    def _run(self, buf: str, final: bool) -> list[OutputEvent]:
        i = 0
        while i < len(buf):
            j = self._readers[self._state](buf, i, final)
            if j is None:
                break
            i = j
        self._held = buf[i:]
        if final:
            return []  # finish() has more to add
        self._flush_text()
        events, self._events = self._events, []
        return events

    def _prose(self, buf: str, i: int, final: bool) -> int | None:
        j = buf.find("<", i)
        if j != i:
            self._emit(self._state, buf[i:] if j < 0 else buf[i:j])
            return len(buf) if j < 0 else j
        marker = _marker_at(buf, i, final)
        if marker == _PARTIAL:
            return None
        if marker is None:
            self._emit(self._state, "<")
            return i + 1
        if marker == CALL_OPEN and self._tools:
            self._state, self._name = _NAME, []
        elif marker == CHANNEL_OPEN and self._state == _CONTENT:
            self._state = _CHANNEL
        elif marker == CHANNEL_CLOSE:
            self._state = _CONTENT
        return i + len(marker)  # every other marker is dropped

    def _channel(self, buf: str, i: int, final: bool) -> int | None:
        rest = buf[i : i + len(_THOUGHT_WORD)]
        if rest == _THOUGHT_WORD:
            self._state = _THOUGHT_START
            return i + len(rest)
        if not final and _THOUGHT_WORD.startswith(rest):
            return None
        self._state = _CONTENT  # an empty or stray channel: its marker was all there was
        return i

    def _space_before(self, buf: str, i: int, final: bool) -> int | None:
        """Whitespace after ``thought`` is dropped; after a call, it is content only if text follows."""
        if buf[i] in _JSON_WS:
            if self._state == _AFTER_CALL:
                self._space.append(buf[i])
            return i + 1
        if self._state == _AFTER_CALL and buf[i] == "<":
            marker = _marker_at(buf, i, final)
            if marker == _PARTIAL:
                return None
            if marker is not None:
                self._space = []
        self._state = _THOUGHT if self._state == _THOUGHT_START else _CONTENT
        self._emit(_CONTENT, "".join(self._space))
        self._space = []
        return i

    def _call_name(self, buf: str, i: int, final: bool) -> int | None:
        found = _NAME_END.search(buf, i)
        j = len(buf) if found is None else found.start()
        self._name.append(buf[i:j])
        if j == len(buf):
            return j
        marker = _marker_at(buf, j, final) if buf[j] == "<" else None
        if marker == _PARTIAL:
            return j if j > i else None
        if buf[j] == "<" and marker not in (CALL_OPEN, CALL_CLOSE):
            self._name.append("" if marker else "<")  # other markers are dropped
            return j + len(marker or "<")
        name = "".join(self._name).strip().removeprefix("call:").strip()
        self._name = []
        if marker == CALL_OPEN:
            return j + len(marker)  # a new call begins before this one had arguments
        self._args = _ArgsConverter()
        self._silent = not name
        if name:
            self._flush_text()
            self._events.append(ToolCallStart(self._index, name))
        if marker == CALL_CLOSE:  # call:NAME<tool_call|> -- a call without arguments
            self._emit(_ARGS, "{}")
            self._end_call()
            self._state = _AFTER_CALL
            return j + len(marker)
        self._state = _ARGS
        return j  # the converter reads the "{" itself

    def _call_args(self, buf: str, i: int, final: bool) -> int | None:
        j = self._args.step(buf, i, final)
        self._drain_args()
        if self._args.ended is not None:
            self._end_call()
            self._state = _NAME if self._args.ended == CALL_OPEN else _AFTER_CALL
            self._name = []
        return j

    def _drain_args(self) -> None:
        self._emit(_ARGS, "".join(self._args.out))
        self._args.out = []

    def _end_call(self) -> None:
        self._args.close()
        self._drain_args()
        if not self._silent:
            self._flush_text()
            self._events.append(ToolCallEnd(self._index))
            self._index += 1
        self._silent = False

    def _emit(self, kind: int, text: str) -> None:
        """Queue text of one kind (_CONTENT, _THOUGHT, _ARGS); consecutive pieces become one event."""
        if not text or (kind == _ARGS and self._silent):
            return
        if kind != self._text_kind:
            self._flush_text()
            self._text_kind = kind
        self._text.append(text)

    def _flush_text(self) -> None:
        if self._text:
            text = "".join(self._text)
            kind = self._text_kind
            event = ContentDelta if kind == _CONTENT else ReasoningDelta
            self._events.append(ToolArgumentsDelta(self._index, text) if kind == _ARGS else event(text))
        self._text = []
