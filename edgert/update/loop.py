"""The daemon's background update loop: apply on start, then every interval (+ jitter), or when nudged.

A nudge (``edgert update check`` through the socket, an MQTT ``cmd`` message) sets
an :class:`asyncio.Event`; MQTT only ever *triggers* a check, trust comes from TUF.
Each round runs :meth:`Updater.apply` in a worker thread: it blocks on the network,
the disk and model loading, and must never stall the event loop that serves
requests. Cancelling the loop does not interrupt a round already running in its
thread; that round is crash-safe like any other. The thread is a daemon thread
(:func:`~edgert.update.detached.in_daemon_thread`), so a round still running when
the daemon stops never keeps the process alive; ``Updater.stop`` ends its download.

The loop survives every failure of a round: it is named by its reason class
(:mod:`edgert.update.failures`), logged (with its traceback when edgert did not
expect it), handed to ``on_round``, and the next round comes after a backoff
(``update.retry_initial_s``, doubling up to ``update.check_interval_s``) or at the
next nudge. The loop's task is supervised as well (:class:`Supervisor`): a
``while True`` guarded by ``except EdgertError`` was a dead loop waiting for the
first ``OSError`` (issue 13, finding 2).

While a daemon runs it is the only driver of the update path (issue 14): ``edgert update
check|apply|rollback`` reach it over the socket as :class:`Job` s on the loop's queue. A job runs
between two timed rounds, never beside one, and hands its outcome back to the caller; an apply or
a rollback is reported like a timed round (``on_round``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgert.errors import DownloadCancelledError, EdgertError, UpdateBusyError
from edgert.log import scrub_urls
from edgert.update import failures
from edgert.update.detached import in_daemon_thread
from edgert.update.orchestrator import ApplyResult, Updater

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Job(Generic[T]):
    """A round asked for over the socket: ``work`` runs in the loop's worker thread, its outcome goes to ``done``."""

    work: Callable[[Updater], T]
    done: asyncio.Future[T]
    #: an apply or a rollback: reported through ``on_round`` like a timed round (a check is not)
    reported: bool = True


def next_delay(interval_s: float, jitter_s: float, rng: random.Random) -> float:
    """Seconds to the next check: the interval plus a uniform 0..jitter, so a fleet does not check in step."""
    return interval_s + rng.uniform(0.0, jitter_s)


def backoff_delay(failed: int, *, initial_s: float, cap_s: float, jitter_s: float, rng: random.Random) -> float:
    """Seconds to the round after ``failed`` failed rounds in a row: initial, doubling, at most ``cap_s``;
    plus 0..jitter so a fleet whose registry failed at once does not come back in step."""
    return min(cap_s, initial_s * 2.0 ** min(failed - 1, 32)) + rng.uniform(0.0, jitter_s)


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round's outcome as the daemon reports it (``/update/status``, metrics, the MQTT deploy topic)."""

    #: one line: "committed m@2", "up-to-date -", "failed (signature): …"
    outcome: str
    #: the failure class when the round failed (a FailureReason value), else None
    reason: str | None = None
    #: ``<reason>: <message>`` when the round failed, else None
    error: str | None = None


def _run_round(updater: Updater) -> RoundReport:
    """Wrapped for the worker thread: every exception becomes a report (a bug is logged with its traceback)."""
    try:
        result = updater.apply()
    except Exception as exc:  # noqa: BLE001 - reported (a bug with its traceback): the loop never dies of a round
        return failed_report(exc)
    return result_report(result)


def failed_report(exc: BaseException) -> RoundReport:
    """A round that raised, as it is reported (logged here: a bug with its traceback)."""
    if isinstance(exc, UpdateBusyError):
        return RoundReport("skipped: another update is running")
    if isinstance(exc, DownloadCancelledError):
        return RoundReport("stopped: edgert is stopping (the download resumes at the next start)")
    reason, message = failures.reason_of(exc), failures.message_of(exc)
    if isinstance(exc, EdgertError):
        log.warning("update round failed (%s): %s", reason, message)
    else:
        log.error("update round failed (%s): %s", reason, message, exc_info=exc)  # a bug: keep its traceback
    return RoundReport(f"failed ({reason}): {message}", reason, f"{reason}: {message}")


def result_report(result: ApplyResult) -> RoundReport:
    """A round that finished (committed, up to date, rolled back), as it is reported."""
    outcome = f"{result.outcome} {result.release or '-'}"
    log.info("update round: %s (%s)", outcome, scrub_urls(result.detail))
    if result.outcome == "rolled-back":
        return RoundReport(outcome, failures.FailureReason.HEALTH_CHECK, f"health_check: {result.detail}")
    return RoundReport(outcome)


async def run_update_loop(
    updater: Updater,
    *,
    nudge: asyncio.Event,
    rng: random.Random | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    jobs: asyncio.Queue[Job[Any]] | None = None,
) -> None:
    """Run until cancelled; no failure of a round ends it.

    ``on_round`` gets every round's :class:`RoundReport` (the daemon records and publishes it);
    an exception it raises is logged, never the end of the loop. ``jobs`` are run while the loop
    waits for its next round (see the module docstring).
    """
    rng = rng or random.Random()  # noqa: S311 - spreading check times, not a secret
    config = updater.config
    failed = 0
    while True:
        nudge.clear()  # a nudge that arrives during this round triggers the next one at once
        try:
            report = await in_daemon_thread(lambda: _run_round(updater), name="edgert-update")
        except Exception as exc:  # _run_round reports everything; this is a last guard for the thread hand-off
            log.exception("update round failed outside the update path")
            reason = failures.reason_of(exc)
            report = RoundReport(f"failed ({reason}): {failures.message_of(exc)}", reason, failures.describe(exc))
        _report(on_round, report)
        failed = failed + 1 if report.reason is not None else 0
        if failed:
            delay = backoff_delay(
                failed, initial_s=config.retry_initial_s, cap_s=config.check_interval_s, jitter_s=0.0, rng=rng
            )
            log.info("next update round in %.0f s (or at the next nudge)", delay)
        else:
            delay = next_delay(config.check_interval_s, config.check_jitter_s, rng)
        deadline = asyncio.get_running_loop().time() + delay
        while (job := await _nudged_or_after(nudge, deadline, jobs)) is not None:
            await _run_job(updater, job, on_round)


def _report(on_round: Callable[[RoundReport], None] | None, report: RoundReport) -> None:
    if on_round is not None:
        try:
            on_round(report)
        except Exception:
            log.exception("reporting the update round failed")


async def _run_job(updater: Updater, job: Job[Any], on_round: Callable[[RoundReport], None] | None) -> None:
    """Run a job in the worker thread and settle its future with what it returned or raised."""
    try:
        result = await in_daemon_thread(lambda: job.work(updater), name="edgert-update")
    except asyncio.CancelledError:
        job.done.cancel()  # the daemon is stopping: the caller's connection ends too
        raise
    except Exception as exc:  # noqa: BLE001 - reported, and handed to the caller who asked for the round
        if job.reported:
            _report(on_round, failed_report(exc))
        if not job.done.done():  # the caller may have gone away
            job.done.set_exception(exc)
        return
    if job.reported and isinstance(result, ApplyResult):
        _report(on_round, result_report(result))
    if not job.done.done():
        job.done.set_result(result)


async def _nudged_or_after(
    nudge: asyncio.Event, deadline: float, jobs: asyncio.Queue[Job[Any]] | None
) -> Job[Any] | None:
    """Wait for a nudge (None), a job (returned) or the loop time ``deadline`` (None). Not ``asyncio.wait_for``:
    on Python 3.11 it swallows a cancel that arrives as the nudge does, and the daemon's stop would leave the
    loop running another round."""
    if jobs is not None and not jobs.empty():
        return jobs.get_nowait()
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(nudge.wait())}
    taking = asyncio.ensure_future(jobs.get()) if jobs is not None else None
    if taking is not None:
        waiters.add(taking)
    try:
        await asyncio.wait(
            waiters, timeout=max(0.0, deadline - asyncio.get_running_loop().time()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    if taking is not None and taking.done() and not taking.cancelled():
        return taking.result()
    return None


class Supervisor:
    """Keeps one background task running: when it ends by anything but a cancel, log why and start it again.

    The restart waits ``restart_delay_s`` so a task that dies at once cannot spin the event loop.
    """

    def __init__(
        self,
        body: Callable[[], Coroutine[Any, Any, None]],
        *,
        name: str,
        restart_delay_s: float = 5.0,
    ) -> None:
        self._body = body
        self._name = name
        self._restart_delay_s = restart_delay_s
        self._stopped = False
        self.task: asyncio.Task[None] | None = None
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> asyncio.Task[None]:
        self._stopped = False
        self.task = asyncio.create_task(self._body(), name=self._name)
        self.task.add_done_callback(self._ended)
        return self.task

    def stop(self) -> None:
        """Cancel the task for good (the daemon is stopping)."""
        self._stopped = True
        if self.task is not None:
            self.task.cancel()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopped or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("%s died; restarting it in %g s", self._name, self._restart_delay_s, exc_info=error)
        else:
            log.error("%s ended; restarting it in %g s", self._name, self._restart_delay_s)
        self.restarts += 1
        asyncio.get_running_loop().call_later(self._restart_delay_s, self._restart)

    def _restart(self) -> None:
        if not self._stopped:
            self.start()
