"""Gemma 4 tool calls end to end: the daemon as a subprocess, over the socket and over MQTT.

The tiny Gemma 4 fixture has random weights, so what it says is noise; what is tested is what the
grammar and the parser guarantee whatever the model says: under ``tool_choice`` "required" or a named
function every reply is a call to a declared function whose arguments validate against its schema.
Strings in the test schemas are bounded (``maxLength`` or ``enum``) because a random model almost
never picks the closing ``<|"|>`` by chance; a trained model closes its strings itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from edgert.api.client import async_unix_client
from edgert.api.mqtt_schemas import ReplyChunk, ReplyFinal, Topics
from edgert.transport.mqtt_client import MqttRequester
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import check_stream, mqtt_daemon

CHAT = "/v1/chat/completions"
MARKERS = ("<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>", "<channel|>", "<|tool_response>", "<|turn>")

SCHEMAS: dict[str, dict[str, Any]] = {
    "check_stock": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "maxLength": 6},
            "store": {"type": "integer"},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "in_store_only": {"type": "boolean"},
        },
        "required": ["sku", "size"],
    },
    "open_ticket": {
        "type": "object",
        "properties": {
            "priority": {"type": "string", "enum": ["low", "high"]},
            "where": {
                "type": "object",
                "properties": {"site": {"type": "integer"}, "floor": {"type": ["integer", "null"]}},
                "required": ["site", "floor"],
            },
            "parts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"code": {"type": "string", "maxLength": 4}, "qty": {"type": "number"}},
                    "required": ["code", "qty"],
                },
                "maxItems": 3,
            },
        },
        "required": ["priority", "where", "parts"],
    },
    "call_staff": {"type": "object", "properties": {}},
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"the kiosk's {name}", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "Is the blue jacket in stock in M? If not open a ticket."}]


def tool_request(choice: object = "required", **extra: object) -> dict[str, Any]:
    return {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 200, **extra}


def check_calls(calls: list[dict[str, Any]], allowed: set[str] | None = None) -> None:
    assert calls, "no tool call"
    for call in calls:
        name = call["function"]["name"]
        assert name in (allowed or SCHEMAS), name
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def check_no_markers(text: str | None) -> None:
    for marker in MARKERS:
        assert marker not in (text or ""), (marker, text)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(tmp_path_factory.mktemp("tools"), tiny_gguf)
    yield proc
    assert proc.stop() == 0, proc.log()


def openai_client(daemon: DaemonProcess) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)))
    return openai.OpenAI(base_url="http://edgert/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_required_calls_validate_against_their_schemas(daemon: DaemonProcess, seed: int) -> None:
    with daemon.client() as client:
        reply = client.post(CHAT, json=tool_request(temperature=1.5, seed=seed, parallel_tool_calls=False))
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert len(choice["message"]["tool_calls"]) == 1  # parallel_tool_calls false: exactly one
    check_calls(choice["message"]["tool_calls"])


def test_a_named_function_is_the_one_called(daemon: DaemonProcess) -> None:
    named = {"type": "function", "function": {"name": "open_ticket"}}
    with daemon.client() as client:
        for seed in (7, 8, 9):
            reply = client.post(CHAT, json=tool_request(named, temperature=1.2, seed=seed)).json()
            calls = reply["choices"][0]["message"]["tool_calls"]
            assert [call["function"]["name"] for call in calls] == ["open_ticket"]
            check_calls(calls, {"open_ticket"})


def test_streamed_argument_pieces_concatenate_to_the_non_streamed_arguments(daemon: DaemonProcess) -> None:
    """Same request at temperature 0 both ways; the stream's pieces arrive as the model writes them."""
    request = tool_request({"type": "function", "function": {"name": "open_ticket"}}, temperature=0)
    with openai_client(daemon) as client:
        whole = client.chat.completions.create(model="default", **request)
        message = whole.choices[0].message
        assert whole.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls is not None and len(message.tool_calls) == 1
        expected = message.tool_calls[0]

        pieces: list[str] = []
        starts: list[tuple[int, str | None, str | None]] = []
        finish = None
        for chunk in client.chat.completions.create(model="default", stream=True, **request):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            check_no_markers(delta.content)
            for call in delta.tool_calls or ():
                if call.id is not None:
                    assert call.function is not None
                    starts.append((call.index, call.id, call.function.name))
                if call.function is not None and call.function.arguments:
                    pieces.append(call.function.arguments)
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(index, name) for index, _, name in starts] == [(0, expected.function.name)]
    assert starts[0][1] is not None and starts[0][1].startswith("call_")
    assert len(pieces) > 2, "arguments must stream in pieces, not as one chunk at the end"
    assert "".join(pieces) == expected.function.arguments
    jsonschema.validate(json.loads("".join(pieces)), SCHEMAS[expected.function.name])


def test_parallel_calls_each_validate_and_are_numbered(daemon: DaemonProcess) -> None:
    seen_several = False
    with daemon.client() as client:
        for seed in range(10, 16):
            reply = client.post(CHAT, json=tool_request(temperature=1.5, seed=seed, max_tokens=400)).json()
            calls = reply["choices"][0]["message"]["tool_calls"]
            if reply["choices"][0]["finish_reason"] == "length":
                calls = calls[:-1]  # the token limit cut the last one short (the model may call on and on)
            else:
                assert reply["choices"][0]["finish_reason"] == "tool_calls"
            check_calls(calls)
            assert len({call["id"] for call in calls}) == len(calls)
            seen_several |= len(calls) > 1
    assert seen_several, "with parallel_tool_calls (the default) some reply should hold several calls"


def test_tool_choice_none_and_auto_never_leak_markers(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        for choice in ("none", "auto"):
            for seed in (1, 2):
                reply = client.post(CHAT, json=tool_request(choice, temperature=1.0, seed=seed)).json()
                message = reply["choices"][0]["message"]
                check_no_markers(message["content"])
                if choice == "none":
                    assert "tool_calls" not in message
                elif message.get("tool_calls"):  # the random model may open a call; then it is a valid one
                    check_calls(message["tool_calls"])


def test_a_call_cut_off_by_max_tokens_comes_back_as_far_as_written(daemon: DaemonProcess) -> None:
    request = tool_request({"type": "function", "function": {"name": "open_ticket"}}, temperature=0, max_tokens=24)
    with daemon.client() as client:
        whole = client.post(CHAT, json=request).json()
        streamed = client.post(CHAT, json={**request, "stream": True}).text
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "open_ticket"
    with pytest.raises(json.JSONDecodeError):  # not finished: the client can tell from finish_reason
        json.loads(call["function"]["arguments"])
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    pieces = [
        tool["function"].get("arguments") or ""
        for event in events
        for choice in event["choices"]
        for tool in choice["delta"].get("tool_calls") or ()
    ]
    assert "".join(pieces) == call["function"]["arguments"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_eight_concurrent_tool_requests_mixed_with_plain_ones(daemon: DaemonProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with async_unix_client(daemon.socket, timeout=120) as client:
            bodies = [tool_request(temperature=1.0, seed=seed, parallel_tool_calls=False) for seed in range(8)]
            bodies += [{"messages": ASK, "max_tokens": 24, "temperature": 0} for _ in range(4)]
            return await asyncio.gather(*(client.post(CHAT, json=body) for body in bodies))

    replies = asyncio.run(run())
    assert all(reply.status_code == 200 for reply in replies), [reply.text for reply in replies]
    for reply in replies[:8]:
        assert reply.json()["choices"][0]["finish_reason"] == "tool_calls"
        check_calls(reply.json()["choices"][0]["message"]["tool_calls"])
    plain = [reply.json()["choices"][0] for reply in replies[8:]]
    assert all("tool_calls" not in choice["message"] and choice["message"]["content"] for choice in plain)
    assert len({choice["message"]["content"] for choice in plain}) == 1  # batching did not disturb greedy text


def test_a_tool_conversation_continues_after_the_results(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        first = client.post(CHAT, json=tool_request(temperature=0)).json()["choices"][0]["message"]
        history = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
            *({"role": "tool", "tool_call_id": call["id"], "content": '{"ok": true}'} for call in first["tool_calls"]),
        ]
        prompt = client.post("/apply-template", json={"messages": history, "tools": TOOLS}).json()["prompt"]
        second = client.post(CHAT, json={"messages": history, "tools": TOOLS, "max_tokens": 16, "temperature": 0})
    assert second.status_code == 200, second.text
    assert "<|tool_response>response:" in prompt and "ok:true" in prompt  # the fixture's template folds results
    name = first["tool_calls"][0]["function"]["name"]
    assert f"<|tool_call>call:{name}{{" in prompt


def test_thinking_switches_the_template_and_thoughts_stay_out_of_content(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        off = client.post("/apply-template", json={"messages": ASK}).json()["prompt"]
        on = client.post("/apply-template", json={"messages": ASK, "reasoning_effort": "low"}).json()["prompt"]
        reply = client.post(CHAT, json={"messages": ASK, "think": True, "max_tokens": 40, "temperature": 1.0})
    assert "<|think|>" in on and "<|think|>" not in off
    assert off.endswith("<|channel>thought\n<channel|>") and not on.endswith("<channel|>")
    check_no_markers(reply.json()["choices"][0]["message"]["content"])


def test_thoughts_before_a_call_come_back_as_reasoning_content(daemon: DaemonProcess) -> None:
    """With thinking on, the required-call grammar lets the model think first (the random model does so
    for some seeds): the thought is reasoning_content, streamed as delta.reasoning_content, never content."""
    thought_seen = False
    with daemon.client() as client:
        for seed in range(20, 32):
            request = tool_request("required", temperature=1.0, seed=seed, think=True, parallel_tool_calls=False)
            request["max_tokens"] = 400
            message = client.post(CHAT, json=request).json()["choices"][0]["message"]
            assert not message["content"]  # a thought (the random model may think to the limit) or a call
            if message.get("reasoning_content"):
                thought_seen = True
                check_no_markers(message["reasoning_content"])
                streamed = client.post(CHAT, json={**request, "stream": True}).text
                events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
                deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
                assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
                assert all(not d.get("content") for d in deltas)
                break
    assert thought_seen, "no seed made the model think first"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.0.function.parameters",
        ),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages.1.tool_call_id"),
    ],
)
def test_bad_tool_input_is_a_400_naming_the_field(daemon: DaemonProcess, body: dict[str, Any], param: str) -> None:
    with daemon.client() as client:
        reply = client.post(CHAT, json={"messages": ASK, **body})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param
        assert client.post(CHAT, json=tool_request(temperature=0)).status_code == 200  # still serving


# ---------------------------------------------------------------------------- MQTT
@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, broker: Broker) -> Iterator[DaemonProcess]:
    proc = mqtt_daemon(tmp_path_factory.mktemp("tools-mqtt"), tiny_gguf, broker, "dev-tools")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_mqtt_calls_validate_streamed_and_not(broker: Broker, device: DaemonProcess) -> None:
    topic = Topics("dev-tools").req
    with MqttRequester(broker.client_settings()) as client:
        [final] = client.ask(topic, tool_request(temperature=1.2, seed=4, id="t-1"))
        assert isinstance(final, ReplyFinal)
        assert final.finish_reason == "tool_calls"
        assert final.tool_calls is not None
        check_calls([call.model_dump() for call in final.tool_calls])

        request = tool_request({"type": "function", "function": {"name": "open_ticket"}}, temperature=0, stream=True)
        replies = client.ask(topic, {**request, "id": "t-2"})
        streamed = check_stream(replies)
        [whole] = client.ask(topic, {**request, "stream": False, "id": "t-3"})
    assert streamed.finish_reason == "tool_calls"
    chunks = [reply for reply in replies if isinstance(reply, ReplyChunk)]
    firsts = [call for chunk in chunks for call in chunk.tool_calls or () if call.id is not None]
    assert len(firsts) == 1 and firsts[0].function.name is not None
    pieces = [call.function.arguments or "" for chunk in chunks for call in chunk.tool_calls or ()]
    assert isinstance(whole, ReplyFinal) and whole.tool_calls is not None
    assert "".join(pieces) == whole.tool_calls[0].function.arguments
    assert firsts[0].function.name == whole.tool_calls[0].function.name
    check_calls([call.model_dump() for call in whole.tool_calls])


# ---------------------------------------------------------------------------- CLI
def test_cli_run_prints_each_call_as_a_json_line(tiny_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "tools.json").write_text(json.dumps({"tools": TOOLS}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env.update(EDGERT_STATE_DIR=str(tmp_path / "state"), EDGERT_ENGINE__N_THREADS="1")
    base = [sys.executable, "-m", "edgert", "run", "-m", str(tiny_gguf), "--tools", str(tmp_path / "tools.json")]
    args = ["--tool-choice", "open_ticket", "-t", "0", "-n", "200", "Ticket please"]
    proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [line["name"] for line in lines] == ["open_ticket"]
    jsonschema.validate(lines[0]["arguments"], SCHEMAS["open_ticket"])
    as_json = subprocess.run(
        [*base, "--json", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    reply = json.loads(as_json.stdout)
    assert reply["finish_reason"] == "tool_calls"
    assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == lines[0]["arguments"]  # greedy: same call
    bad = subprocess.run(
        [*base[:-1], str(tmp_path / "missing.json"), "hi"], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1 and "missing.json" in bad.stderr
