"""The daemon's side of the update path: the background loop wired to the serving model.

Imported by :mod:`edgert.daemon` only when ``update.registry_url`` is set, so a device
that takes no updates never loads python-tuf, securesystemslib, cryptography or
httpx (about 18 MiB of resident memory on a kiosk).

The loop is supervised and survives every failed round; each failure is named by its
reason class, kept in memory (``/update/status`` shows it even when the disk is too
full to record it), counted in ``edgert_update_failures_total{reason=...}`` and sent in
the MQTT deploy report. An unreadable update state does not stop the daemon: the file
is moved aside, the last committed model (the ``current`` link) or the configured one
is served, and updates stay off, loudly, until an operator repairs or removes it.

While the daemon runs it is the only driver of the update path (issue 14): it keeps the
update lock of its state directory, and ``edgert update check|apply|rollback`` reach it
over the socket (:meth:`UpdateService.run`), as jobs on its loop's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edgert.api.mqtt_schemas import DeployState, EvalScore
from edgert.errors import UpdateError, UpdatesDisabledError, UpdateStateError
from edgert.identity import ReleaseIdentity
from edgert.model_switch import ServingModelSwitch
from edgert.serving.host import ModelHost
from edgert.settings import Settings
from edgert.update import failures
from edgert.update.loop import Job, RoundReport, Supervisor, run_update_loop
from edgert.update.orchestrator import CURRENT_LINK, VERSIONS_DIR, Updater, release_identity
from edgert.update.state import EvalRecord, Phase, UpdateState
from edgert.update.switch import ModelSwitch

log = logging.getLogger(__name__)

#: a loop that died is started again after this long (it survives failed rounds by itself; this is for bugs)
RESTART_DELAY_S = 5.0


class LoopRecord:
    """What the running daemon knows of its update rounds, beyond the state file (which may be unwritable)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.last_round: str | None = None
        #: ``<reason>: <message>`` of the latest round when it failed; None after a round that did not
        self.last_error: str | None = None
        self.last_failure_reason: str | None = None
        self.failures: dict[str, int] = dict.fromkeys(failures.FailureReason, 0)

    def add(self, report: RoundReport) -> None:
        self.rounds += 1
        self.last_round = report.outcome
        self.last_error = report.error
        if report.reason is not None:
            self.last_failure_reason = report.reason
            self.failures[report.reason] = self.failures.get(report.reason, 0) + 1


class UpdateService:
    """One device's signed model updates: on start, every interval (+ jitter), and when nudged."""

    def __init__(self, settings: Settings, metrics: CollectorRegistry) -> None:
        self.settings = settings
        self.updater = Updater(settings, keep_lock=True)
        #: set by `POST /update/check` and the MQTT cmd topic: run an update round now
        self.nudge = asyncio.Event()
        #: rounds `edgert update …` asked for over the socket, run by the loop between its own
        self.jobs: asyncio.Queue[Job[Any]] = asyncio.Queue()
        self.record = LoopRecord()
        #: why updates are off (the state file is unreadable or too new), else None
        self.disabled: str | None = None
        self._supervisor: Supervisor | None = None
        self._check_state()
        # The state directory is this daemon's from now on; a lock that cannot be had yet (a CLI's apply
        # running, an unusable lock file) is taken by the first round that can.
        with contextlib.suppress(UpdateError):
            self.updater.hold_lock()
        metrics.register(_UpdateCollector(self))

    def _check_state(self) -> None:
        """A state file this edgert cannot use must not keep the daemon from serving (issue 13, finding 7)."""
        store = self.updater.store
        try:
            store.load()
        except UpdateStateError as exc:
            problem = exc.message
            moved = store.set_aside_unreadable()
            if moved is not None:
                problem = f"{problem}; moved to {moved}"
            self.disabled = failures.message_of(UpdateStateError(problem))
            self.record.add(RoundReport(f"failed (state): {self.disabled}", "state", f"state: {self.disabled}"))
            log.error("UPDATES ARE OFF: %s", self.disabled)  # noqa: TRY400 - one loud line, not a traceback

    def status(self) -> dict[str, object]:
        try:
            data: dict[str, object] = self.updater.status().model_dump(mode="json")
        except UpdateError as exc:  # e.g. the state file went bad while running
            data = {"phase": None, "current": None, "previous": None, "pending": None, "blocklist": []}
            data["last_error"] = failures.describe(exc)
        if self.record.last_error is not None:
            # the latest round's failure, even when the disk was too full to record it in the state file
            data["last_error"] = self.record.last_error
        data["disabled"] = self.disabled
        data["loop"] = {
            "running": self._supervisor is not None and self._supervisor.running,
            "restarts": self.loop_restarts,
            "rounds": self.record.rounds,
            "last_round": self.record.last_round,
            "last_failure_reason": self.record.last_failure_reason,
        }
        return data

    def request_check(self) -> None:
        """Run an update round now (`POST /update/check`, the MQTT ``update_check`` command).

        While updates are off the asker gets the reason instead of a check that never runs.
        """
        if self.disabled is not None:
            raise UpdatesDisabledError(
                f"updates are off: {self.disabled}; repair or remove the state file, then restart edgert"
            )
        self.nudge.set()

    async def run(self, action: str, version: str | None = None) -> dict[str, Any]:
        """Run ``action`` as a round of the daemon's loop and return its outcome (the CLI's thin-client path).

        A failure is raised as an UpdateError naming its failure class (``reason``), so the CLI can print
        the same ``error: <reason>: …`` line as when it runs the updater itself.
        """
        if self.disabled is not None:
            raise UpdatesDisabledError(
                f"updates are off: {self.disabled}; repair or remove the state file, then restart edgert"
            )
        if self._supervisor is None or not self._supervisor.running:
            raise UpdateError("the daemon's update loop is not running (see /update/status and the log)")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.jobs.put_nowait(Job(_WORK[action](version), done, reported=action != "check"))
        try:
            result = await done
        except UpdateError:
            raise
        except Exception as exc:  # keep its failure class: the caller names it
            raise UpdateError(failures.message_of(exc), reason=failures.reason_of(exc)) from exc
        data = asdict(result)
        if action == "check":
            data["offered"] = result.offered.key if result.offered else None
        return data

    @property
    def loop_restarts(self) -> int:
        return self._supervisor.restarts if self._supervisor is not None else 0

    def stop(self) -> None:
        """The daemon is stopping: a download in progress ends between two reads (its ``.part`` kept).

        Whatever else a round is doing, its daemon thread does not keep the process alive.
        """
        self.updater.stop.set()
        if self._supervisor is not None:
            self._supervisor.stop()
        self.updater.release_lock()

    def initial_model(self) -> tuple[str, ReleaseIdentity | None] | None:
        """The release the update path committed, if it is on disk (a file or a folder), and who it is."""
        if self.disabled is not None:
            linked = self._linked_model()
            return (linked, None) if linked is not None else None  # no readable state: no signed identity
        state = self.updater.store.load()
        if state.current is None:
            return None
        current = self.updater.versions_dir / state.current.file_name
        return (str(current), release_identity(state.current)) if current.exists() else None

    def _linked_model(self) -> str | None:
        """Without a readable state, the ``current`` link is the record of the last commit (kept in versions/)."""
        link = self.settings.models_dir / CURRENT_LINK
        versions = (self.settings.models_dir / VERSIONS_DIR).resolve()
        try:
            target = link.resolve(strict=True)
        except OSError:
            return None
        if target.parent != versions:
            log.error("%s points outside %s: not served", link, versions)
            return None
        log.warning("serving the last committed model %s (from %s)", target.name, link)
        return str(target)

    def start(
        self, host: ModelHost, publish_deploy: Callable[[DeployState], None] | None, device_id: str
    ) -> asyncio.Task[None] | None:
        loop = asyncio.get_running_loop()
        switch = ServingModelSwitch(self.settings, host, loop, self.settings.serve.drain_timeout_s)

        def publish(report: RoundReport) -> None:
            if publish_deploy is not None:
                publish_deploy(self.deploy_state(report, device_id=device_id))

        if publish_deploy is not None and self.disabled is None:
            self.updater.on_phase = self._phase_publisher(loop, publish_deploy, device_id)
            # Where the update path stands before the first round: a restarted device is current on the broker
            # at once, and the retained message names its (persisted) phase_since.
            with contextlib.suppress(UpdateError):
                publish_deploy(self.deploy_of(self.updater.status(), device_id=device_id))
        return self.start_loop(switch, publish)

    def _phase_publisher(
        self, loop: asyncio.AbstractEventLoop, publish_deploy: Callable[[DeployState], None], device_id: str
    ) -> Callable[[UpdateState], None]:
        """The Updater's on-phase listener: each saved move, published at once (not only after the round).

        It runs on the round's worker thread; the message is made there (the state is a copy) and handed to
        the event loop, whose FIFO keeps the moves of one round, and the round report after them, in order.
        """

        def phase_changed(state: UpdateState) -> None:
            deploy = self.deploy_of(state, device_id=device_id)
            with contextlib.suppress(RuntimeError):  # the loop has closed: the daemon is exiting
                loop.call_soon_threadsafe(publish_deploy, deploy)

        return phase_changed

    def start_loop(
        self, switch: ModelSwitch, on_round: Callable[[RoundReport], None] | None = None
    ) -> asyncio.Task[None] | None:
        """The supervised loop; None with updates off (:meth:`request_check` then answers with the reason)."""
        self.updater.switch = switch

        def round_done(report: RoundReport) -> None:
            self.record.add(report)
            if on_round is not None:
                on_round(report)

        if self.disabled is not None:
            if on_round is not None:
                on_round(RoundReport(f"failed (state): {self.disabled}", "state", f"state: {self.disabled}"))
            return None

        self._supervisor = Supervisor(
            lambda: run_update_loop(self.updater, nudge=self.nudge, on_round=round_done, jobs=self.jobs),
            name="edgert-update-loop",
            restart_delay_s=RESTART_DELAY_S,
        )
        return self._supervisor.start()

    def deploy_state(self, report: RoundReport, *, device_id: str) -> DeployState:
        """The deploy message after a round: the saved state, with the round's outcome and error."""
        try:
            state = self.updater.status()
        except UpdateError as exc:
            return DeployState(
                device_id=device_id,
                phase="disabled",
                last_error=report.error or failures.describe(exc),
                last_round=report.outcome,
                ts=time.time(),
            )
        return self.deploy_of(state, device_id=device_id, last_round=report.outcome, error=report.error)

    def deploy_of(
        self, state: UpdateState, *, device_id: str, last_round: str | None = None, error: str | None = None
    ) -> DeployState:
        """The one place an update state becomes the retained deploy message (a new field goes here).

        Between rounds (a phase change) ``last_round`` is the latest finished round's outcome. While a rollback
        runs, ``rolled_back`` / ``rollback_reason`` already name the release being undone and why (the blocklist
        names it from that move on: a reader must not pair it with the previous rollback's reason).
        """
        undoing = state.phase is Phase.ROLLING_BACK and state.pending is not None and state.rollback_reason
        return DeployState(
            device_id=device_id,
            phase=state.phase.value,
            current=state.current.key if state.current else None,
            previous=state.previous.key if state.previous else None,
            pending=state.pending.key if state.pending else None,
            channel=self.settings.update.channel,
            blocklist=state.blocklist,
            last_check=state.last_check,
            last_error=error or state.last_error,
            last_round=last_round or self.record.last_round,
            rolled_back=state.pending.key if undoing and state.pending else state.last_rollback,
            rollback_reason=state.rollback_reason if undoing else state.last_rollback_reason,
            phase_since=state.phase_since,
            evaluation=_eval_score(state.evaluation),
            ts=time.time(),
        )


def _eval_score(record: EvalRecord | None) -> EvalScore | None:
    if record is None:
        return None
    fields = {"passed": record.passed, "total": record.total, "threshold": record.threshold, "ts": record.ts}
    return EvalScore(release=record.release, score=record.score, **fields)


def _check(_version: str | None) -> Callable[[Updater], object]:
    return lambda updater: updater.check()


def _apply(version: str | None) -> Callable[[Updater], object]:
    return lambda updater: updater.apply(pin_version=version)


def _rollback(_version: str | None) -> Callable[[Updater], object]:
    return lambda updater: updater.rollback()


#: what `edgert update …` asks the daemon to do (GET /update/offer, POST /update/apply, POST /update/rollback)
_WORK: dict[str, Callable[[str | None], Callable[[Updater], object]]] = {
    "check": _check,
    "apply": _apply,
    "rollback": _rollback,
}


class _UpdateCollector(Collector):
    """Deployment state and the loop's failures in /metrics, read at scrape time."""

    def __init__(self, service: UpdateService) -> None:
        self._service = service

    def collect(self) -> Iterable[GaugeMetricFamily | InfoMetricFamily | CounterMetricFamily]:
        service = self._service
        yield from _state_metrics(service.updater)
        failed = CounterMetricFamily(
            "edgert_update_failures",
            "Update rounds that failed, by reason class (see edgert.update.failures)",
            labels=["reason"],
        )
        for reason, count in sorted(service.record.failures.items()):
            failed.add_metric([reason], float(count))
        yield failed
        yield GaugeMetricFamily(
            "edgert_update_disabled",
            "1 when updates are off because the update state is unreadable or too new (see /update/status)",
            1.0 if service.disabled is not None else 0.0,
        )
        yield CounterMetricFamily(
            "edgert_update_loop_restarts",
            "Times the update loop's task died and was started again (a bug: see the log)",
            float(service.loop_restarts),
        )


def _state_metrics(updater: Updater) -> Iterable[GaugeMetricFamily | InfoMetricFamily]:
    try:
        state = updater.status()
    except UpdateError:
        return  # unreadable: edgert_update_disabled says so, and /update/status why
    phase = GaugeMetricFamily("edgert_update_phase", "Current phase of the model update path", labels=["phase"])
    for candidate in Phase:
        phase.add_metric([candidate.value], 1.0 if state.phase is candidate else 0.0)
    yield phase
    releases = InfoMetricFamily("edgert_update_release", "Committed and pending model releases")
    releases.add_metric(
        [],
        {
            "current": state.current.key if state.current else "",
            "previous": state.previous.key if state.previous else "",
            "pending": state.pending.key if state.pending else "",
        },
    )
    yield releases
    yield GaugeMetricFamily("edgert_update_blocklisted", "Releases blocklisted on this device", len(state.blocklist))
