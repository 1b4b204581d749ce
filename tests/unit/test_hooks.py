"""The firmware hook runner: bounded output, waits on the process, converts OS errors, refuses unsafe hooks.

Issue 13, findings 12 and 5 (hooks half). Real hooks (``/bin/sh`` scripts) run as real processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgert.errors import HookVetoError
from edgert.update.hooks import MAX_OUTPUT_BYTES, HookEvent, HookRunner


def write_hook(hooks_dir: Path, name: str, body: str, *, shebang: bool = True, mode: int = 0o755) -> Path:
    hooks_dir.mkdir(mode=0o755, exist_ok=True)
    path = hooks_dir / name
    path.write_text(("#!/bin/sh\n" if shebang else "") + body + "\n")
    path.chmod(mode)
    return path


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_a_hook_that_exits_0_but_leaves_a_child_holding_stdout_succeeds(tmp_path: Path) -> None:
    """Finding 12: the runner waits on the hook process, not on EOF of its pipe."""
    hooks = tmp_path / "hooks"
    child_pid = tmp_path / "child.pid"
    # The background sleep inherits stdout and keeps the pipe open after the hook has exited 0.
    write_hook(hooks, "pre-install", f"sleep 60 & echo $! > {child_pid}\necho started a helper\nexit 0")
    runner = HookRunner(hooks, timeout_s=5)
    try:
        (result,) = runner.run(HookEvent.PRE_INSTALL, {})
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(child_pid.read_text()), signal.SIGKILL)
    assert result.ok, result
    assert not result.timed_out
    assert result.returncode == 0
    assert "started a helper" in result.output


# Peak RSS from VmHWM (this interpreter's own address space), not ru_maxrss: Linux carries ru_maxrss over
# exec from the forking process, so under a pytest that has loaded models it reports pytest's size.
_MEMORY_PROBE = """
import re, sys
from pathlib import Path
from edgert.update.hooks import HookEvent, HookRunner
(result,) = HookRunner(Path(sys.argv[1]), timeout_s=120).run(HookEvent.ON_COMMIT, {})
print(result.returncode, len(result.output.encode()), repr(result.output[-14:]))
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024)
"""


def test_a_chatty_hook_cannot_fill_the_daemons_memory(tmp_path: Path) -> None:
    """Finding 12: 200 MB of hook output is kept as a bounded tail, not buffered whole."""
    hooks = tmp_path / "hooks"
    write_hook(hooks, "on-commit", "head -c 200000000 /dev/zero | tr '\\0' x\necho\necho the last line")
    # A fresh interpreter, so its peak RSS is this run's alone.
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(hooks)], capture_output=True, text=True, timeout=120, check=True
    )
    summary, peak_mib = proc.stdout.splitlines()
    returncode, kept, tail = summary.split(" ", 2)
    assert returncode == "0"
    assert int(kept) <= MAX_OUTPUT_BYTES
    assert tail == repr("the last line\n")
    assert int(peak_mib) < 150, f"peak RSS {peak_mib} MiB for 200 MB of hook output"


def test_a_hook_without_a_shebang_is_an_edgert_error_naming_the_hook(tmp_path: Path) -> None:
    """Finding 12 (and 2): ENOEXEC from exec is converted at the hook boundary, not raised as OSError."""
    hooks = tmp_path / "hooks"
    write_hook(hooks, "pre-install.10-no-shebang", "echo hi", shebang=False)
    runner = HookRunner(hooks, timeout_s=5)
    with pytest.raises(HookVetoError) as caught:
        runner.run(HookEvent.PRE_INSTALL, {})
    assert "pre-install.10-no-shebang" in caught.value.message
    assert "Exec format error" in caught.value.message
    # A notification event logs the failure and goes on.
    write_hook(hooks, "on-commit", "echo hi", shebang=False)
    (result,) = runner.run(HookEvent.ON_COMMIT, {})
    assert not result.ok
    assert "Exec format error" in result.output


def _group_writable_dir(hooks: Path) -> str:
    hooks.chmod(0o775)
    return "writable by its group"


def _world_writable_dir(hooks: Path) -> str:
    hooks.chmod(0o777)
    return "writable by others"


def _foreign_dir(hooks: Path) -> str:
    os.chown(hooks, 65534, 65534)
    return "owned by uid 65534"


def _group_writable_hook(hooks: Path) -> str:
    (hooks / "pre-install").chmod(0o775)
    return "writable by its group"


def _world_writable_hook(hooks: Path) -> str:
    (hooks / "pre-install").chmod(0o757)
    return "writable by others"


def _foreign_hook(hooks: Path) -> str:
    os.chown(hooks / "pre-install", 65534, 65534)
    return "owned by uid 65534"


@pytest.mark.parametrize(
    "spoil",
    [_group_writable_dir, _world_writable_dir, _foreign_dir, _group_writable_hook, _world_writable_hook, _foreign_hook],
)
def test_hooks_others_could_have_planted_are_refused(tmp_path: Path, spoil: object) -> None:
    """Finding 5: the hooks directory and each hook must be owned by root or edgert's user, not writable by others."""
    if os.geteuid() != 0 and spoil in (_foreign_dir, _foreign_hook):
        pytest.skip("chown to another user needs root")
    hooks = tmp_path / "hooks"
    ran = tmp_path / "ran"
    write_hook(hooks, "pre-install", f"touch {ran}")
    write_hook(hooks, "on-commit", f"touch {ran}")
    assert callable(spoil)
    problem = spoil(hooks)
    target = hooks if "dir" in spoil.__name__ else hooks / "pre-install"
    runner = HookRunner(hooks, timeout_s=5)
    with pytest.raises(HookVetoError) as caught:
        runner.run(HookEvent.PRE_INSTALL, {})
    assert str(target) in caught.value.message
    assert problem in caught.value.message
    if "dir" in spoil.__name__:  # a notification event runs nothing from an unsafe directory, and does not raise
        assert runner.run(HookEvent.ON_COMMIT, {}) == []
    assert not ran.exists()


def test_safe_hooks_still_run(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    ran = tmp_path / "ran"
    write_hook(hooks, "pre-install", f"touch {ran}", mode=0o700)
    (result,) = HookRunner(hooks, timeout_s=5).run(HookEvent.PRE_INSTALL, {})
    assert result.ok
    assert ran.exists()


def test_a_timed_out_hook_is_killed_with_its_group(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    pid_file = tmp_path / "child.pid"
    write_hook(hooks, "health-check", f"sleep 60 & echo $! > {pid_file}\nwait")
    runner = HookRunner(hooks, timeout_s=0.5)
    with pytest.raises(HookVetoError, match="timed out"):
        runner.run(HookEvent.HEALTH_CHECK, {})
    wait_for(pid_file)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the hook's child survived the timeout"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its re-parent) is dead for our purpose.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False
