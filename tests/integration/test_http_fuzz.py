"""Fuzzing the socket's HTTP API (issue 13, "done means"): no 500s, no daemon death, clear 4xx errors.

Hypothesis builds request bodies from OpenAI's shapes with every field now and then replaced by
arbitrary JSON (and some bodies that are not JSON at all), plus the extension headers, and sends
them to one real daemon on the tiny GGUF. Generations are capped at 4 tokens so the pass stays
bounded (about 20 s here). ``derandomize`` keeps CI runs identical; run with
``--hypothesis-seed=random`` locally to explore further.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.daemon import DaemonProcess, start_daemon

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: what a bad request may get; 504 is a deadline the request itself asked for (timeout field or header)
ALLOWED = {200, 400, 404, 413, 415, 504}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: Python's json writes and reads them
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def fields(noise: bool) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """Strategies for chat and completion bodies: plausible values, or now and then any JSON at all (noise)."""

    def sometimes(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(valid, valid, valid, valid, json_values) if noise else valid

    parts = st.lists(
        st.fixed_dictionaries({"type": sometimes(st.just("text")), "text": sometimes(st.text(max_size=40))}),
        min_size=1,
        max_size=3,
    )
    message = st.fixed_dictionaries(
        {
            "role": sometimes(st.sampled_from(["user", "system", "assistant", "developer"])),
            "content": sometimes(st.text(max_size=80) | parts),
        }
    )
    response_format = st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a", "b"]}}},
            {"type": "json_schema"},
        ]
    )
    sampling = {
        "model": sometimes(st.sampled_from(["default", "tiny-gemma4.gguf", "gpt-4o", ""])),
        "max_tokens": sometimes(st.integers(min_value=-3, max_value=10**9)),
        "temperature": sometimes(st.floats(min_value=-1, max_value=6)),
        "top_p": sometimes(st.floats(min_value=-0.5, max_value=1.5)),
        "top_k": sometimes(st.integers(min_value=-5, max_value=10**6)),
        "min_p": sometimes(st.floats(min_value=-0.5, max_value=1.5)),
        "repeat_penalty": sometimes(st.floats(min_value=-1, max_value=6)),
        "seed": sometimes(st.integers(min_value=-(2**65), max_value=2**65)),
        "stop": sometimes(st.text(max_size=8) | st.lists(st.text(max_size=8), max_size=5)),
        "stream": sometimes(st.booleans()),
        "stream_options": sometimes(st.fixed_dictionaries({"include_usage": sometimes(st.booleans())})),
        "response_format": sometimes(response_format),
        "n": sometimes(st.integers(min_value=0, max_value=2)),
        "timeout": sometimes(st.floats(min_value=-1, max_value=100)),
        "priority": sometimes(st.sampled_from(["interactive", "batch", "urgent"])),
        "ignore_eos": sometimes(st.booleans()),
    }
    chat = st.fixed_dictionaries({"messages": sometimes(st.lists(message, min_size=1, max_size=4))}, optional=sampling)
    completion = st.fixed_dictionaries({"prompt": sometimes(st.text(max_size=200))}, optional=sampling)
    return chat, completion


chat_bodies, completion_bodies = fields(noise=True)
plausible_chat, plausible_completion = fields(noise=False)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16).map(str.strip)
headers = st.fixed_dictionaries(
    {},
    optional={
        "x-edgert-timeout": header_text | st.sampled_from(["0.000001", "5", "-1", "nan", "inf", "1e999"]),
        "x-edgert-priority": header_text | st.sampled_from(["interactive", "batch"]),
        "x-request-id": header_text,
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
    },
)


def encode(body: Any, raw: bytes | None) -> bytes:
    return raw if raw is not None else json.dumps(body).encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(tmp_path_factory.mktemp("fuzz"), tiny_gguf, serve__max_tokens_cap="4")
    yield proc
    assert proc.proc.poll() is None, "the daemon died under fuzzing:\n" + proc.log()[-4000:]
    assert proc.stop() == 0, proc.log()[-4000:]
    assert "Traceback" not in proc.log(), proc.log()[-6000:]


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    with daemon.client(timeout=60) as http:
        yield http


def check(response: httpx.Response, request: str) -> None:
    assert response.status_code in ALLOWED, f"{response.status_code} for {request}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str)
        assert error["message"], response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]


def post(client: httpx.Client, path: str, content: bytes, extra: dict[str, str]) -> None:
    response = client.post(path, content=content, headers={"content-type": "application/json", **extra})
    check(response, f"POST {path} {extra} {content[:300]!r}")


@FUZZ
@given(body=chat_bodies, raw=st.none() | st.none() | st.binary(max_size=64), extra=headers)
def test_fuzz_chat_completions(
    client: httpx.Client, body: dict[str, Any], raw: bytes | None, extra: dict[str, str]
) -> None:
    post(client, "/v1/chat/completions", encode(body, raw), extra)


@FUZZ
@given(body=plausible_chat | plausible_completion, extra=headers)
def test_fuzz_plausible_requests(client: httpx.Client, body: dict[str, Any], extra: dict[str, str]) -> None:
    post(client, "/v1/chat/completions" if "messages" in body else "/v1/completions", encode(body, None), extra)


@FUZZ
@given(body=completion_bodies, raw=st.none() | st.none() | st.binary(max_size=64), extra=headers)
def test_fuzz_completions(client: httpx.Client, body: dict[str, Any], raw: bytes | None, extra: dict[str, str]) -> None:
    post(client, "/v1/completions", encode(body, raw), extra)


@settings(FUZZ, max_examples=60)
@given(body=json_values, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/update/check"]))
def test_fuzz_any_json_anywhere(client: httpx.Client, body: Any, path: str) -> None:
    post(client, path, json.dumps(body).encode(), {})


@settings(FUZZ, max_examples=40)
@given(
    model=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"), max_size=30)
)
def test_fuzz_model_lookup(client: httpx.Client, model: str) -> None:
    response = client.get("/v1/models/" + model)
    check(response, f"GET /v1/models/{model!r}")


def test_daemon_still_serves_after_the_fuzzing(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200
