"""``edgert fleet status|watch|compare`` as real subprocesses against a real mosquitto.

The fleet is one real daemon (tiny Gemma 4 fixture, fast telemetry) plus devices whose retained status,
deploy state and telemetry the test publishes with mosquitto_pub -r, as a fleet leaves them on a broker:
the commands must read them all from the retained burst alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgert.fleet.counters import BUCKETS
from edgert.fleet.observe import DeviceView, FleetObserver
from tests.integration.daemon import DaemonProcess, daemon_env
from tests.integration.mosquitto import Broker, free_port
from tests.integration.test_mqtt import mqtt_daemon

EDGERT = Path(sys.executable).parent / "edgert"
NOW = time.time()


def publish(broker: Broker, topic: str, body: dict[str, Any] | bytes) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    subprocess.run(["mosquitto_pub", *broker.cli_args(), "-q", "1", "-r", "-t", topic, "-s"], input=payload, check=True)


def counters(release: str, ok: int, failed: int = 0, *, completion: int = 0, decode_s: float = 0.0) -> dict[str, Any]:
    ttft = [0] * BUCKETS
    ttft[1] = ok + failed  # every request's first token within 0.1..0.25 s
    return {
        "release": release,
        "started": NOW - 600,
        "requests_ok": ok,
        "requests_failed": failed,
        "prompt_tokens": 20 * (ok + failed),
        "completion_tokens": completion,
        "decode_s": decode_s,
        "ttft_buckets": ttft,
    }


def telemetry(device: str, versions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ts": time.time(),
        "device_id": device,
        "uptime_s": 600,
        "tokens_per_s": 4.0,
        "queue_depth": 1,
        "active": 0,
        "requests_finished": 0,
        "rejected": 0,
        "memory": {"rss_bytes": 200 << 20, "available_bytes": 1 << 30, "total_bytes": 2 << 30},
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


def simulated(broker: Broker, device: str, release: str, *, state: str = "online", **deploy: Any) -> None:
    """One device's three retained messages, as a daemon serving ``release`` in group 'sim' leaves them."""
    model, _, version = release.partition("@")
    status = {
        "state": state,
        "device_id": device,
        "group": "sim",
        "model": {"id": model, "file": f"{model}.gguf", "version": version},
        "edgert_version": "0.9.0",
        "uptime_s": 600,
        "ts": NOW - 600,
    }
    publish(broker, f"edgert/v1/{device}/status", status)
    body = {"device_id": device, "phase": "idle", "current": release, "channel": "stable", "ts": NOW} | deploy
    publish(broker, f"edgert/v1/{device}/deploy", body)


def fleet(broker: Broker, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [str(EDGERT), "fleet", *args, "--broker", f"127.0.0.1:{broker.port}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, broker: Broker) -> Iterator[DaemonProcess]:
    """A real daemon in group 'real' that has answered one request, its counters on the broker."""
    daemon = mqtt_daemon(
        tmp_path_factory.mktemp("real-1"),
        tiny_gguf,
        broker,
        "real-1",
        mqtt__group="real",
        mqtt__telemetry_interval_s="0.2",
    )
    try:
        with daemon.client() as client:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            assert client.post("/v1/chat/completions", json=body).status_code == 200

        def counted(views: dict[str, DeviceView]) -> bool:
            view = views.get("real-1")
            versions = view.telemetry.versions if view and view.telemetry else []
            return any(entry.requests_ok >= 1 for entry in versions)

        with FleetObserver(broker.client_settings()) as observer:
            assert observer.wait_until(counted, timeout_s=30), "the daemon's telemetry never counted the request"
        yield daemon
    finally:
        daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def sim(broker: Broker) -> None:
    """Three simulated devices of group 'sim': two on m@2, one rolled back from m@3; and one bad payload."""
    simulated(broker, "sim-1", "m@2")
    simulated(broker, "sim-2", "m@2", blocklist=["m@3"], rolled_back="m@3", rollback_reason="health check: no reply")
    simulated(broker, "sim-3", "m@3", state="offline")
    publish(
        broker, "edgert/v1/sim-1/telemetry", telemetry("sim-1", [counters("m@2", 40, 2, completion=400, decode_s=20)])
    )
    publish(
        broker, "edgert/v1/sim-3/telemetry", telemetry("sim-3", [counters("m@3", 10, 5, completion=50, decode_s=10)])
    )
    publish(broker, "edgert/v1/sim-9/deploy", b'{"device_id": "sim-9", "phase": 7}')


def test_status_json_lists_real_and_retained_devices(broker: Broker, device: DaemonProcess, sim: None) -> None:
    done = fleet(broker, "status", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["device_id"]: row for row in json.loads(done.stdout)}
    assert set(rows) == {"real-1", "sim-1", "sim-2", "sim-3"}  # sim-9's only payload failed validation
    assert "skipped a bad deploy payload from device sim-9" in done.stderr

    real = rows["real-1"]
    assert real["state"] == "online" and real["group"] == "real" and real["model"] == "tiny-gemma4.gguf"
    assert real["requests"] >= 1 and real["error_rate"] == 0.0 and real["ttft_p50_s"] is not None
    assert real["edgert_version"] and real["uptime_s"] > 0 and real["rss_bytes"] > 0

    assert rows["sim-1"]["model"] == "m@2" and rows["sim-1"]["channel"] == "stable"
    assert rows["sim-1"]["requests"] == 42 and rows["sim-1"]["error_rate"] == pytest.approx(2 / 42)
    assert 0.1 <= rows["sim-1"]["ttft_p95_s"] <= 0.25
    assert rows["sim-2"]["rolled_back"] == "m@3" and rows["sim-2"]["rollback_reason"] == "health check: no reply"
    assert rows["sim-3"]["state"] == "offline"


def test_status_table_summarises_each_release(broker: Broker, sim: None) -> None:
    done = fleet(broker, "status", "--group", "sim")
    assert done.returncode == 0, done.stderr
    assert "sim-1" in done.stdout and "real-1" not in done.stdout
    assert "m@3: 1 device(s), 0 healthy, 0 online, 0 updating, 0 failed, 1 rolled back" in done.stdout
    assert "m@2: 2 device(s), 2 healthy, 2 online, 0 updating, 0 failed, 0 rolled back" in done.stdout


def test_status_exit_codes_for_an_empty_group_and_no_broker(broker: Broker, sim: None) -> None:
    empty = fleet(broker, "status", "--group", "nobody", "--json")
    assert empty.returncode == 8 and json.loads(empty.stdout) == []
    assert "no device of group 'nobody'" in empty.stderr
    cmd = [str(EDGERT), "fleet", "status", "--broker", f"127.0.0.1:{free_port()}"]
    unreachable = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert unreachable.returncode == 7 and "cannot reach the broker" in unreachable.stderr


def test_compare_lifetime_counters(broker: Broker, sim: None) -> None:
    done = fleet(broker, "compare", "m@2", "m@3", "--json")
    assert done.returncode == 0, done.stderr
    old, new = json.loads(done.stdout)["releases"]
    assert (old["release"], old["devices"], old["requests"]) == ("m@2", 1, 42)
    assert new["error_rate"] == pytest.approx(5 / 15) and new["tokens_per_s"] == pytest.approx(5.0)
    assert old["tokens_per_s"] == pytest.approx(20.0) and old["completion_tokens_per_request"] == pytest.approx(
        400 / 42
    )

    missing = fleet(broker, "compare", "m@2", "m@7")
    assert missing.returncode == 8
    assert "no device reports counters for m@7" in missing.stderr and "m@2, m@3" in missing.stderr
    assert fleet(broker, "compare", "m@2", "m7").returncode == 2


def test_compare_over_a_window_takes_the_difference(broker: Broker, sim: None) -> None:
    cmd = [
        str(EDGERT),
        "fleet",
        "compare",
        "m@2",
        "m@3",
        "--window",
        "4s",
        "--json",
        "--broker",
        f"127.0.0.1:{broker.port}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # the line comes once the start reading is in (after any warning lines); EOF if it never comes
        lines = iter(proc.stderr.readline, "")
        assert any(line.startswith("measuring") for line in lines), "compare did not read the start of its window"
        # in the window: sim-1 answers 10 more requests (1 failed)
        publish(
            broker,
            "edgert/v1/sim-1/telemetry",
            telemetry("sim-1", [counters("m@2", 49, 3, completion=500, decode_s=25)]),
        )
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    document = json.loads(out)
    old, new = document["releases"]
    assert document["window_s"] == 4
    assert (old["requests"], old["requests_failed"], old["tokens_per_s"]) == (10, 1, pytest.approx(20.0))
    assert new["requests"] == 0 and new["error_rate"] is None  # m@3 did nothing in the window


def test_watch_ends_when_the_rollout_is_done(broker: Broker, sim: None) -> None:
    # sim-2 rolled back from m@3 and sim-3 serves it, but sim-1 is still on m@2
    pending = fleet(broker, "watch", "--group", "sim", "--rollout", "m@3", "--until-done", "--timeout", "1")
    assert pending.returncode == 1 and "m@3 is not done after 1 s: 1 of 3 device(s) serve it" in pending.stderr
    done = fleet(broker, "watch", "--group", "sim", "--rollout", "m@2", "--until-done", "--timeout", "1")
    assert done.returncode == 1  # sim-3 serves m@3 and never refused m@2
    simulated(broker, "sim-1", "m@3")
    done = fleet(broker, "watch", "--group", "sim", "--rollout", "m@3", "--until-done", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert "rollout m@3" in done.stdout and "2/3 serve it" in done.stdout


ACL = Path(__file__).parents[2] / "packaging" / "mosquitto" / "edgert.acl"
USERS = {"dev-1": "pw-dev-1", "operator": "pw-operator", "technician": "pw-technician"}


def test_the_operator_identity_sees_the_fleet_through_the_shipped_acl(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "acl-broker", users=dict(USERS), acl_file=ACL).start()
    try:
        # dev-1 writes its own three topics with its own identity, as a daemon does
        as_device = Broker(broker.workdir, port=broker.port, username="dev-1", password=USERS["dev-1"])
        simulated(as_device, "dev-1", "m@2")
        publish(as_device, "edgert/v1/dev-1/telemetry", telemetry("dev-1", [counters("m@2", 5)]))

        def status_as(user: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
            cmd = [str(EDGERT), "fleet", "status", "--json", "--broker", f"127.0.0.1:{broker.port}", "-u", user]
            env = {**daemon_env(tmp_path / "cli-state"), "EDGERT_MQTT__PASSWORD": password or USERS[user]}
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)

        refused = status_as("operator", "not-the-pw-9f3a")
        assert refused.returncode == 7 and "refused the connection" in refused.stderr, refused.stderr
        assert "not-the-pw-9f3a" not in refused.stderr  # the password is never echoed

        operator = status_as("operator")
        assert operator.returncode == 0, operator.stderr
        (row,) = json.loads(operator.stdout)
        assert (row["device_id"], row["phase"], row["requests"]) == ("dev-1", "idle", 5)
        # a technician may read statuses only: the broker withholds deploy state and telemetry
        technician = status_as("technician")
        assert technician.returncode == 0, technician.stderr
        (row,) = json.loads(technician.stdout)
        assert (row["state"], row["phase"], row["requests"]) == ("online", None, None)
    finally:
        broker.stop()


def test_the_observer_catches_up_after_a_broker_restart(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "restarting").start()
    try:
        simulated(broker, "d1", "m@2")
        with FleetObserver(broker.client_settings()) as observer:
            assert observer.wait_until(lambda views: "d1" in views, timeout_s=30)
            broker.restart()  # same port; retained messages persist
            simulated(broker, "d2", "m@3")
            assert observer.wait_until(lambda views: "d2" in views, timeout_s=60), "no resubscription after restart"
            assert observer.connected and observer.snapshot()["d1"].release == "m@2"
    finally:
        broker.stop()


def test_a_command_to_many_devices_waits_for_the_broker_instead_of_dropping(tmp_path: Path) -> None:
    # paho refuses a message beyond max_queued_messages (+16) unacknowledged ones; publish must wait, not drop
    broker = Broker(tmp_path / "many").start()
    try:
        devices = [f"d{index:03d}" for index in range(300)]
        with FleetObserver(broker.client_settings(max_queued_messages=8)) as sender:
            for device in devices:
                body = {"state": "online", "device_id": device, "ts": NOW}
                sender.publish(f"edgert/v1/{device}/status", json.dumps(body).encode())
            # the observer hears its own messages (it subscribes to every status): all 300 went out
            assert sender.wait_until(lambda views: len(views) == len(devices), timeout_s=60)
            assert sorted(sender.snapshot()) == devices
    finally:
        broker.stop()
