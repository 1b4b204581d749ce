"""Hostile clients on the socket and the TCP listener (issue 13: findings 10, 14, 16), against a real daemon."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket as socketlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgert.settings import ServeSettings
from tests.integration.daemon import DaemonProcess, start_daemon

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}


def free_port() -> int:
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def file_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE set to ``soft`` for a while (a daemon started inside inherits it)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(
        tmp_path_factory.mktemp("hardening"), tiny_gguf, serve__header_timeout_s="2", serve__body_timeout_s="2"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


# ---------------------------------------------------------------- finding 10: slowloris
def test_a_trickled_request_head_is_cut_at_the_header_deadline(daemon: DaemonProcess) -> None:
    """Bytes trickling in do not extend the deadline: the head must be complete 2 s after connecting."""
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as raw:
        raw.connect(str(daemon.socket))
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgert\r\n")
        raw.settimeout(0.25)
        deadline = time.monotonic() + 30
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                raw.sendall(b"X-Drip: 1\r\n")
                closed = raw.recv(1) == b""
            except TimeoutError:
                continue  # still open: drip another header line
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the daemon kept a connection that never finished its request head"
    with daemon.client() as client:
        assert client.get("/health").status_code == 200
        assert 'edgert_http_connections_closed_total{reason="header_timeout"}' in client.get("/metrics").text


def test_a_body_that_never_finishes_gets_408(daemon: DaemonProcess) -> None:
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as raw:
        raw.connect(str(daemon.socket))
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgert\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"messages": '
        )
        raw.settimeout(30)
        reply = b""
        while b"}}" not in reply:  # head and body may come in two reads
            chunk = raw.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"code":"request_timeout"' in reply
    assert b"did not arrive within 2 s" in reply


def test_1100_idle_connections_leave_room_for_a_legitimate_request(tmp_path: Path, tiny_gguf: Path) -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("this test holds 1,100 sockets open; the hard file limit is lower")
    with file_limit(1024):  # the daemon gets systemd's classic soft limit; 1,100 idle connections exceed it
        daemon = start_daemon(tmp_path, tiny_gguf)
    try:
        with file_limit(2048):  # this process, the attacker, needs more than 1,024 itself
            check_slowloris(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log()[-4000:]


def check_slowloris(daemon: DaemonProcess) -> None:
    log_before = len(daemon.log())
    with contextlib.ExitStack() as idle:
        for _ in range(1100):
            raw = idle.enter_context(socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM))
            raw.settimeout(5)
            try:
                raw.connect(str(daemon.socket))
                raw.sendall(b"GET /health HTTP/1.1\r\n")  # half a request head, never finished
            except TimeoutError:
                pytest.fail(f"the daemon stopped accepting connections:\n{daemon.log()[-2000:]}")
            except (BrokenPipeError, ConnectionResetError):
                continue  # already closed to make room for a newer one: the defence at work
        # all 1,100 are still open on this side
        with daemon.client(timeout=15) as client:
            assert client.get("/health").status_code == 200
            assert client.post(CHAT, json=HELLO).status_code == 200
            metrics = client.get("/metrics").text
    grown = len(daemon.log()) - log_before
    assert grown < 16_384, daemon.log()[-4000:]
    assert "connection limit (256) reached" in daemon.log()
    evicted = re.search(r'^edgert_http_connections_closed_total\{reason="evicted"\} (\S+)$', metrics, re.M)
    assert evicted is not None
    assert float(evicted.group(1)) >= 1100 - 256


def test_a_flood_of_malformed_requests_writes_a_line_not_a_flood(daemon: DaemonProcess) -> None:
    """uvicorn logs one warning per malformed request: 500 of them wrote 26 kB before the rate limit."""
    before = daemon.log().count("Invalid HTTP request received.")
    for _ in range(300):
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as raw:
            raw.connect(str(daemon.socket))
            raw.sendall(b"GARBAGE \x00\x01\r\n\r\n")
            raw.settimeout(10)
            assert raw.recv(64).startswith(b"HTTP/1.1 400")
    assert daemon.log().count("Invalid HTTP request received.") - before <= 2
    with daemon.client() as client:
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------- finding 16: deep JSON
def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_schema(levels: int) -> dict[str, object]:
    """A valid JSON schema: an object whose one property is such an object, ``levels`` times."""
    schema: dict[str, object] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, '{"messages": ' + nested(100_000) + "}"),
        (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + nested(5000) + "}"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 2, "stop": ' + nested(200) + "}"),
        (
            CHAT,
            json.dumps(
                {
                    **HELLO,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "deep", "schema": deep_schema(200)},
                    },
                }
            ),
        ),
    ],
    ids=["messages-100000-deep", "extra-field-5000-deep", "stop-200-deep", "schema-200-levels"],
)
def test_deeply_nested_json_is_a_400_not_a_500(daemon: DaemonProcess, path: str, body: str) -> None:
    with daemon.client() as client:
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_request"
        assert "nests arrays/objects deeper than 64 levels" in error["message"]
        assert client.post(CHAT, json=HELLO).status_code == 200
    assert "Traceback" not in daemon.log()


def test_an_integer_longer_than_python_converts_is_a_400_not_a_500(daemon: DaemonProcess) -> None:
    """json.loads refuses integers over 4,300 digits with a plain ValueError (not a JSONDecodeError)."""
    body = '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ' + "9" * 5000 + "}"
    with daemon.client() as client:
        response = client.post(CHAT, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith("request body is not valid JSON: ")
        assert client.post(CHAT, json=HELLO).status_code == 200
    assert "Traceback" not in daemon.log()


# ---------------------------------------------------------------- finding 14: the TCP listener
@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[tuple[DaemonProcess, int]]:
    port = free_port()
    proc = start_daemon(
        tmp_path_factory.mktemp("tcp"),
        tiny_gguf,
        extra_args=("--tcp", f"0.0.0.0:{port}"),
        serve__tcp_auth_token="kiosk-s3cret-token",
        serve__tcp_allowed_hosts='["kiosk.example"]',
    )
    yield proc, port
    assert proc.stop() == 0, proc.log()


AUTH = {"Authorization": "Bearer kiosk-s3cret-token"}


def tcp_post(port: int, headers: dict[str, str], body: bytes | None = None) -> httpx.Response:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        return client.post(CHAT, content=json.dumps(HELLO).encode() if body is None else body, headers=headers)


def test_tcp_requires_the_bearer_token_but_health_does_not(tcp_daemon: tuple[DaemonProcess, int]) -> None:
    daemon, port = tcp_daemon
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "kiosk-s3cret-token"}):
        refused = tcp_post(port, {"content-type": "application/json", **headers})
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert tcp_post(port, {"content-type": "application/json", **AUTH}).status_code == 200
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
    assert "kiosk-s3cret-token" not in daemon.log()


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_tcp_posts_need_a_json_content_type(tcp_daemon: tuple[DaemonProcess, int], content_type: str | None) -> None:
    _, port = tcp_daemon
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    response = tcp_post(port, headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert error["param"] == "content-type"
    assert tcp_post(port, {**AUTH, "content-type": "application/json; charset=utf-8"}).status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 400),
        ("evil.example:8080", 400),
        ("kiosk.example", 200),
        ("localhost", 200),
        ("10.1.2.3:8080", 200),  # a wildcard bind answers on any address of the machine
        ("[::1]:8080", 200),
    ],
)
def test_tcp_checks_the_host_header(tcp_daemon: tuple[DaemonProcess, int], host: str, status: int) -> None:
    _, port = tcp_daemon
    response = tcp_post(port, {**AUTH, "content-type": "application/json", "host": host})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == "host"


def test_non_loopback_tcp_bind_is_warned_about(tcp_daemon: tuple[DaemonProcess, int]) -> None:
    daemon, port = tcp_daemon
    assert f"the TCP listener 0.0.0.0:{port} is reachable from the network" in daemon.log()


def test_the_unix_socket_keeps_accepting_curl_style_form_bodies(tcp_daemon: tuple[DaemonProcess, int]) -> None:
    """README documents ``curl --unix-socket ... -d '{...}'``, which says x-www-form-urlencoded: still fine there."""
    daemon, _ = tcp_daemon
    with daemon.client() as client:
        body = json.dumps(HELLO).encode()
        response = client.post(CHAT, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200, response.text
        assert client.get("/v1/models").status_code == 200  # no token needed on the socket


def test_the_unit_pins_the_file_limit_above_the_connection_cap() -> None:
    """Finding 10: the systemd unit states the descriptor limit the connection cap was sized against."""
    unit = (Path(__file__).parents[2] / "packaging" / "systemd" / "edgert.service").read_text()
    assert "\nLimitNOFILE=1024\n" in unit
    assert ServeSettings().max_connections + 128 <= 1024
