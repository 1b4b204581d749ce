"""A local Hugging Face Hub host: the subset of the Hub's HTTP API that ``HfApi.create_repo`` /
``create_branch`` / ``create_commit`` (Git LFS transfer) and the ``resolve`` download route use.

No existing local Hub server fit (the self-hosted ones need a database and an object
store), so this one implements, from huggingface_hub's own client code:

* ``POST /api/repos/create`` (409 when it exists), ``POST /api/models/<repo>/branch/<name>``;
* ``POST /api/models/<repo>/preupload/<rev>``: binary samples (a NUL byte) are "lfs", text is "regular",
  with the blob id of what the revision already holds (so unchanged files are skipped);
* ``POST /<repo>.git/info/lfs/objects/batch`` (basic transfer: an upload and a verify action),
  ``PUT /lfs/<oid>`` (the sha256 is checked), ``POST /lfs/<oid>/verify``;
* ``POST /api/models/<repo>/commit/<rev>`` (ndjson: header, file, lfsFile): the branch moves in one step;
* ``GET|HEAD /<repo>/resolve/<rev>/<path>``: regular files directly, LFS files by a 302 to
  ``/lfs/<oid>`` (the Hub redirects to its CDN); byte ranges (206) on both.

Writes need ``Authorization: Bearer <token>`` (401 otherwise); reads are public. Xet is not
implemented: run huggingface_hub with ``HF_HUB_DISABLE_XET=1``. Every request line is kept
in ``requests`` so tests can check what was sent and in which order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id


@dataclass
class Entry:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_id(self.data)


@dataclass
class Repo:
    branches: dict[str, dict[str, Entry]] = field(default_factory=lambda: {"main": {}})
    commits: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (oid, branch, paths)


class HubHost:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return {path: entry.data for path, entry in self.repos[repo_id].branches[branch].items()}

    def __enter__(self) -> HubHost:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: HubHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        # ------------------------------------------------------------ plumbing

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _route(self) -> tuple[str, list[str]]:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append(f"{self.command} {path}")
            return path, [unquote(part) for part in path.strip("/").split("/")]

        # ------------------------------------------------------------ verbs

        def do_POST(self) -> None:
            path, parts = self._route()
            body = self._body()
            if not self._authorized():
                return
            if path == "/api/repos/create":
                self._create(json.loads(body))
            elif path.endswith(".git/info/lfs/objects/batch"):
                self._batch(json.loads(body))
            elif parts[0] == "lfs" and parts[-1] == "verify":
                ok = parts[1] in hub.lfs
                self._json(200 if ok else 404, {"ok": ok})
            elif parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, verb, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                elif verb == "preupload":
                    self._preupload(repo, rev, json.loads(body))
                elif verb == "commit":
                    self._commit(repo_id, repo, rev, body)
                elif verb == "branch":
                    repo.branches.setdefault(rev, dict(repo.branches["main"]))
                    self._json(200, {})
                else:
                    self._json(404, {"error": f"no route {path}"})
            else:
                self._json(404, {"error": f"no route {path}"})

        def do_PUT(self) -> None:
            _, parts = self._route()
            data = self._body()  # the LFS basic transfer: presigned, no Authorization header
            if parts[0] == "lfs" and hashlib.sha256(data).hexdigest() == parts[1]:
                hub.lfs[parts[1]] = data
                self._send(200)
            else:
                self._json(400, {"error": "sha256 mismatch"})

        def do_GET(self) -> None:
            path, parts = self._route()
            if parts[0] == "lfs" and parts[1] in hub.lfs:
                self._ranged(hub.lfs[parts[1]])
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
                entry = repo.branches.get(parts[3], {}).get("/".join(parts[4:])) if repo else None
                if entry is None:
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                elif entry.lfs:
                    self._send(302, headers={"Location": f"{hub.url}/lfs/{entry.oid}", "X-Linked-Size": "0"})
                else:
                    self._ranged(entry.data)
                return
            self._json(404, {"error": f"no route {path}"})

        def do_HEAD(self) -> None:
            self.do_GET()

        # ------------------------------------------------------------ endpoints

        def _create(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                return
            hub.repos[repo_id] = Repo()
            self._json(200, {"url": f"{hub.url}/{repo_id}"})

        def _preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
            held = repo.branches.get(rev, {})
            answer = []
            for item in payload["files"]:
                sample = base64.b64decode(item["sample"])
                entry = held.get(item["path"])
                answer.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if b"\0" in sample else "regular",
                        "shouldIgnore": False,
                        "oid": entry.oid if entry else None,
                    }
                )
            self._json(200, {"files": answer})

        def _batch(self, payload: dict[str, Any]) -> None:
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in hub.lfs:
                    objects.append({"oid": oid, "size": size})  # already there: no actions
                else:
                    actions = {
                        "upload": {"href": f"{hub.url}/lfs/{oid}"},
                        "verify": {"href": f"{hub.url}/lfs/{oid}/verify"},
                    }
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
            self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

        def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes) -> None:
            if rev not in repo.branches:
                self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                return
            staged = dict(repo.branches[rev])
            paths = []
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    staged[value["path"]] = Entry(base64.b64decode(value["content"]), lfs=False)
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        self._json(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                        return
                    staged[value["path"]] = Entry(hub.lfs[value["oid"]], lfs=True)
                elif item["key"] != "header":
                    self._json(400, {"error": f"unsupported operation {item['key']}"})
                    return
                if item["key"] != "header":
                    paths.append(value["path"])
            oid = hashlib.sha1(body).hexdigest()
            with hub.lock:
                repo.branches[rev] = staged  # the branch moves in one step: readers see old or new
                repo.commits.append((oid, rev, paths))
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        def _ranged(self, data: bytes) -> None:
            match = _RANGE.match(self.headers.get("Range", ""))
            if match is None:
                self._send(200, data, {"Accept-Ranges": "bytes"})
                return
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            end = min(end, len(data) - 1)
            self._send(206, data[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})

    return Handler
