"""Sampling under a grammar on the real llama.cpp: the shortlist shortcut picks what the full pass picks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.chat.tool_grammar import ToolSpec, tool_call_grammar
from edgert.engine.base import SamplingParams
from edgert.engine.llama import LlamaBackend, LlamaSampler
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import load_settings

SCHEMA = {
    "type": "object",
    "properties": {
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "qty": {"type": "integer"},
        "gift": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["size", "qty", "gift"],
}
GRAMMAR = tool_call_grammar([ToolSpec("order", SCHEMA)])


@pytest.fixture
def runtime(tmp_path: Path, tiny_gguf: Path) -> Iterator[Runtime]:
    engine = {"n_ctx": 1024, "n_parallel": 1, "n_threads": 1, "n_threads_batch": 1, "prefix_cache_entries": 0}
    rt = open_runtime(load_settings(state_dir=tmp_path, model=str(tiny_gguf), engine=engine))
    yield rt
    rt.close()


def generate(rt: Runtime, params: SamplingParams, *, shortlist: bool) -> tuple[str, int]:
    backend = rt.backend
    assert isinstance(backend, LlamaBackend)
    original = backend.new_sampler
    shortcuts = 0

    def sampler(p: SamplingParams) -> LlamaSampler:
        made = original(p)
        if not shortlist:
            made.shortlist_need = 0
        return made

    def counting(sampler: LlamaSampler, logits: object) -> int | None:
        nonlocal shortcuts
        picked = shortlist_pick(sampler, logits)
        shortcuts += picked is not None
        return picked

    shortlist_pick = backend._pick_from_shortlist
    backend.new_sampler = sampler  # type: ignore[method-assign]
    backend._pick_from_shortlist = counting  # type: ignore[method-assign,assignment]
    try:
        prompt = rt.chat_prompt([{"role": "user", "content": "One shirt in M please"}])
        request = rt.request(prompt, sampling=params, max_tokens=120)

        async def run() -> str:
            return (await rt.scheduler.submit(request).collect())[0]

        text = asyncio.run(run())
    finally:
        backend.new_sampler = original  # type: ignore[method-assign]
        backend._pick_from_shortlist = shortlist_pick  # type: ignore[method-assign]
    return text, shortcuts


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, grammar=GRAMMAR),
        SamplingParams(temperature=1.0, top_k=64, seed=5, grammar=GRAMMAR),
        SamplingParams(temperature=1.5, top_k=40, top_p=0.9, seed=9, grammar=GRAMMAR),
    ],
)
def test_the_shortlist_picks_what_the_whole_vocabulary_picks(runtime: Runtime, params: SamplingParams) -> None:
    full, unused = generate(runtime, params, shortlist=False)
    short, used = generate(runtime, params, shortlist=True)
    assert unused == 0
    assert used > 0, "the random model's picks are rejected often: the shortlist must have been used"
    assert short == full
    assert full.startswith("<|tool_call>call:order{")


def test_penalties_and_no_top_k_never_take_the_shortlist(runtime: Runtime) -> None:
    backend = runtime.backend
    assert isinstance(backend, LlamaBackend)
    for params in (
        SamplingParams(temperature=0.0, repeat_penalty=1.2, grammar=GRAMMAR),
        SamplingParams(temperature=1.0, top_k=0, grammar=GRAMMAR),
    ):
        sampler = backend.new_sampler(params)
        assert sampler.shortlist_need == 0
        sampler.close()
