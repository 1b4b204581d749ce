"""MQTT vs Unix-socket round-trip overhead on the same daemon, same prompt (tiny Gemma 4 GGUF).

Starts a local mosquitto and one daemon serving both transports, then measures:

1. latency: the same streamed request, alternately over the socket (SSE) and over MQTT 5
   (Response Topic + Correlation Data), sequentially; p50/p95 of TTFT (first text chunk at
   the client) and of total (final message / [DONE] at the client);
2. throughput: sustained completed requests/s with tiny non-streamed completions and a
   fixed number of requests in flight, per transport.

    .venv/bin/python benchmarks/mqtt_overhead.py [--requests 300] [--seconds 10] [--inflight 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgert.api.client import async_unix_client, unix_client  # noqa: E402
from edgert.api.mqtt_schemas import ReplyChunk, ReplyFinal  # noqa: E402
from edgert.transport.mqtt_client import MqttRequester  # noqa: E402
from tests.integration.daemon import DaemonProcess, start_daemon  # noqa: E402
from tests.integration.mosquitto import Broker  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "tiny-gemma4.gguf"
DEVICE = "bench"
REQ = f"edgert/v1/{DEVICE}/req"


def body(max_tokens: int, *, stream: bool) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": "Hello there, how are you today?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def socket_once(client: httpx.Client, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    ttft = None
    with client.stream("POST", "/v1/chat/completions", json=body(max_tokens, stream=True)) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
    total = time.perf_counter() - started
    return ttft if ttft is not None else total, total


def mqtt_once(requester: MqttRequester, max_tokens: int) -> tuple[float, float]:
    pending = requester.send(REQ, body(max_tokens, stream=True))
    ttft = None
    for at, reply in pending.replies(30):
        if ttft is None and isinstance(reply, ReplyChunk) and reply.delta:
            ttft = at - pending.sent_at
        if isinstance(reply, ReplyFinal):
            total = at - pending.sent_at
            return ttft if ttft is not None else total, total
    raise AssertionError("no final reply")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def latency(daemon: DaemonProcess, requester: MqttRequester, n: int, max_tokens: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"socket ttft": [], "socket total": [], "mqtt ttft": [], "mqtt total": []}
    with unix_client(daemon.socket) as client:
        for _ in range(20):  # warm both paths (prefix cache, connections)
            socket_once(client, max_tokens)
            mqtt_once(requester, max_tokens)
        for _ in range(n):
            ttft, total = socket_once(client, max_tokens)
            results["socket ttft"].append(ttft)
            results["socket total"].append(total)
            ttft, total = mqtt_once(requester, max_tokens)
            results["mqtt ttft"].append(ttft)
            results["mqtt total"].append(total)
    return results


def mqtt_throughput(requester: MqttRequester, seconds: float, inflight: int) -> float:
    window = deque(requester.send(REQ, body(2, stream=False)) for _ in range(inflight))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        oldest = window.popleft()
        *_, (_, last) = oldest.replies(30)
        assert isinstance(last, ReplyFinal), last  # an 'overloaded' refusal must not count as served
        done += 1
        window.append(requester.send(REQ, body(2, stream=False)))
    elapsed = time.perf_counter() - started
    for pending in window:
        for _ in pending.replies(30):
            pass
    return done / elapsed


async def socket_throughput(daemon: DaemonProcess, seconds: float, inflight: int) -> float:
    done = 0
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() - started < seconds:
            response = await client.post("/v1/chat/completions", json=body(2, stream=False))
            response.raise_for_status()
            done += 1

    async with async_unix_client(daemon.socket) as client:
        await asyncio.gather(*(worker(client) for _ in range(inflight)))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="latency samples per transport")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per latency request")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight during throughput runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgert-mqtt-bench-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker").start()
        (work / "daemon").mkdir()
        daemon = start_daemon(
            work / "daemon",
            TINY,
            **broker.daemon_settings(mqtt__device_id=DEVICE, mqtt__telemetry_interval_s="0"),
            engine__max_queue="256",
        )
        try:
            with MqttRequester(broker.client_settings()) as requester:
                lat = latency(daemon, requester, args.requests, args.max_tokens)
                mqtt_rps = mqtt_throughput(requester, args.seconds, args.inflight)
            socket_rps = asyncio.run(socket_throughput(daemon, args.seconds, args.inflight))
        finally:
            daemon.stop()
            broker.stop()
    print(f"tiny Gemma 4 GGUF, {args.requests} sequential streamed requests of {args.max_tokens} tokens per transport")
    print("| metric | p50 ms | p95 ms | mean ms |")
    print("|---|---:|---:|---:|")
    for name, values in lat.items():
        print(f"| {name} | {pct(values, 0.5):.2f} | {pct(values, 0.95):.2f} | {statistics.mean(values) * 1000:.2f} |")
    for what in ("ttft", "total"):
        delta = pct(lat[f"mqtt {what}"], 0.5) - pct(lat[f"socket {what}"], 0.5)
        print(f"| MQTT overhead, {what} p50 | {delta:+.2f} | | |")
    print(f"\nsustained, {args.inflight} in flight, 2-token completions, {args.seconds:g} s each:")
    print(f"| transport | requests/s |\n|---|---:|\n| socket | {socket_rps:.0f} |\n| mqtt | {mqtt_rps:.0f} |")


if __name__ == "__main__":
    main()
