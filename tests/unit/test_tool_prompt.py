"""Tool conversations render exactly as the official Gemma 4 template renders them.

The reference is the template file itself rendered by plain jinja2 the way Hugging Face's
``apply_chat_template`` does (sandboxed, trim_blocks, lstrip_blocks), given what the template expects:
call arguments as objects. edgert's side starts from an OpenAI request body (arguments as JSON text,
``role: "tool"`` results matched by ``tool_call_id``) and goes through the request schema and
:class:`ChatFormatter`, so the test covers the conversion, not only jinja2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgert.api.schemas import ChatCompletionRequest
from edgert.errors import BadRequestError
from edgert.serving.prompt import ChatFormatter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OFFICIAL = (FIXTURES / "templates" / "google-gemma-4-31B-it.jinja").read_text()

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "check_stock",
            "description": "Units of a product in a store",
            "parameters": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "description": "Product code"},
                    "store": {"type": "integer"},
                    "size": {"type": "string", "enum": ["S", "M", "L"]},
                },
                "required": ["sku"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "call_staff",
            "description": "Page a member of staff",
            "parameters": {
                "type": "object",
                "properties": {
                    "reason": {"type": "string"},
                    "where": {
                        "type": "object",
                        "properties": {"aisle": {"type": "integer"}, "zone": {"type": "string"}},
                        "required": ["aisle"],
                    },
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["reason"],
            },
        },
    },
]

CALLS = [
    {
        "id": "call_a",
        "type": "function",
        "function": {"name": "check_stock", "arguments": '{"sku": "X-1", "store": 7}'},
    },
    {
        "id": "call_b",
        "type": "function",
        "function": {
            "name": "call_staff",
            "arguments": json.dumps({"reason": 'say "hi", {now}', "where": {"aisle": 3}, "tags": ["ü", "b"]}),
        },
    },
]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are the kiosk assistant."},
    {"role": "user", "content": "Is X-1 in stock? If not, get help."},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"units": 0}'},
    {"role": "tool", "tool_call_id": "call_b", "content": "paged Sam"},
    {"role": "user", "content": "Thanks!"},
]


def reference(messages: list[dict[str, Any]], *, tools: list[dict[str, Any]], thinking: bool) -> str:
    """The official template through plain jinja2, with arguments as objects as it expects them."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or ():
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(OFFICIAL).render(
        messages=messages, tools=tools, add_generation_prompt=True, bos_token="<bos>", enable_thinking=thinking
    )


def edgert_render(body: dict[str, Any], template: str = OFFICIAL) -> str:
    request = ChatCompletionRequest.model_validate(body)
    formatter = ChatFormatter(template, bos_token="<bos>", eos_token="<eos>")
    return formatter.render(request.message_dicts(), tools=request.tool_dicts(), enable_thinking=request.thinking())


@pytest.mark.parametrize("thinking", [False, True])
def test_a_whole_tool_conversation_renders_byte_identical_to_the_official_template(thinking: bool) -> None:
    body = {"messages": CONVERSATION, "tools": TOOLS, "think": thinking}
    ours = edgert_render(body)
    assert ours == reference(CONVERSATION, tools=TOOLS, thinking=thinking)
    # and it is the Gemma 4 format the issue describes, not some other rendering that happens to agree
    assert '<|tool>declaration:check_stock{description:<|"|>Units of a product in a store<|"|>' in ours
    assert '<|tool_call>call:check_stock{sku:<|"|>X-1<|"|>,store:7}<tool_call|>' in ours
    assert 'call:call_staff{reason:<|"|>say "hi", {now}<|"|>,tags:[<|"|>ü<|"|>,<|"|>b<|"|>],where:{aisle:3}}' in ours
    assert '<|tool_response>response:check_stock{value:<|"|>{"units": 0}<|"|>}<tool_response|>' in ours
    assert '<|tool_response>response:call_staff{value:<|"|>paged Sam<|"|>}<tool_response|>' in ours
    assert ours.startswith("<bos><|turn>system\n" + ("<|think|>\n" if thinking else "") + "You are the kiosk")
    assert ours.endswith("<|turn>model\n" + ("" if thinking else "<|channel>thought\n<channel|>"))


def test_reasoning_effort_switches_thinking_on_and_none_keeps_it_off() -> None:
    for effort, on in (("low", True), ("high", True), ("none", False)):
        body = {"messages": CONVERSATION[:2], "tools": TOOLS, "reasoning_effort": effort}
        assert ("<|think|>" in edgert_render(body)) is on
    both = {"messages": CONVERSATION[:2], "reasoning_effort": "high", "think": False}
    assert "<|think|>" not in edgert_render(both)


def test_prior_thoughts_are_stripped_from_history_as_the_template_does() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nThe user greets.<channel|>Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ours = edgert_render({"messages": messages})
    assert ours == reference(messages, tools=[], thinking=False)
    assert "The user greets" not in ours and "<|turn>model\nHello!<turn|>" in ours


def test_the_generation_prompt_follows_tool_results_the_way_llama_server_adds_it(tiny_gguf: Path) -> None:
    # Results followed by the final answer in history, thinking on: the older template closes the
    # model turn after the folded answer and opens none (its last message was a tool response), so the
    # prompt must get the model's turn opened, as llama.cpp's common_chat_params_init_gemma4 adds it.
    from gguf import GGUFReader

    older = GGUFReader(tiny_gguf).fields["tokenizer.chat_template"].contents()
    messages = [*CONVERSATION[:5], {"role": "assistant", "content": "X-1 is out; Sam is coming."}]
    ours = edgert_render({"messages": messages, "tools": TOOLS, "think": True}, older)
    assert ours.endswith("X-1 is out; Sam is coming.<turn|>\n<|turn>model\n")
    # without thinking that template writes the empty thought channel after the turn, and llama.cpp
    # (so edgert) leaves it so
    plain = edgert_render({"messages": messages, "tools": TOOLS}, older)
    assert plain.endswith("Sam is coming.<turn|>\n<|channel>thought\n<channel|>")
    # the official template opens the turn itself; nothing is added there
    official = edgert_render({"messages": messages, "tools": TOOLS})
    assert official == reference(messages, tools=TOOLS, thinking=False)
    assert official.endswith("Sam is coming.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_the_older_template_gets_tool_results_folded_into_the_assistant_turn(tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    template = GGUFReader(tiny_gguf).fields["tokenizer.chat_template"].contents()
    assert "{#- OpenAI Chat Completions:" not in template  # the fixture carries the older template
    ours = edgert_render({"messages": CONVERSATION, "tools": TOOLS}, template)
    # llama.cpp's workaround: results named after the call in the same position; JSON results as objects
    assert "<|tool_response>response:check_stock{units:0}<tool_response|>" in ours
    assert '<|tool_response>response:call_staff{value:<|"|>paged Sam<|"|>}<tool_response|>' in ours
    assert ours.endswith("<|turn>user\nThanks!<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0.function.name", "required"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools.0.function.parameters",
            "type 'object'",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "open_door"}}},
            "tool_choice",
            "'open_door' is not among the declared tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "no tools are declared"),
        (
            {"messages": [*CONVERSATION[:3], {"role": "tool", "tool_call_id": "call_zzz", "content": "?"}]},
            "messages.3.tool_call_id",
            "matches no tool call",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{**CALLS[0], "function": {"name": "f", "arguments": "{"}}]},
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
            "not valid JSON",
        ),
        (
            {"tools": [TOOLS[0], TOOLS[0]]},
            "tools",
            "declared twice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name{"}}]}, "tools.0.function.name", "pattern"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(body: dict[str, Any], param: str, words: str) -> None:
    from pydantic import ValidationError

    from edgert.transport.shared import invalid_body

    full = {"messages": CONVERSATION[:2], **body}
    with pytest.raises((BadRequestError, ValidationError)) as caught:
        ChatCompletionRequest.model_validate(full)
    error = caught.value if isinstance(caught.value, BadRequestError) else invalid_body(caught.value)
    assert error.param == param
    assert words in error.message


def test_the_template_is_not_jinja2_rendered_by_us_on_a_different_undefined_policy() -> None:
    # ChainableUndefined (edgert) and Undefined (HF) must agree on the official template: it reads
    # optional keys (reasoning, tool_responses, response) that are absent in plain conversations.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    with pytest.raises(jinja2.UndefinedError):
        env.from_string(OFFICIAL).render(messages=CONVERSATION[:2], add_generation_prompt=True, bos_token="<bos>")
    assert edgert_render({"messages": CONVERSATION[:2]}) == reference(CONVERSATION[:2], tools=[], thinking=False)
