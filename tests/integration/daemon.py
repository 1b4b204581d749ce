"""Run ``edgert serve`` as a real subprocess on a real Unix socket, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgert.api.client import answers, unix_client


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    socket: Path
    log_path: Path
    model: Path

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return unix_client(self.socket, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def daemon_env(state_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_") and k != "NOTIFY_SOCKET"}
    env["EDGERT_STATE_DIR"] = str(state_dir)
    env.update({f"EDGERT_{key.upper()}": value for key, value in settings.items()})
    return env


def start_daemon(
    workdir: Path,
    model: Path | str | None,
    *,
    extra_args: tuple[str, ...] = (),
    wait_ready: bool = True,
    env_extra: dict[str, str] | None = None,
    **settings: str,
) -> DaemonProcess:
    socket = workdir / "run" / "edgert.sock"
    log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
    defaults = {"engine__n_threads": "1", "engine__n_ctx": "2048", "engine__n_parallel": "4"}
    defaults.update(settings)
    env = daemon_env(workdir / "state", **defaults)
    env.update(env_extra or {})
    # model None: no --model, the daemon picks its own (the committed release, else settings.model)
    chosen = ["--model", str(model)] if model is not None else []
    cmd = [sys.executable, "-m", "edgert", "serve", "--socket", str(socket), *chosen, *extra_args]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir, text=True)
    daemon = DaemonProcess(proc, socket, log_path, Path(model or ""))
    if wait_ready:
        wait_until_ready(daemon)
    return daemon


def wait_until_ready(daemon: DaemonProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        if answers(daemon.socket):
            try:
                with daemon.client(timeout=2) as client:
                    if client.get("/ready").status_code == 200:
                        return
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    daemon.stop(signal.SIGKILL)
    raise AssertionError(f"daemon not ready after {timeout}s:\n{daemon.log()}")
