"""Tokens from the engine thread to the event loop: :class:`TokenStream` and the per-step :class:`Outbox`.

Nothing on the engine thread waits for a client: what one step produced is handed to
each event loop in one ``loop.call_soon_threadsafe`` call, and a transport reads it by
iterating the request's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from edgert.serving.chat_output import ChatOutput
from edgert.serving.request import Finished, TextChunk


class TokenStream:
    """What a transport iterates: text chunks, then :attr:`result`.

    Iteration raises the request's error instead when it failed before any text
    was produced (deadline in the queue, engine failure), so a transport can still
    answer with a proper status.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TextChunk | Finished] = asyncio.Queue()
        #: set by the scheduler once the request is queued: asks it to drop this request
        self._cancel: Callable[[], None] | None = None
        self.result: Finished | None = None
        self.produced_text = False
        #: called on the event loop with the request's end when it arrives, read or not (the model host counts
        #: requests, and what each release did)
        self.on_finished: Callable[[Finished], None] | None = None
        #: a chat request's reply as it is parsed (content, thoughts, tool calls); None for text completions
        self.chat: ChatOutput | None = None

    def cancel(self) -> None:
        """Stop generating; takes effect before the next decode step."""
        if self.result is None and self._cancel is not None:
            self._cancel()

    def __aiter__(self) -> AsyncIterator[TextChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TextChunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, Finished):
                self.result = item
                if item.error is not None and not self.produced_text:
                    raise item.error
                return
            self.produced_text = True
            yield item

    async def collect(self) -> tuple[str, Finished]:
        parts = [chunk.text async for chunk in self]
        assert self.result is not None
        return "".join(parts), self.result


class Outbox:
    """What one engine step produced, handed to each event loop in one call.

    One wake-up of the event loop per step instead of one per token: on a 2-core
    device every context switch is time taken from llama.cpp's compute threads.
    """

    def __init__(self) -> None:
        self._items: list[tuple[TokenStream, TextChunk | Finished]] = []

    def put(self, stream: TokenStream, item: TextChunk | Finished) -> None:
        self._items.append((stream, item))

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, TextChunk | Finished]]] = {}
        for stream, item in self._items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        self._items = []
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is gone (process shutting down), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[TokenStream, TextChunk | Finished]]) -> None:
    """On the event loop: hand each stream its items, in order."""
    for stream, item in items:
        stream._queue.put_nowait(item)
        if isinstance(item, Finished) and stream.on_finished is not None:
            stream.on_finished(item)
