"""Chat messages -> prompt text, exactly as the model was trained to see them.

The template is the GGUF's own ``tokenizer.chat_template`` (Jinja, rendered in a
sandbox), except for base GGUFs that ship none (Gemma 3 270M): the catalog marks
those ``chat_template = "gemma-turns"`` and edgert applies Gemma's turn format
itself — without it llama-cpp-python falls back to a Llama-2 format and the
model emits end-of-sequence at once.
"""

from __future__ import annotations

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


class ChatFormatter:
    """Renders chat messages with one compiled template."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateError as exc:
            raise BadRequestError(f"messages: {exc}", param="messages") from None
        except jinja2.TemplateError as exc:
            raise BadRequestError(f"messages: the chat template rejected them: {exc}", param="messages") from None


def formatter_for(mode: str, gguf_template: str | None, *, bos_token: str, eos_token: str) -> ChatFormatter:
    """Pick the template: the GGUF's own, or the built-in Gemma turns for base models."""
    if mode == "gemma-turns":
        return ChatFormatter(GEMMA_TURNS_TEMPLATE, bos_token=bos_token, eos_token=eos_token)
    if gguf_template:
        return ChatFormatter(gguf_template, bos_token=bos_token, eos_token=eos_token)
    # A GGUF without a template and no catalog entry telling otherwise: Gemma is what we run.
    return ChatFormatter(GEMMA_TURNS_TEMPLATE, bos_token=bos_token, eos_token=eos_token)
