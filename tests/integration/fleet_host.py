"""nginx serving a fleet's registry site under a per-device prefix ``/dev/<device-id>/`` (tests/integration/fleet.py).

The prefix makes nginx's access log say what every device fetched (bytes, Range, status); ``rate`` throttles
the model files (``limit_rate`` on ``targets/``) so a download lasts long enough to be interrupted.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx

from tests.integration.http_host import NGINX, free_port, make_traversable, worker_user

_NGINX_CONFIG = """\
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format fleet '$msec $request_uri $status $body_bytes_sent "$http_range"';
    access_log {work}/access.log fleet;
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
        location ~ ^/dev/[^/]+/targets/ {{ rewrite ^/dev/[^/]+(/.*)$ $1 break; {limit} }}
        location /dev/ {{ rewrite ^/dev/[^/]+(/.*)$ $1 break; }}
    }}
}}
"""


@dataclass(frozen=True)
class Fetch:
    """One line of nginx's access log: a device's request for one file."""

    at: float
    device_id: str
    path: str
    status: int
    body_bytes: int
    range: str


class FleetHost:
    """nginx serving the registry site to every device under /dev/<device-id>/; model files at ``rate`` B/s."""

    def __init__(self, root: Path, workdir: Path, *, rate: int | None) -> None:
        self.root, self.workdir, self.rate = root, workdir, rate
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url_for(self, device_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/dev/{device_id}/"

    def start(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        conf = self.workdir / "nginx.conf"
        limit = f"limit_rate {self.rate};" if self.rate else ""
        conf.write_text(
            _NGINX_CONFIG.format(user=worker_user(), work=self.workdir, port=self.port, root=self.root, limit=limit)
        )
        self.proc = subprocess.Popen([NGINX, "-p", str(self.workdir), "-c", str(conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.workdir / 'error.log').read_text()}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def fetches(self) -> list[Fetch]:
        path = self.workdir / "access.log"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            at, uri, status, sent, rng = line.split(" ", 4)
            if not uri.startswith("/dev/"):
                continue  # start()'s probe
            _, _, device_id, rest = unquote(uri).split("/", 3)  # model ids hold ':' (sent as %3A)
            rows.append(Fetch(float(at), device_id, "/" + rest, int(status), int(sent), rng.strip('"')))
        return rows
