"""A real static HTTP host for integration tests: nginx (Debian package) on a free loopback port.

nginx serves byte ranges (206 + Content-Range) for static files, like the CDNs
and object stores a fleet registry lives on. Usage::

    with NginxHost(root_dir, workdir) as host:
        host.url            # http://127.0.0.1:<port>/
        host.stop(); host.start()   # the server "dies" and comes back
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_CONFIG = """\
user root;
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
        conf.write_text(_CONFIG.format(work=self.workdir, port=self.port, root=self.root, limit=limit))
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
