"""The engine on the real llama.cpp with the tiny Gemma 4 fixture: batching, sampling, limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from edgert.engine.base import BatchToken, SamplingParams
from edgert.engine.llama import LlamaBackend, LlamaSampler, reference_generate
from edgert.errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelFileError,
    ModelLoadError,
    OverloadedError,
    PromptTooLongError,
)
from edgert.serving.runtime import Runtime, load_options, open_runtime
from edgert.serving.scheduler import Priority, TokenStream
from edgert.settings import load_settings

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hi", "Tell me about the sea.", "Count: one two three", "Bonjour, ça va ?", "日本語で話して"]


def make_settings(tmp_path: Path, model: Path, **engine: object):
    base = {"n_ctx": 1024, "n_parallel": 4, "n_threads": 1, "n_threads_batch": 1, "n_batch": 256}
    base.update(engine)
    return load_settings(state_dir=tmp_path, model=str(model), engine=base)


@pytest.fixture
def runtime(tmp_path: Path, tiny_gguf: Path) -> Iterator[Runtime]:
    rt = open_runtime(make_settings(tmp_path, tiny_gguf))
    yield rt
    rt.close()


def chat(rt: Runtime, text: str) -> tuple[int, ...]:
    return rt.chat_prompt([{"role": "user", "content": text}])


async def generate(rt: Runtime, prompt: tuple[int, ...], **kwargs: object) -> tuple[str, object]:
    kwargs.setdefault("sampling", GREEDY)
    return await rt.scheduler.submit(rt.request(prompt, **kwargs)).collect()  # type: ignore[arg-type]


def detok(rt: Runtime, tokens: list[int]) -> str:
    return b"".join(rt.backend.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def test_greedy_output_equals_raw_llama_cpp_python(runtime: Runtime, tiny_gguf: Path, tmp_path: Path) -> None:
    options = load_options(make_settings(tmp_path, tiny_gguf).engine)
    for text in PROMPTS[:3]:
        prompt = chat(runtime, text)
        ours, result = asyncio.run(generate(runtime, prompt, max_tokens=48))
        ref = reference_generate(tiny_gguf, options, list(prompt), 48)
        assert ours == detok(runtime, ref.tokens)
        assert result.completion_tokens == len(ref.tokens)


def test_plain_greedy_fast_path_picks_what_llama_cpp_greedy_sampler_picks(runtime: Runtime) -> None:
    backend = runtime.backend
    assert isinstance(backend, LlamaBackend)
    fast = backend.new_sampler(GREEDY)
    assert fast.plain_greedy
    # Anything beyond plain greedy keeps llama.cpp's chain (grammar, penalties, temperature).
    for params in (SamplingParams(temperature=0.0, repeat_penalty=1.1), SamplingParams(temperature=0.7)):
        chained = backend.new_sampler(params)
        assert not chained.plain_greedy
        chained.close()
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    reference = LlamaSampler(chain)
    try:
        # Logits for every position of three different prompts in one batch.
        batch: list[BatchToken] = []
        for seq, text in enumerate(PROMPTS[:3]):
            tokens = chat(runtime, text)
            batch += [BatchToken(seq=seq, token=t, pos=i, logits=True) for i, t in enumerate(tokens)]
        backend.decode(batch)
        picks = [(backend.sample(fast, i), backend.sample(reference, i)) for i in range(len(batch))]
    finally:
        reference.close()
        for seq in range(3):
            backend.seq_remove(seq)
    assert all(ours == theirs for ours, theirs in picks), picks
    assert len({ours for ours, _ in picks}) > 1  # not one constant token


def test_repetition_penalty_makes_a_greedy_output_use_more_distinct_tokens(runtime: Runtime) -> None:
    prompt = chat(runtime, PROMPTS[2])
    plain, _ = asyncio.run(generate(runtime, prompt, max_tokens=48))
    penalised, _ = asyncio.run(
        generate(runtime, prompt, max_tokens=48, sampling=SamplingParams(temperature=0.0, repeat_penalty=1.8))
    )
    assert penalised != plain
    assert len(set(runtime.backend.tokenize(penalised, add_special=False, parse_special=False))) > len(
        set(runtime.backend.tokenize(plain, add_special=False, parse_special=False))
    )


def test_concurrent_greedy_outputs_equal_sequential_ones(runtime: Runtime) -> None:
    prompts = [chat(runtime, text) for text in PROMPTS]
    sequential = [asyncio.run(generate(runtime, p, max_tokens=40))[0] for p in prompts]

    async def together() -> list[str]:
        results = await asyncio.gather(*(generate(runtime, p, max_tokens=40) for p in prompts))
        return [text for text, _ in results]

    assert asyncio.run(together()) == sequential
    assert runtime.scheduler.idle()


def test_private_kv_cells_per_slot_limit_each_request_and_keep_outputs(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_runtime(make_settings(tmp_path, tiny_gguf, kv_unified=False, n_ctx=2048, n_parallel=4))
    try:
        assert rt.backend.info.n_ctx_seq == 256  # 2048 cells split between 4 slots and 4 prefix entries
        assert rt.scheduler.config.n_ctx == 256
        assert rt.scheduler.kv_cells == 2048
        prompts = [chat(rt, text) for text in PROMPTS[:4]]

        async def together() -> list[str]:
            runs = [generate(rt, p, max_tokens=24) for p in prompts]
            return [text for text, _ in await asyncio.gather(*runs)]

        concurrent = asyncio.run(together())
        sequential = [asyncio.run(generate(rt, p, max_tokens=24))[0] for p in prompts]
        assert concurrent == sequential
        with pytest.raises(PromptTooLongError, match="context holds 256"):
            asyncio.run(generate(rt, chat(rt, "word " * 300)))
    finally:
        rt.close()


def test_private_kv_batches_keep_sequence_ids_in_order_and_reuse_the_lowest_slot(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    # llama.cpp (kv_unified off) puts several sequences into one micro-batch only when their ids
    # are consecutive and in order: a new request takes the lowest free slot, batches are sorted.
    rt = open_runtime(make_settings(tmp_path, tiny_gguf, kv_unified=False, n_ctx=8192, n_parallel=4))
    backend = rt.backend
    assert isinstance(backend, LlamaBackend)
    batches: list[list[tuple[int, int]]] = []  # (sequence, token) of every decode call
    decode = backend.decode

    def recording(batch: list[BatchToken]) -> None:
        batches.append([(token.seq, token.token) for token in batch])
        decode(batch)

    backend.decode = recording  # type: ignore[method-assign]
    prompts = [chat(rt, text) for text in PROMPTS[:4]]
    try:

        async def scenario() -> None:
            def submit(prompt: tuple[int, ...], max_tokens: int) -> TokenStream:
                request = rt.request(prompt, sampling=GREEDY, max_tokens=max_tokens, ignore_eos=True)
                return rt.scheduler.submit(request)

            first, second = submit(prompts[0], 2), submit(prompts[1], 4)  # usually slots 0 and 1
            running = submit(prompts[2], 2000)  # usually slot 2; until cancelled
            await first.collect()
            await second.collect()  # freed: 0, then 1 (a stack would hand out 1 next)
            late = submit(prompts[3], 8)  # the lowest free slot: usually 0, below the running one
            await late.collect()
            running.cancel()
            await running.collect()

        asyncio.run(scenario())
    finally:
        rt.close()

    def slot_of(prompt: tuple[int, ...]) -> int:
        """The sequence a prompt was prefilled into (these short prompts go in one chunk)."""
        for batch in batches:
            for seq in {seq for seq, _ in batch}:
                if tuple(token for s, token in batch if s == seq) == prompt:
                    return seq
        raise AssertionError("prompt never prefilled")

    ids = [[seq for seq, _ in batch] for batch in batches]
    assert all(seqs == sorted(seqs) for seqs in ids), [seqs for seqs in ids if seqs != sorted(seqs)][:3]
    assert slot_of(prompts[3]) == min({0, 1, 2, 3} - {slot_of(prompts[2])})


def test_new_request_joins_a_running_batch(runtime: Runtime) -> None:
    long_prompt, short_prompt = chat(runtime, "long"), chat(runtime, "short")

    async def scenario() -> tuple[float, float]:
        long_stream = runtime.scheduler.submit(
            runtime.request(long_prompt, sampling=GREEDY, max_tokens=600, ignore_eos=True)
        )
        first = await long_stream.__aiter__().__anext__()
        assert first.text is not None
        short_text, short_result = await generate(runtime, short_prompt, max_tokens=5, ignore_eos=True)
        short_done = time.monotonic()
        await long_stream.collect()
        assert short_result.completion_tokens == 5
        return short_done, time.monotonic()

    short_done, long_done = asyncio.run(scenario())
    assert short_done < long_done


def test_max_tokens_finishes_with_length(runtime: Runtime) -> None:
    _, result = asyncio.run(generate(runtime, chat(runtime, "Hi"), max_tokens=7, ignore_eos=True))
    assert result.reason == "length"
    assert result.completion_tokens == 7
    assert result.prompt_tokens > 0
    assert result.ttft_s is not None


def test_stop_string_ends_generation_and_is_not_returned(runtime: Runtime) -> None:
    prompt = chat(runtime, "Tell me about the sea.")
    full, _ = asyncio.run(generate(runtime, prompt, max_tokens=40, ignore_eos=True))
    stop = full[10:13]
    assert stop.strip(), "the fixture's greedy output should have text to stop on"
    text, result = asyncio.run(generate(runtime, prompt, max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert result.reason == "stop"
    assert text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_seed_matters(runtime: Runtime) -> None:
    prompt = chat(runtime, "Hi")

    def sample(seed: int) -> str:
        params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed)
        return asyncio.run(generate(runtime, prompt, sampling=params, max_tokens=30, ignore_eos=True))[0]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_deadline_in_the_queue_raises_and_during_generation_finishes(runtime: Runtime) -> None:
    prompt = chat(runtime, "Hi")
    with pytest.raises(DeadlineExceededError):
        asyncio.run(generate(runtime, prompt, max_tokens=10, deadline=time.monotonic() - 1))

    async def running() -> object:
        stream = runtime.scheduler.submit(
            runtime.request(
                prompt, sampling=GREEDY, max_tokens=100000, ignore_eos=True, deadline=time.monotonic() + 0.05
            )
        )
        await stream.collect()
        return stream.result

    result = asyncio.run(running())
    assert result.reason == "deadline"  # type: ignore[attr-defined]


def test_prompt_longer_than_context_is_rejected_before_queuing(runtime: Runtime) -> None:
    too_long = tuple([2] + [496] * 1100)

    async def submit() -> None:
        runtime.scheduler.submit(runtime.request(too_long, sampling=GREEDY))

    with pytest.raises(PromptTooLongError, match="1101 tokens"):
        asyncio.run(submit())


def test_full_queue_rejects_at_once(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_runtime(make_settings(tmp_path, tiny_gguf, n_parallel=1, max_queue=2, retry_after_s=3))
    try:

        async def scenario() -> OverloadedError:
            prompt = chat(rt, "Hi")
            running = rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=400, ignore_eos=True))
            await running.__aiter__().__anext__()  # admitted: the one slot is busy now
            streams = [running] + [
                rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=5)) for _ in range(2)
            ]
            with pytest.raises(OverloadedError) as info:
                rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=5))
            for stream in streams:
                await stream.collect()
            return info.value

        error = asyncio.run(scenario())
        assert error.retry_after_s == 3
        assert rt.scheduler.stats.rejected >= 1
    finally:
        rt.close()


def test_interactive_requests_are_admitted_before_batch_ones(tmp_path: Path, tiny_gguf: Path) -> None:
    rt = open_runtime(make_settings(tmp_path, tiny_gguf, n_parallel=1))
    try:

        async def scenario() -> list[str]:
            prompt = chat(rt, "Hi")
            order: list[str] = []
            blocker = rt.scheduler.submit(rt.request(prompt, sampling=GREEDY, max_tokens=50, ignore_eos=True))

            async def run(name: str, priority: Priority) -> None:
                await rt.scheduler.submit(
                    rt.request(prompt, sampling=GREEDY, max_tokens=3, priority=priority)
                ).collect()
                order.append(name)

            batch = asyncio.ensure_future(run("batch", Priority.BATCH))
            await asyncio.sleep(0)
            interactive = asyncio.ensure_future(run("interactive", Priority.INTERACTIVE))
            await blocker.collect()
            await asyncio.gather(batch, interactive)
            return order

        assert asyncio.run(scenario()) == ["interactive", "batch"]
    finally:
        rt.close()


def test_json_grammar_constrains_output_to_json(runtime: Runtime) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    sampling = SamplingParams(temperature=0.0, json_mode="schema", json_schema=json.dumps(schema))
    text, result = asyncio.run(generate(runtime, chat(runtime, "Answer in JSON"), sampling=sampling, max_tokens=64))
    assert result.reason == "stop"
    assert isinstance(json.loads(text)["ok"], bool)


def test_truncated_gguf_is_refused_before_loading(tmp_path: Path, tiny_gguf: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"broken\.gguf"):
        open_runtime(make_settings(tmp_path, broken))


def test_llama_cpp_load_failure_quotes_llama_cpp_reason(tmp_path: Path, tiny_gguf: Path) -> None:
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(tiny_gguf)
    bad = tmp_path / "missing-tensor.gguf"
    writer = GGUFWriter(bad, "gemma4")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(
            field.name,
            field.contents(),
            field.types[0],
            field.types[-1] if field.types[0].name == "ARRAY" else None,
        )
    for tensor in reader.tensors:
        if tensor.name != "output_norm.weight":
            writer.add_tensor(
                tensor.name,
                tensor.data,
                raw_shape=list(reversed(tensor.shape.tolist())),
                raw_dtype=tensor.tensor_type,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="output_norm"):
        open_runtime(make_settings(tmp_path, bad))


def test_a_grammar_llama_cpp_rejects_fails_only_that_request(runtime: Runtime) -> None:
    prompt = chat(runtime, "Hi")

    async def scenario() -> tuple[BaseException | None, str]:
        good = runtime.scheduler.submit(runtime.request(prompt, sampling=GREEDY, max_tokens=20, ignore_eos=True))
        bad = runtime.scheduler.submit(
            runtime.request(
                prompt,
                sampling=SamplingParams(temperature=0.0, json_mode="schema", json_schema='{"type": "bogus"}'),
                max_tokens=5,
            )
        )
        try:
            await bad.collect()
        except BadRequestError as exc:
            error: BaseException | None = exc
        else:
            error = None
        text, _ = await good.collect()
        return error, text

    error, text = asyncio.run(scenario())
    assert isinstance(error, BadRequestError)
    assert "response_format" in str(error)
    assert text
    assert runtime.scheduler.idle()


def test_cancel_mid_generation_frees_the_slot_on_both_backends(tmp_path: Path, tiny_model: Path) -> None:
    rt = open_runtime(make_settings(tmp_path, tiny_model, n_ctx=2048))
    try:

        async def scenario() -> TokenStream:
            request = rt.request(chat(rt, "Hi"), sampling=GREEDY, max_tokens=2000, ignore_eos=True)
            stream = rt.scheduler.submit(request)
            iterator = stream.__aiter__()
            await iterator.__anext__()
            stream.cancel()
            async for _ in iterator:
                pass
            return stream

        stream = asyncio.run(scenario())
        assert stream.result is not None
        assert stream.result.reason == "cancelled"
        assert stream.result.completion_tokens < 2000
        assert rt.scheduler.idle()
        assert rt.scheduler.stats.active == 0
        assert rt.scheduler.stats.kv_reserved == 0
        if isinstance(rt.backend, LlamaBackend):
            assert rt.backend.seq_pos_max(0) == -1  # the sequence's KV cells are free again
    finally:
        rt.close()
