"""Prompt-prefix KV reuse on the real engine (tiny Gemma 4: sliding window 128 tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.engine.base import SamplingParams
from edgert.serving.prefix_cache import PrefixCache, common_prefix
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.scheduler import Finished
from edgert.settings import load_settings

GREEDY = SamplingParams(temperature=0.0)
# ~300 tokens with the fixture's cut vocabulary: longer than the 128-token sliding window
SYSTEM = "You are the assistant of a bakery kiosk. " + " ".join(f"Rule {i}: be kind to customers." for i in range(25))
QUESTIONS = ["Do you sell bread?", "What time do you open?", "Is there coffee?", "Any vegan cakes?"]


def open_rt(tmp_path: Path, tiny_gguf: Path, **engine: object) -> Runtime:
    base: dict[str, object] = {"n_ctx": 4096, "n_parallel": 2, "n_threads": 1, "n_threads_batch": 1}
    base.update(engine)
    return open_runtime(load_settings(state_dir=tmp_path, model=str(tiny_gguf), engine=base))


@pytest.fixture
def runtime(tmp_path: Path, tiny_gguf: Path) -> Iterator[Runtime]:
    rt = open_rt(tmp_path, tiny_gguf)
    yield rt
    rt.close()


def ask(rt: Runtime, question: str, system: str = SYSTEM) -> tuple[str, Finished]:
    prompt = rt.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": question}])

    async def go() -> tuple[str, Finished]:
        return await rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=24)).collect()

    return asyncio.run(go())


def test_reuse_gives_the_same_output_and_skips_the_shared_prompt(tmp_path: Path, tiny_gguf: Path) -> None:
    plain = open_rt(tmp_path / "plain", tiny_gguf, prefix_cache_entries=0)
    try:
        expected = [ask(plain, q)[0] for q in QUESTIONS]
    finally:
        plain.close()
    rt = open_rt(tmp_path / "cached", tiny_gguf)
    try:
        results = [ask(rt, q) for q in QUESTIONS]
        stats = rt.scheduler.stats
    finally:
        rt.close()
    assert [text for text, _ in results] == expected
    cached = [r.cached_tokens for _, r in results]
    prompt_len = results[0][1].prompt_tokens
    assert prompt_len > 200
    # 1st: nothing cached; 2nd: the shared part is longer than the sliding window, so the
    # whole-prompt candidate cannot serve it and an exact entry is cut at the boundary;
    # from the 3rd on, the system prompt comes from the cache.
    assert cached[0] == 0
    assert cached[2] > prompt_len - 20
    assert cached[3] == cached[2]
    assert stats.prefix_hits >= 2
    assert stats.prefix_tokens_reused >= 2 * cached[2]


def test_short_shared_prefix_is_reused_from_a_candidate_entry(runtime: Runtime) -> None:
    system = "Be brief. " * 8  # ~40 tokens: within the sliding window
    ask(runtime, QUESTIONS[0], system)
    _, second = ask(runtime, QUESTIONS[1], system)
    assert second.cached_tokens >= 32


def test_shared_prefixes_persist_across_restarts(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_rt(tmp_path, tiny_gguf)
    try:
        first = [ask(rt, q)[0] for q in QUESTIONS[:2]]
    finally:
        rt.close()
    saved = list((tmp_path / "prefix-cache").glob("*.kvstate"))
    assert len(saved) == 1
    rt = open_rt(tmp_path, tiny_gguf)
    try:
        assert rt.scheduler.stats.prefix_entries == 1
        text, result = ask(rt, QUESTIONS[0])
    finally:
        rt.close()
    assert result.cached_tokens > 200
    assert text == first[0]


def test_private_kv_reuses_and_persists_prefixes_with_the_same_outputs(tmp_path: Path, tiny_gguf: Path) -> None:
    # kv_unified off: each sequence (slot or cache entry) has its own 1024 cells; llama.cpp copies
    # a whole sequence stream, and the copy is trimmed to the shared part
    private: dict[str, object] = {"kv_unified": False, "n_ctx": 6 * 1024}
    plain = open_rt(tmp_path / "plain", tiny_gguf, prefix_cache_entries=0, **private)
    try:
        assert plain.backend.info.n_ctx_seq == 3072  # 2 slots
        expected = [ask(plain, q)[0] for q in QUESTIONS]
    finally:
        plain.close()
    rt = open_rt(tmp_path / "cached", tiny_gguf, **private)
    try:
        assert rt.backend.info.n_ctx_seq == 1024  # 2 slots + 4 cache entries
        results = [ask(rt, q) for q in QUESTIONS]
    finally:
        rt.close()
    assert [text for text, _ in results] == expected
    assert results[0][1].cached_tokens == 0
    assert all(r.cached_tokens > 250 for _, r in results[2:])
    restarted = open_rt(tmp_path / "cached", tiny_gguf, **private)
    try:
        text, result = ask(restarted, QUESTIONS[1])
    finally:
        restarted.close()
    assert result.cached_tokens > 250
    assert text == expected[1]


def test_a_saved_prefix_that_does_not_match_its_name_is_discarded(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_rt(tmp_path, tiny_gguf)
    try:
        for q in QUESTIONS[:2]:
            ask(rt, q)
    finally:
        rt.close()
    (saved,) = (tmp_path / "prefix-cache").glob("*.kvstate")
    forged = saved.with_name(saved.name.split("-")[0] + "-" + "0" * 24 + ".kvstate")
    saved.rename(forged)
    rt = open_rt(tmp_path, tiny_gguf)
    try:
        assert rt.scheduler.stats.prefix_entries == 0
        assert not forged.exists()
        assert ask(rt, QUESTIONS[0])[1].cached_tokens == 0
    finally:
        rt.close()


def test_warm_prefix_serves_the_first_request(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_rt(tmp_path, tiny_gguf, prefix_cache_persist=False)
    try:
        assert asyncio.run(rt.warm_prefixes([SYSTEM])) == 1
        _, result = ask(rt, QUESTIONS[2])
    finally:
        rt.close()
    assert result.cached_tokens > 200


def test_cached_prefixes_give_way_when_requests_need_the_kv_cache(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_rt(tmp_path, tiny_gguf, n_ctx=1024, prefix_cache_persist=False)
    try:
        ask(rt, QUESTIONS[0])
        ask(rt, QUESTIONS[1])
        assert rt.scheduler.stats.prefix_entries >= 1

        prompt = rt.chat_prompt([{"role": "user", "content": "word " * 150}])

        async def big() -> Finished:
            request = rt.request(prompt, sampling=GREEDY, max_tokens=1024 - len(prompt) - 1, ignore_eos=True)
            return (await rt.scheduler.submit(request).collect())[1]

        assert asyncio.run(big()).reason == "length"
        # the system prompt's entries made room; what is left is the big prompt's own candidate
        # entry, whose cells the request computed itself (moved from its reservation, not added)
        assert rt.scheduler.stats.prefix_entries == 1
        assert rt.scheduler.stats.kv_reserved == len(prompt) - 1
        assert ask(rt, QUESTIONS[2])[1].cached_tokens == 0
    finally:
        rt.close()


def test_a_shared_cached_prefix_is_counted_once_when_admitting(tmp_path: Path, tiny_gguf: Path) -> None:
    # 4 requests of ~310 prompt tokens + 120 new ones: counted one by one only 2 fit in 1024
    # cells; sharing the ~300-token system prompt's cells, all 4 run at once.
    rt = open_rt(tmp_path, tiny_gguf, n_ctx=1024, n_parallel=4, prefix_cache_persist=False)
    try:
        ask(rt, QUESTIONS[0])
        ask(rt, QUESTIONS[1])  # cuts the exact shared entry
        prompts = [
            rt.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) for q in QUESTIONS
        ]
        assert all(2 * (len(p) + 120) <= 1024 < 3 * (len(p) + 120) for p in prompts)

        async def together() -> tuple[int, list[Finished]]:
            streams = [
                rt.scheduler.submit(rt.request(p, sampling=GREEDY, max_tokens=120, ignore_eos=True)) for p in prompts
            ]
            runs = asyncio.gather(*(s.collect() for s in streams))
            peak = 0
            while not runs.done():
                peak = max(peak, rt.scheduler.stats.active)
                await asyncio.sleep(0.0005)
            return peak, [finished for _, finished in await runs]

        peak, results = asyncio.run(together())
        assert peak == 4
        assert [r.reason for r in results] == ["length"] * 4
        assert all(r.cached_tokens > 250 for r in results)
        assert rt.scheduler.stats.kv_reserved == sum(
            len(e)
            for e in rt.scheduler._prefix.cache.entries  # type: ignore[union-attr]
        )
    finally:
        rt.close()


def test_prefix_cache_bookkeeping() -> None:
    cache = PrefixCache([10, 11], min_tokens=2, max_tokens=100, n_swa=4)
    assert common_prefix((1, 2, 3), (1, 2, 4)) == 2
    a = cache.add((1, 2, 3, 4, 5, 6, 7, 8), cache.take_seq() or 0, exact=False)
    b = cache.add((1, 2, 9), cache.take_seq() or 0, exact=True)
    match = cache.best_match((1, 2, 3, 4, 7))
    assert match is not None
    assert match.entry is a
    assert match.common == 4
    # SWA: the entry only holds positions >= 4, the reuse of 4 needs position 0 onwards
    assert not cache.usable(match, 4, entry_pos_min=4)
    assert cache.usable(match, 4, entry_pos_min=0)
    assert cache.lru() is a  # candidates go before exact entries
    cache.drop(a)
    assert cache.lru() is b
    assert cache.take_seq() is not None
