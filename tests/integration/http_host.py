"""A real static HTTP host for integration tests: nginx (Debian package) on a free loopback port.

nginx serves byte ranges (206 + Content-Range) for static files, like the CDNs
and object stores a fleet registry lives on. Started as root, its workers run as
``www-data`` (``nobody`` where that user is missing), as Debian's nginx does: a
published file that only its owner can read gets a 403 here as it would in the
field (issue 13, finding 9). Usage::

    with NginxHost(root_dir, workdir) as host:
        host.url            # http://127.0.0.1:<port>/
        host.stop(); host.start()   # the server "dies" and comes back
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_CONFIG = """\
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /targets/ {{ {limit} }}
    }}
}}
"""


def worker_user() -> str:
    """The ``user`` directive: an unprivileged account when started as root (else nginx ignores it)."""
    if os.geteuid() != 0:
        return ""
    for name in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return f"user {name} {grp.getgrgid(entry.pw_gid).gr_name};"
    raise RuntimeError("no unprivileged user (www-data or nobody) to run nginx's workers as")


def make_traversable(root: Path) -> None:
    """Let the workers reach ``root``: pytest's tmp dirs are 0700 and owned by the test user.

    Only the search (x) bit is added for others, and only on our own directories: the files
    below keep the modes the code under test gave them, which is what the tests check.
    """
    for directory in [root, *root.parents]:
        info = directory.stat()
        if info.st_mode & stat.S_IXOTH:
            continue
        if info.st_uid != os.geteuid():
            raise RuntimeError(f"nginx's workers cannot enter {directory} (mode {stat.filemode(info.st_mode)})")
        directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NginxHost:
    """nginx serving ``root``; ``rate`` (bytes/s) throttles /targets/ so tests can catch a download midway."""

    def __init__(self, root: Path, workdir: Path, *, rate: int | None = None) -> None:
        self.root = root
        self.workdir = workdir
        self.rate = rate
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        limit = f"limit_rate {self.rate};" if self.rate else ""
        conf = self.workdir / "nginx.conf"
        make_traversable(self.root)
        conf.write_text(
            _CONFIG.format(user=worker_user(), work=self.workdir, port=self.port, root=self.root, limit=limit)
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.workdir), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # nginx logs to error.log in the workdir
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.workdir / 'error.log').read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: open connections are cut, like a crashed host
            self.proc.wait(timeout=10)
        self.proc = None

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> NginxHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
