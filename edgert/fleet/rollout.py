"""The rules of a rollout in waves, with no I/O: which devices a wave holds, what each reported, halt or go on.

``edgert fleet rollout`` (:mod:`edgert.fleet.rollout_controller`) promotes a release wave by wave and, between
two promotions, asks :func:`decide` about the wave's :class:`WaveTally` (its members' reports and counts, kept
current from the devices that changed; :func:`judge` is the same verdict over a whole set of views). Everything
here is a pure function of retained device state (:class:`~edgert.fleet.observe.DeviceView`) and numbers, or
bookkeeping with no I/O, so each rule is unit-tested on synthetic views, in the spirit of python-tuf's I/O-free
trust rules.

Which devices are in a wave is computable on the operator's side: a device takes a release promoted to
``P`` percent exactly when its :func:`~edgert.update.state.rollout_bucket` for that release is below ``P``
(the device makes the same test, :func:`~edgert.update.state.in_rollout`). Waves are cumulative: the 25 %
wave holds the 5 % wave's devices too, and each is judged on every device it holds.

What a device reported about release ``R`` (its retained :class:`~edgert.api.mqtt_schemas.DeployState`)::

    updated   current == R
    failed    R rolled back or blocklisted (a failed health check, evaluation or load always blocklists)
    error     last_error names R, not blocklisted: the device is retrying (a failure once the wave's time is up)
    waiting   online, nothing about R yet
    offline   offline and nothing about R: listed, never counted as a failure
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from edgert.api.mqtt_schemas import DeployState
from edgert.fleet.observe import DeviceView
from edgert.update.manifest import ChannelPointer
from edgert.update.state import blocklist_key, rollout_bucket

#: deploy phases a device reports while its updates are off (it will never report on a release)
UPDATES_OFF: Final = frozenset({"disabled"})


class Outcome(StrEnum):
    UPDATED = "updated"
    FAILED = "failed"
    ERROR = "error"
    WAITING = "waiting"
    OFFLINE = "offline"


class Verdict(StrEnum):
    #: the wave is still running: keep watching
    WAIT = "wait"
    #: every device of the wave reported (or the time is up) and the failures are within the limit
    GO = "go"
    #: too many failures, or an evaluation regression: re-sign the channel to the previous release
    HALT = "halt"
    #: the time is up and no device of the wave reported: nothing to judge on; the channel stays as it is
    STALLED = "stalled"


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """What one device of a wave said about the release."""

    device_id: str
    outcome: Outcome
    #: why it failed (rollback reason or last error), or what it is doing
    detail: str = ""
    #: its evaluation score of the release, when it ran the release's evaluation set
    score: float | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    #: one line saying why
    reason: str
    #: every member's report, sorted by device, for a final verdict (go, halt, stalled); empty while the wave
    #: waits: a wait is decided on the counts alone, so a wake-up costs O(devices that changed), not O(wave)
    reports: tuple[DeviceReport, ...] = ()
    #: members per outcome (errors counted as failed once the time is up)
    counts: Mapping[Outcome, int] = field(default_factory=dict)
    #: devices in the wave
    members: int = 0

    def with_outcome(self, *outcomes: Outcome) -> list[DeviceReport]:
        return [report for report in self.reports if report.outcome in outcomes]

    def count(self, *outcomes: Outcome) -> int:
        return sum(self.counts.get(outcome, 0) for outcome in outcomes)

    @property
    def failure_rate(self) -> float:
        failed = self.count(Outcome.FAILED)
        reported = failed + self.count(Outcome.UPDATED)
        return failed / reported if reported else 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """When a wave halts the rollout (``--max-failure-rate``, ``--eval-regression``)."""

    max_failure_rate: float
    #: halt when the release's median evaluation score is more than this below ``eval_baseline``; None: never
    eval_regression: float | None = None
    #: the previous release's fleet median evaluation score, read before the first wave; None: unknown
    eval_baseline: float | None = None


# --------------------------------------------------------------------------- who is in the rollout


def follows(view: DeviceView, channel: str, group: str | None = None) -> bool:
    """The device takes updates from ``channel`` (and is in ``group``, when one is named).

    A device that reports no channel (an edgert before deploy payload v2) is taken to follow it: waiting for
    it costs at most a wave's time, leaving it out could promote to devices nobody watches.
    """
    deploy = view.deploy
    if deploy is None or deploy.phase in UPDATES_OFF:
        return False
    if group is not None and view.group != group:
        return False
    return deploy.channel is None or deploy.channel == channel


def eligible(views: Mapping[str, DeviceView], channel: str, group: str | None = None) -> list[str]:
    """The device ids a rollout on ``channel`` reaches, sorted."""
    return sorted(device_id for device_id, view in views.items() if follows(view, channel, group))


def previous_release(pointer: ChannelPointer | None, model_id: str, version: str) -> tuple[str, str] | None:
    """The release a halted rollout of ``model_id@version`` goes back to: what the channel's devices run now.

    That is the channel's version when it is fully promoted, else its previous version (devices outside an
    unfinished rollout stay there); for a rollout of the version the channel already names (run again
    without its state file), the pointer's previous version. None when the channel offers nothing earlier.
    """
    if pointer is None:
        return None
    if (pointer.model_id, pointer.version) != (model_id, version) and pointer.rollout == 100:
        return pointer.model_id, pointer.version
    if pointer.previous_version is None or (pointer.model_id, pointer.previous_version) == (model_id, version):
        return None
    return pointer.model_id, pointer.previous_version


@functools.cache
def _bucket(device_id: str, model_id: str, version: str) -> int:
    """:func:`rollout_bucket`, remembered: a wave is judged again at every burst of reports, and a device's
    bucket for a release never changes (one hash per device and release, however long the rollout)."""
    return rollout_bucket(device_id, model_id, version)


def in_wave(device_id: str, model_id: str, version: str, percent: int) -> bool:
    return _bucket(device_id, model_id, version) < percent


def wave_members(device_ids: Iterable[str], model_id: str, version: str, percent: int) -> list[str]:
    """The devices that take ``model_id@version`` when it is promoted to ``percent`` %, sorted."""
    return sorted(d for d in device_ids if in_wave(d, model_id, version, percent))


@dataclass(frozen=True, slots=True)
class WavePercent:
    """The percentage a wave is promoted to, and why when it is not the one asked for."""

    percent: int
    asked: int
    note: str = ""


def wave_percent(
    device_ids: Sequence[str], model_id: str, version: str, asked: int, *, min_devices: int, floor: int = 0
) -> WavePercent:
    """``asked``, raised to the smallest percentage whose wave holds ``min_devices`` of the devices seen
    (all of them when fewer are seen), and never below ``floor`` (what an earlier wave already promoted)."""
    percent = max(asked, floor)
    need = min(min_devices, len(device_ids))
    if need == 0:
        return WavePercent(percent, asked)
    buckets = sorted(_bucket(d, model_id, version) for d in device_ids)
    smallest = buckets[need - 1] + 1  # the need-th lowest bucket must be below the percentage
    if smallest <= percent:
        return WavePercent(percent, asked)
    note = (
        f"{asked}% holds {len(wave_members(device_ids, model_id, version, asked))} of {len(device_ids)} devices; "
        f"raised to {smallest}% to hold {need} (--min-devices {min_devices})"
    )
    return WavePercent(smallest, asked, note)


# --------------------------------------------------------------------------- what each device said


def report_of(view: DeviceView | None, device_id: str, release: str) -> DeviceReport:
    """What ``device_id`` reported about ``release`` (``<model-id>@<version>``); None: never seen."""
    deploy = view.deploy if view is not None else None
    online = view is not None and view.online
    if deploy is not None:
        score = _score(deploy, release)
        if release in deploy.blocklist or deploy.rolled_back == release:
            # rollback_reason speaks of rolled_back: after an earlier rollback it may name another release
            own = deploy.rollback_reason if deploy.rolled_back in (release, None) else None
            reason = own or deploy.last_error or ("rolled back" if deploy.rolled_back == release else "blocklisted")
            return DeviceReport(device_id, Outcome.FAILED, reason, score)
        if deploy.current == release:
            return DeviceReport(device_id, Outcome.UPDATED, deploy.phase, score)
        if deploy.last_error and release in deploy.last_error:
            return DeviceReport(device_id, Outcome.ERROR, deploy.last_error, score)
        if online and deploy.pending == release:
            return DeviceReport(device_id, Outcome.WAITING, deploy.phase)
    return DeviceReport(device_id, Outcome.WAITING if online else Outcome.OFFLINE)


def _score(deploy: DeployState, release: str) -> float | None:
    evaluation = deploy.evaluation
    return evaluation.score if evaluation is not None and evaluation.release == release else None


def fleet_median_score(views: Mapping[str, DeviceView], device_ids: Iterable[str], release: str) -> float | None:
    """The median evaluation score of ``release`` over the devices that report one; None when none does."""
    scores = [
        score
        for device_id in device_ids
        if (view := views.get(device_id)) is not None
        and view.deploy is not None
        and (score := _score(view.deploy, release)) is not None
    ]
    return statistics.median(scores) if scores else None


# --------------------------------------------------------------------------- the verdict


class WaveTally:
    """A wave's per-device reports and how many members have each outcome, kept current device by device.

    ``edgert fleet rollout`` fills it once per wave from the whole fleet, then :meth:`update` s only the
    devices whose retained state changed since its last look (:meth:`FleetObserver.changes`): a wake-up costs
    O(devices that reported), whatever the fleet's size. Membership is re-derived for a changed device only
    (it may join: a new device, or one that turned its updates on; or leave), and its bucket is cached.
    """

    def __init__(
        self,
        release: tuple[str, str],
        percent: int,
        channel: str,
        group: str | None = None,
        *,
        excused: Collection[str] = frozenset(),
    ) -> None:
        self.release = release
        self.key = blocklist_key(*release)
        self.percent, self.channel, self.group = percent, channel, group
        self.excused = frozenset(excused)
        self.reports: dict[str, DeviceReport] = {}
        self.counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        #: members offline now that were offline when the rollout started (not waited for)
        self.excused_offline = 0

    def update(self, device_id: str, view: DeviceView | None) -> None:
        """Take in ``device_id``'s latest view (None: gone from the broker, or out of the observed group)."""
        if (
            view is not None
            and follows(view, self.channel, self.group)
            and in_wave(device_id, *self.release, self.percent)
        ):
            self.put(report_of(view, device_id, self.key))
        else:
            self.drop(device_id)

    def put(self, report: DeviceReport) -> None:
        """``report`` is its device's report now (a member, joining or already in)."""
        self.drop(report.device_id)
        self.reports[report.device_id] = report
        self._count(report, 1)

    def drop(self, device_id: str) -> None:
        """``device_id`` is not (or no longer) in the wave."""
        old = self.reports.pop(device_id, None)
        if old is not None:
            self._count(old, -1)

    def _count(self, report: DeviceReport, step: int) -> None:
        self.counts[report.outcome] += step
        if report.outcome is Outcome.OFFLINE and report.device_id in self.excused:
            self.excused_offline += step

    @property
    def members(self) -> int:
        return len(self.reports)

    def ids(self, *outcomes: Outcome) -> list[str]:
        """The members with one of ``outcomes``, sorted (O(wave): for nudges, not per wake-up)."""
        return sorted(d for d, report in self.reports.items() if report.outcome in outcomes)


def judge(
    views: Mapping[str, DeviceView],
    members: Sequence[str],
    release: tuple[str, str],
    limits: Limits,
    *,
    time_up: bool,
    excused: Collection[str] = frozenset(),
) -> Judgement:
    """:func:`decide` for the wave whose devices are ``members``, each as ``views`` shows it (None: never seen)."""
    tally = WaveTally(release, 100, "", excused=excused)  # members given: put() directly, no membership test
    for device_id in members:
        tally.put(report_of(views.get(device_id), device_id, tally.key))
    return decide(tally, limits, time_up=time_up)


def decide(tally: WaveTally, limits: Limits, *, time_up: bool) -> Judgement:
    """halt, go on, wait, or stalled, for the wave ``tally`` holds.

    The rate is failures over devices that reported (updated + failed). A halt comes as soon as it is
    certain: failures over *every* member above the limit cannot fall back under it, since a blocklisted
    release stays failed. Otherwise the wave is judged once every member reported, or when its time is up
    (devices still retrying then count as failed, silent ones are listed, none counts as failed).

    An offline member is waited for like a silent one unless it is excused (offline already when the
    rollout started): an offline status can be a broker outage's last will, fired for every device at once
    while they reconnect, and a wave judged then would pass on the few that happened to report first.

    Waiting is decided on the counts alone (O(1)); only a final verdict lists the members' reports.
    """
    counts, members = tally.counts, tally.members
    if time_up:
        counts = counts | {Outcome.FAILED: counts[Outcome.FAILED] + counts[Outcome.ERROR], Outcome.ERROR: 0}
    if members and tally.counts[Outcome.FAILED] / members > limits.max_failure_rate:
        reports = _final_reports(tally, time_up)
        failed = [r for r in reports if tally.reports[r.device_id].outcome is Outcome.FAILED]  # not the retrying
        return Judgement(Verdict.HALT, _halt_line(failed, members, limits), reports, counts, members)
    open_ = counts[Outcome.WAITING] + counts[Outcome.OFFLINE] - tally.excused_offline + counts[Outcome.ERROR]
    if open_ and not time_up:
        return Judgement(Verdict.WAIT, f"{open_} of {members} devices have not reported", (), counts, members)
    reports = _final_reports(tally, time_up)
    by = {outcome: [r for r in reports if r.outcome is outcome] for outcome in Outcome}
    failed = by[Outcome.FAILED]
    reported = len(by[Outcome.UPDATED]) + len(failed)
    if members and reported == 0:
        silent = ", ".join(r.device_id for r in by[Outcome.WAITING] + by[Outcome.OFFLINE])
        return Judgement(Verdict.STALLED, f"no device of the wave reported ({silent})", reports, counts, members)
    if reported and len(failed) / reported > limits.max_failure_rate:
        return Judgement(Verdict.HALT, _halt_line(failed, reported, limits), reports, counts, members)
    regression = _regression(reports, tally.key, limits)
    if regression is not None:
        return Judgement(Verdict.HALT, regression, reports, counts, members)
    return Judgement(Verdict.GO, _pass_line(by, reported, len(failed)), reports, counts, members)


def _final_reports(tally: WaveTally, time_up: bool) -> tuple[DeviceReport, ...]:
    """Every member's report, sorted by device; a retrying one counts as failed once the time is up."""
    reports = (tally.reports[d] for d in sorted(tally.reports))
    return tuple(_errors_failed(r) if time_up else r for r in reports)


def _errors_failed(report: DeviceReport) -> DeviceReport:
    if report.outcome is Outcome.ERROR:
        return DeviceReport(report.device_id, Outcome.FAILED, report.detail, report.score)
    return report


def _halt_line(failed: list[DeviceReport], reported: int, limits: Limits) -> str:
    who = "; ".join(f"{r.device_id}: {r.detail}" for r in failed)
    return (
        f"{len(failed)} of {reported} devices failed ({len(failed) / reported:.0%} > "
        f"--max-failure-rate {limits.max_failure_rate:g}): {who}"
    )


def _regression(reports: Sequence[DeviceReport], key: str, limits: Limits) -> str | None:
    if limits.eval_regression is None or limits.eval_baseline is None:
        return None
    scores = [r.score for r in reports if r.score is not None]
    if not scores:
        return None
    median = statistics.median(scores)
    if median >= limits.eval_baseline - limits.eval_regression:
        return None
    low = "; ".join(f"{r.device_id}: {r.score:.2f}" for r in reports if r.score is not None and r.score < median + 1e-9)
    return (
        f"{key} evaluation median {median:.2f} is more than {limits.eval_regression:g} below the previous "
        f"release's fleet median {limits.eval_baseline:.2f}: {low}"
    )


def _pass_line(by: Mapping[Outcome, list[DeviceReport]], reported: int, failed: int) -> str:
    line = f"{reported} reported, {failed} failed"
    silent = by[Outcome.WAITING] + by[Outcome.OFFLINE]
    if silent:
        line += "; did not report: " + ", ".join(
            f"{r.device_id} ({'offline' if r.outcome is Outcome.OFFLINE else 'no answer'})" for r in silent
        )
    return line
