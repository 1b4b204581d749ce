"""Chat messages -> prompt text, exactly as the model was trained to see them.

The template is the GGUF's own ``tokenizer.chat_template`` (Jinja, rendered in a
sandbox), except for base GGUFs that ship none (Gemma 3 270M): the catalog marks
those ``chat_template = "gemma-turns"`` and edgert applies Gemma's turn format
itself — without it llama-cpp-python falls back to a Llama-2 format and the
model emits end-of-sequence at once.

Gemma 4 templates (recognised, as llama.cpp recognises them, by their ``'<|tool_call>call:'``) also
render tool declarations, tool calls and results, and thinking. What the template is given follows
llama.cpp's ``common_chat_params_init_gemma4`` so a prompt is byte-identical to llama-server's: call
arguments as objects, ``enable_thinking``, the older templates' ``tool_responses`` folding, and a
``<|turn>model\n`` after a turn the template closed itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgert.errors import BadRequestError, ModelError

#: Gemma's turn format (Gemma 2/3): a system message is folded into the first user turn.
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] ~ '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    # newlines live inside expressions so the whitespace-stripping tags cannot eat them
    "{{ '<start_of_turn>' ~ role ~ '\n' ~ (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class _TemplateError(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


#: what marks a Gemma 4 template (llama.cpp's common/chat.cpp detects it the same way)
_GEMMA4_MARK = "'<|tool_call>call:'"
#: what marks the newer Gemma 4 templates that read OpenAI ``role: "tool"`` messages themselves
_OPENAI_TOOL_MESSAGES_MARK = "{#- OpenAI Chat Completions:"


class ChatFormatter:
    """Renders chat messages with one compiled template."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        #: "gemma4" when the template is Gemma 4's (tool calls, thinking); None for any other
        self.family = "gemma4" if _GEMMA4_MARK in template else None
        self._folds_tool_results = self.family == "gemma4" and _OPENAI_TOOL_MESSAGES_MARK not in template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @property
    def supports_tools(self) -> bool:
        return self.family == "gemma4"

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> str:
        messages = list(messages)
        if self._folds_tool_results:
            messages = fold_tool_results(messages)
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = list(tools)
        if self.family == "gemma4":
            extra["enable_thinking"] = enable_thinking
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateError as exc:
            raise BadRequestError(f"messages: {exc}", param="messages") from None
        except jinja2.TemplateError as exc:
            raise BadRequestError(f"messages: the chat template rejected them: {exc}", param="messages") from None
        if self.family == "gemma4" and add_generation_prompt and text.endswith("<turn|>\n"):
            # The template closed the model's turn after a tool result and opened none: the model
            # would not know it is its turn (llama.cpp adds the same).
            text += "<|turn>model\n"
        return text


def fold_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Older Gemma 4 templates read results from ``tool_responses`` on the assistant message.

    A port of llama.cpp's ``convert_tool_responses_gemma4``: an assistant message with calls, the
    ``role: "tool"`` messages after it and a following plain assistant answer become one assistant
    message. A result is named after the call in the same position; JSON results become objects.
    """
    folded: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            folded.append(message)
            i += 1
            continue
        calls = list(message["tool_calls"])
        merged: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        if isinstance(message.get("reasoning_content"), str):
            merged["reasoning_content"] = message["reasoning_content"]
        responses: list[dict[str, Any]] = []
        i += 1
        while i < len(messages) and messages[i].get("role") == "tool":
            result = messages[i]
            name = calls[len(responses)]["function"].get("name", "") if len(responses) < len(calls) else ""
            responses.append({"name": name or result.get("tool_call_id", ""), "response": _tool_result(result)})
            i += 1
        if responses:
            merged["tool_responses"] = responses
        if i < len(messages) and messages[i].get("role") == "assistant":
            answer = messages[i]
            if not answer.get("tool_calls") and answer.get("content"):
                merged["content"] = answer["content"]
                i += 1
        folded.append(merged)
    return folded


def _tool_result(message: dict[str, Any]) -> Any:
    content = message.get("content")
    if isinstance(content, str):
        try:
            return json.loads(content)
        except ValueError:
            return content
    return content


def formatter_for(mode: str, gguf_template: str | None, *, bos_token: str, eos_token: str) -> ChatFormatter:
    """Pick the template: the GGUF's own, or the built-in Gemma turns for base models."""
    if mode == "gemma-turns":
        return ChatFormatter(GEMMA_TURNS_TEMPLATE, bos_token=bos_token, eos_token=eos_token)
    if gguf_template:
        return ChatFormatter(gguf_template, bos_token=bos_token, eos_token=eos_token)
    # A GGUF without a template and no catalog entry telling otherwise: Gemma is what we run.
    return ChatFormatter(GEMMA_TURNS_TEMPLATE, bos_token=bos_token, eos_token=eos_token)
