"""Images and audio end to end: the daemon with the tiny Gemma 4 model and its tiny projector, over
the socket, over MQTT and from the CLI. The weights are random: what is tested is that media reach the
model (their tokens are counted, cached, evaluated beside text streams) and that bad media get a
clear 400 while the daemon keeps serving."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgert.api.client import async_unix_client
from edgert.api.mqtt_schemas import ReplyFinal, Topics
from edgert.transport.mqtt_client import MqttRequester
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import check_stream, mqtt_daemon
from tests.media_samples import noise_png, tone_wav

CHAT = "/v1/chat/completions"
MMPROJ = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-gemma4-mmproj.gguf"


def image_part(data: bytes, kind: str = "png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"}}


def audio_part(data: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def ask(*parts: dict[str, Any], max_tokens: int = 6, **extra: object) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(tmp_path_factory.mktemp("media"), tiny_gguf, extra_args=("--mmproj", str(MMPROJ)))
    yield proc
    assert proc.stop() == 0, proc.log()


def details(reply: dict[str, Any]) -> dict[str, int]:
    return reply["usage"]["prompt_tokens_details"]


def test_an_image_and_a_clip_reach_the_model_in_order(daemon: DaemonProcess) -> None:
    photo, clip = image_part(noise_png()), audio_part(tone_wav(1.0))
    with daemon.client() as client:
        reply = client.post(CHAT, json=ask(photo, {"type": "text", "text": "and"}, clip))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert details(body)["image_tokens"] == 80 and details(body)["audio_tokens"] == 25
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        prompt = client.post("/apply-template", json=ask(photo, clip)).json()["prompt"]
    assert prompt.count("<__media_") == 2  # the template sees one marker per medium, in place


def test_the_same_photo_again_comes_from_the_prefix_cache(daemon: DaemonProcess) -> None:
    photo = image_part(noise_png(seed=7))
    with daemon.client() as client:
        first = client.post(CHAT, json=ask(photo)).json()
        again = client.post(CHAT, json=ask(photo)).json()
        other = client.post(CHAT, json=ask(image_part(noise_png(seed=8)))).json()
    assert details(again)["cached_tokens"] > details(first)["cached_tokens"] + 80
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert details(other)["cached_tokens"] < details(again)["cached_tokens"] - 80


def test_media_requests_run_beside_text_streams(daemon: DaemonProcess) -> None:
    async def run() -> list[Any]:
        async with async_unix_client(daemon.socket, timeout=120) as client:
            bodies = [ask(image_part(noise_png(seed=seed)), max_tokens=8) for seed in range(20, 24)]
            bodies += [ask(audio_part(tone_wav(0.5)), max_tokens=8)]
            bodies += [{"messages": [{"role": "user", "content": "plain"}], "max_tokens": 16} for _ in range(3)]
            return await asyncio.gather(*(client.post(CHAT, json=body) for body in bodies))

    replies = asyncio.run(run())
    assert [reply.status_code for reply in replies] == [200] * 8, [reply.text for reply in replies]
    assert [details(reply.json())["image_tokens"] for reply in replies[:4]] == [80] * 4
    with daemon.client() as client:
        metrics = client.get("/metrics").text
    evaluated = next(line for line in metrics.splitlines() if line.startswith("edgert_media_evaluated_total "))
    assert float(evaluated.split()[1]) >= 5  # the encode time is there too, for the stall it costs streams
    assert "edgert_media_eval_seconds_total " in metrics


def test_a_streamed_reply_about_an_image(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        text = client.post(CHAT, json=ask(image_part(noise_png(seed=3)), stream=True, max_tokens=5)).text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("part", "status", "words"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64!"}}, 400, "base64"),
        (image_part(noise_png()[:60]), 400, "image"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}, 400, "media_url_hosts"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, 400, "file"),
        (audio_part(tone_wav(31.0)), 400, "30"),
    ],
)
def test_bad_media_get_a_clear_error_naming_the_part(
    daemon: DaemonProcess, part: dict[str, Any], status: int, words: str
) -> None:
    with daemon.client() as client:
        reply = client.post(CHAT, json=ask(part))
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["param"] == "messages.0.content.1", error
        assert words in error["message"], error
        assert client.post(CHAT, json=ask(image_part(noise_png()))).status_code == 200  # still serving


def test_a_very_thin_image_is_downscaled_and_served_not_a_crash(daemon: DaemonProcess) -> None:
    """libmtmd aborts the process on an image it would make longer than 1120 tokens (a 16000x1 strip); the
    longest side is capped first (serve.media_max_side) and the engine refuses what still comes out too long."""
    with daemon.client() as client:
        reply = client.post(CHAT, json=ask(image_part(noise_png(16000, 1))))
        assert reply.status_code == 200, reply.text
        assert 0 < details(reply.json())["image_tokens"] <= 1120
        assert client.get("/health").status_code == 200


def test_a_text_only_daemon_refuses_media_and_says_why(tmp_path: Path, tiny_gguf: Path) -> None:
    proc = start_daemon(tmp_path, tiny_gguf)
    try:
        with proc.client() as client:
            reply = client.post(CHAT, json=ask(image_part(noise_png())))
            assert reply.status_code == 400, reply.text
            assert "text-only" in reply.json()["error"]["message"]
            assert reply.json()["error"]["param"] == "messages.0.content.1"
    finally:
        assert proc.stop() == 0, proc.log()


def test_mqtt_carries_a_photo_as_base64(broker: Broker, tiny_gguf: Path, tmp_path: Path) -> None:
    device = mqtt_daemon(tmp_path, tiny_gguf, broker, "dev-media", engine__mmproj=str(MMPROJ))
    try:
        with MqttRequester(broker.client_settings()) as client:
            [final] = client.ask(Topics("dev-media").req, {**ask(image_part(noise_png())), "id": "m-1"})
            streamed = check_stream(
                client.ask(Topics("dev-media").req, {**ask(audio_part(tone_wav(1.0))), "stream": True, "id": "m-2"})
            )
        assert isinstance(final, ReplyFinal), final
        assert final.usage.prompt_tokens_details is not None
        assert final.usage.prompt_tokens_details.image_tokens == 80
        assert streamed.usage.prompt_tokens_details is not None
        assert streamed.usage.prompt_tokens_details.audio_tokens == 25
    finally:
        assert device.stop() == 0, device.log()


def test_cli_run_with_an_image_and_a_clip(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "photo.png").write_bytes(noise_png())
    (tmp_path / "note.wav").write_bytes(tone_wav(1.0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env.update(EDGERT_STATE_DIR=str(tmp_path / "state"), EDGERT_ENGINE__N_THREADS="1")
    cmd = [sys.executable, "-m", "edgert", "run", "-m", str(tiny_gguf), "--mmproj", str(MMPROJ), "--json", "-t", "0"]
    media = ["--image", str(tmp_path / "photo.png"), "--audio", str(tmp_path / "note.wav"), "-n", "4", "What?"]
    proc = subprocess.run([*cmd, *media], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["usage"]["completion_tokens"] >= 1
    missing = subprocess.run(
        [*cmd, "--image", str(tmp_path / "nope.png"), "hi"], env=env, capture_output=True, text=True, check=False
    )
    assert missing.returncode == 1 and "nope.png" in missing.stderr
