"""What a chat generation produces, as the transports see it: text, thoughts and tool calls.

The engine streams text; a chat output parser (e.g. :class:`~edgert.chat.gemma4_output.Gemma4OutputParser`)
turns it into these events as it arrives, so a client sees a tool call's name as soon as the model
has written it and its arguments as JSON pieces while the model writes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """Answer text for the user (never a control marker)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Text of the model's thinking channel (OpenAI's ``reasoning_content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """The model opened call number ``index`` (0, 1, ... within the reply) of function ``name``."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgumentsDelta:
    """The next piece of call ``index``'s arguments as JSON text; the pieces concatenate to the whole."""

    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """Call ``index`` is complete: its argument pieces form one JSON object."""

    index: int


OutputEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolArgumentsDelta | ToolCallEnd
