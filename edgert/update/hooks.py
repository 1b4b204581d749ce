"""Firmware hooks: executables an integrator drops in ``update.hooks_dir``.

The contract (events, variables, exit codes, timeout) is ``firmware_hooks/README.md``.
In short: for event ``E`` every executable file named ``E`` or ``E.<anything>``
runs, in name order, with a clean environment (a fixed PATH plus the
``EDGERT_*`` variables below), its own process group and ``update.hook_timeout_s``.
A timeout kills the whole group and counts as a non-zero exit. stdout and stderr
go to the log, one record per line (the last ``MAX_OUTPUT_BYTES`` of a run).

Hooks run with edgert's privileges (root on many devices), so, like sudo and systemd,
the runner refuses a hooks directory or hook that someone else could have planted:
each must be owned by root or by the user running edgert and not writable by its
group or others (:class:`~edgert.errors.HookUnsafeError`).

Only ``pre-download``, ``pre-install`` and ``health-check`` can stop an update;
the other events are notifications whose failures are logged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import stat
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Final

from edgert.errors import HookUnsafeError, HookVetoError

log = logging.getLogger(__name__)

#: Hooks do not inherit the daemon's environment (it may hold secrets): they get this PATH.
HOOK_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Output kept per hook run (the tail), so a chatty hook cannot fill memory or the journal
#: (before this ring, 300 MB of hook output took the daemon to 603 MB RSS).
MAX_OUTPUT_BYTES: Final = 64 * 1024
#: After a hook exits, how long its output may still arrive: a background child it started
#: can hold the pipe open for ever, and the hook's result must not wait for it.
OUTPUT_GRACE_S: Final = 1.0
_READ_BYTES: Final = 64 * 1024
#: Reads taken after the grace period: a pipe holds 64 KiB (Linux default), so 4 MiB is all of it.
_DRAIN_READS: Final = 64


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
    #: Why the hook could not be started at all (e.g. "Exec format error"), else None.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None

    @property
    def failure(self) -> str:
        """What went wrong, as a phrase after the hook's name."""
        if self.error is not None:
            return f"cannot be run ({self.error})"
        return "timed out" if self.timed_out else f"exited {self.returncode}"


class HookRunner:
    """Runs the hooks of one directory; a runner without a directory runs nothing."""

    def __init__(self, hooks_dir: Path | None, *, timeout_s: float) -> None:
        self.hooks_dir = hooks_dir
        self.timeout_s = timeout_s

    def hooks_for(self, event: HookEvent) -> list[Path]:
        """The hooks of ``event`` in run order; HookUnsafeError when the directory itself is unsafe."""
        if self.hooks_dir is None or not self.hooks_dir.is_dir():
            return []
        check_trusted(self.hooks_dir, "hooks directory")
        return sorted(
            path
            for path in self.hooks_dir.iterdir()
            if (path.name == event.value or path.name.startswith(event.value + "."))
            and path.is_file()
            and os.access(path, os.X_OK)
        )

    def run(self, event: HookEvent, env: Mapping[str, str]) -> list[HookResult]:
        """Run every hook of ``event``; raise HookVetoError on the first failure of a blocking event.

        An unsafe hook (or directory) stops a blocking event before anything runs; a notification
        event logs it and runs only the safe ones.
        """
        try:
            hooks = self._trusted(self.hooks_for(event), blocking=event in BLOCKING)
        except HookUnsafeError as exc:
            if event in BLOCKING:
                raise
            log.error("%s hooks not run: %s", event.value, exc.message)  # noqa: TRY400 - one clear line
            return []
        results = []
        for path in hooks:
            result = self._run_one(event, path, env)
            results.append(result)
            if not result.ok and event in BLOCKING:
                tail = result.output.strip().splitlines()[-1:] or [""]
                raise HookVetoError(f"{event.value} hook {path.name} {result.failure}: {tail[0]}".rstrip(": "))
        return results

    @staticmethod
    def _trusted(hooks: list[Path], *, blocking: bool) -> list[Path]:
        safe = []
        for path in hooks:
            try:
                check_trusted(path, "hook")
            except HookUnsafeError as exc:
                if blocking:
                    raise
                log.error("%s", exc.message)  # noqa: TRY400 - one clear line; the other hooks still run
                continue
            safe.append(path)
        return safe

    def _run_one(self, event: HookEvent, path: Path, env: Mapping[str, str]) -> HookResult:
        full_env = {"PATH": HOOK_PATH, **env, "EDGERT_HOOK_EVENT": event.value}
        log.info("running %s hook %s", event.value, path)
        try:
            # A new session = a new process group: a timeout kills the hook and everything it started.
            proc = subprocess.Popen(  # noqa: S603 - the hooks directory is the integrator's, checked above
                [str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=path.parent,
                start_new_session=True,
            )
        except OSError as exc:  # ENOEXEC (no shebang), EACCES, a file gone since the listing
            result = HookResult(event, path, None, False, str(exc), error=exc.strerror or str(exc))
            log.warning("%s hook %s %s", event.value, path, result.failure)
            return result
        assert proc.stdout is not None  # stdout=PIPE
        tail = _OutputTail(proc.stdout, MAX_OUTPUT_BYTES)
        timed_out = False
        try:
            # The process, not its pipe: a background child may hold stdout long after the hook exited.
            proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()  # the hook itself was in the group: SIGKILL ends it
        output = tail.finish(OUTPUT_GRACE_S).decode("utf-8", errors="replace")
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


def check_trusted(path: Path, what: str) -> None:
    """Refuse ``path`` unless root or this process's user owns it and neither its group nor others may write it.

    ``stat`` follows a symlink: what runs is the link's target (the link itself lives in the
    checked directory).
    """
    info = path.stat()
    problems = []
    if info.st_uid not in (0, os.geteuid()):
        problems.append(f"owned by uid {info.st_uid} (not root, nor uid {os.geteuid()} that runs edgert)")
    if info.st_mode & stat.S_IWGRP:
        problems.append("writable by its group")
    if info.st_mode & stat.S_IWOTH:
        problems.append("writable by others")
    if problems:
        raise HookUnsafeError(
            f"refusing {what} {path}: {' and '.join(problems)} (mode {stat.filemode(info.st_mode)}); "
            "it must be owned by root or edgert's user and not writable by others (chown, chmod go-w)"
        )


class _OutputTail:
    """Reads a hook's merged stdout and stderr on a thread, keeping only the last ``limit`` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int) -> None:
        self._pipe = pipe
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        # finish() writes here to wake the reader when the hook is done but its pipe never closes.
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="edgert-hook-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._pipe.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_r in ready:
                    self._drain(fd)
                    return
                data = os.read(fd, _READ_BYTES)
                if not data:  # every writer closed it
                    return
                self._keep(data)

    def _drain(self, fd: int) -> None:
        """Take what the pipe already holds (the hook's last lines, on a loaded machine), not waiting for more."""
        os.set_blocking(fd, False)
        for _ in range(_DRAIN_READS):  # bounded: a background child may keep writing for ever
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                return
            if not data:
                return
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        # Drop whole old chunks while the rest still holds ``limit`` bytes.
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.popleft())

    def finish(self, grace_s: float) -> bytes:
        """The kept tail, after EOF or ``grace_s``, whichever comes first."""
        self._thread.join(grace_s)
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._pipe.close()
        return b"".join(self._chunks)[-self._limit :]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, signal.SIGKILL)
