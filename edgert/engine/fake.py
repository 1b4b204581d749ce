"""A scripted :class:`~edgert.engine.base.SequenceBackend` for fast, deterministic scheduler tests.

In the spirit of httpx's ``MockTransport``: a ``script`` function maps each prompt to the text
pieces to generate (one token each, then end of generation), and an optional ``gate`` lets a test
release tokens one at a time, so admission, priorities, cancellation and deadlines are tested by
order of events instead of by timing. Never a substitute for the real-model tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgert.engine.base import ModelInfo, SamplingParams, SequenceHandle

EOS = 0
Script = Callable[[list[int]], Sequence[str]]


def reply_ok(_prompt: list[int]) -> Sequence[str]:
    return ["o", "k"]


def fake_info(n_ctx: int = 256, n_seq_max: int = 4) -> ModelInfo:
    return ModelInfo(
        path=Path("fake.gguf"), architecture="fake", n_ctx=n_ctx, n_ctx_seq=n_ctx, n_ctx_train=n_ctx,
        n_seq_max=n_seq_max, n_swa=0, n_vocab=0x110000, n_params=0, size_bytes=0, description="scripted",
        bos_token="", eos_token="", add_bos=False, chat_template=None,
    )  # fmt: skip


@dataclass(eq=False)
class FakeHandle:
    prompt: list[int]
    params: SamplingParams
    max_length: int
    pieces: Iterator[str]
    released: bool = False


@dataclass
class FakeBackend:
    """Tokens are code points (EOS is 0); ``script`` decides the output, ``gate`` when each token comes."""

    script: Script = reply_ok
    info: ModelInfo = field(default_factory=fake_info)
    #: each generated token takes one permit; None generates freely
    gate: threading.Semaphore | None = None
    #: in the order the scheduler started them
    started: list[FakeHandle] = field(default_factory=list)
    closed: bool = False
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:  # noqa: ARG002
        return [ord(char) for char in text]  # code points: nothing is special

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def start(self, prompt: list[int], params: SamplingParams, max_length: int) -> FakeHandle:
        handle = FakeHandle(prompt, params, max_length, iter(self.script(prompt)))
        with self._changed:
            self.started.append(handle)
            self._changed.notify_all()
        return handle

    def next_token(self, handle: SequenceHandle) -> tuple[int, bytes]:
        assert isinstance(handle, FakeHandle)
        if self.gate is not None:
            self.gate.acquire()
        piece = next(handle.pieces, None)
        return (EOS, b"") if piece is None else (ord(piece[0]) if piece else 1, piece.encode())

    def release(self, handle: SequenceHandle) -> None:
        assert isinstance(handle, FakeHandle)
        with self._changed:
            handle.released = True
            self._changed.notify_all()

    def close(self) -> None:
        self.closed = True

    def wait_for(self, condition: Callable[[FakeBackend], bool], timeout_s: float = 10.0) -> None:
        """Block until ``condition(self)`` holds after a start or release; AssertionError at the deadline."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self), timeout_s):
                raise AssertionError("the fake backend never reached the expected state")
