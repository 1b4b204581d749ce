"""Firmware hooks: executables an integrator drops in ``update.hooks_dir``.

The contract (events, variables, exit codes, timeout) is ``firmware_hooks/README.md``.
In short: for event ``E`` every executable file named ``E`` or ``E.<anything>``
runs, in name order, with a clean environment (a fixed PATH plus the
``EDGERT_*`` variables below), its own process group and ``update.hook_timeout_s``.
A timeout kills the whole group and counts as a non-zero exit. stdout and stderr
go to the log, one record per line.

Only ``pre-download``, ``pre-install`` and ``health-check`` can stop an update;
the other events are notifications whose failures are logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from edgert.errors import HookVetoError

log = logging.getLogger(__name__)

#: Hooks do not inherit the daemon's environment (it may hold secrets): they get this PATH.
HOOK_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Output kept per hook run (the tail), so a chatty hook cannot fill memory or the journal.
MAX_OUTPUT_BYTES: Final = 64 * 1024


class HookEvent(StrEnum):
    PRE_DOWNLOAD = "pre-download"
    PRE_INSTALL = "pre-install"
    POST_INSTALL = "post-install"
    HEALTH_CHECK = "health-check"
    ON_COMMIT = "on-commit"
    ON_ROLLBACK = "on-rollback"


#: Events whose non-zero exit (or timeout) stops the update.
BLOCKING: Final = frozenset({HookEvent.PRE_DOWNLOAD, HookEvent.PRE_INSTALL, HookEvent.HEALTH_CHECK})


@dataclass(frozen=True, slots=True)
class HookResult:
    event: HookEvent
    path: Path
    returncode: int | None
    timed_out: bool
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class HookRunner:
    """Runs the hooks of one directory; a runner without a directory runs nothing."""

    def __init__(self, hooks_dir: Path | None, *, timeout_s: float) -> None:
        self.hooks_dir = hooks_dir
        self.timeout_s = timeout_s

    def hooks_for(self, event: HookEvent) -> list[Path]:
        if self.hooks_dir is None or not self.hooks_dir.is_dir():
            return []
        return sorted(
            path
            for path in self.hooks_dir.iterdir()
            if (path.name == event.value or path.name.startswith(event.value + "."))
            and path.is_file()
            and os.access(path, os.X_OK)
        )

    def run(self, event: HookEvent, env: Mapping[str, str]) -> list[HookResult]:
        """Run every hook of ``event``; raise HookVetoError on the first failure of a blocking event."""
        results = []
        for path in self.hooks_for(event):
            result = self._run_one(event, path, env)
            results.append(result)
            if not result.ok and event in BLOCKING:
                why = "timed out" if result.timed_out else f"exited {result.returncode}"
                tail = result.output.strip().splitlines()[-1:] or [""]
                raise HookVetoError(f"{event.value} hook {path.name} {why}: {tail[0]}".rstrip(": "))
        return results

    def _run_one(self, event: HookEvent, path: Path, env: Mapping[str, str]) -> HookResult:
        full_env = {"PATH": HOOK_PATH, **env, "EDGERT_HOOK_EVENT": event.value}
        log.info("running %s hook %s", event.value, path)
        # A new session = a new process group: a timeout kills the hook and everything it started.
        proc = subprocess.Popen(  # noqa: S603 - the hooks directory is the integrator's, by design
            [str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=path.parent,
            start_new_session=True,
        )
        timed_out = False
        try:
            raw, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                raw, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipe
                proc.kill()
                raw = b""
        output = raw[-MAX_OUTPUT_BYTES:].decode("utf-8", errors="replace")
        for line in output.splitlines():
            log.info("hook %s: %s", path.name, line)
        result = HookResult(event, path, proc.returncode, timed_out, output)
        if not result.ok:
            log.warning(
                "%s hook %s %s",
                event.value,
                path.name,
                f"timed out after {self.timeout_s:g} s" if timed_out else f"exited {proc.returncode}",
            )
        return result


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, signal.SIGKILL)
