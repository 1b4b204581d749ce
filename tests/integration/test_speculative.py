"""``edgert serve`` with a Gemma 4 MTP drafter: the same answers as without one, and cancel/deadline still work.

The tiny fixture and its random drafter (``tests/fixtures/tiny-gemma4-assistant.gguf``) run in a real daemon
on a real socket; ``speculative = "on"`` drafts every step, so every request below goes through the draft,
verify and KV-rollback path. The output is compared with a daemon serving the same model without a drafter.
"""

from __future__ import annotations

import json
import socket as socketlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.test_socket_api import metrics

CHAT = "/v1/chat/completions"
DRAFTER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-gemma4-assistant.gguf"
QUESTIONS = ["Where is the cafe?", "Tell me about the sea.", "Count: one two three", "Bonjour, ça va ?"]


def body(question: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 48, **extra}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    spec = start_daemon(
        tmp_path_factory.mktemp("spec"),
        tiny_gguf,
        engine__drafter=str(DRAFTER),
        engine__speculative="on",
        engine__n_ctx="16384",
        engine__n_parallel="2",
        serve__max_tokens_cap="16000",
    )
    plain = start_daemon(tmp_path_factory.mktemp("plain"), tiny_gguf, engine__speculative="off")
    yield spec, plain
    assert spec.stop() == 0, spec.log()
    assert plain.stop() == 0, plain.log()


def answer(daemon: DaemonProcess, question: str, **extra: object) -> str:
    with daemon.client() as client:
        response = client.post(CHAT, json=body(question, **extra))
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_answers_equal_a_daemon_without_drafter_and_drafts_are_counted(
    daemons: tuple[DaemonProcess, DaemonProcess],
) -> None:
    spec, plain = daemons
    before = metrics(spec).get("edgert_draft_tokens_total", 0.0)
    for question in QUESTIONS:
        assert answer(spec, question) == answer(plain, question)
    # a seeded sampled answer too: each token is the model's own sample, so the same seed gives the same text
    seeded = {"temperature": 1.0, "seed": 5, "top_k": 40}
    assert answer(spec, QUESTIONS[1], **seeded) == answer(plain, QUESTIONS[1], **seeded)
    after = metrics(spec)
    assert after["edgert_draft_tokens_total"] > before
    assert after["edgert_draft_accepted_tokens_total"] <= after["edgert_draft_tokens_total"]
    assert "draft step failed" not in spec.log()


def test_disconnect_mid_stream_with_drafts_frees_the_slot(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    spec, _ = daemons
    before = metrics(spec).get("edgert_sequences_finished_total{reason=cancelled}", 0.0)
    raw = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    raw.connect(str(spec.socket))
    payload = json.dumps(body("Hi", max_tokens=16000, stream=True, ignore_eos=True)).encode()
    raw.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgert\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    try:
        received = b""
        while b"data: " not in received:  # streaming has started
            received += raw.recv(4096)
    finally:
        raw.close()
    deadline = time.monotonic() + 10
    now = metrics(spec)
    while time.monotonic() < deadline:
        now = metrics(spec)
        if now.get("edgert_sequences_finished_total{reason=cancelled}", 0.0) > before:
            break
        time.sleep(0.05)
    assert now["edgert_sequences_finished_total{reason=cancelled}"] == before + 1
    assert now["edgert_active_sequences"] == 0
    assert now["edgert_kv_cache_used_tokens"] == 0


def test_deadline_passes_during_a_drafted_generation(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    spec, _ = daemons
    with spec.client() as client:
        slow = client.post(
            CHAT, json=body("Hi", max_tokens=15000, ignore_eos=True), headers={"X-Edgert-Timeout": "0.5"}
        )
    # a deadline that passes after the first token finishes the answer there (as without drafts)
    assert slow.status_code == 200, slow.text
    assert slow.json()["choices"][0]["finish_reason"] == "deadline"
    assert 0 < slow.json()["usage"]["completion_tokens"] < 15000
    assert metrics(spec)["edgert_kv_cache_used_tokens"] == 0


def test_a_missing_drafter_file_is_refused_at_start(tmp_path: Path, tiny_gguf: Path) -> None:
    daemon = start_daemon(
        tmp_path, tiny_gguf, wait_ready=False, engine__drafter=str(tmp_path / "nope.gguf"), engine__speculative="on"
    )
    assert daemon.proc.wait(60) != 0
    assert "nope.gguf" in daemon.log()
