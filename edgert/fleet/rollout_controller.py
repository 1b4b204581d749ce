"""``edgert fleet rollout``'s driver: promote a wave, nudge its devices, watch them report, halt or go on.

The decisions are :mod:`edgert.fleet.rollout`'s (pure); this module acts on them: it signs through the
operator's registry exactly as ``edgert registry promote`` + ``publish`` do (:class:`~edgert.registry.Registry`,
the same calls), reads the fleet through a :class:`~edgert.fleet.observe.FleetObserver` (the broker's retained
topics), sends ``update_check`` nudges on the devices' ``cmd`` topics, and saves its state
(:mod:`edgert.fleet.rollout_state`) *before* each action, so a killed run continues where it stopped.

A halt re-signs the channel to the previous release at 100 %. Devices need nothing special for it: a device
that committed the halted release is offered the previous one by the normal signed path
(:func:`~edgert.update.state.choose_target`: the pointer's version, now the previous release, is not the
current one) and installs it like any update; a device whose health check failed has already rolled back
and blocklisted it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from edgert.api.mqtt_schemas import Command, Topics
from edgert.errors import RegistryError, RolloutError
from edgert.fleet import rollout_state
from edgert.fleet.observe import BATCH_S, DeviceView, FleetObserver
from edgert.fleet.rollout import (
    Judgement,
    Limits,
    Outcome,
    Verdict,
    WaveTally,
    decide,
    eligible,
    fleet_median_score,
    previous_release,
    wave_members,
    wave_percent,
)
from edgert.fleet.rollout_state import RolloutState, Status, WaveResult
from edgert.registry.repository import Registry
from edgert.update.state import blocklist_key

log = logging.getLogger("edgert.fleet")

#: how often the controller looks again while nothing arrives (the progress line, the wave's deadline)
TICK_S: Final = 1.0
#: devices of a wave still silent after this long are nudged again (a nudge sent while one was offline is lost)
RENUDGE_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    """What the operator asked for (``edgert fleet rollout`` arguments)."""

    model_id: str
    version: str
    channel: str
    waves: tuple[int, ...]
    max_failure_rate: float
    min_devices: int
    wave_wait_s: float
    state_path: Path
    eval_regression: float | None = None
    group: str | None = None
    #: also copy the published site here (``edgert registry publish --out``)
    out: Path | None = None
    nudge: bool = True
    abandon: bool = False

    @property
    def release(self) -> str:
        return blocklist_key(self.model_id, self.version)


def check_waves(waves: Sequence[int]) -> tuple[int, ...]:
    """``--waves``: increasing percentages in 1..100; RolloutError naming the bad one."""
    if not waves:
        raise RolloutError("--waves needs at least one percentage, e.g. 5,25,100")
    for before, percent in zip((0, *waves), waves, strict=False):
        if not 1 <= percent <= 100:
            raise RolloutError(f"--waves: {percent} is not a percentage in 1..100")
        if percent <= before:
            raise RolloutError(f"--waves must increase: {percent} follows {before}")
    return tuple(waves)


class RolloutController:
    """One run of ``edgert fleet rollout``: :meth:`run` returns the saved state when it stops.

    ``say`` gets one line per event (a wave's result, a raised percentage, the halt); ``progress`` gets the
    running wave's counts while it is watched (the CLI shows them on one live line).
    """

    def __init__(
        self,
        request: RolloutRequest,
        registry: Registry,
        observer: FleetObserver,
        *,
        say: Callable[[str], None],
        progress: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.request = request
        self.registry = registry
        self.observer = observer
        self.say = say
        self.progress = progress or (lambda _line: None)
        self.clock = clock

    # ------------------------------------------------------------------ the run
    def run(self) -> RolloutState:
        state = self._start()
        if not state.unfinished:
            self.say(f"the rollout of {state.release} on {state.channel} is already {state.status}: {_end(state)}")
            return state
        while state.status is Status.RUNNING and state.wave < len(state.waves):
            verdict = self._run_wave(state)
            if verdict is Verdict.STALLED:
                return state  # nothing known to be wrong: the channel stays, a rerun keeps waiting
        if state.status is Status.HALTING:
            self._halt(state)
        elif state.status is Status.RUNNING:
            state.status = Status.DONE
            self._save(state)
            self.say(f"done: {state.release} on {state.channel} for {state.promoted or state.waves[-1]}% of devices")
        return state

    def _start(self) -> RolloutState:
        request = self.request
        saved = rollout_state.load(request.state_path)
        try:
            resumed = rollout_state.resume_or_refuse(saved, request.model_id, request.version, request.channel)
        except RolloutError:
            if not request.abandon or saved is None or saved.channel != request.channel:
                raise
            resumed = None
        if resumed is not None and not (request.abandon and not resumed.unfinished):
            if resumed.unfinished:
                self.say(f"resuming the rollout of {resumed.release}: {_where(resumed)}")
            return resumed
        if saved is not None and saved.unfinished:
            saved.status = Status.ABANDONED
            self._save(saved)
            self.say(f"abandoned the unfinished rollout of {saved.release} (the channel stays as it is now)")
        return self._new_state()

    def _new_state(self) -> RolloutState:
        request = self.request
        status = self.registry.status()
        published = {(m.meta.model_id, m.meta.version) for m in status.models}
        if (request.model_id, request.version) not in published:
            raise RolloutError(
                f"{request.release} is not published in {self.registry.directory}: run `edgert registry add` and "
                "`edgert registry publish` first"
            )
        pointer = status.channels.channels.get(request.channel)
        already = (
            pointer.rollout
            if pointer and (pointer.model_id, pointer.version) == (request.model_id, request.version)
            else 0
        )
        if already == 100:
            raise RolloutError(f"{request.release} is already offered to every device on {request.channel}")
        previous = previous_release(pointer, request.model_id, request.version)
        views = self.observer.settle()
        devices = eligible(views, request.channel, request.group)
        baseline = None
        if previous is not None and request.eval_regression is not None:
            baseline = fleet_median_score(views, devices, blocklist_key(*previous))
        state = RolloutState(
            model_id=request.model_id,
            version=request.version,
            channel=request.channel,
            previous_model=previous[0] if previous else None,
            previous_version=previous[1] if previous else None,
            waves=list(request.waves),
            offline_at_start=[d for d in devices if not views[d].online],
            from_percent=already,
            eval_baseline=baseline,
        )
        self._save(state)
        if already:
            self.say(f"{state.release} is already promoted to {already}% on {request.channel}: waves start there")
        back = state.previous or "nothing (the channel offered no earlier release)"
        self.say(
            f"rolling out {state.release} on {request.channel} in waves {','.join(map(str, request.waves))}% to "
            f"{len(devices)} devices seen; a halt goes back to {back}"
            + (f"; evaluation baseline {baseline:.2f}" if baseline is not None else "")
        )
        return state

    # ------------------------------------------------------------------ one wave
    def _run_wave(self, state: RolloutState) -> Verdict:
        request = self.request
        if state.promoted is None:
            devices = eligible(self.observer.settle(), request.channel, request.group)
            floor = state.results[-1].percent if state.results else state.from_percent
            chosen = wave_percent(
                devices,
                state.model_id,
                state.version,
                state.waves[state.wave],
                min_devices=request.min_devices,
                floor=floor,
            )
            if floor and chosen.percent <= floor:  # an earlier wave was raised past this one
                self._skip(state, floor)
                return Verdict.GO
            if chosen.note:
                self.say(f"wave {state.wave + 1}: {chosen.note}")
            state.promoted, state.wave_started = chosen.percent, self.clock()
            self._save(state)  # decided, then done: a restart promotes the same percentage again
        elif state.wave_started is None:  # the wave stalled in an earlier run: it gets its time again
            state.wave_started = self.clock()
            self._save(state)
        self._promote(state.model_id, state.version, state.promoted)
        judgement = self._watch(state)
        line = _wave_line(state, judgement)
        if judgement.verdict is Verdict.STALLED:
            state.wave_started = None
            self._save(state)
            self.say(f"{line}: stalled, {judgement.reason}; the channel stays at {state.promoted}%; run again to wait")
            return judgement.verdict
        state.results = [*state.results, _result(state, judgement)]
        if judgement.verdict is Verdict.HALT:
            state.status, state.reason = Status.HALTING, judgement.reason
            self._save(state)
            self.say(f"{line}: HALT: {judgement.reason}")
            return judgement.verdict
        state.wave, state.wave_started = state.wave + 1, None
        if state.wave < len(state.waves):
            state.promoted = None
        self._save(state)
        self.say(f"{line}: pass ({judgement.reason})")
        return judgement.verdict

    def _skip(self, state: RolloutState, floor: int) -> None:
        asked, last = state.waves[state.wave], state.wave == len(state.waves) - 1
        reason = f"{asked}% is within the {floor}% already promoted"
        skipped = WaveResult(
            percent=floor,
            asked=asked,
            devices=0,
            updated=0,
            failed=0,
            verdict="skipped",
            reason=reason,
            finished=datetime.now(UTC),
        )
        state.results = [*state.results, skipped]
        state.wave, state.promoted = state.wave + 1, floor if last else None
        self._save(state)
        self.say(f"wave {state.wave}/{len(state.waves)}: {reason}: skipped")

    def _watch(self, state: RolloutState) -> Judgement:
        """Judge the wave each time devices report, until it passes, halts, or its --wave-wait is up.

        The wave's reports are kept in a :class:`WaveTally` filled once from the whole fleet; each wake-up takes
        in only the devices that changed since the last (:meth:`FleetObserver.changes`) and decides on the
        counts, so its cost follows the devices reporting, not the fleet's size."""
        assert state.promoted is not None and state.wave_started is not None
        request, release = self.request, (state.model_id, state.version)
        limits = Limits(request.max_failure_rate, request.eval_regression, state.eval_baseline)
        deadline = state.wave_started + request.wave_wait_s
        nudged_at: float | None = None
        tally = WaveTally(
            release, state.promoted, request.channel, request.group, excused=frozenset(state.offline_at_start)
        )
        seen, shown = 0, ""
        while True:
            seen, changed = self.observer.changes(seen)
            for device_id, view in changed.items():
                tally.update(device_id, view)
            evaluated = time.monotonic()
            # the time is up only while the broker is reachable: silence during an outage says nothing of devices
            connected = self.observer.connected
            time_up = self.clock() >= deadline and connected
            judgement = decide(tally, limits, time_up=time_up)
            line = _wave_line(state, judgement, elapsed_s=self.clock() - state.wave_started)
            line = line if connected else f"{line}; broker connection lost, reconnecting"
            if line != shown or judgement.verdict is not Verdict.WAIT:
                self.progress(line)
                shown = line
            if judgement.verdict is not Verdict.WAIT:
                return judgement
            if connected and (nudged_at is None or self.clock() - nudged_at >= RENUDGE_S):
                self._nudge(tally.ids(Outcome.WAITING, Outcome.ERROR))
                nudged_at = self.clock()
            # wakes on the next report, else after a tick (progress, deadline)
            left = deadline - self.clock()
            if self.observer.wait_for_message(seen, min(TICK_S, left) if left > 0 else TICK_S) > seen:
                # a burst (thousands of reports in a second) costs one pass per BATCH_S, not one per message
                time.sleep(max(BATCH_S - (time.monotonic() - evaluated), 0.0))

    def _members(self, views: Mapping[str, DeviceView], state: RolloutState) -> list[str]:
        assert state.promoted is not None
        devices = eligible(views, self.request.channel, self.request.group)
        return wave_members(devices, state.model_id, state.version, state.promoted)

    # ------------------------------------------------------------------ the halt
    def _halt(self, state: RolloutState) -> None:
        """Re-sign the channel back (saved as halting first: a restart re-signs again), then nudge the wave."""
        members = self._members(self.observer.snapshot(), state) if state.promoted is not None else []
        if state.previous_model is not None and state.previous_version is not None:
            self._promote(state.previous_model, state.previous_version, 100)
            back = f"the channel is back on {state.previous} for every device"
        else:
            self._promote(state.model_id, state.version, 0)
            back = f"the channel offers {state.release} to no device (there was no earlier release to go back to)"
        state.status = Status.HALTED
        self._save(state)
        self._nudge(members)
        self.say(f"halted: {state.reason}; {back}")
        if state.previous is not None:
            self._await_return(state, members)

    def _await_return(self, state: RolloutState, members: Sequence[str]) -> None:
        """Watch the wave's devices that took the halted release go back (at most --wave-wait): a line naming
        those still on it. Nothing to wait for when every device of the wave failed it."""
        release, previous = state.release, state.previous

        def on_release(view: DeviceView | None) -> bool:
            """It serves the release or is installing it (an install that began before the halt)."""
            return (
                view is not None and view.deploy is not None and release in (view.deploy.current, view.deploy.pending)
            )

        seen, views = self.observer.changes(0)
        had = [d for d in members if on_release(views.get(d))]
        if not had:
            return
        self.progress(f"{len(had)} devices of the wave took {release}; waiting for them to go back to {previous}")
        wave, still, deadline = frozenset(had), set(had), time.monotonic() + self.request.wave_wait_s
        # each wake-up reads only the devices that changed, as a wave's watch does
        while still and (left := deadline - time.monotonic()) > 0:
            self.observer.wait_for_message(seen, left)
            seen, changed = self.observer.changes(seen)
            for device_id in wave.intersection(changed):
                if on_release(changed[device_id]):
                    still.add(device_id)  # its latest state decides, as a fresh look at the fleet would
                else:
                    still.discard(device_id)
        back = [d for d in had if d not in still]
        line = f"back on {previous}: {len(back)} of {len(had)} devices that had taken {release}"
        self.say(line + (f"; still on it after --wave-wait: {', '.join(sorted(still))}" if still else ""))

    # ------------------------------------------------------------------ actions
    def _promote(self, model_id: str, version: str, percent: int) -> None:
        """``registry promote`` + ``publish`` (+ the copy to ``--out``), every time it is asked for.

        Never skipped because the registry already names that pointer: a run killed after the registry's
        timestamp was signed but before the site was copied to the HTTP host left devices on the old
        metadata (seen in the kill -9 test). Promoting the same pointer again changes nothing devices act on.
        """
        try:
            self.registry.promote(model_id, version, channel=self.request.channel, rollout=percent)
            result = self.registry.publish(out=self.request.out)
        except RegistryError as exc:
            raise RegistryError(f"signing {model_id}@{version} at {percent}% failed: {exc.message}") from exc
        self.say(
            f"signed {self.request.channel}: {model_id}@{version} for {percent}% of devices "
            f"(targets v{result.targets_version}, timestamp v{result.timestamp_version})"
        )

    def _nudge(self, device_ids: Sequence[str]) -> None:
        """An ``update_check`` on each device's cmd topic: it checks now instead of at its next poll."""
        if not self.request.nudge or not device_ids:
            return
        payload = json.dumps(Command(action="update_check").model_dump(exclude_none=True)).encode()
        for device_id in device_ids:
            try:
                self.observer.publish(Topics(device_id).cmd, payload)
            except (ConnectionError, OSError) as exc:  # a nudge only hurries a device; its poll still comes
                log.warning("fleet: could not nudge %s: %s", device_id, exc)
                return

    def _save(self, state: RolloutState) -> None:
        rollout_state.save(self.request.state_path, state)


# --------------------------------------------------------------------------- lines


def _wave_line(state: RolloutState, judgement: Judgement, *, elapsed_s: float | None = None) -> str:
    asked = state.waves[min(state.wave, len(state.waves) - 1)]
    raised = f" (asked {asked}%)" if state.promoted != asked else ""
    members = judgement.members
    reported = judgement.count(Outcome.UPDATED, Outcome.FAILED)
    failed = judgement.count(Outcome.FAILED)
    offline = judgement.count(Outcome.OFFLINE)
    line = (
        f"wave {state.wave + 1}/{len(state.waves)}: promoted {state.promoted}%{raised}, {members} devices in wave, "
        f"{reported} reported, {failed} failed"
    )
    if offline:
        line += f", {offline} offline"
    if elapsed_s is not None:
        line += f" ({elapsed_s:.0f} s)"
    return line


def _result(state: RolloutState, judgement: Judgement) -> WaveResult:
    assert state.promoted is not None
    return WaveResult(
        percent=state.promoted,
        asked=state.waves[state.wave],
        devices=judgement.members,
        updated=judgement.count(Outcome.UPDATED),
        failed=judgement.count(Outcome.FAILED),
        silent=[r.device_id for r in judgement.with_outcome(Outcome.WAITING, Outcome.OFFLINE)],
        verdict=judgement.verdict.value,
        reason=judgement.reason,
        finished=datetime.now(UTC),
    )


def _where(state: RolloutState) -> str:
    if state.status is Status.HALTING:
        return f"halting ({state.reason}); re-signing the channel back"
    promoted = f", promoted {state.promoted}%" if state.promoted is not None else ""
    return f"wave {state.wave + 1} of {len(state.waves)}{promoted}"


def _end(state: RolloutState) -> str:
    if state.status is Status.HALTED:
        return str(state.reason)
    if state.results:
        return f"{len(state.results)} waves, the last at {state.results[-1].percent}%"
    return str(state.status)
