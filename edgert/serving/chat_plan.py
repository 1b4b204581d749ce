"""A chat request -> what the template, the sampler and the output parser need for it.

Tools and thinking are Gemma 4 features here: the model's own template declares the tools and
switches thinking on, llama.cpp's grammar sampler keeps calls to the declared functions and their
schemas, and :class:`~edgert.chat.gemma4_output.Gemma4OutputParser` reads calls and thoughts back
out of the text. ``tool_choice`` decides the grammar:

- "required" / a named function: every reply is one call (several with ``parallel_tool_calls``),
  under the grammar from the first token;
- "auto": the grammar waits for the model to open a call (``<|tool_call>``), then holds it to the
  schemas -- text before the call is free;
- "none": the call opener is a banned token, so the model cannot start one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from edgert.api.schemas import ChatCompletionRequest
from edgert.chat.tool_grammar import ToolSpec, tool_call_grammar
from edgert.errors import BadRequestError
from edgert.serving.prompt import ChatFormatter

#: Gemma 4 control tokens whose text the output parser reads; the others stay silent in the stream
GEMMA4_MARKERS = ("<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>")
TOOL_CALL_OPEN = "<|tool_call>"


@dataclass(frozen=True, slots=True)
class ChatPlan:
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool = False
    #: the output is Gemma 4's (thought channels, markers): parse it; False: plain text
    parse_gemma4: bool = False
    #: tool calls are recognised in the output
    parse_tools: bool = False
    grammar: str | None = None
    grammar_lazy: bool = False
    grammar_trigger_tokens: tuple[int, ...] = ()
    banned_tokens: tuple[int, ...] = ()
    special_pieces: Mapping[int, bytes] = field(default_factory=dict)


def plan_chat(
    body: ChatCompletionRequest, formatter: ChatFormatter, special_tokens: Mapping[str, int], model_id: str
) -> ChatPlan:
    mode = body.tool_mode()
    thinking = body.thinking()
    if not formatter.supports_tools:
        if body.tools:
            raise BadRequestError(
                f"tools: model {model_id!r} has no tool support (its chat template has no tool-call format; "
                "tool calling needs a Gemma 4 instruction-tuned model such as gemma-4-e2b-it)",
                param="tools",
            )
        if body.think:
            raise BadRequestError(
                f"think: model {model_id!r} has no thinking mode (its chat template has none)", param="think"
            )
        return ChatPlan()  # reasoning_effort is a hint OpenAI clients send freely: ignored where it cannot apply
    pieces = {special_tokens[marker]: marker.encode() for marker in GEMMA4_MARKERS if marker in special_tokens}
    opener = special_tokens.get(TOOL_CALL_OPEN)
    plan = ChatPlan(
        tools=body.tool_dicts(),
        enable_thinking=thinking,
        parse_gemma4=True,
        parse_tools=mode != "none",
        special_pieces=pieces,
        banned_tokens=(opener,) if opener is not None else (),
    )
    if mode == "none":
        return plan
    specs = [ToolSpec(tool.function.name, tool.function.parameters or {}) for tool in body.tools or ()]
    if mode == "named":
        assert not isinstance(body.tool_choice, str) and body.tool_choice is not None
        wanted = body.tool_choice.function.name
        specs = [spec for spec in specs if spec.name == wanted]
    max_calls = None if body.parallel_tool_calls and mode != "named" else 1
    # The opener is no longer banned: the grammar decides where a call may start.
    if mode == "auto":
        if opener is None:
            raise BadRequestError(f"tools: model {model_id!r} has no {TOOL_CALL_OPEN} token", param="tools")
        grammar = tool_call_grammar(specs, min_calls=1, max_calls=max_calls)
        return replace(plan, grammar=grammar, grammar_lazy=True, grammar_trigger_tokens=(opener,), banned_tokens=())
    grammar = tool_call_grammar(specs, min_calls=1, max_calls=max_calls, thought=thinking)
    return replace(plan, grammar=grammar, banned_tokens=())
