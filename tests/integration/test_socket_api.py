"""The daemon as a real subprocess on a real Unix socket, driven by real clients."""

from __future__ import annotations

import asyncio
import json
import signal
import socket as socketlib
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgert.api.client import async_unix_client
from tests.integration.daemon import DaemonProcess, start_daemon

CHAT = "/v1/chat/completions"


def hello(max_tokens: int = 8, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, **extra}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DaemonProcess]:
    """One daemon per backend (llama.cpp GGUF, onnxruntime-genai folder) shared by the module's API tests."""
    workdir = tmp_path_factory.mktemp("daemon")
    proc = start_daemon(workdir, tiny_model, serve__max_body_bytes="65536")
    yield proc
    assert proc.stop() == 0, proc.log()


def metrics(daemon: DaemonProcess) -> dict[str, float]:
    with daemon.client() as client:
        text = client.get("/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def openai_client(daemon: DaemonProcess) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)))
    return openai.OpenAI(base_url="http://edgert/v1", api_key="unused", http_client=http, max_retries=0)


def test_socket_is_0660_and_there_is_no_tcp_listener(daemon: DaemonProcess) -> None:
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
    assert f"pid={daemon.proc.pid}," not in listening


def test_openai_client_non_stream_and_stream(daemon: DaemonProcess) -> None:
    with openai_client(daemon) as client:
        check_openai_client(client, daemon.model.name)


def check_openai_client(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model=reply.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content
    assert finish == reply.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == reply.usage.completion_tokens

    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]

    text = client.completions.create(model="default", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason in ("stop", "length")


def test_curl_streams_sse_with_done(daemon: DaemonProcess) -> None:
    body = json.dumps(hello(6, stream=True))
    out = subprocess.run(
        ["curl", "-sN", "--unix-socket", str(daemon.socket), "http://edgert/v1/chat/completions", "-d", body],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    events = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_concurrent_clients_all_complete(daemon: DaemonProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with async_unix_client(daemon.socket) as client:
            return await asyncio.gather(*(client.post(CHAT, json=hello(16, temperature=0, seed=i)) for i in range(10)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 10
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)


@pytest.mark.parametrize(
    ("body", "status", "code", "needle"),
    [
        (b'{"messages": [', 400, "bad_request", "not valid JSON"),
        (b"[1, 2]", 400, "bad_request", "must be a JSON object"),
        (json.dumps({"messages": "hi"}).encode(), 400, "bad_request", "messages"),
        (json.dumps(hello(max_tokens="many")).encode(), 400, "bad_request", "max_tokens"),
        (json.dumps(hello(temperature=9)).encode(), 400, "bad_request", "temperature"),
        (json.dumps(hello(model="llama-70b")).encode(), 404, "model_not_found", "llama-70b"),
        (json.dumps(hello(n=3)).encode(), 400, "bad_request", "n: only one"),
        (
            json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
            400,
            "context_length_exceeded",
            "context holds 2048",
        ),
        (b'{"messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}', 413, "payload_too_large", "65536"),
    ],
)
def test_bad_requests_get_exact_status_and_message(
    daemon: DaemonProcess, body: bytes, status: int, code: str, needle: str
) -> None:
    with daemon.client() as client:
        response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert needle in error["message"]
        # ... and the daemon keeps serving
        assert client.post(CHAT, json=hello(2)).status_code == 200


@pytest.fixture(scope="module")
def long_context_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[DaemonProcess]:
    """Room for generations long enough (seconds) that a client can leave mid-way on a busy CI machine.

    The ONNX fixture's 2048-token context runs out in ~0.2 s, too short a window to leave in
    reliably; its cancellation path (the same scheduler) is covered in tests/unit/test_engine.py.
    """
    workdir = tmp_path_factory.mktemp("long")
    proc = start_daemon(
        workdir, tiny_gguf, engine__n_ctx="16384", engine__n_parallel="2", serve__max_tokens_cap="16000"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_disconnect_mid_stream_frees_the_slot(long_context_daemon: DaemonProcess) -> None:
    daemon = long_context_daemon
    before = metrics(daemon).get("edgert_sequences_finished_total{reason=cancelled}", 0.0)
    raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    raw.connect(str(daemon.socket))
    body = json.dumps(hello(16000, stream=True, temperature=0, ignore_eos=True)).encode()
    raw.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgert\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        received = b""
        while b"data: " not in received:  # streaming has started
            received += raw.recv(4096)
    finally:
        raw.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = metrics(daemon)
        if now.get("edgert_sequences_finished_total{reason=cancelled}", 0.0) > before:
            break
        time.sleep(0.05)
    assert now["edgert_sequences_finished_total{reason=cancelled}"] == before + 1
    assert now["edgert_active_sequences"] == 0
    assert now["edgert_kv_cache_used_tokens"] == 0


def test_metrics_parse_and_move(daemon: DaemonProcess) -> None:
    before = metrics(daemon)
    with daemon.client() as client:
        assert client.post(CHAT, json=hello(4, temperature=0)).status_code == 200
    after = metrics(daemon)
    key = "edgert_requests_total{route=/v1/chat/completions,status=200}"
    assert after[key] == before.get(key, 0) + 1
    assert after["edgert_generated_tokens_total"] > before["edgert_generated_tokens_total"]
    assert after["edgert_prompt_tokens_total"] > before["edgert_prompt_tokens_total"]
    assert after["edgert_time_to_first_token_seconds_count"] > before.get("edgert_time_to_first_token_seconds_count", 0)
    assert after["edgert_uptime_seconds"] > 0
    architecture = "gemma4" if daemon.model.suffix == ".gguf" else "gemma3_text"
    (info,) = (name for name in after if name.startswith("edgert_model_info{"))
    assert f"{{architecture={architecture}," in info
    assert f",id={daemon.model.name},modalities=text," in info  # no registry release: no version, no digest
    assert ",version=}" in info


def test_second_daemon_on_the_same_socket_refuses(daemon: DaemonProcess, tiny_gguf: Path) -> None:
    second = subprocess.run(
        [*daemon.proc.args[:4], "--socket", str(daemon.socket), "--model", str(tiny_gguf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 6
    assert f"another edgert daemon is already serving on {daemon.socket}" in second.stderr
    with daemon.client() as client:
        assert client.get("/ready").status_code == 200


def test_stale_socket_file_is_replaced(tmp_path: Path, tiny_gguf: Path) -> None:
    stale = tmp_path / "run" / "edgert.sock"
    stale.parent.mkdir()
    leftover = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, nobody listens: what a crash leaves behind
    daemon = start_daemon(tmp_path, tiny_gguf)
    try:
        with daemon.client() as client:
            assert client.get("/health").json()["status"] == "ok"
    finally:
        assert daemon.stop() == 0
    assert not stale.exists()


def test_overload_returns_503_with_retry_after_and_daemon_stays_healthy(tmp_path: Path, tiny_model: Path) -> None:
    daemon = start_daemon(
        tmp_path, tiny_model, engine__n_parallel="1", engine__max_queue="1", engine__retry_after_s="4"
    )
    try:

        async def run() -> list[httpx.Response]:
            async with async_unix_client(daemon.socket) as client:
                long = hello(1500, temperature=0, ignore_eos=True)
                return await asyncio.gather(*(client.post(CHAT, json=long) for _ in range(6)))

        responses = asyncio.run(run())
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2
        assert 503 in statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "4"
        assert refused.json()["error"]["code"] == "overloaded"
        with daemon.client() as client:
            assert client.get("/ready").status_code == 200
            assert client.post(CHAT, json=hello(2)).status_code == 200
    finally:
        assert daemon.stop() == 0


def refuses_connections_within(path: Path, timeout_s: float) -> bool:
    """Poll until a new connection to the socket is refused (or its file is gone), up to the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                return True
        time.sleep(0.01)
    return False


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path: Path, tiny_model: Path) -> None:
    daemon = start_daemon(tmp_path, tiny_model, engine__n_threads="1")
    chunks: list[str] = []
    done = threading.Event()

    def stream() -> None:
        with (
            daemon.client() as client,
            client.stream("POST", CHAT, json=hello(1200, stream=True, temperature=0, ignore_eos=True)) as r,
        ):
            chunks.extend(line for line in r.iter_lines() if line)
        done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    while not any(c.startswith("data: ") for c in chunks):
        time.sleep(0.01)
    daemon.proc.send_signal(signal.SIGTERM)
    assert refuses_connections_within(daemon.socket, 10), "still accepting connections while draining"
    assert daemon.proc.wait(60) == 0, daemon.log()
    reader.join(10)
    assert done.is_set()
    assert chunks[-1] == "data: [DONE]"
    finish = json.loads(chunks[-2][len("data: ") :])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop")
    assert not daemon.socket.exists()


def test_deadline_header_and_bad_extension_headers(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        slow = client.post(CHAT, json=hello(100000 // 100, temperature=0), headers={"X-Edgert-Timeout": "0.000001"})
        assert slow.status_code == 504, slow.text
        assert slow.json()["error"]["code"] == "deadline_exceeded"
        bad = client.post(CHAT, json=hello(2), headers={"X-Edgert-Priority": "urgent"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "priority"
        echoed = client.post(CHAT, json=hello(2), headers={"X-Request-Id": "kiosk-42"})
        assert echoed.headers["x-request-id"] == "kiosk-42"


def test_shared_system_prompt_is_served_from_the_prefix_cache(tmp_path: Path, tiny_gguf: Path) -> None:
    daemon = start_daemon(tmp_path, tiny_gguf)  # llama.cpp only: ONNX generators share no KV cache
    try:
        check_prefix_cache(daemon)
    finally:
        assert daemon.stop() == 0


def check_prefix_cache(daemon: DaemonProcess) -> None:
    system = "You answer questions at a museum kiosk. " * 6
    cached = []
    with daemon.client() as client:
        for question in ("Where is the cafe?", "When do you close?", "Is there a cloakroom?"):
            body = {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": 4,
            }
            response = client.post(CHAT, json=body)
            assert response.status_code == 200
            cached.append(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0
    assert cached[-1] >= 32
    assert metrics(daemon)["edgert_prefix_cache_hits_total"] >= 1


def test_json_logs_carry_request_ids_and_sd_notify_is_sent(tmp_path: Path, tiny_gguf: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    daemon = start_daemon(
        tmp_path,
        tiny_gguf,
        extra_args=("--log-json",),
        env_extra={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "600000"},
    )
    try:
        messages = [notify.recv(4096).decode()]
        while "WATCHDOG=1" not in messages or "READY=1" not in messages:
            messages.append(notify.recv(4096).decode())
        # watchdog pings may come while the model loads (a busy CI machine); READY=1 is the first state change
        assert next(m for m in messages if m != "WATCHDOG=1") == "READY=1"
        with daemon.client() as client:
            assert client.post(CHAT, json=hello(2), headers={"X-Request-Id": "trace-me"}).status_code == 200
        assert daemon.stop() == 0
        while "STOPPING=1" not in messages:
            messages.append(notify.recv(4096).decode())
    finally:
        daemon.stop()
        notify.close()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    request_lines = [line for line in lines if line.get("request_id") == "trace-me"]
    assert request_lines
    assert request_lines[0]["msg"] == "POST /v1/chat/completions 200"
    assert any(line["msg"].startswith("ready:") for line in lines)
    assert all(line["level"] in ("debug", "info", "warning", "error") for line in lines)


def test_disconnect_while_waiting_for_a_non_streaming_reply_cancels_it(long_context_daemon: DaemonProcess) -> None:
    daemon = long_context_daemon
    before = metrics(daemon)
    raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    raw.connect(str(daemon.socket))
    body = json.dumps(hello(16000, temperature=0, ignore_eos=True)).encode()
    with raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgert\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    deadline = time.monotonic() + 10
    key = "edgert_sequences_finished_total{reason=cancelled}"
    while time.monotonic() < deadline and metrics(daemon).get(key, 0.0) <= before.get(key, 0.0):
        time.sleep(0.05)
    after = metrics(daemon)
    assert after[key] == before.get(key, 0.0) + 1
    assert after["edgert_active_sequences"] == 0
    assert after.get("edgert_requests_total{route=/v1/chat/completions,status=499}", 0) >= 1


def test_tcp_listener_only_when_configured(tmp_path: Path, tiny_gguf: Path) -> None:
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_daemon(tmp_path, tiny_gguf, extra_args=("--tcp", f"127.0.0.1:{port}"))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/ready").json()["status"] == "ready"
            assert client.post(CHAT, json=hello(2)).status_code == 200
        assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660  # the socket is still there too
    finally:
        assert daemon.stop() == 0
