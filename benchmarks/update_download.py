"""Verified download (updater and ``models pull``) vs curl on loopback, and bytes re-fetched after a kill.

Serves a random file (default 1 GiB) from nginx on 127.0.0.1 and compares, interleaved in one run:

* ``curl -o <file>`` (no verification), and the same followed by fsync (durable, as edgert is), with
* ``edgert.update.download.fetch`` over ``download.client()`` (length cap, streaming SHA-256 on a
  second thread, 1 MiB socket reads through httpcore's public network-backend API, fsync) — the one
  downloader of both the updater and ``edgert models pull``;
* ``--plain``: the same fetch over a plain ``httpx.Client`` (httpcore's 64 KiB reads), i.e. what
  dropping the large-read transport would cost;
* ``--baseline-src DIR``: the fetch of another source tree (e.g. ``git archive`` of an earlier commit
  unpacked in DIR), to compare before and after a change in the same run.

Every fetch runs in a fresh subprocess (the same for each variant) and is timed there, imports excluded.

then kills a fetch subprocess with SIGKILL halfway, resumes it, and sums the body
bytes nginx sent for both attempts (its access log) to get the bytes fetched twice.
Just before the kill it reads the connection's queues with ``ss``: the client
kernel's receive queue (accepted, not yet read by the process) and nginx's send
queue (written by nginx, not yet acknowledged), which split the bytes fetched twice
into the client's part and the server's. The kills are repeated for each
``--kill-rcvbuf`` value (``SO_RCVBUF`` of the client's socket; 0: the kernel's
autotuning), optionally with a client slower than the link (``--slow-ms`` of sleep
per buffer, as a slow disk or a busy CPU would make it).

    .venv/bin/python benchmarks/update_download.py [--size-mib 1024] [--runs 5] [--plain]
        [--baseline-src DIR] [--kills 3] [--kill-rcvbuf 0 --kill-rcvbuf 262144] [--slow-ms 0]

Needs nginx (``apt-get install -y nginx``) and curl. Uses a temporary directory
on the same filesystem as ``--workdir`` (default: a new one under /tmp).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run from the repository root: the nginx helper lives with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.http_host import NginxHost

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from pathlib import Path
from edgert.update import download
import time
url, part, length, sha = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rcvbuf, slow = int(sys.argv[5]), float(sys.argv[6]) / 1000
with download.client(60, receive_buffer_bytes=rcvbuf or None) as client:
    download.fetch(client, download.Fetch(url, part, length, {"sha256": sha}), progress=lambda *_: time.sleep(slow))
"""


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 24))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def time_curl(url: str, out: Path) -> tuple[float, float]:
    """Seconds until curl exits, and until its file is also durable (fsync, as edgert does)."""
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(out), url], check=True)
    exited = time.perf_counter() - started
    with out.open("rb") as fh:
        os.fsync(fh.fileno())
    durable = time.perf_counter() - started
    out.unlink()
    return exited, durable


TIMED = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import httpx
from edgert.update import download
url, part, size, sha, plain = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "plain"
started = time.perf_counter()
with httpx.Client(timeout=60) if plain else download.client(60) as client:
    download.fetch(client, download.Fetch(url, part, size, {"sha256": sha}))
elapsed = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(elapsed, usage.ru_utime + usage.ru_stime)
"""


def time_fetch(url: str, part: Path, size: int, sha: str, *, src: Path = REPO, plain: bool = False) -> float:
    """Seconds for one verified, fsynced fetch by the code in ``src``, timed in a fresh process."""
    part.unlink(missing_ok=True)
    args = [str(src), url, str(part), str(size), sha, "plain" if plain else "large"]
    out = subprocess.run([sys.executable, "-c", TIMED, *args], check=True, capture_output=True, text=True).stdout
    part.unlink()
    elapsed, cpu = out.split()
    CPU_SECONDS.setdefault((str(src), plain), []).append(float(cpu))  # the process's user + system time
    return float(elapsed)


#: CPU seconds (user + system, imports included) of each fetch process, by (source tree, plain).
CPU_SECONDS: dict[tuple[str, bool], list[float]] = {}


def body_bytes_sent(log: str, path: str) -> list[int]:
    """$body_bytes_sent (10th field of the combined log format) of every GET of ``path``."""
    return [int(line.split()[9]) for line in log.splitlines() if f"GET {path} " in line]


def socket_queues(port: int) -> tuple[int, int]:
    """(client receive queue, server send queue) in bytes of the one connection to ``port``, from ``ss``."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} or sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    recv_q = send_q = 0
    for line in out.splitlines():
        fields = line.split()  # Recv-Q Send-Q Local:Port Peer:Port
        if fields[2].endswith(f":{port}"):
            send_q += int(fields[1])  # nginx's side
        else:
            recv_q += int(fields[0])  # the client's side
    return recv_q, send_q


def refetched_after_kill(
    host: NginxHost, url: str, part: Path, size: int, sha: str, *, rcvbuf: int, slow_ms: float
) -> tuple[int, int, int, int]:
    """(bytes kept, bytes sent twice, client receive queue at the kill, nginx send queue at the kill)."""
    part.unlink(missing_ok=True)
    before = len(body_bytes_sent(host.access_log(), "/blob"))
    child = [sys.executable, "-c", CHILD, url, str(part), str(size), sha, str(rcvbuf), str(slow_ms)]
    proc = subprocess.Popen(child)
    while not part.exists() or part.stat().st_size < size // 2:
        time.sleep(0.005)
    recv_q, send_q = socket_queues(host.port)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    subprocess.run(child, check=True)
    part.unlink()
    time.sleep(0.2)  # nginx logs a request after its client is gone
    sent = body_bytes_sent(host.access_log(), "/blob")[before:]
    return kept, sum(sent) - size, recv_q, send_q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="also time the fetch over a plain httpx.Client")
    parser.add_argument("--baseline-src", type=Path, help="also time the fetch of the edgert tree in this folder")
    parser.add_argument("--kill-rcvbuf", type=int, action="append", help="SO_RCVBUF for the kills (0: autotuning)")
    parser.add_argument("--slow-ms", type=float, default=0, help="client sleep per buffer in the kills")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgert-dl-bench-", dir=args.workdir))
    size = args.size_mib * 2**20
    www = work / "www"
    www.mkdir()
    sha = make_file(www / "blob", size)
    with NginxHost(www, work / "nginx") as host:
        url = host.url + "blob"
        curls, durables, ourses, plains, baselines = [], [], [], [], []

        def curl_run() -> None:
            exited, durable = time_curl(url, work / "curl.out")
            curls.append(exited)
            durables.append(durable)

        variants = [curl_run, lambda: ourses.append(time_fetch(url, work / "blob.part", size, sha))]
        if args.plain:
            variants.append(lambda: plains.append(time_fetch(url, work / "blob.part", size, sha, plain=True)))
        if args.baseline_src:
            src = args.baseline_src.resolve()
            variants.append(lambda: baselines.append(time_fetch(url, work / "blob.part", size, sha, src=src)))
        for run in range(args.runs):
            # Interleaved, each after a sync (none pays another's writeback), the order rotated each run
            # so that none always follows the same neighbour.
            for variant in variants[run % len(variants) :] + variants[: run % len(variants)]:
                os.sync()
                variant()
        curl, durable, ours = (statistics.median(x) for x in (curls, durables, ourses))
        kills = {
            rcvbuf: [
                refetched_after_kill(host, url, work / "blob.part", size, sha, rcvbuf=rcvbuf, slow_ms=args.slow_ms)
                for _ in range(args.kills)
            ]
            for rcvbuf in args.kill_rcvbuf or [0, 256 << 10]
        }
    (www / "blob").unlink()
    mib = size / 2**20
    print(f"size: {mib:.0f} MiB, median of {args.runs} interleaved runs")
    print(f"curl -o (unverified):          {curl:6.2f} s  {mib / curl:7.0f} MiB/s")
    print(f"edgert fetch (sha256 + fsync): {ours:6.2f} s  {mib / ours:7.0f} MiB/s")
    print(f"curl -o + fsync (durable):     {durable:6.2f} s  {mib / durable:7.0f} MiB/s")
    print(f"ratio edgert/curl throughput:  {curl / ours:.2f}x (vs curl + fsync: {durable / ours:.2f}x)")
    for name, times in (("plain httpx.Client (64 KiB reads)", plains), (f"baseline {args.baseline_src}", baselines)):
        if times:
            other = statistics.median(times)
            print(
                f"{name}: {other:6.2f} s  {mib / other:7.0f} MiB/s  "
                f"ratio {curl / other:.2f}x (vs curl + fsync: {durable / other:.2f}x)"
            )
    # Ratios within each run (curl and the fetches ran back to back) cancel load that drifts between runs.
    for name, times in (("edgert", ourses), ("plain", plains), ("baseline", baselines)):
        if times:
            paired = sorted(d / t for d, t in zip(durables, times, strict=True))
            print(
                f"per-run {name}/(curl + fsync): median {statistics.median(paired):.2f}x, "
                f"range {paired[0]:.2f}-{paired[-1]:.2f}x; seconds {' '.join(f'{t:.2f}' for t in times)}"
            )
    print(f"curl + fsync seconds: {' '.join(f'{t:.2f}' for t in durables)}")
    for (src, plain), cpu in CPU_SECONDS.items():
        name = "plain" if plain else ("edgert" if src == str(REPO) else "baseline")
        print(f"CPU seconds (user + system) of {name}: median {statistics.median(cpu):.2f}")
    for rcvbuf, results in kills.items():
        client = f"SO_RCVBUF {rcvbuf >> 10} KiB" if rcvbuf else "receive buffer autotuned"
        slow = f", client sleeps {args.slow_ms} ms per buffer" if args.slow_ms else ""
        print(f"kill -9 halfway, {client}{slow}, {args.kills} kills:")
        for kept, refetched, recv_q, send_q in results:
            print(
                f"  kept {kept / 2**20:6.1f} MiB; sent twice {refetched / 2**20:5.2f} MiB = "
                f"client recv queue {recv_q / 2**20:5.2f} + nginx send queue {send_q / 2**20:5.2f} "
                f"+ rest {(refetched - recv_q - send_q) / 2**20:5.2f} MiB"
            )
        if results:
            print(f"  median sent twice: {statistics.median(r[1] for r in results) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
