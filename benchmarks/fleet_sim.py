"""A fleet on this machine (issue 18): N real ``edgert serve`` daemons, one mosquitto, one signed registry behind nginx.

Every device is a real daemon (tiny Gemma 4 fixture, 1 thread, n_ctx 512; its own state dir, socket, MQTT
identity; two groups), the registry is a real ``edgert.registry`` repository published to a site that nginx
serves with model files throttled to ``--rate`` bytes/s per connection (a slow link, and time to catch a
download midway); the operator is ``edgert fleet rollout`` / ``edgert fleet status`` as real subprocesses.
The harness is tests/integration/fleet.py (the test suite's short version: tests/integration/test_fleet_sim.py).

Phases, in order:

1. start-up: the fleet from nothing to every daemon ready, online on the broker and on 1.0.0; memory (RSS
   and PSS, shared pages counted once) and CPU of the whole fleet;
2. steady state (``--steady-s``): broker messages per device per minute (a wildcard subscriber), payload
   sizes per topic, fleet and broker CPU; the retained burst a fresh subscriber gets and what
   ``edgert fleet status --json`` costs (wall, CPU);
3. 2.0.0 rolled out in waves (``--waves``, default 10,50,100) with a request load on ``--load-devices``
   devices over their sockets: time per wave, failed requests, the controller's CPU (rusage); then 2.1.0
   the same way with the broker stopped for ``--outage-s`` right after its second wave is signed;
4. a 3.0.0 that no device can load (a GGUF llama.cpp refuses: its health check fails), in ``--bad-waves``
   (default 5,25,100, as ``fleet rollout``'s): the rollout must halt after its first wave, those devices
   roll back, the channel and the fleet stay on 2.1.0;
5. 4.0.0 to every device, ``--kills`` devices killed -9 in the middle of their download and started again:
   bytes nginx sent each device (resume waste = sent - file size).

    flock /tmp/edgert-bench.lock .venv/bin/python benchmarks/fleet_sim.py [--devices 24] [--rate 250000]
        [--steady-s 120] [--outage-s 30] [--kills 5] [--load-devices 3] [--json results.json]
    .venv/bin/python benchmarks/fleet_sim.py --controller-scale 1000,10000,100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

# Run from the repository root: the fleet harness lives with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgert.fleet import rollout_state
from edgert.fleet.rollout import wave_members
from tests.integration.fleet import BrokerWatch, CommandRun, Load, SimFleet
from tests.integration.update_support import MODEL_ID, broken_model, make_variant

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny-gemma4.gguf"


def fleet_memory(sim: SimFleet) -> dict[str, float]:
    """RSS summed over the daemons, and PSS (each shared page split among the processes that map it)."""
    rss, pss = [], []
    for device in sim.devices:
        assert device.daemon is not None
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(device.daemon.proc.pid).memory_full_info()
            rss.append(info.rss)
            pss.append(info.pss)
    mib = 1024**2
    return {
        "rss_sum_mib": sum(rss) / mib,
        "pss_sum_mib": sum(pss) / mib,
        "rss_per_daemon_mib": statistics.median(rss) / mib,
        "pss_per_daemon_mib": statistics.median(pss) / mib,
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def daemon_pids(sim: SimFleet) -> list[int]:
    return [d.daemon.proc.pid for d in sim.devices if d.daemon is not None]


def live_rates(watch: BrokerWatch, start: float, end: float, devices: int) -> dict[str, Any]:
    """Messages the devices published between ``start`` and ``end`` (unix time), per device per minute, by kind."""
    with watch.lock:
        live = [m for m in watch.messages if start <= m[0] < end and not m[4]]
    minutes = (end - start) / 60
    kinds = sorted({m[2] for m in live})
    per_kind = {
        kind: {
            "per_device_per_min": sum(1 for m in live if m[2] == kind) / devices / minutes,
            "payload_bytes_median": statistics.median(m[3] for m in live if m[2] == kind),
            "payload_bytes_max": max(m[3] for m in live if m[2] == kind),
        }
        for kind in kinds
    }
    return {
        "window_s": end - start,
        "per_device_per_min": len(live) / devices / minutes,
        "payload_bytes_per_device_per_min": sum(m[3] for m in live) / devices / minutes,
        "by_kind": per_kind,
    }


def retained_sizes(watch: BrokerWatch) -> dict[str, Any]:
    """The latest payload size of every retained device topic (status, deploy, telemetry)."""
    sizes: dict[tuple[str, str], int] = {}
    with watch.lock:
        for _, device, kind, size, _ in watch.messages:
            if kind in ("status", "deploy", "telemetry"):
                sizes[(device, kind)] = size
    by_kind = {
        kind: statistics.median(s for (_, k), s in sizes.items() if k == kind) for kind in sorted({k for _, k in sizes})
    }
    return {"topics": len(sizes), "bytes": sum(sizes.values()), "median_bytes_by_kind": by_kind}


def retained_burst(sim: SimFleet) -> dict[str, float]:
    """A fresh wildcard subscriber: how many retained messages (and bytes) arrive, and how fast."""
    fresh = BrokerWatch(sim.broker)
    began = time.time()
    fresh.start()
    try:
        # no end marker: the burst is over once at least status + deploy of every device came and 1 s is quiet
        def quiet() -> bool:
            with fresh.lock:
                burst = [m[0] for m in fresh.messages if m[4]]
            return len(burst) >= 2 * len(sim.devices) and time.time() - max(burst) > 1.0

        fresh.wait(quiet, 30, lambda: f"{len(fresh.messages)} messages")
        with fresh.lock:
            burst = [m for m in fresh.messages if m[4]]
        return {
            "messages": len(burst),
            "bytes": sum(m[3] for m in burst),
            "seconds": max(m[0] for m in burst) - began,
        }
    finally:
        fresh.stop()


def fleet_status_cost(sim: SimFleet) -> dict[str, Any]:
    """``edgert fleet status --json`` as the operator runs it: wall and CPU (rusage), devices by release."""
    run = sim.fleet_status()
    assert run.returncode == 0, run.output
    devices = json.loads(run.output)
    return {
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "devices": len(devices),
        "json_bytes": len(run.output),
        "online_by_model": dict(Counter(d["model"] for d in devices if d["state"] == "online")),
    }


def wave_times(run: CommandRun) -> list[dict[str, Any]]:
    """Seconds from each wave's signing to its verdict, from the controller's own timestamped lines."""
    waves, signed_at = [], None
    for at, line in run.lines:
        if line.startswith("signed ") and signed_at is None:
            signed_at = at
        elif line.startswith("wave ") and (": pass" in line or "HALT" in line) and signed_at is not None:
            waves.append({"line": line, "seconds": round(at - signed_at, 1)})
            signed_at = None
    return waves


def controller_scale(sizes: list[int], changes: tuple[int, ...] = (1, 100), wave_percent: int = 10) -> dict[str, Any]:
    """What ``fleet rollout``'s controller spends per wake-up on N synthetic devices (no broker, no sockets).

    The devices' status and deploy payloads go through :meth:`FleetObserver.handle` (the MQTT thread's path,
    not timed here); then, as :meth:`RolloutController._watch` does: the wave's tally filled once from every
    device (``fill_ms``, once per wave), and per wake-up after ``k`` members changed their deploy state
    (``wakeup_ms_<k>_changed``: :meth:`FleetObserver.changes` + :meth:`WaveTally.update` per changed device +
    :func:`decide`; the least of 20). ``full_ms``: the way before (the whole fleet re-judged per wake-up:
    snapshot copy, eligible devices, wave members, judge), kept for comparison.
    """
    from edgert.api.mqtt_schemas import DeployState, DeviceStatus
    from edgert.fleet.observe import FleetObserver
    from edgert.fleet.rollout import Limits, WaveTally, decide, eligible, judge
    from edgert.settings import MqttSettings

    old, new, limits = f"{MODEL_ID}@1.0.0", f"{MODEL_ID}@2.0.0", Limits(0.1, None, None)

    def deploy(device_id: str, current: str) -> bytes:
        state = DeployState(device_id=device_id, phase="idle", current=current, ts=time.time())
        return state.model_dump_json().encode()

    out: dict[str, Any] = {}
    for size in sizes:
        observer = FleetObserver(MqttSettings(broker="127.0.0.1"))
        ids = [f"dev-{i:06d}" for i in range(size)]
        for device_id in ids:
            status = DeviceStatus(state="online", device_id=device_id, group="lobby", ts=time.time())
            observer.handle(f"edgert/v1/{device_id}/status", status.model_dump_json().encode())
            observer.handle(f"edgert/v1/{device_id}/deploy", deploy(device_id, old))
        began = time.perf_counter()
        tally = WaveTally((MODEL_ID, "2.0.0"), wave_percent, "stable")
        seen, everything = observer.changes(0)
        for device_id, view in everything.items():
            tally.update(device_id, view)
        decide(tally, limits, time_up=False)
        row: dict[str, Any] = {"fill_ms": round(1000 * (time.perf_counter() - began), 2), "wave_members": tally.members}
        members = sorted(tally.reports)
        for k in changes:
            runs = []
            for flip in range(1, 21):
                for device_id in members[:k]:  # members' reports change: the costliest kind of change
                    observer.handle(f"edgert/v1/{device_id}/deploy", deploy(device_id, new if flip % 2 else old))
                began = time.perf_counter()
                seen, changed = observer.changes(seen)
                for device_id, view in changed.items():
                    tally.update(device_id, view)
                decide(tally, limits, time_up=False)
                runs.append(time.perf_counter() - began)
                assert len(changed) == min(k, len(members))
            row[f"wakeup_ms_{k}_changed"] = round(1000 * min(runs), 3)
        full = []
        for _ in range(3):
            began = time.perf_counter()
            snapshot = observer.snapshot()
            wave = wave_members(eligible(snapshot, "stable"), MODEL_ID, "2.0.0", wave_percent)
            judge(snapshot, wave, (MODEL_ID, "2.0.0"), limits, time_up=False)
            full.append(time.perf_counter() - began)
        row["full_ms"] = round(1000 * min(full), 2)
        row["steady"] = controller_steady(size)
        out[str(size)] = row
    return out


def controller_steady(size: int, seconds: float = 10.0, per_device_min: float = 2.02) -> dict[str, float]:
    """The real watch loop (``RolloutController._watch``) on a 10 % wave of ``size`` synthetic devices for
    ``seconds`` while a feeder thread delivers the fleet's steady message rate (``per_device_min`` per device
    per minute, edgert's defaults; each a device's deploy state, so each is a change to re-read): the CPU of
    the controller's own thread (``time.thread_time``) after the tally's fill at the wave's start (given apart)."""
    import threading

    from edgert.api.mqtt_schemas import DeployState, DeviceStatus
    from edgert.fleet.observe import FleetObserver
    from edgert.fleet.rollout_controller import RolloutController, RolloutRequest
    from edgert.fleet.rollout_state import RolloutState
    from edgert.registry.repository import Registry
    from edgert.settings import MqttSettings

    class Fed(FleetObserver):
        @property
        def connected(self) -> bool:  # fed through handle(), as the broker would: the wave's clock runs
            return True

    observer = Fed(MqttSettings(broker="127.0.0.1"))
    ids = [f"dev-{i:06d}" for i in range(size)]
    deploys = {}
    for device_id in ids:
        status = DeviceStatus(state="online", device_id=device_id, group="lobby", ts=time.time())
        observer.handle(f"edgert/v1/{device_id}/status", status.model_dump_json().encode())
        state = DeployState(device_id=device_id, phase="idle", current=f"{MODEL_ID}@1.0.0", ts=time.time())
        deploys[device_id] = state.model_dump_json().encode()
        observer.handle(f"edgert/v1/{device_id}/deploy", deploys[device_id])
    rate = size * per_device_min / 60
    stop = threading.Event()

    def feed() -> None:
        sent, began = 0, time.monotonic()
        while not stop.is_set():
            due = int(rate * (time.monotonic() - began))
            for n in range(sent, due):
                device_id = ids[n % size]
                observer.handle(f"edgert/v1/{device_id}/deploy", deploys[device_id])
            sent = due
            time.sleep(0.01)  # a load generator's pacing: the messages due every 10 ms

    with tempfile.TemporaryDirectory() as tmp:
        request = RolloutRequest(
            model_id=MODEL_ID,
            version="2.0.0",
            channel="stable",
            waves=(10,),
            max_failure_rate=0.1,
            min_devices=1,
            wave_wait_s=seconds,
            state_path=Path(tmp) / "stable.json",
            nudge=False,
        )
        # the first progress line comes right after the fill (once per wave): what follows is the steady part
        filled: list[tuple[float, float]] = []

        def progress(_line: str) -> None:
            if not filled:
                filled.append((time.thread_time(), time.monotonic()))

        registry = Registry.init(Path(tmp) / "reg")
        controller = RolloutController(request, registry, observer, say=lambda _: None, progress=progress)
        state = RolloutState(
            model_id=MODEL_ID, version="2.0.0", channel="stable", waves=[10], promoted=10, wave_started=time.time()
        )
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        began = time.thread_time()
        controller._watch(state)  # the loop itself is what is measured
        cpu, wall = time.thread_time() - filled[0][0], time.monotonic() - filled[0][1]
        stop.set()
        feeder.join()
    return {
        "messages_per_s": round(rate),
        "fill_cpu_ms": round(1000 * (filled[0][0] - began), 1),
        "watched_s": round(wall, 2),
        "controller_thread_cpu_pct": round(100 * cpu / wall, 2),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def broker_outage(sim: SimFleet, outage_s: float) -> dict[str, float]:
    """Stop mosquitto for ``outage_s`` and start it again on the same port; how long until every device is back."""
    sim.broker.stop()
    down_at = time.time()
    time.sleep(outage_s)  # the outage itself, not a synchronisation
    sim.broker.start()
    up_at = time.time()

    def stale() -> list[str]:
        """Devices with no status made since the broker returned (live, or retained if it beat our resubscribe)."""
        return [d.device_id for d in sim.devices if (sim.watch.get(d.device_id, "status") or {}).get("ts", 0) < up_at]

    back = sim.watch.wait(lambda: not stale(), 300, lambda: f"not back on the broker: {stale()}")
    return {"outage_s": up_at - down_at, "devices_back_s_after_broker": back}


def good_rollout(sim: SimFleet, version: str, args: argparse.Namespace, *, outage_s: float) -> dict[str, Any]:
    """``fleet rollout`` of a good release in ``--waves`` under a request load; the broker taken away for
    ``outage_s`` right after the second wave is signed (0: not at all)."""
    load = Load(sim.devices[: args.load_devices]).start()
    began = time.time()
    run = sim.rollout(version, "--waves", args.waves, "--min-devices", "1", "--wave-wait", "5m")
    outage: dict[str, float] = {}
    if outage_s:
        run.wait_line(f"for {args.waves.split(',')[1]}% of devices", 300)
        outage = broker_outage(sim, outage_s)
    done = run.finish(900)
    load.stop()
    converged = sim.wait_current(sim.devices, version, 300)
    result = {
        "returncode": done.returncode,
        "wall_s": done.wall_s,
        "fleet_converged_s_after_controller": converged,
        "controller_cpu_s": done.cpu_s,
        "controller_max_rss_mib": done.max_rss_bytes / 1024**2,
        "waves": wave_times(done),
        **outage,
        "load_requests_ok": load.ok,
        "load_requests_failed": len(load.failures),
        "load_failures": load.failures[:5],
        "bytes_by_device": sim.bytes_by_device(version),
        # what the devices published while the rollout ran
        "messages": live_rates(sim.watch, began, time.time(), len(sim.devices)),
        "output": done.output,
        # what the operator sees once it is done
        "fleet_status": fleet_status_cost(sim),
    }
    say(f"{version}: rc {done.returncode} in {done.wall_s:.0f} s\n{done.output}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--rate", type=int, default=250_000, help="nginx limit_rate on model files (bytes/s)")
    parser.add_argument("--steady-s", type=float, default=120.0)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--load-devices", type=int, default=3)
    parser.add_argument("--waves", default="10,50,100", help="waves of the good 2.0.0")
    parser.add_argument("--bad-waves", default="5,25,100", help="waves of the bad 3.0.0 (fleet rollout's default)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument(
        "--controller-scale",
        default=None,
        help="only time the controller's work per wake-up on N synthetic devices, e.g. 1000,10000,100000",
    )
    args = parser.parse_args()
    if args.controller_scale:
        print(json.dumps(controller_scale([int(n) for n in args.controller_scale.split(",")]), indent=2))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgert-fleet-"))
    results: dict[str, Any] = {"devices": args.devices, "rate_bytes_s": args.rate, "cpus": psutil.cpu_count()}
    sim = SimFleet(workdir / "fleet", TINY, args.devices, rate=args.rate)
    try:
        # 1. start-up ---------------------------------------------------------------------------------------
        cpu_before = psutil.cpu_times()
        results["startup_s"] = sim.start("1.0.0", ready_timeout=900)
        cpu_after = psutil.cpu_times()
        results["startup_machine_cpu_s"] = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        results["daemon_cpu_after_start_s"] = cpu_seconds(daemon_pids(sim))
        say(f"{args.devices} daemons ready, online and on 1.0.0 in {results['startup_s']:.1f} s")

        # 2. steady state ----------------------------------------------------------------------------------
        time.sleep(5)  # the start-up's last deploy/status messages land before the window opens
        pids, broker_pid = daemon_pids(sim), sim.broker.proc.pid if sim.broker.proc else 0
        fleet_cpu, broker_cpu = cpu_seconds(pids), cpu_seconds([broker_pid])
        window_start = time.time()
        time.sleep(args.steady_s)
        window_end = time.time()
        results["steady"] = live_rates(sim.watch, window_start, window_end, args.devices)
        results["steady"]["fleet_cpu_percent"] = 100 * (cpu_seconds(pids) - fleet_cpu) / args.steady_s
        results["steady"]["broker_cpu_percent"] = 100 * (cpu_seconds([broker_pid]) - broker_cpu) / args.steady_s
        results["memory"] = fleet_memory(sim)
        results["retained"] = retained_sizes(sim.watch)
        results["retained_burst"] = retained_burst(sim)
        results["fleet_status"] = fleet_status_cost(sim)
        say(f"steady: {json.dumps(results['steady'])}")

        # 3. 2.0.0 in waves under load; then 2.1.0 the same way with the broker down mid-rollout ---------------
        sim.add("2.0.0", make_variant(TINY, workdir / "v2.gguf", general_name="tiny v2"))
        results["rollout_v2"] = good_rollout(sim, "2.0.0", args, outage_s=0.0)
        sim.add("2.1.0", make_variant(TINY, workdir / "v21.gguf", general_name="tiny v2.1"))
        results["rollout_v21_outage"] = good_rollout(sim, "2.1.0", args, outage_s=args.outage_s)

        # 4. a 3.0.0 no device can load: halt after the first wave ----------------------------------------
        sim.add("3.0.0", broken_model(TINY, workdir / "broken.gguf"))
        bad = sim.rollout("3.0.0", "--waves", args.bad_waves, "--min-devices", "1", "--wave-wait", "5m").finish(900)
        state = rollout_state.load(rollout_state.default_path(sim.registry.registry.directory, "stable"))
        assert state is not None
        wave = wave_members([d.device_id for d in sim.devices], MODEL_ID, "3.0.0", state.results[0].percent)
        by_id = {d.device_id: d for d in sim.devices}
        sim.watch.wait(lambda: all(sim.rejected(by_id[d], "3.0.0") for d in wave), 120, lambda: "no rollback")
        sim.wait_current(sim.devices, "2.1.0", 120)
        channel = sim.registry.registry.status().channels.channels["stable"]
        touched = [d for d, sent in sim.bytes_by_device("3.0.0").items() if sent]
        results["rollout_v3_bad"] = {
            "returncode": bad.returncode,
            "status": str(state.status),
            "waves_run": len(state.results),
            "first_wave_percent": state.results[0].percent,
            "devices_affected": len(wave),
            "devices_affected_percent": round(100 * len(wave) / args.devices, 1),
            "devices_that_fetched_v3": len(touched),
            "channel_after": f"{channel.version}@{channel.rollout}%",
            "fleet_on_previous": all(sim.on(d, "2.1.0") for d in sim.devices),
            "wall_s": bad.wall_s,
            "controller_cpu_s": bad.cpu_s,
            "waves": wave_times(bad),
        }
        say(f"3.0.0: rc {bad.returncode}\n{bad.output}")

        # 5. 4.0.0 to every device, kill -9 mid-download, restart: resume -----------------------------------
        sim.add("4.0.0", make_variant(TINY, workdir / "v4.gguf", general_name="tiny v4"))
        size = sim.registry.target_file("4.0.0").stat().st_size
        victims = sim.devices[-args.kills :]
        run = sim.rollout("4.0.0", "--waves", "100", "--wave-wait", "5m")
        kept = sim.kill_mid_download(victims, size, 300)
        time.sleep(2)  # down for a moment (a power cut), not a synchronisation
        for device in victims:
            device.start()
        resume = run.finish(900)
        sim.wait_current(sim.devices, "4.0.0", 120)
        sent = sim.bytes_by_device("4.0.0")
        results["kill_resume"] = {
            "returncode": resume.returncode,
            "file_bytes": size,
            "kept_part_bytes": kept,
            "sent_to_killed": {d.device_id: sent[d.device_id] for d in victims},
            "waste_bytes_killed": {d.device_id: sent[d.device_id] - size for d in victims},
            "sent_to_others_max": max(v for k, v in sent.items() if k not in kept),
            "wall_s": resume.wall_s,
            "controller_cpu_s": resume.cpu_s,
        }
        say(f"4.0.0: rc {resume.returncode}\n{resume.output}")
        results["memory_end"] = fleet_memory(sim)
    finally:
        sim.stop()
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
