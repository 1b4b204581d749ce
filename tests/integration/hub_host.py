"""A local Hugging Face Hub host: the subset of the Hub's HTTP API that ``HfApi.create_repo`` /
``create_branch`` / ``create_commit`` (Git LFS transfer) and the ``resolve`` download route use.

No existing local Hub server fit (the self-hosted ones need a database and an object
store), so this one is a small Starlette application, served by uvicorn in a background
thread on a loopback port the OS picks. It implements, from huggingface_hub's own client code:

* ``POST /api/repos/create`` (409 when it exists), ``POST /api/models/<repo>/branch/<name>``;
* ``POST /api/models/<repo>/preupload/<rev>``: binary samples (a NUL byte) are "lfs", text is "regular",
  with the blob id of what the revision already holds (so unchanged files are skipped);
* ``POST /<repo>.git/info/lfs/objects/batch`` (basic transfer: an upload and a verify action),
  ``PUT /lfs/<oid>`` (the sha256 is checked), ``POST /lfs/<oid>/verify``;
* ``POST /api/models/<repo>/commit/<rev>`` (ndjson: header, file, lfsFile): the branch moves in one step;
* ``GET|HEAD /<repo>/resolve/<rev>/<path>``: regular files directly, LFS files by a 302 to
  ``/lfs/<oid>`` (the Hub redirects to its CDN); byte ranges (206) on both.

Writes (every ``POST``) need ``Authorization: Bearer <token>`` (401 otherwise); reads and the
presigned LFS ``PUT`` are public. Anything else is a JSON 404. Xet is not implemented: run
huggingface_hub with ``HF_HUB_DISABLE_XET=1``. Every request line is kept in ``requests`` so
tests can check what was sent and in which order.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_START_TIMEOUT_S = 10.0


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
    """``with HubHost(token) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            _app(self), log_config=None, log_level="warning", access_log=False, lifespan="off", http="h11"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="hub-host", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return {path: entry.data for path, entry in self.repos[repo_id].branches[branch].items()}

    def _serve(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> HubHost:
        self.thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the local Hub host (uvicorn) did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(_START_TIMEOUT_S)
        self.sock.close()


# ---------------------------------------------------------------- plumbing


def _json(status: int, value: object, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value).encode()
    return Response(body, status, headers={"Content-Type": "application/json", **(headers or {})})


def _raw_path(request: Request) -> str:
    """The path as sent (still percent-encoded; no query string)."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    return raw.decode("latin-1")


def _parts(request: Request) -> list[str]:
    """The path's segments, each percent-decoded after the split (a ``%2F`` in a revision stays in it)."""
    return [unquote(part) for part in _raw_path(request).strip("/").split("/")]


def _no_route(request: Request) -> Response:
    return _json(404, {"error": f"no route {_raw_path(request)}"})


def _ranged(request: Request, data: bytes) -> Response:
    match = _RANGE.match(request.headers.get("Range", ""))
    if match is None:
        return Response(data, 200, headers={"Accept-Ranges": "bytes"})
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else len(data) - 1
    if start >= len(data):
        return Response(b"", 416, headers={"Content-Range": f"bytes */{len(data)}"})
    end = min(end, len(data) - 1)
    return Response(data[start : end + 1], 206, headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})


def _app(hub: HubHost) -> Starlette:
    class RecordAndAuthorize(BaseHTTPMiddleware):
        """Record every request line; refuse any POST without the bearer token."""

        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            with hub.lock:
                hub.requests.append(f"{request.method} {_raw_path(request)}")
            if request.method == "POST" and request.headers.get("Authorization") != f"Bearer {hub.token}":
                return _json(401, {"error": "Invalid credentials in Authorization header"})
            return await call_next(request)

    async def no_route(request: Request, exc: Exception) -> Response:  # Starlette's 404 and 405
        return _no_route(request)

    # ------------------------------------------------------------ endpoints

    async def create(request: Request) -> Response:
        payload = await request.json()
        repo_id = f"{payload['organization']}/{payload['name']}"
        with hub.lock:
            if repo_id in hub.repos:
                return _json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = Repo()
        return _json(200, {"url": f"{hub.url}/{repo_id}"})

    async def batch(request: Request) -> Response:
        payload = await request.json()
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
        return _json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    async def lfs_verify(request: Request) -> Response:
        ok = request.path_params["oid"] in hub.lfs
        return _json(200 if ok else 404, {"ok": ok})

    async def lfs_put(request: Request) -> Response:
        oid, data = request.path_params["oid"], await request.body()  # presigned: no Authorization header
        if hashlib.sha256(data).hexdigest() != oid:
            return _json(400, {"error": "sha256 mismatch"})
        with hub.lock:
            hub.lfs[oid] = data
        return Response(b"", 200)

    async def lfs_get(request: Request) -> Response:
        data = hub.lfs.get(request.path_params["oid"])
        if data is None:
            return _no_route(request)
        return _ranged(request, data)

    async def models(request: Request) -> Response:  # /api/models/<org>/<name>/<verb>/<rev...>
        parts = _parts(request)
        repo_id, verb, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
        repo = hub.repos.get(repo_id)
        if repo is None:
            return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if verb == "preupload":
            return _preupload(repo, rev, await request.json())
        if verb == "commit":
            return _commit(repo_id, repo, rev, await request.body())
        if verb == "branch":
            with hub.lock:
                repo.branches.setdefault(rev, dict(repo.branches["main"]))
            return _json(200, {})
        return _no_route(request)

    async def resolve(request: Request) -> Response:  # GET and HEAD /<org>/<name>/resolve/<rev>/<path...>
        parts = _parts(request)
        repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
        entry = repo.branches.get(parts[3], {}).get("/".join(parts[4:])) if repo else None
        if entry is None:
            return _json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        if entry.lfs:
            return Response(b"", 302, headers={"Location": f"{hub.url}/lfs/{entry.oid}", "X-Linked-Size": "0"})
        return _ranged(request, entry.data)

    # ------------------------------------------------------------ commit machinery

    def _preupload(repo: Repo, rev: str, payload: dict[str, Any]) -> Response:
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
        return _json(200, {"files": answer})

    def _commit(repo_id: str, repo: Repo, rev: str, body: bytes) -> Response:
        if rev not in repo.branches:
            return _json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        staged = dict(repo.branches[rev])
        paths = []
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                staged[value["path"]] = Entry(base64.b64decode(value["content"]), lfs=False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in hub.lfs:
                    return _json(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                staged[value["path"]] = Entry(hub.lfs[value["oid"]], lfs=True)
            elif item["key"] != "header":
                return _json(400, {"error": f"unsupported operation {item['key']}"})
            if item["key"] != "header":
                paths.append(value["path"])
        oid = hashlib.sha1(body).hexdigest()
        with hub.lock:
            repo.branches[rev] = staged  # the branch moves in one step: readers see old or new
            repo.commits.append((oid, rev, paths))
        return _json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    routes = [  # first match wins, in the order the hand-written dispatcher checked them
        Route("/api/repos/create", create, methods=["POST"]),
        Route("/{repo:path}.git/info/lfs/objects/batch", batch, methods=["POST"]),
        Route("/lfs/{oid}/verify", lfs_verify, methods=["POST"]),
        Route("/lfs/{oid}", lfs_put, methods=["PUT"]),
        Route("/lfs/{oid}", lfs_get, methods=["GET"]),  # GET routes answer HEAD too
        Route("/api/models/{org}/{name}/{verb}/{rev:path}", models, methods=["POST"]),
        Route("/{org}/{name}/resolve/{rev}/{path:path}", resolve, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RecordAndAuthorize)],
        exception_handlers={404: no_route, 405: no_route},
    )
