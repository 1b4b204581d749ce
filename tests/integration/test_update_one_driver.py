"""One update driver: while a daemon runs, ``edgert update …`` asks it over the socket (issue 14).

Before, ``edgert update apply`` ran the updater in its own process: it committed a release the daemon
did not serve, and its garbage collection deleted the file the daemon still had mapped
(``/proc/PID/maps``: ``…@1.0.0.gguf (deleted)``) while ``/update/status`` named the new version.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.update_support import MODEL_ID, Fleet, device_env, device_update, edgert_cmd, make_variant


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def start_device(workdir: Path, fleet: Fleet, fallback_model: Path) -> DaemonProcess:
    # no timer round during the test: only what the test asks for installs anything
    update = device_update(fleet, check_interval_s=3600, check_jitter_s=0)
    env = {f"EDGERT_UPDATE__{key.upper()}": str(value) for key, value in update.items()}
    return start_daemon(workdir, fallback_model, env_extra=env)


def cli(workdir: Path, fleet: Fleet, socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``edgert update …`` configured like the daemon (same state dir, the daemon's socket)."""
    env = device_env(workdir / "state", fleet, check_interval_s=3600, check_jitter_s=0)
    env["EDGERT_SERVE__SOCKET"] = str(socket)
    return subprocess.run(
        edgert_cmd("update", *args), env=env, capture_output=True, text=True, timeout=180, check=False, cwd=workdir
    )


def update_status(daemon: DaemonProcess) -> dict[str, object]:
    with daemon.client() as client:
        response = client.get("/update/status")
        assert response.status_code == 200, response.text
        return dict(response.json())


def current_key(state: dict[str, object]) -> str | None:
    current = state.get("current")
    return f"{current['meta']['model_id']}@{current['meta']['version']}" if isinstance(current, dict) else None


def serves(daemon: DaemonProcess, version: str) -> bool:
    """``/v1/models`` names ``version``: in its id (a versioned file name), or as the model info's version."""
    with daemon.client() as client:
        model_id = str(client.get("/v1/models").json()["data"][0]["id"])
        text = client.get("/metrics").text
    info = [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "edgert_model_info"
    ]
    return version in model_id or any(labels.get("version") == version for labels in info)


def mapped_versions(pid: int) -> set[str]:
    """Model files the process maps now (llama.cpp mmaps the GGUF it serves)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split(None, 5)[-1] for line in maps.splitlines() if line.endswith(".gguf")}


def wait_until(condition: object, what: str, daemon: DaemonProcess, timeout: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached after {timeout}s\n{daemon.log()}"
        time.sleep(0.05)


def deleted_mappings(pid: int) -> list[str]:
    """Model files the process still maps although they were deleted (a release GC'd under it)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split(None, 5)[-1] for line in maps.splitlines() if ".gguf (deleted)" in line})


def test_cli_apply_while_a_daemon_runs_is_done_by_the_daemon(tmp_path: Path, fleet: Fleet, tiny_gguf: Path) -> None:
    workdir = tmp_path / "device"
    workdir.mkdir()
    fleet.release("1.0.0")
    daemon = start_device(workdir, fleet, tiny_gguf)
    try:
        wait_until(lambda: current_key(update_status(daemon)) == f"{MODEL_ID}@1.0.0", "1.0.0 committed", daemon)
        wait_until(lambda: serves(daemon, "1.0.0"), "1.0.0 served", daemon)

        for version in ("2.0.0", "3.0.0"):
            fleet.release(version, make_variant(tiny_gguf, tmp_path / f"v{version}.gguf", general_name=version))
            applied = cli(workdir, fleet, daemon.socket, "apply", "--json")
            assert applied.returncode == 0, applied.stderr
            assert json.loads(applied.stdout)["outcome"] == "committed", applied.stdout
            # the daemon committed it and serves it: /update/status and /v1/models agree at once
            assert current_key(update_status(daemon)) == f"{MODEL_ID}@{version}"
            assert serves(daemon, version), daemon.log()
            assert any(name.endswith(f"@{version}.gguf") for name in mapped_versions(daemon.proc.pid))
            assert deleted_mappings(daemon.proc.pid) == []
            assert "applying an update" not in applied.stderr  # no updater ran in the CLI's process

        status = cli(workdir, fleet, daemon.socket, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["current"]["meta"]["version"] == "3.0.0"
        text = cli(workdir, fleet, daemon.socket, "status")
        assert text.returncode == 0, text.stderr
        assert f"current:   {MODEL_ID}@3.0.0" in text.stdout.splitlines(), text.stdout
        assert f"previous:  {MODEL_ID}@2.0.0" in text.stdout.splitlines(), text.stdout
        check = cli(workdir, fleet, daemon.socket, "check", "--json")
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout)["offered"] is None
        assert json.loads(check.stdout)["current"] == f"{MODEL_ID}@3.0.0"

        rolled = cli(workdir, fleet, daemon.socket, "rollback", "--json")
        assert rolled.returncode == 0, rolled.stderr
        assert json.loads(rolled.stdout)["outcome"] == "rolled-back-manually"
        assert current_key(update_status(daemon)) == f"{MODEL_ID}@2.0.0"
        assert serves(daemon, "2.0.0"), daemon.log()
        assert deleted_mappings(daemon.proc.pid) == []
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_cli_refuses_when_the_state_dir_is_held_but_no_socket_answers(tmp_path: Path, fleet: Fleet) -> None:
    """A daemon on a socket this CLI was not told about: the CLI must not drive the update beside it."""
    workdir = tmp_path / "device"
    lock_path = workdir / "state" / "update" / "lock"
    lock_path.parent.mkdir(parents=True)
    fleet.release("1.0.0")
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (("apply",), ("check",), ("rollback",)):
            result = cli(workdir, fleet, workdir / "run" / "elsewhere.sock", *args)
            assert result.returncode == 5, (args, result.stdout, result.stderr)
            assert result.stderr.startswith("error: "), result.stderr
            assert "no daemon answers on" in result.stderr, result.stderr
    assert not (workdir / "state" / "models" / "versions").exists()
