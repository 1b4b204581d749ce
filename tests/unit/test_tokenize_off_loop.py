"""Finding 11 of issue 13: prompts are rendered and tokenized off the event loop (HTTP and MQTT), huge ones not at all.

The HTTP app runs in-process (httpx's ASGI transport) on the real tiny GGUF, with a spy around the
runtime's prompt builders: which thread runs them, and whether they run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgert.serving.host import ModelHost
from edgert.serving.metrics import Metrics
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.service import InferenceService, Limits
from edgert.settings import load_settings
from edgert.transport.http import ApiState, create_app

N_CTX = 1024


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Runtime]:
    settings = load_settings(
        state_dir=tmp_path_factory.mktemp("tokenize"),
        engine={"n_ctx": N_CTX, "n_parallel": 2, "n_threads": 1, "prefix_cache_entries": 0},
    )
    rt = open_runtime(settings, str(tiny_gguf))
    yield rt
    rt.close()


@pytest.fixture
def calls(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(which prompt builder, the thread it ran on) for every prompt the runtime builds."""
    seen: list[tuple[str, int]] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, threading.get_ident()))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runtime, "chat_prompt_with_media", spy("chat", runtime.chat_prompt_with_media))
    monkeypatch.setattr(runtime, "completion_prompt", spy("completion", runtime.completion_prompt))
    return seen


def post(runtime: Runtime, path: str, body: dict[str, object]) -> tuple[httpx.Response, int]:
    """POST to an in-process app; returns the response and the event loop's thread id."""
    service = InferenceService(ModelHost.serving_runtime(runtime), Limits(default_timeout_s=60, max_tokens_cap=4))
    service.ready = True
    state = ApiState(metrics=Metrics(service.stats), max_body_bytes=8 * 1_048_576, service=service)

    async def run() -> tuple[httpx.Response, int]:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://edgert", timeout=60) as client:
            return await client.post(path, json=body), threading.get_ident()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("path", "body", "builder"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, "chat"),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2}, "completion"),
    ],
)
def test_prompts_are_tokenized_on_a_worker_thread(
    runtime: Runtime, calls: list[tuple[str, int]], path: str, body: dict[str, object], builder: str
) -> None:
    response, loop_thread = post(runtime, path, body)
    assert response.status_code == 200, response.text
    assert [name for name, _ in calls] == [builder]
    assert all(thread != loop_thread for _, thread in calls), "the prompt was tokenized on the event loop"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (N_CTX * 64 + 1)}]}, "messages"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "y" * (N_CTX * 32)},
                    {"role": "user", "content": "z" * (N_CTX * 32 + 1)},
                ]
            },
            "messages",
        ),
        ("/v1/completions", {"prompt": "w" * (N_CTX * 64 + 1)}, "prompt"),
    ],
)
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(
    runtime: Runtime, calls: list[tuple[str, int]], path: str, body: dict[str, object], field: str
) -> None:
    response, _ = post(runtime, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == field
    assert error["message"].startswith(f"{field}: ")
    assert f"holds {N_CTX} tokens" in error["message"]
    assert calls == [], "an oversized prompt was tokenized"


def test_mqtt_requests_are_tokenized_on_a_worker_thread(runtime: Runtime, calls: list[tuple[str, int]]) -> None:
    """The MQTT transport admits on the loop (cheap checks only) and tokenizes in the request's task."""
    from edgert.transport.mqtt import MqttTransport
    from edgert.transport.mqtt_link import Incoming, Outgoing

    service = InferenceService(ModelHost.serving_runtime(runtime), Limits(default_timeout_s=60, max_tokens_cap=4))
    service.ready = True
    state = ApiState(metrics=Metrics(service.stats), max_body_bytes=8 * 1_048_576, service=service)
    settings = load_settings(mqtt={"broker": "127.0.0.1:1", "device_id": "dev-1"})
    sent: list[Outgoing] = []

    async def run() -> int:
        transport = MqttTransport(settings, state)
        transport._send = sent.append  # type: ignore[method-assign]  # no broker: keep what would go out
        payload = b'{"id": "r1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
        transport._on_request(Incoming("edgert/v1/dev-1/chat", payload, "edgert/v1/dev-1/reply/c1", None))
        assert calls == [], "the prompt was tokenized while the message was being admitted"
        while transport._running:
            await asyncio.sleep(0.01)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert [name for name, _ in calls] == ["chat"]
    assert all(thread != loop_thread for _, thread in calls), "the prompt was tokenized on the event loop"
    assert sent, "no reply was produced"
    assert b'"finish_reason"' in sent[-1].payload
