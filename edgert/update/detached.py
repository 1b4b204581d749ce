"""Run blocking update work on a daemon thread that never keeps the process alive.

``asyncio.to_thread`` uses the loop's default executor, which ``asyncio.run`` joins at exit
(and ``concurrent.futures`` joins again at interpreter exit): an update round stuck in a
download or a hook kept a SIGTERM'd daemon alive for as long as the round took (finding 8:
"stopped" logged, the process still there 50 s later). A round on a daemon thread is
abandoned instead when the process exits; the update path persists its phase before every
step, so what it leaves behind is what a ``kill -9`` would leave, and the next start
resumes or rolls back. The caller also sets :attr:`Updater.stop` so a download ends cleanly
between two reads first.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar, cast

T = TypeVar("T")


async def in_daemon_thread(work: Callable[[], T], *, name: str) -> T:
    """``await`` ``work()`` run on a new daemon thread; cancelling the await leaves the thread running."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for this result any more
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
