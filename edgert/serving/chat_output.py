"""One chat reply as it is generated: the engine's text -> content, thoughts and tool calls.

Both transports feed a request's text chunks through its :class:`ChatOutput` and translate the
events it returns (an SSE chunk, an MQTT chunk); at the end it holds the whole reply for a
non-streamed answer. A model without Gemma 4's output format gets its text back as content.

Call ids are made here, once, when a call opens: the streamed and the non-streamed answer name a
call the same way, and a client sends the id back with the call's result.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from edgert.api.schemas import ChatDelta, FinishReason, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from edgert.chat.events import (
    ContentDelta,
    OutputEvent,
    ReasoningDelta,
    ToolArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from edgert.chat.gemma4_output import Gemma4OutputParser


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    complete: bool = False


class ChatOutput:
    def __init__(self, parser: Gemma4OutputParser | None = None) -> None:
        self._parser = parser
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[_Call] = []

    def feed(self, text: str) -> list[OutputEvent]:
        events: list[OutputEvent] = [ContentDelta(text)] if self._parser is None else self._parser.feed(text)
        self._record(events)
        return events

    def finish(self) -> list[OutputEvent]:
        events = self._parser.finish() if self._parser is not None else []
        self._record(events)
        return events

    def _record(self, events: list[OutputEvent]) -> None:
        for event in events:
            if isinstance(event, ContentDelta):
                self._content.append(event.text)
            elif isinstance(event, ReasoningDelta):
                self._reasoning.append(event.text)
            elif isinstance(event, ToolCallStart):
                self._calls.append(_Call(f"call_{uuid.uuid4().hex[:24]}", event.name))
            elif isinstance(event, ToolArgumentsDelta):
                self._calls[event.index].arguments.append(event.fragment)
            elif isinstance(event, ToolCallEnd):
                self._calls[event.index].complete = True

    def call_id(self, index: int) -> str:
        return self._calls[index].id

    @property
    def content(self) -> str | None:
        """The answer text; None when the reply is only tool calls (and whitespace around them)."""
        text = "".join(self._content)
        return None if self._calls and not text.strip() else text

    @property
    def reasoning(self) -> str | None:
        return "".join(self._reasoning) or None

    @property
    def tool_calls(self) -> list[ToolCall] | None:
        """Every call the model opened; one cut off by the token limit carries its arguments as far as written."""
        if not self._calls:
            return None
        return [
            ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments="".join(call.arguments)))
            for call in self._calls
        ]

    def finish_reason(self, reason: FinishReason) -> FinishReason:
        """OpenAI's "tool_calls" when the model stopped after complete calls, else the engine's reason."""
        if reason == "stop" and self._calls and all(call.complete for call in self._calls):
            return "tool_calls"
        return reason


def chat_delta(event: OutputEvent, output: ChatOutput) -> ChatDelta | None:
    """The OpenAI stream delta for one event (None for a call's end, which OpenAI does not send)."""
    if isinstance(event, ContentDelta):
        return ChatDelta(content=event.text)
    if isinstance(event, ReasoningDelta):
        return ChatDelta(reasoning_content=event.text)
    if isinstance(event, ToolCallStart):
        function = FunctionCallDelta(name=event.name, arguments="")
        call = ToolCallDelta(index=event.index, id=output.call_id(event.index), type="function", function=function)
        return ChatDelta(tool_calls=[call])
    if isinstance(event, ToolArgumentsDelta):
        return ChatDelta(
            tool_calls=[ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.fragment))]
        )
    return None
