"""A registry host that an attacker controls: serves a published site's files, or mangles the metadata.

Metadata goes through this server (``registry_url``); model files may still come from
nginx (``targets_url``). ``mode`` chooses the attack on ``timestamp.json``, the first
file a device fetches in every round:

* ``None``: serve it faithfully;
* ``"truncate"``: promise the whole file (Content-Length) and close the connection halfway;
* ``"drop"``: close the connection without answering;
* ``"oversized"``: answer with far more bytes than python-tuf accepts for a timestamp.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Literal

Mode = Literal["truncate", "drop", "oversized"] | None

#: python-tuf caps timestamp.json at 16 KiB (UpdaterConfig.timestamp_max_length)
OVERSIZED_BYTES = 1_000_000


class HostileRegistry:
    def __init__(self, site: Path) -> None:
        self.site = site
        self.mode: Mode = None
        self.requests: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.requests.append(self.path)
                path = self.path.partition("?")[0]
                file = registry.site / path.lstrip("/")
                if ".." in path or not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                mode = registry.mode if path.endswith("/timestamp.json") else None
                if mode == "drop":
                    self.close_connection = True
                    return
                if mode == "oversized":
                    body += b" " * OVERSIZED_BYTES
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "truncate" else body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> HostileRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
