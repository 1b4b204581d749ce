"""Downloads with a deadline, cancellable between reads, and a SIGTERM'd daemon that stops mid-download.

Issue 13, finding 8: a registry trickling 1 KiB every 0.5 s held the update lock for good, and a
downloading daemon was still alive 50 s after SIGTERM. Real nginx (``limit_rate``) throttles the
registry; the daemon runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgert.errors import DownloadCancelledError, DownloadError, DownloadTooSlowError
from edgert.update import download
from edgert.update.state import Phase, StateStore
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.http_host import NginxHost
from tests.integration.update_support import MODEL_ID, Fleet, device_update, write_hook

DRAIN_TIMEOUT_S = 3.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log()}"
        time.sleep(0.02)


def part_bytes(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


@pytest.fixture
def blob_site(tmp_path: Path) -> tuple[Path, bytes]:
    """A site with one 2 MB file under /targets/ (the throttled location)."""
    blob = os.urandom(2_000_000)
    site = tmp_path / "site"
    (site / "targets").mkdir(parents=True)
    (site / "targets" / "blob.bin").write_bytes(blob)
    return site, blob


def blob_job(host: NginxHost, tmp_path: Path, blob: bytes) -> download.Fetch:
    (tmp_path / "dl").mkdir(exist_ok=True)
    return download.Fetch(
        url=f"{host.url}targets/blob.bin",
        part=tmp_path / "dl" / "blob.bin.part",
        length=len(blob),
        hashes={"sha256": hashlib.sha256(blob).hexdigest()},
    )


def test_a_trickling_registry_is_cut_off_as_too_slow_and_the_part_resumes(
    tmp_path: Path, blob_site: tuple[Path, bytes]
) -> None:
    site, blob = blob_site
    # 2 KiB/s: each read returns long before the per-read timeout, so only an overall deadline ends it.
    with NginxHost(site, tmp_path / "slow", rate=2048) as host, download.client(30) as http:
        job = blob_job(host, tmp_path, blob)
        pace = download.Pace(min_bytes_per_s=1_000_000, slack_s=1.0)  # deadline: 1 s + 2 MB / 1 MB/s = 3 s
        with pytest.raises(DownloadError, match="too slow") as caught:
            download.fetch(http, job, pace=pace)
    assert isinstance(caught.value, DownloadTooSlowError)
    assert "update.download_min_bytes_per_s" in caught.value.message
    kept = part_bytes(job.part)
    assert 0 < kept < len(blob)
    with NginxHost(site, tmp_path / "fast") as host, download.client(30) as http:
        fetched = download.fetch(http, blob_job(host, tmp_path, blob), pace=pace)
    assert fetched.resumed_from == kept
    assert job.part.read_bytes() == blob


def test_a_registry_that_goes_silent_is_cut_off_at_the_deadline_not_the_read_timeout(tmp_path: Path) -> None:
    """Headers and a few bytes, then nothing: the deadline (3 s) ends it, not the 60 s per-read timeout."""
    blob = os.urandom(2_000_000)
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(blob) + blob[:1000])
            done.wait(60)  # silent, connection open

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    job = download.Fetch(
        url=f"http://127.0.0.1:{listener.getsockname()[1]}/blob.bin",
        part=tmp_path / "blob.bin.part",
        length=len(blob),
        hashes={"sha256": hashlib.sha256(blob).hexdigest()},
    )
    try:
        with download.client(60) as http, pytest.raises(DownloadTooSlowError, match="too slow"):
            download.fetch(http, job, pace=download.Pace(min_bytes_per_s=1_000_000, slack_s=1.0))
    finally:
        done.set()
        listener.close()
    assert part_bytes(job.part) == 1000


def test_a_download_stops_between_reads_when_asked_and_keeps_its_part(
    tmp_path: Path, blob_site: tuple[Path, bytes]
) -> None:
    site, blob = blob_site
    stop = threading.Event()
    failures: list[BaseException] = []
    with NginxHost(site, tmp_path / "slow", rate=20_000) as host, download.client(30) as http:
        job = blob_job(host, tmp_path, blob)

        def run() -> None:
            try:
                download.fetch(http, job, stop=stop)
            except BaseException as exc:  # the test inspects it
                failures.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        wait_until(lambda: part_bytes(job.part) > 0, "the first bytes")
        stop.set()
        worker.join(30)  # the whole file would take 100 s at this rate
        assert not worker.is_alive(), "the download did not stop"
    (failure,) = failures
    assert isinstance(failure, DownloadCancelledError), failure
    assert "the next attempt resumes" in failure.message
    assert 0 < part_bytes(job.part) < len(blob)


# --------------------------------------------------------------------------- the daemon


@pytest.fixture
def slow_fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    """A registry whose model file takes ~80 s to download (1.6 MB at 20 kB/s)."""
    with Fleet(tmp_path, tiny_gguf, rate=20_000) as running:
        running.release("1.0.0")
        yield running


def start_device(tmp_path: Path, fleet: Fleet, model: Path, **update: object) -> DaemonProcess:
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet, **update).items()}
    return start_daemon(tmp_path / "device", model, serve__drain_timeout_s=str(DRAIN_TIMEOUT_S), **settings)


def test_sigterm_stops_a_downloading_daemon_within_the_drain_timeout_and_the_next_start_resumes(
    tmp_path: Path, slow_fleet: Fleet, tiny_gguf: Path
) -> None:
    (tmp_path / "device").mkdir()
    versions = tmp_path / "device" / "state" / "models" / "versions"

    def part() -> Path | None:
        found = sorted(versions.glob("*.gguf.part")) if versions.is_dir() else []
        return found[0] if found else None

    daemon = start_device(tmp_path, slow_fleet, tiny_gguf)
    try:
        wait_until(lambda: (p := part()) is not None and part_bytes(p) >= 40_000, "a partial download")
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            returncode = daemon.proc.wait(DRAIN_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon was still alive {DRAIN_TIMEOUT_S + 10:g} s after SIGTERM:\n{daemon.log()}")
    finally:
        daemon.stop(signal.SIGKILL)
    assert returncode == 0, daemon.log()
    kept = part()
    assert kept is not None, "the .part was not kept"
    kept_bytes = part_bytes(kept)
    assert kept_bytes >= 40_000
    state = StateStore(tmp_path / "device" / "state" / "update").load()
    assert state.phase is Phase.DOWNLOADING

    slow_fleet.host.stop()
    slow_fleet.host.rate = None
    slow_fleet.host.start()
    daemon = start_device(tmp_path, slow_fleet, tiny_gguf)
    try:
        store = StateStore(tmp_path / "device" / "state" / "update")

        def committed() -> bool:
            current = store.load().current
            return current is not None and current.key == f"{MODEL_ID}@1.0.0"

        wait_until(committed, "the resumed release to be committed", log=daemon.log)
    finally:
        assert daemon.stop() == 0, daemon.log()
    ranged = [line for line in slow_fleet.host.access_log().splitlines() if "model.gguf" in line and '" 206 ' in line]
    assert ranged, slow_fleet.host.access_log()


def test_sigterm_stops_the_daemon_whatever_its_update_round_is_doing(tmp_path: Path, tiny_gguf: Path) -> None:
    """The round's thread never keeps the process alive: here it waits on a slow pre-download hook."""
    (tmp_path / "device").mkdir()
    hooks, hook_pid = tmp_path / "hooks", tmp_path / "hook.pid"
    write_hook(hooks, "pre-download", f"echo $$ > {hook_pid}.tmp; mv {hook_pid}.tmp {hook_pid}; sleep 60")
    with Fleet(tmp_path, tiny_gguf) as fleet:
        fleet.release("1.0.0")
        daemon = start_device(tmp_path, fleet, tiny_gguf, hooks_dir=str(hooks), hook_timeout_s=120)
        try:
            wait_until(hook_pid.exists, "the pre-download hook to run")
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                returncode = daemon.proc.wait(DRAIN_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the daemon was still alive {DRAIN_TIMEOUT_S + 10:g} s after SIGTERM:\n{daemon.log()}")
        finally:
            daemon.stop(signal.SIGKILL)
            if hook_pid.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(hook_pid.read_text()), signal.SIGKILL)
    assert returncode == 0, daemon.log()
