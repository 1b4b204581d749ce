"""The scheduler's admission, priorities, cancellation and deadlines on the scripted fake backend.

Deterministic: the fake's gate holds every token until the test releases it, so "A is running
while B and C wait" is a fact the test arranges, not a timing it hopes for. The same scheduler
on the real engines is tested in test_engine.py and test_onnx_backend.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TypeVar

import pytest

from edgert.engine.base import SamplingParams
from edgert.engine.fake import FakeBackend, FakeHandle
from edgert.errors import DeadlineExceededError, OverloadedError
from edgert.serving.scheduler import Finished, GenerationRequest, Priority, Scheduler, SchedulerConfig, TokenStream

T = TypeVar("T")


def request(
    prompt: str, *, priority: Priority = Priority.INTERACTIVE, deadline: float | None = None, max_tokens: int = 8
) -> GenerationRequest:
    return GenerationRequest(
        prompt=tuple(ord(char) for char in prompt),
        sampling=SamplingParams(),
        max_tokens=max_tokens,
        priority=priority,
        deadline=deadline,
    )


def prompt_of(handle: FakeHandle) -> str:
    return "".join(chr(token) for token in handle.prompt)


def long_reply(_prompt: list[int]) -> Sequence[str]:
    return ["x"] * 50


@pytest.fixture
def gate() -> threading.Semaphore:
    return threading.Semaphore(0)


@pytest.fixture
def scheduled() -> Iterator[Callable[..., Scheduler]]:
    """Start schedulers over a fake backend; every one is stopped after the test."""
    started: list[Scheduler] = []

    def make(fake: FakeBackend, *, n_slots: int = 1, max_queue: int = 4) -> Scheduler:
        config = SchedulerConfig(n_slots=n_slots, n_ctx=256, n_batch=64, prefill_chunk=64, max_queue=max_queue)
        scheduler = Scheduler(fake, config)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield make
    for scheduler in started:
        scheduler.stop()


def run(work: Callable[[], Coroutine[object, object, T]]) -> T:
    return asyncio.run(asyncio.wait_for(work(), 30))


def test_the_scripted_reply_streams_then_stops_at_end_of_generation(scheduled: Callable[..., Scheduler]) -> None:
    fake = FakeBackend(script=lambda _prompt: ["Hel", "lo"])
    scheduler = scheduled(fake)

    async def scenario() -> tuple[str, Finished]:
        return await scheduler.submit(request("hi")).collect()

    text, result = run(scenario)
    assert (text, result.reason, result.prompt_tokens, result.completion_tokens) == ("Hello", "stop", 2, 2)
    fake.wait_for(lambda backend: all(handle.released for handle in backend.started))


def test_max_tokens_ends_with_length(scheduled: Callable[..., Scheduler]) -> None:
    scheduler = scheduled(FakeBackend(script=long_reply))

    async def scenario() -> tuple[str, Finished]:
        return await scheduler.submit(request("hi", max_tokens=3)).collect()

    text, result = run(scenario)
    assert (text, result.reason, result.completion_tokens) == ("xxx", "length", 3)


def test_a_full_queue_refuses_at_once_with_a_retry_hint(
    scheduled: Callable[..., Scheduler], gate: threading.Semaphore
) -> None:
    fake = FakeBackend(script=long_reply, gate=gate)
    scheduler = scheduled(fake, n_slots=1, max_queue=1)

    async def scenario() -> list[Finished]:
        running = scheduler.submit(request("A", max_tokens=2))
        fake.wait_for(lambda backend: len(backend.started) == 1)  # A holds the only slot
        queued = scheduler.submit(request("B", max_tokens=2))
        with pytest.raises(OverloadedError, match="queue full") as refused:
            scheduler.submit(request("C"))
        assert refused.value.retry_after_s == scheduler.config.retry_after_s
        assert scheduler.stats.rejected == 1
        gate.release(100)
        return [(await stream.collect())[1] for stream in (running, queued)]

    assert [result.reason for result in run(scenario)] == ["length", "length"]
    assert [prompt_of(handle) for handle in fake.started] == ["A", "B"]


def test_interactive_requests_are_admitted_before_batch_ones_queued_earlier(
    scheduled: Callable[..., Scheduler], gate: threading.Semaphore
) -> None:
    fake = FakeBackend(script=long_reply, gate=gate)
    scheduler = scheduled(fake, n_slots=1)

    async def scenario() -> None:
        streams = [scheduler.submit(request("A", max_tokens=1))]
        fake.wait_for(lambda backend: len(backend.started) == 1)
        streams += [
            scheduler.submit(request("b1", priority=Priority.BATCH, max_tokens=1)),
            scheduler.submit(request("b2", priority=Priority.BATCH, max_tokens=1)),
            scheduler.submit(request("I", max_tokens=1)),
        ]
        gate.release(100)
        for stream in streams:
            await stream.collect()

    run(scenario)
    assert [prompt_of(handle) for handle in fake.started] == ["A", "I", "b1", "b2"]


def test_cancelling_a_running_request_frees_its_slot_for_the_next(
    scheduled: Callable[..., Scheduler], gate: threading.Semaphore
) -> None:
    fake = FakeBackend(script=long_reply, gate=gate)
    scheduler = scheduled(fake, n_slots=1)

    async def scenario() -> tuple[Finished, Finished]:
        running = scheduler.submit(request("A"))
        fake.wait_for(lambda backend: len(backend.started) == 1)
        waiting = scheduler.submit(request("B", max_tokens=2))
        running.cancel()
        gate.release(100)
        return (await running.collect())[1], (await waiting.collect())[1]

    cancelled, after = run(scenario)
    assert cancelled.reason == "cancelled"
    assert cancelled.completion_tokens <= 1  # at most the token the engine was computing when asked
    assert after.reason == "length"
    assert [(prompt_of(h), h.released) for h in fake.started] == [("A", True), ("B", True)]


def test_a_cancelled_queued_request_never_starts(
    scheduled: Callable[..., Scheduler], gate: threading.Semaphore
) -> None:
    fake = FakeBackend(script=long_reply, gate=gate)
    scheduler = scheduled(fake, n_slots=1)

    async def scenario() -> Finished:
        running = scheduler.submit(request("A", max_tokens=2))
        fake.wait_for(lambda backend: len(backend.started) == 1)
        queued = scheduler.submit(request("B"))
        queued.cancel()
        gate.release(100)
        await running.collect()
        return (await queued.collect())[1]

    result = run(scenario)
    assert (result.reason, result.completion_tokens) == ("cancelled", 0)
    assert [prompt_of(handle) for handle in fake.started] == ["A"]


def test_a_deadline_that_passes_in_the_queue_is_an_error_before_any_text(scheduled: Callable[..., Scheduler]) -> None:
    fake = FakeBackend()
    scheduler = scheduled(fake)

    async def scenario() -> TokenStream:
        stream = scheduler.submit(request("late", deadline=time.monotonic() - 1))
        with pytest.raises(DeadlineExceededError, match="while queued"):
            await stream.collect()
        return stream

    assert run(scenario).result is not None
    assert fake.started == []


def test_a_deadline_that_passes_during_generation_finishes_with_the_text_so_far(
    scheduled: Callable[..., Scheduler], gate: threading.Semaphore
) -> None:
    fake = FakeBackend(script=long_reply, gate=gate)
    scheduler = scheduled(fake)

    async def scenario() -> tuple[str, Finished]:
        deadline = time.monotonic() + 0.05
        stream = scheduler.submit(request("A", deadline=deadline, max_tokens=40))
        fake.wait_for(lambda backend: len(backend.started) == 1)
        while time.monotonic() <= deadline:  # the condition under test is the clock itself
            await asyncio.sleep(deadline - time.monotonic() + 0.001)
        gate.release(100)  # the token being computed arrives; the next step sees the deadline
        return await stream.collect()

    text, result = run(scenario)
    assert (text, result.reason) == ("x", "deadline")
    assert isinstance(result.error, DeadlineExceededError)
    assert fake.started[0].released
