"""The rollout's rules on synthetic device views: wave membership, what a device reported, halt or go on,
and the controller's state file (resume, refuse another release, unreadable files)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgert.api.mqtt_schemas import DeployState, DeviceStatus, EvalScore
from edgert.cli.app import app
from edgert.errors import RolloutError
from edgert.fleet import rollout_state
from edgert.fleet.observe import DeviceView, FleetObserver
from edgert.fleet.rollout import (
    Judgement,
    Limits,
    Outcome,
    Verdict,
    WaveTally,
    decide,
    eligible,
    fleet_median_score,
    judge,
    previous_release,
    report_of,
    wave_members,
    wave_percent,
)
from edgert.fleet.rollout_controller import RolloutController, RolloutRequest, check_waves
from edgert.fleet.rollout_state import RolloutState, Status
from edgert.registry.repository import Registry
from edgert.settings import MqttSettings
from edgert.update.manifest import ChannelPointer
from edgert.update.state import choose_target, in_rollout, rollout_bucket

MODEL, V2, V3 = "tiny:f16", "2", "3"
R3 = f"{MODEL}@{V3}"
R2 = f"{MODEL}@{V2}"
LIMITS = Limits(max_failure_rate=0.1)


def view(
    device_id: str,
    *,
    online: bool = True,
    group: str | None = None,
    channel: str | None = "stable",
    phase: str = "idle",
    current: str | None = R2,
    pending: str | None = None,
    blocklist: tuple[str, ...] = (),
    rolled_back: str | None = None,
    reason: str | None = None,
    last_error: str | None = None,
    score: tuple[str, float] | None = None,
    deploy: bool = True,
) -> DeviceView:
    status = DeviceStatus(state="online" if online else "offline", device_id=device_id, group=group, ts=0.0)
    evaluation = (
        EvalScore(release=score[0], score=score[1], threshold=0.5, passed=1, total=1, ts=0.0) if score else None
    )
    state = DeployState(
        device_id=device_id,
        phase=phase,
        current=current,
        pending=pending,
        channel=channel,
        blocklist=list(blocklist),
        rolled_back=rolled_back,
        rollback_reason=reason,
        last_error=last_error,
        evaluation=evaluation,
        ts=0.0,
    )
    return DeviceView(device_id, status=status, deploy=state if deploy else None, seen=0.0)


def fleet(*views: DeviceView) -> dict[str, DeviceView]:
    return {v.device_id: v for v in views}


def devices(count: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(count)]


# --------------------------------------------------------------------------- who is in a wave


def test_wave_members_are_exactly_the_devices_that_take_the_pointer() -> None:
    ids = devices(200)
    for percent in (0, 5, 25, 50, 100):
        pointer = ChannelPointer(model_id=MODEL, version=V3, target="t", rollout=percent, promoted_at=datetime.now(UTC))
        expected = sorted(d for d in ids if in_rollout(d, pointer))  # the device's own rule
        assert wave_members(ids, MODEL, V3, percent) == expected
    assert wave_members(ids, MODEL, V3, 100) == ids
    assert wave_members(ids, MODEL, V3, 0) == []


def test_a_small_wave_is_raised_to_hold_min_devices() -> None:
    ids = devices(10)
    buckets = sorted(rollout_bucket(d, MODEL, V3) for d in ids)
    asked = buckets[0]  # holds no device
    chosen = wave_percent(ids, MODEL, V3, asked, min_devices=3)
    assert chosen.percent == buckets[2] + 1
    assert len(wave_members(ids, MODEL, V3, chosen.percent)) == 3
    assert len(wave_members(ids, MODEL, V3, chosen.percent - 1)) == 2  # the smallest that holds 3
    assert f"raised to {chosen.percent}%" in chosen.note and "--min-devices 3" in chosen.note


def test_a_wave_that_holds_enough_keeps_its_percentage_and_never_goes_below_the_last() -> None:
    ids = devices(50)
    assert wave_percent(ids, MODEL, V3, 100, min_devices=3).percent == 100
    assert wave_percent(ids, MODEL, V3, 100, min_devices=3).note == ""
    assert wave_percent(ids, MODEL, V3, 10, min_devices=1, floor=40).percent == 40


def test_fewer_devices_than_min_devices_means_all_of_them() -> None:
    ids = devices(2)
    chosen = wave_percent(ids, MODEL, V3, 1, min_devices=5)
    assert wave_members(ids, MODEL, V3, chosen.percent) == ids
    assert wave_percent([], MODEL, V3, 5, min_devices=3).percent == 5


def test_eligible_devices_follow_the_channel_and_group_and_take_updates() -> None:
    views = fleet(
        view("a"),
        view("b", channel="beta"),
        view("c", channel=None),  # an older edgert: taken to follow it
        view("d", phase="disabled"),
        view("e", deploy=False),
        view("f", group="north"),
    )
    assert eligible(views, "stable") == ["a", "c", "f"]
    assert eligible(views, "stable", group="north") == ["f"]


# --------------------------------------------------------------------------- what a device said


@pytest.mark.parametrize(
    ("device", "outcome", "detail"),
    [
        (view("d", current=R3), Outcome.UPDATED, "idle"),
        (view("d", blocklist=(R3,), reason="health check failed: no load"), Outcome.FAILED, "health check failed"),
        (view("d", rolled_back=R3, last_error="health_check: probe"), Outcome.FAILED, "health_check: probe"),
        (view("d", last_error=f"download: {R3} 404"), Outcome.ERROR, "404"),
        (view("d", pending=R3, phase="downloading"), Outcome.WAITING, "downloading"),
        (view("d"), Outcome.WAITING, ""),
        (view("d", online=False), Outcome.OFFLINE, ""),
        (view("d", blocklist=(R2,)), Outcome.WAITING, ""),  # another release's failure is not this one's
        # blocklisted now, while rolled_back/rollback_reason still tell of an earlier release's rollback
        (
            view("d", blocklist=(R2, R3), rolled_back=R2, reason="R2 did not load", last_error="hook: camera"),
            Outcome.FAILED,
            "hook: camera",
        ),
        (view("d", blocklist=(R2, R3), rolled_back=R2, reason="R2 did not load"), Outcome.FAILED, "blocklisted"),
    ],
)
def test_report_of_each_deploy_state(device: DeviceView, outcome: Outcome, detail: str) -> None:
    report = report_of(device, "d", R3)
    assert report.outcome is outcome
    assert detail in report.detail


def test_a_device_never_seen_is_offline() -> None:
    assert report_of(None, "ghost", R3).outcome is Outcome.OFFLINE


# --------------------------------------------------------------------------- the verdict


def test_the_wave_waits_while_an_online_device_has_not_reported() -> None:
    views = fleet(view("a", current=R3), view("b"))
    judgement = judge(views, ["a", "b"], (MODEL, V3), LIMITS, time_up=False)
    assert judgement.verdict is Verdict.WAIT
    assert "1 of 2" in judgement.reason


def test_every_device_updated_goes_on_and_offline_ones_are_listed_not_failed() -> None:
    views = fleet(view("a", current=R3), view("b", current=R3), view("c", online=False))
    judgement = judge(views, ["a", "b", "c"], (MODEL, V3), LIMITS, time_up=False, excused={"c"})
    assert judgement.verdict is Verdict.GO
    assert judgement.failure_rate == 0.0
    assert "c (offline)" in judgement.reason


def test_a_device_that_went_offline_during_the_rollout_is_waited_for_until_the_time_is_up() -> None:
    """After a broker outage every device's retained status is its last will (offline) until it reconnects:
    the wave must not pass on the few that reported before it (found by benchmarks/fleet_sim.py)."""
    views = fleet(view("a", current=R3), *(view(d, online=False) for d in "bcdef"))
    members = sorted(views)
    waiting = judge(views, members, (MODEL, V3), LIMITS, time_up=False)
    assert waiting.verdict is Verdict.WAIT and "5 of 6" in waiting.reason
    late = judge(views, members, (MODEL, V3), LIMITS, time_up=True)
    assert late.verdict is Verdict.GO  # offline at the deadline: listed, never a failure
    assert "b (offline)" in late.reason and late.failure_rate == 0.0


def test_a_failure_rate_over_the_limit_halts_naming_devices_and_reasons() -> None:
    views = fleet(
        view("a", current=R3),
        view("b", current=R3),
        view("c", blocklist=(R3,), rolled_back=R3, reason="health check failed: model did not load"),
    )
    judgement = judge(views, ["a", "b", "c"], (MODEL, V3), Limits(max_failure_rate=0.3), time_up=False)
    assert judgement.verdict is Verdict.HALT
    assert "1 of 3 devices failed (33% > --max-failure-rate 0.3)" in judgement.reason
    assert "c: health check failed: model did not load" in judgement.reason


def test_failures_within_the_limit_go_on() -> None:
    views = fleet(*(view(d, current=R3) for d in "abcdefghi"), view("j", blocklist=(R3,)))
    judgement = judge(views, sorted(views), (MODEL, V3), Limits(max_failure_rate=0.1), time_up=False)
    assert judgement.verdict is Verdict.GO  # 1 of 10 is not more than 0.1


def test_a_halt_comes_before_the_wave_is_complete_once_it_is_certain() -> None:
    views = fleet(view("a", blocklist=(R3,)), view("b"), view("c"), view("d"), view("e"))
    judgement = judge(views, sorted(views), (MODEL, V3), Limits(max_failure_rate=0.1), time_up=False)
    assert judgement.verdict is Verdict.HALT  # 1 of 5 failed already: the final rate is at least 20 %
    assert "1 of 5" in judgement.reason


def test_a_device_retrying_keeps_the_wave_open_then_counts_as_failed_when_time_is_up() -> None:
    views = fleet(view("a", current=R3), view("b", last_error=f"download: {R3}: connection reset"))
    assert judge(views, ["a", "b"], (MODEL, V3), LIMITS, time_up=False).verdict is Verdict.WAIT
    judgement = judge(views, ["a", "b"], (MODEL, V3), LIMITS, time_up=True)
    assert judgement.verdict is Verdict.HALT
    assert "b: download" in judgement.reason


def test_silent_devices_at_the_deadline_are_listed_and_the_rest_decide() -> None:
    views = fleet(view("a", current=R3), view("b"))
    judgement = judge(views, ["a", "b"], (MODEL, V3), LIMITS, time_up=True)
    assert judgement.verdict is Verdict.GO
    assert "b (no answer)" in judgement.reason


def test_no_device_reporting_by_the_deadline_stalls_instead_of_judging() -> None:
    views = fleet(view("a"), view("b", online=False))
    judgement = judge(views, ["a", "b"], (MODEL, V3), LIMITS, time_up=True)
    assert judgement.verdict is Verdict.STALLED
    assert "a, b" in judgement.reason


def test_an_evaluation_regression_halts_even_without_failures() -> None:
    views = fleet(view("a", current=R3, score=(R3, 0.6)), view("b", current=R3, score=(R3, 0.7)))
    limits = Limits(max_failure_rate=0.1, eval_regression=0.05, eval_baseline=0.9)
    judgement = judge(views, ["a", "b"], (MODEL, V3), limits, time_up=False)
    assert judgement.verdict is Verdict.HALT
    assert "median 0.65" in judgement.reason and "0.90" in judgement.reason
    within = Limits(max_failure_rate=0.1, eval_regression=0.3, eval_baseline=0.9)
    assert judge(views, ["a", "b"], (MODEL, V3), within, time_up=False).verdict is Verdict.GO


def test_scores_of_another_release_are_not_this_ones() -> None:
    views = fleet(view("a", current=R3, score=(R2, 0.1)))
    limits = Limits(max_failure_rate=0.1, eval_regression=0.05, eval_baseline=0.9)
    assert judge(views, ["a"], (MODEL, V3), limits, time_up=False).verdict is Verdict.GO


# --------------------------------------------------------------------------- the wave kept current


def feed(observer: FleetObserver, *views: DeviceView) -> None:
    """Each view's status and deploy state as the broker would deliver them."""
    for device in views:
        assert device.status is not None and device.deploy is not None
        observer.handle(f"edgert/v1/{device.device_id}/status", device.status.model_dump_json().encode())
        observer.handle(f"edgert/v1/{device.device_id}/deploy", device.deploy.model_dump_json().encode())


class Watched:
    """A wave's tally fed only the changes the observer reports, as the controller feeds it."""

    def __init__(self, observer: FleetObserver, percent: int, excused: frozenset[str] = frozenset()) -> None:
        self.observer, self.seen = observer, 0
        self.tally = WaveTally((MODEL, V3), percent, "stable", excused=excused)
        self.taken: list[str] = []

    def look(self, *, time_up: bool = False) -> Judgement:
        self.seen, changed = self.observer.changes(self.seen)
        self.taken = sorted(changed)
        for device_id, device in changed.items():
            self.tally.update(device_id, device)
        judgement = decide(self.tally, LIMITS, time_up=time_up)
        # the same verdict and counts as judging the whole fleet afresh
        views = self.observer.snapshot()
        members = wave_members(eligible(views, "stable"), MODEL, V3, self.tally.percent)
        whole = judge(views, members, (MODEL, V3), LIMITS, time_up=time_up, excused=self.tally.excused)
        assert (judgement.verdict, judgement.reason, judgement.members) == (whole.verdict, whole.reason, len(members))
        assert {o: judgement.count(o) for o in Outcome} == {o: whole.count(o) for o in Outcome}
        assert judgement.reports == whole.reports  # every member's report once the wave is decided
        return judgement


def test_a_device_changing_outcome_twice_is_counted_once_each_time() -> None:
    observer = FedObserver(MqttSettings(broker="127.0.0.1"))
    feed(observer, view("a"), view("b"))
    watched = Watched(observer, 100)
    assert watched.look().count(Outcome.WAITING) == 2
    feed(observer, view("a", pending=R3, phase="downloading", last_error=f"download {R3}: timed out"))
    judgement = watched.look()
    assert watched.taken == ["a"]  # only the device that changed is re-read
    assert (judgement.count(Outcome.ERROR), judgement.count(Outcome.WAITING)) == (1, 1)
    feed(observer, view("a", current=R3))
    judgement = watched.look()
    assert (judgement.count(Outcome.ERROR), judgement.count(Outcome.UPDATED), judgement.members) == (0, 1, 2)
    feed(observer, view("b", current=R3))
    assert watched.look().verdict is Verdict.GO


def test_a_new_device_joins_the_wave_and_one_leaving_the_channel_leaves_it() -> None:
    observer = FedObserver(MqttSettings(broker="127.0.0.1"))
    feed(observer, view("a", current=R3))
    watched = Watched(observer, 100)
    assert watched.look().verdict is Verdict.GO
    feed(observer, view("late"))  # appeared after the wave started: waited for like any member
    judgement = watched.look()
    assert judgement.verdict is Verdict.WAIT and judgement.members == 2
    feed(observer, view("late", channel="beta"))  # switched channel: no longer in this rollout
    judgement = watched.look()
    assert judgement.verdict is Verdict.GO and judgement.members == 1
    observer.handle("edgert/v1/late/status", b"")
    observer.handle("edgert/v1/late/deploy", b"")  # cleared from the broker
    assert watched.look().members == 1


def test_only_members_by_bucket_enter_the_tally() -> None:
    observer = FedObserver(MqttSettings(broker="127.0.0.1"))
    ids = devices(40)
    feed(observer, *(view(d) for d in ids))
    watched = Watched(observer, 30)
    assert watched.look().members == len(wave_members(ids, MODEL, V3, 30))
    feed(observer, *(view(d, current=R3) for d in ids[:20]))  # look() compares with a fresh judgement
    watched.look()


def test_a_member_dropping_offline_is_waited_for_unless_it_was_offline_at_the_start() -> None:
    observer = FedObserver(MqttSettings(broker="127.0.0.1"))
    feed(observer, view("a", current=R3), view("b", current=R3), view("c", online=False))
    watched = Watched(observer, 100, excused=frozenset({"c"}))
    judgement = watched.look()
    assert judgement.verdict is Verdict.GO and judgement.count(Outcome.OFFLINE) == 1
    feed(observer, view("b", online=False, current=R2))  # its last will: offline, and nothing about R3 kept
    judgement = watched.look()
    assert judgement.verdict is Verdict.WAIT and "1 of 3" in judgement.reason
    feed(observer, view("c"))  # the excused one comes back online: now awaited too
    assert "2 of 3" in watched.look().reason
    late = watched.look(time_up=True)
    assert late.verdict is Verdict.GO and "b (offline)" in late.reason and "c (no answer)" in late.reason


def test_fleet_median_score_of_the_previous_release() -> None:
    views = fleet(view("a", score=(R2, 0.8)), view("b", score=(R2, 1.0)), view("c", score=(R3, 0.0)), view("d"))
    assert fleet_median_score(views, sorted(views), R2) == 0.9
    assert fleet_median_score(views, sorted(views), f"{MODEL}@9") is None


# --------------------------------------------------------------------------- the previous release


def pointer(version: str, rollout: int, previous: str | None = None, model: str = MODEL) -> ChannelPointer:
    return ChannelPointer(
        model_id=model,
        version=version,
        target=f"models/{model}/{version}/model.gguf",
        rollout=rollout,
        previous_version=previous,
        previous_target=f"models/{model}/{previous}/model.gguf" if previous else None,
        promoted_at=datetime.now(UTC),
    )


def test_previous_release_is_what_the_channels_devices_run_now() -> None:
    assert previous_release(None, MODEL, V3) is None
    assert previous_release(pointer(V2, 100, "1"), MODEL, V3) == (MODEL, V2)
    assert previous_release(pointer(V2, 40, "1"), MODEL, V3) == (MODEL, "1")  # an unfinished rollout of 2
    assert previous_release(pointer(V2, 40), MODEL, V3) is None
    assert previous_release(pointer(V3, 25, V2), MODEL, V3) == (MODEL, V2)  # already promoted, no state file
    assert previous_release(pointer(V3, 25, V3), MODEL, V3) is None  # never "back" to the release itself
    assert previous_release(pointer("7", 100, model="other"), MODEL, V3) == ("other", "7")


def test_check_waves_names_the_bad_percentage() -> None:
    assert check_waves([5, 25, 100]) == (5, 25, 100)
    with pytest.raises(RolloutError, match="must increase: 25 follows 50"):
        check_waves([50, 25])
    with pytest.raises(RolloutError, match="101 is not a percentage"):
        check_waves([5, 101])
    with pytest.raises(RolloutError, match="at least one"):
        check_waves([])


# --------------------------------------------------------------------------- the state file


def state(version: str = V3, status: Status = Status.RUNNING) -> RolloutState:
    return RolloutState(model_id=MODEL, version=version, channel="stable", waves=[5, 100], status=status)


def test_the_state_file_round_trips_and_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "rollouts" / "stable.json"
    saved = state()
    saved.promoted, saved.wave_started = 7, 1000.0
    rollout_state.save(path, saved)
    assert rollout_state.load(path) == saved
    assert [p.name for p in path.parent.iterdir()] == ["stable.json"]  # no temp file left beside it
    assert rollout_state.load(tmp_path / "none.json") is None


def test_the_same_release_resumes_and_a_finished_one_is_reported() -> None:
    running = state()
    assert rollout_state.resume_or_refuse(running, MODEL, V3, "stable") is running
    done = state(status=Status.DONE)
    assert rollout_state.resume_or_refuse(done, MODEL, V3, "stable") is done


def test_another_release_is_refused_while_one_is_unfinished() -> None:
    for status in (Status.RUNNING, Status.HALTING):
        with pytest.raises(RolloutError, match=rf"rollout of {MODEL}@{V3} on stable is unfinished.*--abandon"):
            rollout_state.resume_or_refuse(state(status=status), MODEL, "4", "stable")
    for status in (Status.DONE, Status.HALTED, Status.ABANDONED):
        assert rollout_state.resume_or_refuse(state(status=status), MODEL, "4", "stable") is None
    with pytest.raises(RolloutError, match="belongs to channel 'stable'"):
        rollout_state.resume_or_refuse(state(), MODEL, V3, "beta")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not JSON"),
        (json.dumps({"schema_version": 99}).encode(), "written by a newer edgert"),
        (json.dumps({"schema_version": 1, "model_id": MODEL}).encode(), "is invalid"),
    ],
)
def test_an_unreadable_state_file_is_refused_with_its_path(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "stable.json"
    path.write_bytes(content)
    with pytest.raises(RolloutError, match=message) as caught:
        rollout_state.load(path)
    assert str(path) in caught.value.message


# --------------------------------------------------------------------------- a halt's pointer, on a device


@pytest.mark.parametrize("halted_at", [25, 100])
def test_a_device_that_committed_the_halted_release_is_offered_the_previous_one(
    tmp_path: Path, tiny_gguf: Path, halted_at: int
) -> None:
    """The pointer a halt signs (``Registry.promote`` of the previous release at 100 %), read by the device's
    own rule: whether the halt came mid-rollout or after the last wave, a device on the bad release is offered
    the previous one and a device that never took it keeps what it has."""
    registry = Registry.init(tmp_path / "reg")
    for version in (V2, V3):
        registry.add(tiny_gguf, model_id=MODEL, version=version)
    registry.promote(MODEL, V2, channel="stable", rollout=100)
    registry.promote(MODEL, V3, channel="stable", rollout=5)
    registry.promote(MODEL, V3, channel="stable", rollout=halted_at)
    halt = registry.promote(MODEL, V2, channel="stable", rollout=100)
    for device_id in devices(20):
        choice = choose_target(halt, device_id=device_id, blocklist=[])
        assert choice.target == f"models/{MODEL}/{V2}/model.gguf", (halt, choice)


# --------------------------------------------------------------------------- the controller, without a broker


class FedObserver(FleetObserver):
    """A FleetObserver fed the devices' retained payloads through its public entry point, no broker; it says
    it is connected (``link``) so the controller's deadlines run."""

    link = True

    @property
    def connected(self) -> bool:
        return self.link


def observed(*views: DeviceView) -> FedObserver:
    observer = FedObserver(MqttSettings(broker="127.0.0.1"))
    feed(observer, *views)
    return observer


def published_registry(tmp_path: Path, tiny_gguf: Path) -> Registry:
    registry = Registry.init(tmp_path / "reg")
    for version in (V2, V3, "4"):
        registry.add(tiny_gguf, model_id=MODEL, version=version)
    registry.promote(MODEL, V2, channel="stable", rollout=100)
    registry.publish()
    return registry


def request(tmp_path: Path, version: str = V3, **changes: object) -> RolloutRequest:
    values: dict[str, object] = {
        "model_id": MODEL,
        "version": version,
        "channel": "stable",
        "waves": (50, 100),
        "max_failure_rate": 0.1,
        "min_devices": 1,
        "wave_wait_s": 0.3,
        "state_path": tmp_path / "stable.json",
        "nudge": False,
    }
    return RolloutRequest(**(values | changes))  # type: ignore[arg-type]


def test_a_wave_that_fails_halts_and_re_signs_the_previous_release(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    ids = devices(6)
    members = set(wave_members(ids, MODEL, V3, 50))
    fleet_views = [view(d, blocklist=(R3,) if d in members else (), reason="load failed") for d in ids]
    lines: list[str] = []
    controller = RolloutController(request(tmp_path), registry, observed(*fleet_views), say=lines.append)
    state = controller.run()
    assert state.status is Status.HALTED and state.previous == R2
    assert [r.percent for r in state.results] == [50]
    pointer = registry.status().channels.channels["stable"]
    assert (pointer.version, pointer.rollout) == (V2, 100)
    assert any(line.startswith("halted: ") and "back on tiny:f16@2" in line for line in lines), lines
    # run again: reported, nothing signed again
    again: list[str] = []
    RolloutController(request(tmp_path), registry, observed(*fleet_views), say=again.append).run()
    assert again == [f"the rollout of {R3} on stable is already halted: {state.reason}"]


def test_after_a_halt_the_devices_that_took_the_release_are_watched_going_back(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    ids = devices(12)
    members = wave_members(ids, MODEL, V3, 50)
    assert len(members) >= 3
    failed, back, stays = members[0], members[1], members[2]
    fleet_views = [view(d, current=R3) if d in members else view(d) for d in ids]
    fleet_views[ids.index(failed)] = view(failed, blocklist=(R3,), reason="load failed")
    observer = observed(*fleet_views)

    def progress(line: str) -> None:
        if "waiting for them to go back" in line:  # the halt has looked: now one device goes back, one never does
            feed(observer, view(back, current=R2))

    lines: list[str] = []
    controller = RolloutController(request(tmp_path), registry, observer, say=lines.append, progress=progress)
    assert controller.run().status is Status.HALTED
    returned = [line for line in lines if line.startswith(f"back on {R2}: ")]
    assert len(returned) == 1, lines
    assert f"1 of {len(members) - 1} devices that had taken {R3}" in returned[0]
    assert f"still on it after --wave-wait: {', '.join(sorted(set(members[1:]) - {back}))}" in returned[0]
    assert stays in returned[0] and back not in returned[0].split("still on it")[1]


def test_a_silent_wave_stalls_keeps_the_channel_and_gets_its_time_again(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    silent = observed(*(view(d) for d in devices(4)))
    state = RolloutController(request(tmp_path), registry, silent, say=lambda _line: None).run()
    assert state.status is Status.RUNNING and state.wave == 0 and state.promoted is not None
    assert state.wave_started is None  # a rerun restarts the wave's clock
    pointer = registry.status().channels.channels["stable"]
    assert (pointer.version, pointer.rollout) == (V3, state.promoted)
    saved = rollout_state.load(tmp_path / "stable.json")
    assert saved == state


def test_another_release_waits_for_the_unfinished_one_unless_abandoned(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    silent = observed(*(view(d) for d in devices(4)))
    RolloutController(request(tmp_path), registry, silent, say=lambda _line: None).run()  # stalls, unfinished
    with pytest.raises(RolloutError, match=r"rollout of tiny:f16@3 on stable is unfinished \(running, wave 1 of 2\)"):
        RolloutController(request(tmp_path, "4"), registry, silent, say=lambda _line: None).run()
    lines: list[str] = []
    state = RolloutController(request(tmp_path, "4", abandon=True), registry, silent, say=lines.append).run()
    assert state.version == "4" and state.previous == R2  # 3 never finished: devices outside it are on 2
    assert lines[0].startswith(f"abandoned the unfinished rollout of {R3}")


def test_an_unpublished_release_is_refused_before_anything_is_saved(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    with pytest.raises(RolloutError, match=r"tiny:f16@9 is not published .* `edgert registry publish` first"):
        RolloutController(request(tmp_path, "9"), registry, observed(), say=lambda _line: None).run()
    assert not (tmp_path / "stable.json").exists()


def test_a_halt_with_no_earlier_release_offers_the_release_to_no_device(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = Registry.init(tmp_path / "reg")
    registry.add(tiny_gguf, model_id=MODEL, version=V3)
    registry.publish()
    failing = observed(*(view(d, current=None, blocklist=(R3,)) for d in devices(3)))
    lines: list[str] = []
    state = RolloutController(request(tmp_path), registry, failing, say=lines.append).run()
    assert state.status is Status.HALTED and state.previous is None
    pointer = registry.status().channels.channels["stable"]
    assert (pointer.version, pointer.rollout) == (V3, 0)
    assert "offers tiny:f16@3 to no device (there was no earlier release to go back to)" in lines[-1]


def test_a_release_already_offered_to_every_device_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)  # 2 at 100 %
    with pytest.raises(RolloutError, match="tiny:f16@2 is already offered to every device on stable"):
        RolloutController(request(tmp_path, V2), registry, observed(), say=lambda _line: None).run()
    assert not (tmp_path / "stable.json").exists()


def test_a_release_promoted_by_hand_rolls_on_from_its_percentage_never_below(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    registry.promote(MODEL, V3, channel="stable", rollout=60)
    registry.publish()
    updated = observed(*(view(d, current=R3) for d in devices(4)))
    lines: list[str] = []
    ask = request(tmp_path, waves=(25, 50, 100))
    state = RolloutController(ask, registry, updated, say=lines.append).run()
    assert state.status is Status.DONE and state.from_percent == 60 and state.previous == R2
    assert [(r.verdict, r.percent) for r in state.results] == [("skipped", 60), ("skipped", 60), ("go", 100)]
    assert "wave 1/3: 25% is within the 60% already promoted: skipped" in lines
    pointer = registry.status().channels.channels["stable"]
    assert (pointer.version, pointer.rollout, pointer.previous_version) == (V3, 100, V2)


def test_a_wave_does_not_time_out_while_the_broker_is_unreachable(tmp_path: Path, tiny_gguf: Path) -> None:
    """Silence during a broker outage says nothing about devices: the deadline waits for the link."""
    registry = published_registry(tmp_path, tiny_gguf)
    silent = observed(*(view(d) for d in devices(4)))
    silent.link = False
    lines: list[str] = []
    progress: list[str] = []
    controller = RolloutController(request(tmp_path), registry, silent, say=lines.append, progress=progress.append)
    worker = threading.Thread(target=controller.run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while not any("broker connection lost" in line for line in progress[-50:]):
        assert time.monotonic() < deadline and worker.is_alive(), (lines, progress[-3:])
        time.sleep(0.05)
    worker.join(1.5)  # several times the wave's 0.3 s: still watching
    assert worker.is_alive(), lines
    silent.link = True
    worker.join(30)
    assert not worker.is_alive()
    assert "stalled" in lines[-1], lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--waves", "50,25"], "must increase: 25 follows 50"),
        (["--waves", "5,x"], "expected percentages such as 5,25,100"),
        (["--wave-wait", "soon"], "expected a duration"),
        (["--max-failure-rate", "2"], "--max-failure-rate"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_option(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["fleet", "rollout", MODEL, V3, "--channel", "stable", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_only_devices_offline_when_the_rollout_started_are_not_waited_for(tmp_path: Path, tiny_gguf: Path) -> None:
    registry = published_registry(tmp_path, tiny_gguf)
    ids = devices(5)
    fleet_views = [view(d, current=R3) for d in ids[1:]] + [view(ids[0], online=False)]
    state = RolloutController(request(tmp_path, wave_wait_s=60), registry, observed(*fleet_views), say=print).run()
    assert state.status is Status.DONE and state.offline_at_start == [ids[0]]
    assert ids[0] in state.results[-1].silent
