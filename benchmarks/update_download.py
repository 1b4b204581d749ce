"""Verified update download vs curl on loopback, and bytes re-fetched after a kill mid-download.

Serves a random file (default 1 GiB) from nginx on 127.0.0.1 and compares:

* ``curl -o <file>`` (no verification) with
* ``edgert.update.download.fetch`` (signed-length cap, streaming SHA-256, fsync),

then kills a fetch subprocess with SIGKILL halfway, resumes it, and sums the body
bytes nginx sent for both attempts (its access log) to get the bytes fetched twice.

    .venv/bin/python benchmarks/update_download.py [--size-mib 1024] [--runs 3]

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

import httpx

# Run from the repository root: the nginx helper lives with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgert.update import download
from tests.integration.http_host import NginxHost

CHILD = """
import sys, httpx
from pathlib import Path
from edgert.update import download
url, part, length, sha = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with httpx.Client(timeout=60) as client:
    download.fetch(client, download.Fetch(url, part, length, {"sha256": sha}))
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


def time_fetch(url: str, part: Path, size: int, sha: str) -> float:
    part.unlink(missing_ok=True)
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        download.fetch(client, download.Fetch(url, part, size, {"sha256": sha}))
    elapsed = time.perf_counter() - started
    part.unlink()
    return elapsed


def body_bytes_sent(log: str, path: str) -> list[int]:
    """$body_bytes_sent (10th field of the combined log format) of every GET of ``path``."""
    return [int(line.split()[9]) for line in log.splitlines() if f"GET {path} " in line]


def refetched_after_kill(host: NginxHost, url: str, part: Path, size: int, sha: str) -> tuple[int, int]:
    part.unlink(missing_ok=True)
    before = len(body_bytes_sent(host.access_log(), "/blob"))
    child = [sys.executable, "-c", CHILD, url, str(part), str(size), sha]
    proc = subprocess.Popen(child)
    while not part.exists() or part.stat().st_size < size // 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    subprocess.run(child, check=True)
    part.unlink()
    time.sleep(0.2)  # nginx logs a request after its client is gone
    sent = body_bytes_sent(host.access_log(), "/blob")[before:]
    return kept, sum(sent) - size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgert-dl-bench-", dir=args.workdir))
    size = args.size_mib * 2**20
    www = work / "www"
    www.mkdir()
    sha = make_file(www / "blob", size)
    with NginxHost(www, work / "nginx") as host:
        url = host.url + "blob"
        curls, durables, ourses = [], [], []
        for _ in range(args.runs):  # interleaved, each after a sync: neither pays the other's writeback
            os.sync()
            exited, durable = time_curl(url, work / "curl.out")
            curls.append(exited)
            durables.append(durable)
            os.sync()
            ourses.append(time_fetch(url, work / "blob.part", size, sha))
        curl, durable, ours = (statistics.median(x) for x in (curls, durables, ourses))
        kept, refetched = refetched_after_kill(host, url, work / "blob.part", size, sha)
    (www / "blob").unlink()
    mib = size / 2**20
    print(f"size: {mib:.0f} MiB, median of {args.runs} interleaved runs")
    print(f"curl -o (unverified):          {curl:6.2f} s  {mib / curl:7.0f} MiB/s")
    print(f"edgert fetch (sha256 + fsync): {ours:6.2f} s  {mib / ours:7.0f} MiB/s")
    print(f"curl -o + fsync (durable):     {durable:6.2f} s  {mib / durable:7.0f} MiB/s")
    print(f"ratio edgert/curl throughput:  {curl / ours:.2f}x (vs curl + fsync: {durable / ours:.2f}x)")
    print(f"kill -9 at {kept / 2**20:.0f} MiB kept on disk; the resume asked for Range bytes={kept}-")
    print(f"bytes nginx sent twice (incl. what sat in socket buffers at the kill): {refetched}")


if __name__ == "__main__":
    main()
