"""Which config file is in force: a planted ./edgert.toml must not steer an installed device or root.

Issue 13, finding 5: ``sudo edgert update apply`` from a directory holding a hostile ``edgert.toml``
ran that file's hooks as root, because the working-directory file won over /etc/edgert/edgert.toml.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert import settings as settings_module
from edgert.settings import config_file_path, load_settings

HOSTILE = 'log_level = "debug"\n[update]\nhooks_dir = "/tmp/evil-hooks"\n'
NOBODY = 65534


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with a planted edgert.toml, no EDGERT_* variables, and a system config path we control."""
    for name in list(os.environ):
        if name.startswith("EDGERT_"):
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    (work / "edgert.toml").write_text(HOSTILE, encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.setattr(settings_module, "SYSTEM_CONFIG", tmp_path / "etc" / "edgert.toml")
    yield work


def install_system_config(tmp_path: Path) -> Path:
    system = tmp_path / "etc" / "edgert.toml"
    system.parent.mkdir()
    system.write_text('log_level = "warning"\n', encoding="utf-8")
    return system


def test_installed_system_config_wins_over_a_planted_local_file(
    workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    system = install_system_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgert.settings"):
        settings = load_settings()
    assert config_file_path() == system
    assert settings.log_level == "warning"
    assert settings.update.hooks_dir != Path("/tmp/evil-hooks")
    assert any(
        "ignoring ./edgert.toml" in record.getMessage() and "is installed" in record.getMessage()
        for record in caplog.records
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal under test is root's")
def test_root_never_reads_a_working_directory_config(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgert.settings"):
        settings = load_settings()
    assert config_file_path() is None
    assert settings.log_level == "info"  # the default, not the planted file's
    assert settings.update.hooks_dir != Path("/tmp/evil-hooks")
    assert any("running as root" in record.getMessage() for record in caplog.records)


def test_an_explicit_config_is_read_and_no_warning_given(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EDGERT_CONFIG", str(workdir / "edgert.toml"))
    with caplog.at_level(logging.WARNING, logger="edgert.settings"):
        settings = load_settings()
    assert settings.log_level == "debug"
    assert caplog.records == []
    monkeypatch.delenv("EDGERT_CONFIG")
    assert load_settings(config_path=Path("edgert.toml")).log_level == "debug"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_local_file_rules_for_a_non_root_caller(workdir: Path) -> None:
    local_config_refusal = settings_module.local_config_refusal
    local = workdir / "edgert.toml"
    os.chown(local, NOBODY, NOBODY)
    local.chmod(0o644)
    assert local_config_refusal(local, euid=NOBODY) is None
    assert "owned by uid 65534" in (local_config_refusal(local, euid=NOBODY + 1) or "")
    local.chmod(0o664)
    assert "writable by group or others (mode -rw-rw-r--)" in (local_config_refusal(local, euid=NOBODY) or "")
    local.chmod(0o646)
    assert "writable by group or others" in (local_config_refusal(local, euid=NOBODY) or "")


def _as_nobody(script: str, *, cwd: Path) -> list[str]:
    """The command running ``script`` as user nobody: for real (setpriv) when nobody can import edgert from this
    checkout; else (a checkout under a 0700 directory, e.g. a ``mktemp -d`` clone) as root with the effective uid
    that edgert's settings ask for reporting nobody."""
    real = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c"]
    probe = subprocess.run([*real, "import edgert.settings"], cwd=cwd, capture_output=True, check=False, timeout=60)
    if probe.returncode == 0:
        return [*real, script]
    return [sys.executable, "-c", f"import os; os.geteuid = lambda: {NOBODY}; {script}"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs a real non-root process")
@pytest.mark.parametrize(("mode", "read"), [(0o644, True), (0o664, False)])
def test_a_development_run_reads_its_own_safe_file_only(mode: int, read: bool) -> None:
    """A real process as user nobody in its own directory: the file is used only when nobody else can write it."""
    # Not tmp_path: /tmp/pytest-of-root is 0700, which nobody cannot enter.
    with tempfile.TemporaryDirectory(prefix="edgert-devrun-") as name:
        work = Path(name)
        work.chmod(0o755)
        os.chown(work, NOBODY, NOBODY)
        local = work / "edgert.toml"
        local.write_text('log_level = "debug"\n', encoding="utf-8")
        os.chown(local, NOBODY, NOBODY)
        local.chmod(mode)
        env = {key: value for key, value in os.environ.items() if not key.startswith("EDGERT_")}
        env["HOME"] = name
        script = (
            "import edgert.settings as s; from pathlib import Path; "
            f"s.SYSTEM_CONFIG = Path({str(work / 'no-system.toml')!r}); print(s.load_settings().log_level)"
        )
        result = subprocess.run(
            _as_nobody(script, cwd=work),
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("debug" if read else "info")
    if not read:
        assert "ignoring ./edgert.toml: it is writable by group or others" in result.stderr
