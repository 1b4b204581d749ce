"""What ``edgert fleet status`` costs the operator as the fleet grows: the retained burst and the command.

Starts a local mosquitto, leaves N simulated devices' three retained messages on it (status, deploy state,
telemetry with one release's counters: the shapes and sizes a daemon publishes, built from the pydantic
models), then runs ``edgert fleet status --json`` as a subprocess and reports, per N: the retained bytes
it reads, wall time, CPU (user+sys of the child) and peak RSS. Run it under the shared lock:

    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/fleet_status_cost.py [--devices 100,1000,5000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgert.api.mqtt_schemas import (  # noqa: E402
    TTFT_BUCKETS_S,
    DeployState,
    DeviceStatus,
    LinkCounters,
    MemoryReading,
    ModelRef,
    Telemetry,
    VersionCounters,
)
from edgert.settings import MqttSettings  # noqa: E402
from edgert.transport.mqtt_client import TopicSubscriber  # noqa: E402
from tests.integration.mosquitto import Broker  # noqa: E402

EDGERT = Path(sys.executable).parent / "edgert"


def device_messages(index: int, now: float) -> list[tuple[str, bytes]]:
    """One device's three retained messages, as a daemon serving gemma-4-e2b@3 in group 'vans' leaves them."""
    device = f"van-{index:06d}"
    release = "gemma-4-e2b@3"
    status = DeviceStatus(
        state="online",
        device_id=device,
        group="vans",
        model=ModelRef(id="gemma-4-e2b", file="gemma-4-e2b-Q4_K_M.gguf", quant="Q4_K_M", version="3"),
        backend="cpu",
        edgert_version="0.9.0",
        protocol="5",
        uptime_s=86400.0,
        ts=now,
    )
    deploy = DeployState(device_id=device, phase="idle", current=release, previous="gemma-4-e2b@2", ts=now)
    buckets = [0] * (len(TTFT_BUCKETS_S) + 1)
    buckets[2], buckets[3] = 900 + index % 100, 100
    telemetry = Telemetry(
        ts=now,
        device_id=device,
        uptime_s=86400.0,
        tokens_per_s=13.4,
        queue_depth=0,
        active=1,
        requests_finished=1000 + index % 100,
        rejected=0,
        memory=MemoryReading(rss_bytes=3_500_000_000, available_bytes=4_000_000_000, total_bytes=8_000_000_000),
        temperature_c=54.0,
        mqtt=LinkCounters(
            connected=True, reconnects=2, buffered=0, dropped=0, duplicates=0, bad_payloads=0, requests=1000
        ),
        versions=[
            VersionCounters(
                release=release,
                started=now - 86400,
                requests_ok=1000 + index % 100,
                requests_failed=3,
                prompt_tokens=180_000,
                completion_tokens=95_000,
                decode_s=7000.0,
                ttft_buckets=buckets,
            )
        ],
    )
    prefix = f"edgert/v1/{device}"
    return [
        (f"{prefix}/status", status.model_dump_json(exclude_none=True).encode()),
        (f"{prefix}/deploy", deploy.model_dump_json(exclude_none=True).encode()),
        (f"{prefix}/telemetry", telemetry.model_dump_json(exclude_none=True).encode()),
    ]


def fill(broker: Broker, first: int, last: int) -> int:
    """Leave devices first..last-1 retained on the broker; the bytes of payload left."""
    now = time.time()
    messages = [message for index in range(first, last) for message in device_messages(index, now)]
    # a marker topic after the devices: once it comes back, the broker holds everything published before it
    marker = f"bench/marker/{last}"
    arrived: list[str] = []
    with TopicSubscriber(
        MqttSettings(broker="127.0.0.1", port=broker.port), (marker,), lambda t, _p, _r: arrived.append(t)
    ) as client:
        for topic, payload in messages:
            client.publish(topic, payload, retain=True)
        client.publish(marker, b"done")
        deadline = time.monotonic() + 120
        while not arrived and time.monotonic() < deadline:
            time.sleep(0.05)
    assert arrived, "the broker never echoed the marker"
    return sum(len(payload) for _, payload in messages)


def measure(broker: Broker, devices: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [str(EDGERT), "fleet", "status", "--json", "--wait", "120", "--broker", f"127.0.0.1:{broker.port}"],
        capture_output=True,
        text=True,
        check=False,
        env={key: value for key, value in os.environ.items() if not key.startswith("EDGERT_")},
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    seen = len(json.loads(done.stdout))
    assert seen == devices, f"fleet status saw {seen} of {devices} devices"
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "max_rss_mib": after.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="100,1000,5000", help="fleet sizes, ascending")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.devices.split(","))
    per_device = sum(len(payload) for _, payload in device_messages(0, time.time()))
    print(f"retained bytes per device: {per_device} (status+deploy+telemetry)")
    print("devices  retained_MiB  wall_s  cpu_s  peak_rss_MiB  (fleet status --json, incl. 0.5 s quiet + start-up)")
    with tempfile.TemporaryDirectory() as workdir:
        broker = Broker(Path(workdir)).start()
        try:
            held, retained = 0, 0
            for size in sizes:
                retained += fill(broker, held, size)
                held = size
                figures = measure(broker, size)
                print(
                    f"{size:7d}  {retained / 2**20:12.1f}  {figures['wall_s']:6.2f}  {figures['cpu_s']:5.2f}"
                    f"  {figures['max_rss_mib']:12.0f}"
                )
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
