#!/usr/bin/env python3
"""Build ``dist/edgert_<version>_<arch>.deb``: a self-contained venv under ``/opt/edgert``.

    make deb                                   # = .venv/bin/python packaging/build_deb.py
    EDGERT_DEB_VERSION=0.1.0-2 make deb        # package version (default: <edgert.__version__>-1)
    CMAKE_ARGS=-DGGML_CUDA=on make deb         # CUDA build of llama-cpp-python (on a CUDA build host)

How (see packaging/README.md for the why):

1. wheels: the project wheel (``pip wheel . --no-deps``) in a scratch directory, and every
   dependency (+ the ``embedded`` model extra) in a persistent wheelhouse
   (``~/.cache/edgert/deb-wheelhouse``), pinned to the versions in the build venv (``pip freeze``:
   what ``make test`` ran against). Later builds resolve offline from the wheelhouse.
2. venv: ``/usr/bin/python3.11 -m venv --without-pip <stage>/opt/edgert``, then the build venv's
   pip installs into it (``pip --python``) with ``--no-compile``. A venv is not relocatable, so
   every text file that names ``<stage>`` (script shebangs, ``activate*``, ``pyvenv.cfg``) is
   rewritten to ``/opt/edgert``, and the build fails if the staging path is left anywhere.
3. bytecode: ``compileall --invalidation-mode checked-hash`` with ``-s <stage> -p /`` so the
   ``.pyc`` files name ``/opt/edgert/...`` and do not depend on mtimes (reproducible; the tree is
   read-only under ``ProtectSystem=strict``, so nothing is compiled at run time).
4. the rest: unit, sysusers.d, tmpfiles.d, conffile ``/etc/edgert/edgert.toml``, ``/usr/bin/edgert``,
   maintainer scripts; modes normalised (0755/0644), every mtime = ``SOURCE_DATE_EPOCH`` (default:
   the last commit's time), owner root:root, ``dpkg-deb -Zzstd -z3``.

The venv links to the build machine's ``/usr/bin/python3.X``, so the .deb targets the build
machine's Debian/Ubuntu release and architecture (what device-image builders do: build on or for
the image's release). ``Depends`` names that ``python3.X`` and the shared libraries of the bundled
native code (``dpkg-shlibdeps``).
"""

# ruff: noqa: S603 - a build script: it runs pip, dpkg-deb and friends by design

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = Path("/opt/edgert")
#: every path the package may own lies below one of these
ALLOWED_ROOTS = ("/opt/edgert", "/usr/bin", "/etc/edgert", "/lib/systemd", "/usr/lib/sysusers.d", "/usr/lib/tmpfiles.d")
MAINTAINER = "edgert maintainers <edgert@localhost>"
DESCRIPTION = """\
Edge LLM inference runtime (daemon, CLI, embedded model)
 edgert serves quantized Gemma GGUF models over an OpenAI-compatible HTTP API on
 a Unix socket (/run/edgert/edgert.sock, group edgert-clients) with continuous
 batching on llama.cpp, and keeps models current from a signed registry.
 .
 This package is a self-contained Python virtual environment in /opt/edgert
 (with the embedded Gemma 3 270M default model), the `edgert` command, a
 hardened systemd unit and /etc/edgert/edgert.toml."""


def log(message: str) -> None:
    print(f"build_deb: {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, stdout: int | None = None
) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(str(part) for part in cmd))
    return subprocess.run([str(part) for part in cmd], check=True, text=True, env=env, stdout=stdout)


def output(cmd: Sequence[str | Path], *, cwd: Path | None = None, stderr: int | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in cmd], check=True, text=True, stdout=subprocess.PIPE, cwd=cwd, stderr=stderr
    )
    return result.stdout


def project_version() -> str:
    text = (ROOT / "edgert" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("build_deb: no __version__ in edgert/__init__.py")
    return match.group(1)


def source_date_epoch() -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    try:
        return int(output(["git", "-C", ROOT, "log", "-1", "--format=%ct"]).strip())
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return 0


# ------------------------------------------------------------------ wheels
def pip(*args: str | Path, python: Path | None = None, env: dict[str, str] | None = None) -> None:
    base: list[str | Path] = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if python is not None:
        base += ["--python", python]
    run([*base, *args], env=env)


def pip_offline_first(args: Sequence[str | Path], wheelhouse: Path, env: dict[str, str]) -> None:
    """Resolve from the wheelhouse alone; go to the index only when something is missing."""
    offline = [sys.executable, "-m", "pip", *args, "--no-index", "--find-links", wheelhouse]
    result = subprocess.run(offline, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if result.returncode != 0:
        log("the wheelhouse lacks something: asking the package index")
        pip(*args, "--find-links", wheelhouse, env=env)


def build_wheels(work: Path, wheelhouse: Path, extras: list[str], env: dict[str, str]) -> tuple[Path, Path, str]:
    project = work / "project-wheel"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    # hatchling for the isolated build of the project wheel, kept in the wheelhouse too
    pip_offline_first(["wheel", "--quiet", "--wheel-dir", wheelhouse, "hatchling>=1.25"], wheelhouse, env)
    pip_offline_first(["wheel", "--quiet", "--no-deps", "--wheel-dir", project, ROOT], wheelhouse, env)
    (wheel,) = project.glob("edgert-*.whl")

    constraints = work / "constraints.txt"
    frozen = output([sys.executable, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"])
    pins = [line for line in frozen.splitlines() if "==" in line and not line.lower().startswith("edgert==")]
    constraints.write_text("\n".join(sorted(pins)) + "\n")

    requirements = work / "requirements.txt"
    requirements.write_text("\n".join(wheel_requirements(wheel, extras)) + "\n")
    pip_offline_first(
        ["wheel", "--quiet", "--wheel-dir", wheelhouse, "-c", constraints, "-r", requirements], wheelhouse, env
    )
    return project, constraints, wheel.name


def wheel_requirements(wheel: Path, extras: list[str]) -> list[str]:
    import zipfile  # noqa: PLC0415 - only here

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [item for item in archive.namelist() if item.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    wanted: list[str] = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        environments = [{"extra": extra} for extra in ["", *extras]]
        if marker is None or any(marker.evaluate(environment) for environment in environments):
            requirement.marker = None
            wanted.append(str(requirement))
    return sorted(wanted)


# ------------------------------------------------------------------ venv
def build_venv(
    stage: Path, python: Path, project: Path, wheelhouse: Path, constraints: Path, spec: str, env: dict[str, str]
) -> None:
    venv = stage / PREFIX.relative_to("/")
    run([python, "-m", "venv", "--without-pip", venv], env=env)
    pip(
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        project,
        "--find-links",
        wheelhouse,
        "--no-compile",
        "--no-warn-script-location",
        "-c",
        constraints,
        spec,
        python=venv / "bin" / "python",
        env=env,
    )
    for cache in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    staged = str(venv).encode()
    rewritten: set[Path] = set()
    for path in [*sorted((venv / "bin").iterdir()), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if staged in data:
            path.write_bytes(data.replace(staged, str(PREFIX).encode()))
            rewritten.add(path)
    fix_records(venv, rewritten)
    leftovers = [str(path) for path in walk(venv) if path.is_file() and staged in path.read_bytes()]
    if leftovers:
        raise SystemExit("build_deb: the staging path is still named in: " + ", ".join(leftovers[:20]))
    for link in walk(venv):
        if link.is_symlink() and str(stage) in str(link.readlink()):
            raise SystemExit(f"build_deb: {link} points into the staging tree")
    # bytecode that names /opt/edgert and is checked by source hash, not mtime
    run(
        [
            venv / "bin" / "python",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "checked-hash",
            "-s",
            stage,
            "-p",
            "/",
            venv / "lib",
        ],
        env=env,
    )


def fix_records(venv: Path, rewritten: set[Path]) -> None:
    """Give the rewritten scripts their new hash and size in each wheel's RECORD (pip verifies them)."""
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    for record in sorted(site.glob("*.dist-info/RECORD")):
        lines = record.read_bytes().decode().splitlines(keepends=True)
        changed = False
        for index, line in enumerate(lines):
            (row,) = csv.reader([line])
            target = Path(os.path.normpath(site / row[0]))
            if target not in rewritten:
                continue
            data = target.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator=line[len(line.rstrip("\r\n")) :]).writerow(
                [row[0], f"sha256={digest}", str(len(data))]
            )
            lines[index] = buffer.getvalue()
            changed = True
        if changed:
            record.write_bytes("".join(lines).encode())


def walk(top: Path) -> Iterator[Path]:
    for directory, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            yield Path(directory) / name


# ------------------------------------------------------------------ package tree
def install_file(source: Path, target: Path, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def lay_out(stage: Path) -> None:
    install_file(HERE / "edgert.toml", stage / "etc/edgert/edgert.toml", 0o644)
    install_file(HERE / "systemd/edgert.service", stage / "lib/systemd/system/edgert.service", 0o644)
    install_file(HERE / "systemd/edgert.sysusers", stage / "usr/lib/sysusers.d/edgert.conf", 0o644)
    install_file(HERE / "systemd/edgert.tmpfiles", stage / "usr/lib/tmpfiles.d/edgert.conf", 0o644)
    for dropin in sorted((HERE / "systemd/dropins").glob("*.conf")):
        install_file(dropin, stage / "opt/edgert/share/edgert/dropins" / dropin.name, 0o644)
    # The broker's side of MQTT access control, for whoever runs the broker (see its README).
    for name in ("edgert.acl", "README.md"):
        install_file(HERE / "mosquitto" / name, stage / "opt/edgert/share/edgert/mosquitto" / name, 0o644)
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    (stage / "usr/bin/edgert").symlink_to("/opt/edgert/bin/edgert")


def normalise(stage: Path, epoch: int) -> None:
    for path in [stage, *walk(stage)]:
        if path.is_symlink():
            os.utime(path, (epoch, epoch), follow_symlinks=False)
            continue
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            path.chmod(0o755)
        else:
            path.chmod(0o755 if mode & 0o111 else 0o644)
        os.utime(path, (epoch, epoch))


def check_paths(stage: Path) -> None:
    for path in walk(stage):
        if path.is_dir() and not path.is_symlink():
            continue
        name = "/" + str(path.relative_to(stage))
        if name.startswith("/DEBIAN/"):
            continue
        if not any(name == root or name.startswith(root + "/") for root in ALLOWED_ROOTS):
            raise SystemExit(f"build_deb: {name} lies outside {', '.join(ALLOWED_ROOTS)}")


def python_package(python: Path) -> str:
    """Debian package of the interpreter the venv links to: its X.Y names ``python3.X``."""
    real = python.resolve()
    try:
        owner = output(["dpkg-query", "--search", str(real)]).split(":")[0]
    except subprocess.CalledProcessError:
        raise SystemExit(f"build_deb: {real} is not from a Debian package; set EDGERT_DEB_PYTHON") from None
    version = output([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"]).strip()
    if not owner.startswith(f"python{version}"):
        raise SystemExit(f"build_deb: {real} belongs to {owner}, expected python{version}*")
    upstream = output(["dpkg-query", "--showformat=${Version}", "--show", owner]).split("-")[0]
    return f"python{version} (>= {upstream})"


def shlib_depends(stage: Path, work: Path) -> list[str]:
    """Debian packages of the system libraries the bundled native code links to."""
    venv = stage / PREFIX.relative_to("/")
    objects = [
        path for path in walk(venv) if path.is_file() and not path.is_symlink() and path.read_bytes()[:4] == b"\x7fELF"
    ]
    if not objects:
        return []
    private = sorted({str(path.parent) for path in objects})
    (work / "shlibdeps" / "debian").mkdir(parents=True, exist_ok=True)
    (work / "shlibdeps" / "debian" / "control").write_text("Source: edgert\n\nPackage: edgert\nArchitecture: any\n")
    cmd: list[str | Path] = ["dpkg-shlibdeps", "-O", "--ignore-missing-info", "-xedgert"]
    cmd += [f"-l{directory}" for directory in private]
    cmd += objects
    text = output(cmd, cwd=work / "shlibdeps", stderr=subprocess.DEVNULL)
    match = re.search(r"^shlibs:Depends=(.*)$", text, re.MULTILINE)
    return [part.strip() for part in match.group(1).split(",")] if match else []


def control(stage: Path, version: str, arch: str, depends: list[str]) -> str:
    size_kib = 0
    for path in walk(stage):
        if path.is_file() and not path.is_symlink():
            size_kib += (path.lstat().st_size + 1023) // 1024
        else:
            size_kib += 1
    fields = {
        "Package": "edgert",
        "Version": version,
        "Architecture": arch,
        "Maintainer": MAINTAINER,
        "Installed-Size": str(size_kib),
        "Depends": ", ".join(depends),
        "Recommends": "systemd",
        "Section": "misc",
        "Priority": "optional",
        "Homepage": "https://github.com/edgert/edgert",
        "Description": DESCRIPTION,
    }
    return "".join(f"{key}: {value}\n" for key, value in fields.items())


def write_debian(stage: Path, version: str, arch: str, depends: list[str]) -> None:
    debian = stage / "DEBIAN"
    debian.mkdir()
    md5 = []
    for path in walk(stage):
        if path.is_file() and not path.is_symlink() and debian not in path.parents:
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            md5.append(f"{digest}  {path.relative_to(stage)}\n")
    (debian / "control").write_text(control(stage, version, arch, depends))
    (debian / "conffiles").write_text("/etc/edgert/edgert.toml\n")
    (debian / "md5sums").write_text("".join(md5))
    for script in ("postinst", "prerm", "postrm"):
        install_file(HERE / "debian" / script, debian / script, 0o755)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the edgert .deb (see packaging/README.md).")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("EDGERT_DEB_OUT", ROOT / "dist")))
    parser.add_argument("--version", default=os.environ.get("EDGERT_DEB_VERSION") or f"{project_version()}-1")
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        default=Path(os.environ.get("EDGERT_WHEELHOUSE", Path.home() / ".cache" / "edgert" / "deb-wheelhouse")),
    )
    parser.add_argument("--python", type=Path, default=Path(os.environ.get("EDGERT_DEB_PYTHON", "/usr/bin/python3.11")))
    parser.add_argument("--extras", default=os.environ.get("EDGERT_DEB_EXTRAS", "embedded"))
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory (printed)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    check = subprocess.run([sys.executable, HERE / "make_default_config.py", "--check"], check=False)
    if check.returncode != 0:
        raise SystemExit("build_deb: packaging/edgert.toml has drifted from edgert/settings.py")
    target_minor = output([args.python, "-c", "import sys; print(sys.version_info[:2])"]).strip()
    if target_minor != str(sys.version_info[:2]):
        raise SystemExit(f"build_deb: {args.python} is {target_minor}, this build venv {sys.version_info[:2]}")

    epoch = source_date_epoch()
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), PYTHONHASHSEED="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheelhouse: Path = args.wheelhouse
    if env.get("CMAKE_ARGS"):
        # pip's wheel cache keys a built llama-cpp-python on its sdist only, not on CMAKE_ARGS:
        # keep GPU builds apart from CPU ones.
        flavour = hashlib.sha256(env["CMAKE_ARGS"].encode()).hexdigest()[:12]
        wheelhouse = wheelhouse.with_name(f"{wheelhouse.name}-{flavour}")
        env["PIP_NO_CACHE_DIR"] = "1"
    extras = [extra for extra in args.extras.split(",") if extra]
    arch = output(["dpkg", "--print-architecture"]).strip()
    os.umask(0o022)

    work = Path(tempfile.mkdtemp(prefix="edgert-deb-"))
    try:
        stage = work / "root"
        stage.mkdir()
        project, constraints, wheel_name = build_wheels(work, wheelhouse, extras, env)
        spec = f"edgert[{','.join(extras)}]=={project_version()}" if extras else f"edgert=={project_version()}"
        log(f"installing {spec} ({wheel_name}) into {PREFIX}")
        build_venv(stage, args.python, project, wheelhouse, constraints, spec, env)
        lay_out(stage)
        check_paths(stage)
        depends = [python_package(args.python), *shlib_depends(stage, work)]
        normalise(stage, epoch)
        write_debian(stage, args.version, arch, depends)
        normalise(stage / "DEBIAN", epoch)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        deb = args.out_dir / f"edgert_{args.version}_{arch}.deb"
        run(
            ["dpkg-deb", "--root-owner-group", "-Zzstd", "-z3", "--build", stage, deb],
            env=env,
            stdout=subprocess.DEVNULL,
        )
    finally:
        if args.keep_work:
            log(f"scratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    size = deb.stat().st_size
    log(f"built {deb} ({size / 1_048_576:.1f} MiB) in {time.monotonic() - started:.0f} s")
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
