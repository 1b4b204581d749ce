"""The daemon's background update loop: apply on start, then every interval (+ jitter), or when nudged.

A nudge (``edgert update check`` through the socket, an MQTT ``cmd`` message) sets
an :class:`asyncio.Event`; MQTT only ever *triggers* a check, trust comes from TUF.
Each round runs :meth:`Updater.apply` in a worker thread: it blocks on the network,
the disk and model loading, and must never stall the event loop that serves
requests. Cancelling the loop does not interrupt a round already running in its
thread; that round is crash-safe like any other and finishes on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from edgert.errors import EdgertError, UpdateBusyError
from edgert.update.detached import in_daemon_thread
from edgert.update.orchestrator import ApplyResult, Updater

log = logging.getLogger(__name__)


def next_delay(interval_s: float, jitter_s: float, rng: random.Random) -> float:
    """Seconds to the next check: the interval plus a uniform 0..jitter, so a fleet does not check in step."""
    return interval_s + rng.uniform(0.0, jitter_s)


async def run_update_loop(
    updater: Updater,
    *,
    nudge: asyncio.Event,
    rng: random.Random | None = None,
    on_round: Callable[[str], None] | None = None,
) -> None:
    """Run until cancelled. Failures are logged and retried at the next round.

    ``on_round`` gets a one-line outcome after every round (the daemon reports deploy state with it).
    """
    rng = rng or random.Random()  # noqa: S311 - spreading check times, not a secret
    config = updater.config
    while True:
        nudge.clear()  # a nudge that arrives during this round triggers the next one at once
        try:
            result: ApplyResult = await in_daemon_thread(updater.apply, name="edgert-update")
            outcome = f"{result.outcome} {result.release or '-'}"
            log.info("update round: %s (%s)", outcome, result.detail)
        except UpdateBusyError:
            outcome = "skipped: another update is running"
            log.info("update round %s", outcome)
        except EdgertError as exc:
            outcome = f"failed: {exc}"
            log.warning("update round %s", outcome)
        if on_round is not None:
            on_round(outcome)
        delay = next_delay(config.check_interval_s, config.check_jitter_s, rng)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nudge.wait(), delay)
