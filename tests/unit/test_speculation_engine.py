"""Speculative decoding on the real llama.cpp: the tiny Gemma 4 fixture with its random MTP drafter.

The random drafter (``tiny-gemma4-assistant.gguf``, made by ``benchmarks/make_mtp_drafter.py``) almost never
guesses right, so it exercises the MTP context and the reject path. The accept path is exercised by an
*oracle* drafter: the backend's ``draft`` replaced with one that proposes the known greedy continuation, with
every third token spoiled, so rounds are accepted fully, partly and not at all. Either way the output must be
exactly the output without speculation: every emitted token is the model's own sample after the accepted
prefix, and rejected positions must leave the KV cache (a stale cell would change every later token).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from edgert.engine.base import DraftRequest, SamplingParams
from edgert.engine.llama import LlamaBackend
from edgert.errors import ModelFileError, ModelMissingError
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import load_settings

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hi", "Tell me about the sea.", "Count: one two three", "Bonjour, ça va ?"]
TINY_DRAFTER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-gemma4-assistant.gguf"


def open_tiny(tmp_path: Path, model: Path, **engine: object) -> Runtime:
    base: dict[str, object] = {"n_ctx": 1024, "n_parallel": 4, "n_threads": 1, "n_threads_batch": 1, "n_batch": 256}
    base.update(engine)
    return open_runtime(load_settings(state_dir=tmp_path, model=str(model), engine=base))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Runtime]:
    rt = open_tiny(tmp_path_factory.mktemp("plain"), tiny_gguf, speculative="off")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Runtime]:
    rt = open_tiny(tmp_path_factory.mktemp("spec"), tiny_gguf, speculative="on", drafter=str(TINY_DRAFTER))
    yield rt
    rt.close()


def chat(rt: Runtime, text: str) -> tuple[int, ...]:
    return rt.chat_prompt([{"role": "user", "content": text}])


def run(rt: Runtime, text: str, **kwargs: object) -> tuple[str, object]:
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("max_tokens", 40)
    kwargs.setdefault("ignore_eos", True)
    request = rt.request(chat(rt, text), **kwargs)  # type: ignore[arg-type]

    async def go() -> tuple[str, object]:
        return await rt.scheduler.submit(request).collect()

    return asyncio.run(go())


def run_together(rt: Runtime, texts: list[str], **kwargs: object) -> list[str]:
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("max_tokens", 40)
    kwargs.setdefault("ignore_eos", True)

    async def go() -> list[str]:
        streams = [rt.scheduler.submit(rt.request(chat(rt, t), **kwargs)) for t in texts]  # type: ignore[arg-type]
        return [(await s.collect())[0] for s in streams]

    return asyncio.run(go())


class Oracle:
    """Drafts the known continuation of each running prompt, every ``spoil``-th draft token wrong."""

    def __init__(self, backend: LlamaBackend, spoil: int = 3) -> None:
        self.backend = backend
        self.spoil = spoil
        self.sequences: list[list[int]] = []  # prompt + reference output, one per request
        self.calls = 0

    def draft(self, requests: list[DraftRequest]) -> list[list[int]]:
        out = []
        for r in requests:
            self.calls += 1
            found: list[int] = []
            for full in self.sequences:
                if r.pos < len(full) and full[r.pos] == r.last_token:
                    found = full[r.pos + 1 : r.pos + 1 + r.n_max]
                    break
            spoiled = [t if (r.pos + i) % self.spoil else (t + 1) % 8000 for i, t in enumerate(found)]
            out.append(spoiled)
        return out


def reference_tokens(
    rt: Runtime, text: str, monkeypatch: pytest.MonkeyPatch, sampling: SamplingParams = GREEDY
) -> list[int]:
    """The prompt and the tokens a plain run samples for it (recorded: detokenizing would not round-trip)."""
    backend = rt.backend
    assert isinstance(backend, LlamaBackend)
    sampled: list[int] = []
    original = backend.sample

    def recording(sampler: object, batch_index: int) -> int:
        token = original(sampler, batch_index)  # type: ignore[arg-type]
        sampled.append(token)
        return token

    with monkeypatch.context() as patch:
        patch.setattr(backend, "sample", recording)
        run(rt, text, sampling=sampling, max_tokens=60)
    return list(chat(rt, text)) + sampled


def test_the_random_mtp_drafter_drafts_and_greedy_output_is_unchanged(plain: Runtime, spec: Runtime) -> None:
    for text in PROMPTS:
        assert run(spec, text)[0] == run(plain, text)[0]
    stats = spec.scheduler.stats
    assert stats.draft_tokens > 0, "speculative = 'on' must draft"
    assert stats.draft_accepted < stats.draft_tokens


def test_concurrent_streams_with_drafts_equal_plain_outputs(plain: Runtime, spec: Runtime) -> None:
    assert run_together(spec, PROMPTS) == run_together(plain, PROMPTS)


def test_accepted_drafts_keep_greedy_output_identical(
    plain: Runtime, spec: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = spec.backend
    assert isinstance(backend, LlamaBackend)
    oracle = Oracle(backend)
    for text in PROMPTS[:3]:
        oracle.sequences.append(reference_tokens(plain, text, monkeypatch))
    monkeypatch.setattr(backend, "draft", oracle.draft)
    before = (spec.scheduler.stats.draft_tokens, spec.scheduler.stats.draft_accepted)
    together = run_together(spec, PROMPTS[:3])
    assert together == run_together(plain, PROMPTS[:3])
    drafted = spec.scheduler.stats.draft_tokens - before[0]
    accepted = spec.scheduler.stats.draft_accepted - before[1]
    assert oracle.calls > 0
    assert 0 < accepted < drafted, "the oracle's rounds must be accepted in part"
    # fewer steps than tokens: accepted drafts emitted several tokens per step
    steps_before = spec.scheduler.stats.steps
    run(spec, PROMPTS[0])
    assert spec.scheduler.stats.steps - steps_before < 40


def test_seeded_sampling_is_the_same_with_and_without_drafts(
    plain: Runtime, spec: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp's rule: a draft token counts only when the model's own sampler picks it, so each emitted token
    # is one sampler call on the same logits as without drafts -- with the same seed, the same text
    params = SamplingParams(temperature=1.2, top_k=40, top_p=0.95, seed=11)
    reference = run(plain, PROMPTS[1], sampling=params)[0]
    backend = spec.backend
    assert isinstance(backend, LlamaBackend)
    oracle = Oracle(backend, spoil=4)
    oracle.sequences.append(reference_tokens(plain, PROMPTS[1], monkeypatch, params))
    monkeypatch.setattr(backend, "draft", oracle.draft)
    accepted = spec.scheduler.stats.draft_accepted
    assert run(spec, PROMPTS[1], sampling=params)[0] == reference
    assert spec.scheduler.stats.draft_accepted > accepted


def test_stop_strings_and_max_tokens_cut_inside_an_accepted_round(
    plain: Runtime, spec: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = spec.backend
    assert isinstance(backend, LlamaBackend)
    oracle = Oracle(backend, spoil=1000)  # every round fully accepted: the limit falls inside one
    oracle.sequences.append(reference_tokens(plain, PROMPTS[1], monkeypatch))
    monkeypatch.setattr(backend, "draft", oracle.draft)
    full, _ = run(plain, PROMPTS[1], max_tokens=60)
    stop = full[20:23]
    assert stop.strip()
    text, result = run(spec, PROMPTS[1], max_tokens=60, stop=(stop,))
    assert result.reason == "stop"  # type: ignore[attr-defined]
    assert text == full[: full.index(stop)]
    for limit in (1, 2, 5, 7):
        text, result = run(spec, PROMPTS[1], max_tokens=limit)
        assert result.completion_tokens == limit  # type: ignore[attr-defined]
        assert result.reason == "length"  # type: ignore[attr-defined]
        assert text == run(plain, PROMPTS[1], max_tokens=limit)[0]


def test_json_grammar_holds_with_drafts(plain: Runtime, spec: Runtime) -> None:
    params = SamplingParams(temperature=0.0, json_mode="object")
    text, result = run(spec, "Give me JSON", sampling=params, max_tokens=200, ignore_eos=False)
    assert text == run(plain, "Give me JSON", sampling=params, max_tokens=200, ignore_eos=False)[0]
    assert text.startswith("{")  # the grammar held (the random model rarely closes the object within the limit)
    if result.reason == "stop":  # type: ignore[attr-defined]
        json.loads(text)


def test_auto_mode_gives_up_on_a_drafter_that_keeps_missing(tmp_path: Path, tiny_gguf: Path, plain: Runtime) -> None:
    rt = open_tiny(tmp_path, tiny_gguf, speculative="auto", drafter=str(TINY_DRAFTER), n_parallel=1)
    try:
        first = run(rt, PROMPTS[1], max_tokens=30)[0]
        drafted = rt.scheduler.stats.draft_tokens
        # the random drafter's rounds fail, so the stream's acceptance falls and it stops drafting
        later = run(rt, PROMPTS[1], max_tokens=120)[0]
        assert first == run(plain, PROMPTS[1], max_tokens=30)[0]
        assert later == run(plain, PROMPTS[1], max_tokens=120)[0]
        assert rt.scheduler.stats.draft_tokens - drafted < 120
    finally:
        rt.close()


def test_a_cached_prefix_serves_drafted_requests_unchanged(plain: Runtime, spec: Runtime) -> None:
    system = "You answer questions at a museum kiosk. " * 6
    hits = spec.scheduler.stats.prefix_hits
    answers = []
    for question in ("Where is the cafe?", "When do you close?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        prompt = spec.chat_prompt(messages)

        async def go(rt: Runtime, prompt: tuple[int, ...] = prompt) -> tuple[str, object]:
            request = rt.request(prompt, sampling=GREEDY, max_tokens=30, ignore_eos=True)
            return await rt.scheduler.submit(request).collect()

        text, result = asyncio.run(go(spec))
        assert text == asyncio.run(go(plain))[0]
        answers.append(result)
    assert spec.scheduler.stats.prefix_hits > hits
    assert answers[1].cached_tokens >= 32  # type: ignore[attr-defined]


def test_private_kv_cells_with_a_drafter_keep_outputs(tmp_path: Path, tiny_gguf: Path, plain: Runtime) -> None:
    # the drafter views the model's KV cache with the same layout: one stream per sequence here
    rt = open_tiny(tmp_path, tiny_gguf, speculative="on", drafter=str(TINY_DRAFTER), kv_unified=False)
    try:
        assert run_together(rt, PROMPTS) == run_together(plain, PROMPTS)
        assert rt.scheduler.stats.draft_tokens > 0
    finally:
        rt.close()


def wide_drafter(tmp_path: Path) -> Path:
    """The tiny drafter with a hidden-state width the tiny model does not have (llama.cpp would abort on it)."""
    reader = GGUFReader(TINY_DRAFTER)
    wrong = tmp_path / "wide-assistant.gguf"
    writer = GGUFWriter(wrong, "gemma4-assistant")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = 128 if key == "gemma4-assistant.embedding_length_out" else field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, field.types[0], field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return wrong


def test_a_drafter_made_for_another_model_is_refused_before_llama_cpp_sees_it(tmp_path: Path, tiny_gguf: Path) -> None:
    # llama.cpp would abort the process on a drafter whose width does not match (a view out of bounds)
    wrong = wide_drafter(tmp_path)
    with pytest.raises(ModelFileError, match=r"its embedding_length_out is 128, the model's embedding_length is 64"):
        open_tiny(tmp_path, tiny_gguf, speculative="on", drafter=str(wrong))
    with pytest.raises(ModelFileError, match="not a Gemma 4 MTP drafter"):
        open_tiny(tmp_path, tiny_gguf, speculative="on", drafter=str(tiny_gguf))
    with pytest.raises(ModelMissingError, match=r"drafter file .* does not exist"):
        open_tiny(tmp_path, tiny_gguf, speculative="on", drafter=str(tmp_path / "none.gguf"))
