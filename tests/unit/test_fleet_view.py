"""The fleet view on synthetic payloads: observer bookkeeping, TTFT percentiles, summaries, compare windows."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import pytest

from edgert.api.mqtt_schemas import TTFT_BUCKETS_S, DeployState, DeviceStatus, Telemetry, VersionCounters
from edgert.cli import exitcodes
from edgert.fleet import compare as comparing
from edgert.fleet.counters import BUCKETS, Totals, ttft_quantile, window
from edgert.fleet.observe import DeviceView, FleetObserver, parse_topic
from edgert.fleet.view import device_row, note, rollout_target, summaries
from edgert.settings import MqttSettings

NOW = 1_800_000_000.0


def status(device: str, *, version: str | None = "2", state: str = "online", group: str | None = "a") -> bytes:
    model = {"id": "m", "file": "m.gguf", "version": version} if version else None
    body = {"state": state, "device_id": device, "group": group, "model": model, "ts": NOW, "uptime_s": 50}
    return json.dumps(body).encode()


def deploy(device: str, **fields: Any) -> bytes:
    return json.dumps({"device_id": device, "phase": "idle", "ts": NOW, **fields}).encode()


def counters(release: str = "m@2", *, started: float = NOW - 100, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "release": release,
        "started": started,
        "requests_ok": 0,
        "requests_failed": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "decode_s": 0.0,
        "ttft_buckets": [0] * BUCKETS,
    }
    return body | fields


def telemetry(device: str, versions: list[dict[str, Any]]) -> bytes:
    body = {
        "ts": NOW,
        "device_id": device,
        "uptime_s": 100,
        "tokens_per_s": 7.5,
        "queue_depth": 2,
        "active": 1,
        "requests_finished": 9,
        "rejected": 0,
        "memory": {"rss_bytes": 300 << 20, "available_bytes": 1 << 30, "total_bytes": 2 << 30},
        "mqtt": {
            "connected": True,
            "reconnects": 0,
            "buffered": 0,
            "dropped": 0,
            "duplicates": 0,
            "bad_payloads": 0,
            "requests": 0,
        },
        "versions": versions,
    }
    return json.dumps(body).encode()


@pytest.fixture
def observer() -> FleetObserver:
    # never connected: handle() is the message entry point, fed here as paho's thread would
    return FleetObserver(MqttSettings(broker="127.0.0.1"))


# ----------------------------------------------------------------------------- observer
def test_topics_of_the_three_retained_parts_name_the_device() -> None:
    assert parse_topic("edgert/v1/dev-1/status") == ("dev-1", "status")
    assert parse_topic("edgert/v1/dev-1/telemetry") == ("dev-1", "telemetry")
    assert parse_topic("edgert/v1/dev-1/req") is None
    assert parse_topic("edgert/v1/dev-1/reply/x") is None
    assert parse_topic("edgert/v2/dev-1/status") is None
    assert parse_topic("edgert/v1/fleet/deploy") is None


def test_messages_build_one_view_per_device(observer: FleetObserver) -> None:
    observer.handle("edgert/v1/d1/status", status("d1"))
    observer.handle("edgert/v1/d1/deploy", deploy("d1", current="m@2", phase="downloading", pending="m@3"))
    observer.handle("edgert/v1/d2/deploy", deploy("d2", current="m@1"))
    views = observer.snapshot()
    assert set(views) == {"d1", "d2"}
    one, two = views["d1"], views["d2"]
    assert one.online and one.group == "a" and one.release == "m@2" and one.phase == "downloading"
    # no status (yet): the committed release stands for what it serves, and it is not online
    assert not two.online and two.release == "m@1" and two.group is None
    assert observer.messages == 3 and observer.bad_payloads == 0


def test_a_bad_payload_is_counted_skipped_and_warned_once(
    observer: FleetObserver, caplog: pytest.LogCaptureFixture
) -> None:
    observer.handle("edgert/v1/d1/status", status("d1"))
    with caplog.at_level(logging.WARNING, logger="edgert.fleet"):
        observer.handle("edgert/v1/d1/status", b"{not json")
        observer.handle("edgert/v1/d1/status", json.dumps({"state": "maybe", "device_id": "d1", "ts": 1}).encode())
        observer.handle("edgert/v1/d9/telemetry", b"[]")
    assert observer.bad_payloads == 3
    # the last good status stands; a device with only bad payloads is not in the picture
    assert set(observer.snapshot()) == {"d1"} and observer.snapshot()["d1"].online
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings  # once per device and part, not once per message
    assert "status payload from device d1" in warnings[0] and "telemetry payload from device d9" in warnings[1]


def test_a_payload_naming_another_device_is_refused(observer: FleetObserver) -> None:
    observer.handle("edgert/v1/d1/status", status("d2"))
    assert observer.snapshot() == {} and observer.bad_payloads == 1


def test_an_empty_retained_message_clears_that_part(observer: FleetObserver) -> None:
    observer.handle("edgert/v1/d1/status", status("d1"))
    observer.handle("edgert/v1/d1/deploy", deploy("d1", current="m@2"))
    observer.handle("edgert/v1/d1/status", b"")
    view = observer.snapshot()["d1"]
    assert view.status is None and view.deploy is not None
    observer.handle("edgert/v1/d1/deploy", b"")
    assert observer.snapshot() == {}


def test_group_limits_the_snapshot() -> None:
    observer = FleetObserver(MqttSettings(broker="127.0.0.1"), group="b")
    observer.handle("edgert/v1/d1/status", status("d1", group="a"))
    observer.handle("edgert/v1/d2/status", status("d2", group="b"))
    assert set(observer.snapshot()) == {"d2"}


def test_wait_until_times_out_while_messages_keep_coming(observer: FleetObserver) -> None:
    # a busy fleet never goes quiet while a (big) fleet is judged: the timeout must hold all the same
    stop, results = threading.Event(), []

    def slow_no(_views: dict[str, DeviceView]) -> bool:
        time.sleep(0.02)  # stands for judging 100,000 devices: messages arrive meanwhile
        return False

    def stream() -> None:
        while not stop.is_set():
            observer.handle("edgert/v1/d1/status", status("d1"))

    feeder = threading.Thread(target=stream)
    waiter = threading.Thread(target=lambda: results.append(observer.wait_until(slow_no, 0.2)))
    feeder.start()
    waiter.start()
    try:
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "wait_until outlived its timeout under a steady stream"
        assert results == [False] and observer.messages > 1
    finally:
        stop.set()
        feeder.join()
        waiter.join(timeout=5)


def test_changes_name_each_changed_device_once_as_it_is_now(observer: FleetObserver) -> None:
    observer.handle("edgert/v1/d1/status", status("d1"))
    observer.handle("edgert/v1/d2/status", status("d2"))
    count, everything = observer.changes(0)
    assert count == 2 and set(everything) == {"d1", "d2"}
    assert observer.changes(count) == (count, {})  # nothing new: nothing to re-read
    observer.handle("edgert/v1/d1/deploy", deploy("d1", current="m@2"))
    observer.handle("edgert/v1/d1/deploy", deploy("d1", current="m@3"))  # twice: listed once, as it is now
    observer.handle("edgert/v1/d3/status", status("d3"))
    later, changed = observer.changes(count)
    assert later == count + 3 and set(changed) == {"d1", "d3"}
    view = changed["d1"]
    assert view is not None and view.deploy is not None and view.deploy.current == "m@3"
    # a device cleared from the broker is a change too: None
    observer.handle("edgert/v1/d2/status", b"")
    assert observer.changes(later) == (later + 1, {"d2": None})


def test_changes_outside_the_group_read_as_gone() -> None:
    observer = FleetObserver(MqttSettings(broker="127.0.0.1"), group="b")
    observer.handle("edgert/v1/d1/status", status("d1", group="b"))
    count, _ = observer.changes(0)
    observer.handle("edgert/v1/d1/status", status("d1", group="a"))  # moved to another group
    assert observer.changes(count) == (count + 1, {"d1": None})


def test_wait_until_wakes_on_the_message_that_makes_it_true(observer: FleetObserver) -> None:
    def serves_three(views: dict[str, DeviceView]) -> bool:
        return any(view.release == "m@3" for view in views.values())

    assert not observer.wait_until(serves_three, timeout_s=0.05)
    feeder = threading.Thread(target=observer.handle, args=("edgert/v1/d1/status", status("d1", version="3")))
    feeder.start()
    try:
        assert observer.wait_until(serves_three, timeout_s=30)
    finally:
        feeder.join()
    assert observer.wait_for_message(0, timeout_s=0.01) == 1


def test_settle_ends_after_the_retained_burst_though_live_messages_go_on(observer: FleetObserver) -> None:
    observer.handle("edgert/v1/d1/status", status("d1"), retained=True)
    stop = threading.Event()

    def live_telemetry() -> None:  # a busy fleet: live (not retained) readings never pause for long
        while not stop.is_set():
            observer.handle("edgert/v1/d2/telemetry", telemetry("d2", []), retained=False)
            stop.wait(0.01)

    feeder = threading.Thread(target=live_telemetry)
    feeder.start()
    started = time.monotonic()
    try:
        views = observer.settle(quiet_s=0.2, timeout_s=60)
    finally:
        stop.set()
        feeder.join()
    assert time.monotonic() - started < 60, "settle waited for its timeout: live messages held it open"
    assert "d1" in views


# ----------------------------------------------------------------------------- counters
def buckets(**at: int) -> list[int]:
    """Histogram counts by bucket index: buckets(b0=3, inf=1)."""
    counts = [0] * BUCKETS
    for key, count in at.items():
        counts[-1 if key == "inf" else int(key[1:])] = count
    return counts


def test_ttft_percentiles_interpolate_within_the_bucket() -> None:
    assert ttft_quantile(buckets(b0=4), 0.5) == pytest.approx(0.05)  # halfway through 0..0.1
    # 10 requests: 2 in 0..0.1, 8 in 0.25..0.5; the median (rank 5) is 3/8 into the third bucket
    assert ttft_quantile(buckets(b0=2, b2=8), 0.5) == pytest.approx(0.25 + 0.25 * 3 / 8)
    assert ttft_quantile(buckets(b0=2, b2=8), 0.95) == pytest.approx(0.25 + 0.25 * 7.5 / 8)
    assert ttft_quantile(buckets(b0=2, b2=8), 0.0) == 0.0


def test_ttft_in_the_open_bucket_is_its_lower_bound() -> None:
    assert ttft_quantile(buckets(b0=9, inf=1), 0.95) == TTFT_BUCKETS_S[-1]
    assert ttft_quantile(buckets(b0=9, inf=1), 0.5) == pytest.approx(0.1 * 5 / 9)


def test_ttft_without_requests_or_with_foreign_buckets_is_unknown() -> None:
    assert ttft_quantile(buckets(), 0.5) is None
    assert ttft_quantile([1, 2, 3], 0.5) is None
    with pytest.raises(ValueError, match="outside"):
        ttft_quantile(buckets(b0=1), 95)


def reading(**fields: Any) -> VersionCounters:
    return VersionCounters.model_validate(counters(**fields))


def test_totals_add_up_devices_and_derive_rates() -> None:
    one = Totals.of(reading(requests_ok=8, requests_failed=2, prompt_tokens=100, completion_tokens=50, decode_s=5.0))
    two = Totals.of(reading(requests_ok=10, completion_tokens=150, decode_s=5.0, ttft_buckets=buckets(b1=10)))
    total = one + two
    assert (total.devices, total.requests, total.requests_failed) == (2, 20, 2)
    assert total.error_rate == pytest.approx(0.1)
    assert total.tokens_per_s == pytest.approx(20.0)  # 200 completion tokens over 10 s of decoding
    assert total.completion_tokens_per_request == pytest.approx(10.0)
    assert total.prompt_tokens_per_request == pytest.approx(5.0)
    assert Totals().error_rate is None and Totals().tokens_per_s is None and Totals().ttft(0.5) is None


def test_a_foreign_histogram_is_left_out_but_its_requests_count() -> None:
    total = Totals.of(reading(requests_ok=3, ttft_buckets=[3]))
    assert total.requests == 3 and total.ttft(0.5) is None


def test_window_is_the_difference_of_two_readings() -> None:
    start = reading(requests_ok=10, requests_failed=1, completion_tokens=100, decode_s=4.0, ttft_buckets=buckets(b0=11))
    end = reading(requests_ok=15, requests_failed=1, completion_tokens=160, decode_s=6.0, ttft_buckets=buckets(b0=16))
    diff = window(start, end)
    assert (diff.requests_ok, diff.requests_failed, diff.completion_tokens) == (5, 0, 60)
    assert diff.decode_s == pytest.approx(2.0) and diff.ttft_buckets == tuple(buckets(b0=5))
    assert window(None, end) == Totals.of(end)  # the release began in the window


def test_a_restart_in_the_window_takes_the_new_reading_whole() -> None:
    start = reading(requests_ok=50, completion_tokens=500, decode_s=20.0, ttft_buckets=buckets(b0=50))
    restarted = reading(started=NOW, requests_ok=3, completion_tokens=30, decode_s=1.0, ttft_buckets=buckets(b0=3))
    assert window(start, restarted) == Totals.of(restarted)
    # the same start time but counters that went down (a clock that did not move): still a restart
    went_down = reading(requests_ok=4, completion_tokens=40, decode_s=2.0, ttft_buckets=buckets(b0=4))
    assert window(start, went_down) == Totals.of(went_down)


# ----------------------------------------------------------------------------- rows, summaries
def fleet(*messages: tuple[str, bytes]) -> list[DeviceView]:
    observer = FleetObserver(MqttSettings(broker="127.0.0.1"))
    for topic, payload in messages:
        observer.handle(topic, payload)
    return list(observer.snapshot().values())


def test_device_row_carries_status_deploy_and_telemetry_figures() -> None:
    served = counters(requests_ok=9, requests_failed=1, ttft_buckets=buckets(b0=10))
    older = counters("m@1", requests_ok=10)
    (view,) = fleet(
        ("edgert/v1/d1/status", status("d1")),
        ("edgert/v1/d1/deploy", deploy("d1", current="m@2", channel="beta", last_error="download: timed out")),
        ("edgert/v1/d1/telemetry", telemetry("d1", [served, older])),
    )
    row = device_row(view)
    assert row["device_id"] == "d1" and row["state"] == "online" and row["model"] == "m@2"
    assert row["channel"] == "beta" and row["phase"] == "idle" and row["last_error"] == "download: timed out"
    assert row["requests"] == 20 and row["requests_failed"] == 1 and row["error_rate"] == pytest.approx(0.05)
    assert row["ttft_p50_s"] == pytest.approx(0.05)
    assert row["tokens_per_s"] == 7.5 and row["queue_depth"] == 2 and row["rss_bytes"] == 300 << 20
    assert row["uptime_s"] == 100  # the telemetry's, fresher than the status'
    json.dumps(row)  # one JSON document for scripts


def test_the_note_names_a_rollback_before_an_error_before_an_evaluation() -> None:
    evaluation = {"release": "m@3", "score": 0.5, "threshold": 0.8, "passed": 5, "total": 10, "ts": NOW}
    rolled = deploy("d1", rolled_back="m@3", rollback_reason="evaluation below threshold", last_error="x")
    (view,) = fleet(("edgert/v1/d1/deploy", rolled))
    assert note(device_row(view)) == "rolled back m@3: evaluation below threshold"
    (view,) = fleet(("edgert/v1/d1/deploy", deploy("d1", last_error="download: timed out", evaluation=evaluation)))
    assert note(device_row(view)) == "download: timed out"
    (view,) = fleet(("edgert/v1/d1/deploy", deploy("d1", evaluation=evaluation)))
    assert note(device_row(view)) == "eval m@3: 0.50 (below threshold 0.80)"
    (view,) = fleet(("edgert/v1/d1/deploy", deploy("d1")))
    assert note(device_row(view)) == ""


def test_a_device_with_only_a_status_has_empty_figures() -> None:
    (view,) = fleet(("edgert/v1/d1/status", status("d1", state="offline", version=None)))
    row = device_row(view)
    assert row["state"] == "offline" and row["model"] is None and row["requests"] is None and row["phase"] is None


def test_summaries_count_serving_updating_failed_and_rolled_back() -> None:
    views = fleet(
        ("edgert/v1/d1/status", status("d1", version="2")),
        ("edgert/v1/d2/status", status("d2", version="2", state="offline")),
        ("edgert/v1/d3/status", status("d3", version="3")),
        ("edgert/v1/d2/deploy", deploy("d2", current="m@2", phase="downloading", pending="m@3")),
        ("edgert/v1/d1/deploy", deploy("d1", current="m@2", blocklist=["m@3"], rolled_back="m@3")),
        ("edgert/v1/d4/status", status("d4", version="2")),
        ("edgert/v1/d4/deploy", deploy("d4", current="m@2", blocklist=["m@3"])),
        ("edgert/v1/d5/status", status("d5", version="3")),
        ("edgert/v1/d5/deploy", deploy("d5", current="m@3", phase="rolling_back")),
    )
    by_release = {summary.release: summary for summary in summaries(views)}
    assert [summary.release for summary in summaries(views)] == ["m@3", "m@2"]  # newest first
    two, three = by_release["m@2"], by_release["m@3"]
    assert (two.devices, two.online, two.healthy) == (3, 2, 2)
    assert (three.devices, three.online, three.healthy) == (2, 2, 1)  # d5 is rolling back
    assert (three.updating, three.failed, three.rolled_back) == (1, 1, 1)
    assert "m@3: 2 device(s), 1 healthy" in three.line()


def test_the_rollout_target_is_the_newest_pending_release_else_the_newest_served() -> None:
    pending = fleet(
        ("edgert/v1/d1/deploy", deploy("d1", current="m@9", pending="m@10")),
        ("edgert/v1/d2/deploy", deploy("d2", current="m@10")),
        ("edgert/v1/d3/deploy", deploy("d3", current="m@9", pending="m@9.1")),
    )
    assert rollout_target(pending) == "m@10"  # 10 > 9.1 > 9, as numbers
    assert rollout_target(fleet(("edgert/v1/d1/deploy", deploy("d1", current="m@9")))) == "m@9"
    assert rollout_target(fleet(("edgert/v1/d1/status", status("d1")))) is None


# ----------------------------------------------------------------------------- compare
def test_compare_sums_a_release_over_devices_lifetime_and_window() -> None:
    start = comparing.readings(
        fleet(
            ("edgert/v1/d1/telemetry", telemetry("d1", [counters("m@1", requests_ok=10, completion_tokens=100)])),
            ("edgert/v1/d2/telemetry", telemetry("d2", [counters("m@2", requests_ok=40, completion_tokens=400)])),
        )
    )
    end = comparing.readings(
        fleet(
            ("edgert/v1/d1/telemetry", telemetry("d1", [counters("m@1", requests_ok=12, completion_tokens=130)])),
            # d2 restarted during the window: its new reading is the window's work
            ("edgert/v1/d2/telemetry", telemetry("d2", [counters("m@2", started=NOW, requests_ok=5)])),
            ("edgert/v1/d3/telemetry", telemetry("d3", [counters("m@2", requests_ok=1, requests_failed=1)])),
        )
    )
    lifetime = comparing.totals("m@2", end)
    assert (lifetime.devices, lifetime.requests, lifetime.requests_failed) == (2, 7, 1)
    windowed = comparing.row("m@1", comparing.totals("m@1", end, start))
    assert windowed["requests"] == 2 and windowed["completion_tokens_per_request"] == pytest.approx(15.0)
    assert comparing.totals("m@2", end, start).requests == 7
    message = comparing.missing("m@7", end)
    assert message == "no device reports counters for m@7 (3 device(s) report; releases with data: m@1, m@2)"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("10m", 600), ("1.5h", 5400), ("2d", 172800)])
def test_window_durations(text: str, seconds: float) -> None:
    assert comparing.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "10x", "-5m", "m10"])
def test_bad_window_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        comparing.parse_duration(text)


@pytest.mark.parametrize("text", ["m", "m@", "@2", "m@2@3", "m @2"])
def test_bad_releases_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected MODEL@VERSION"):
        comparing.parse_release(text)


def test_payload_models_stay_the_ones_the_observer_reads() -> None:
    # the observer validates with these models; a schema change that broke them would silently empty the view
    DeviceStatus.model_validate_json(status("d1"))
    DeployState.model_validate_json(deploy("d1"))
    Telemetry.model_validate_json(telemetry("d1", [counters()]))


def test_fleet_exit_codes_mean_one_thing_each() -> None:
    # scripts branch on them: two meanings under one number (7 was claimed twice once) would lie to one of them
    codes = {name: value for name, value in vars(exitcodes).items() if name.isupper() and isinstance(value, int)}
    assert len(set(codes.values())) == len(codes), codes
    documented = exitcodes.__doc__ or ""
    for value in codes.values():
        assert f"| {value} " in documented, f"exit code {value} is not in edgert/cli/exitcodes.py's table"
