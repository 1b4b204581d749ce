"""The model host (issue 14): a retired model closes when its last request ends, not by polling the engine.

Real runtimes on the tiny GGUF; the only thing observed from outside is each runtime's ``close``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.api.schemas import CompletionRequest
from edgert.serving.host import ModelHost
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.service import InferenceService, Limits
from edgert.settings import load_settings

TOKENS = 24


@pytest.fixture
def runtimes(tmp_path: Path, tiny_gguf: Path) -> Iterator[tuple[Runtime, Runtime]]:
    settings = load_settings(
        state_dir=tmp_path, engine={"n_ctx": 512, "n_parallel": 2, "n_threads": 1, "prefix_cache_entries": 0}
    )
    old, new = open_runtime(settings, str(tiny_gguf)), open_runtime(settings, str(tiny_gguf))
    yield old, new
    for runtime in (old, new):
        runtime.close()  # idempotent: a closed scheduler and backend stay closed


def closes(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    closed = threading.Event()
    real = runtime.close

    def close() -> None:
        real()
        closed.set()

    monkeypatch.setattr(runtime, "close", close)
    return closed


def ask() -> CompletionRequest:
    return CompletionRequest(prompt="Once upon a time", max_tokens=TOKENS, ignore_eos=True, temperature=0)


def test_a_retired_model_closes_when_its_last_request_ends(
    runtimes: tuple[Runtime, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = runtimes
    old_closed, new_closed = closes(old, monkeypatch), closes(new, monkeypatch)
    host = ModelHost.serving_runtime(old)
    host.ready = True
    service = InferenceService(host, Limits(default_timeout_s=60, max_tokens_cap=TOKENS))

    async def scenario() -> None:
        stream = await service.generate(ask(), "on-old")
        # Retire it before anything else runs on the loop: its end can only be counted there, so it is
        # in flight now whatever the engine thread has done (awaiting a first chunk first let a loaded
        # machine deliver the whole 24-token reply, end included, and the count read 0).
        retired = host.retire(host.serve(new) or old)
        assert host.in_flight(old) == 1
        assert not retired.is_set()
        assert not old_closed.is_set()  # never cut: its request runs on

        later = await service.generate(ask(), "on-new")  # new requests go to the new model
        assert host.in_flight(new) == 1
        _, result = await stream.collect()
        assert result.completion_tokens == TOKENS  # the old request ran in full
        await later.collect()
        # the end reached the loop: the old model closes (off the loop), the new one is not touched
        assert await asyncio.to_thread(retired.wait, 30)
        assert host.in_flight(new) == 0
        assert not new_closed.is_set()

    asyncio.run(scenario())
    assert old_closed.is_set()
    assert host.served is not None
    assert host.serving is new


def test_an_idle_retired_model_closes_at_once_and_only_once(
    runtimes: tuple[Runtime, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = runtimes
    old_closed = closes(old, monkeypatch)
    host = ModelHost.serving_runtime(old)
    replaced = host.serve(new)
    assert replaced is old
    assert host.retire(old).is_set()  # no request on it: closed on the caller's thread
    assert old_closed.is_set()
    old_closed.clear()
    assert host.retire(old).is_set()  # retiring it again does nothing
    host.close_now(old)
    assert not old_closed.is_set()
    host.close_all()
    assert host.serving is None
