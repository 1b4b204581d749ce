"""Images and audio in the batching engine: the tiny Gemma 4 model with its tiny projector, real libmtmd."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.engine.base import MediaItem, SamplingParams
from edgert.engine.llama.media import MAX_IMAGE_TOKENS, placeholder_token
from edgert.errors import BadRequestError
from edgert.media.parts import MEDIA_MARKER
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import load_settings
from tests.media_samples import noise_rgb, tone_wav

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
GREEDY = SamplingParams(temperature=0.0)


def image(width: int, height: int, seed: int = 0) -> MediaItem:
    pixels = noise_rgb(width, height, seed)
    return MediaItem("image", pixels, width, height, hashlib.sha256(pixels).hexdigest(), "messages.0.content.1")


def wav(seconds: float) -> MediaItem:
    data = tone_wav(seconds)
    return MediaItem("audio", data, 0, 0, hashlib.sha256(data).hexdigest(), "messages.0.content.2")


def ask(*media: MediaItem, text: str = "What is this?") -> list[dict[str, object]]:
    return [{"role": "user", "content": text + "".join(MEDIA_MARKER for _ in media)}]


@pytest.fixture
def runtime(tmp_path: Path, tiny_gguf: Path) -> Iterator[Runtime]:
    engine = {"n_ctx": 4096, "n_parallel": 4, "n_threads": 1, "n_threads_batch": 1, "mmproj": str(MMPROJ)}
    rt = open_runtime(load_settings(state_dir=tmp_path, model=str(tiny_gguf), engine=engine))
    yield rt
    rt.close()


async def generate(rt: Runtime, *media: MediaItem, max_tokens: int = 8, text: str = "What is this?") -> object:
    tokens, spans = rt.chat_prompt_with_media(ask(*media, text=text), media=media)
    request = rt.request(tokens, sampling=GREEDY, max_tokens=max_tokens)
    from dataclasses import replace

    stream = rt.scheduler.submit(replace(request, media=spans))
    return await stream.collect()


def test_the_projector_gives_the_model_image_and_audio(runtime: Runtime) -> None:
    assert runtime.backend.info.modalities == ("text", "image", "audio")


def test_an_image_and_a_clip_take_their_positions_with_digest_placeholders(runtime: Runtime) -> None:
    photo, clip = image(40, 30), wav(1.0)
    tokens, spans = runtime.chat_prompt_with_media(ask(photo, clip), media=(photo, clip))
    assert [(span.kind, span.n_tokens) for span in spans] == [("image", 80), ("audio", 25)]
    for span, item in zip(spans, (photo, clip), strict=True):
        assert span.digest == item.digest
        assert set(tokens[span.start : span.start + span.n_tokens]) == {placeholder_token(item.digest)}
        assert tokens[span.start - 1] >= 0 and tokens[span.start + span.n_tokens] >= 0  # <|image> ... <image|>
    for span in spans:
        runtime.backend.release_media(span)  # type: ignore[union-attr]


def test_media_requests_generate_and_text_streams_keep_running(runtime: Runtime) -> None:
    async def scenario() -> list[object]:
        return await asyncio.gather(
            generate(runtime, image(64, 48, seed=1), max_tokens=6),
            generate(runtime, wav(2.0), max_tokens=6),
            generate(runtime, max_tokens=12, text="Plain text, no media."),
        )

    results = asyncio.run(scenario())
    for _text, finished in results:  # type: ignore[misc]
        assert finished.error is None and finished.completion_tokens >= 1
    assert runtime.scheduler.stats.media_evals == 2
    assert runtime.scheduler.stats.media_eval_seconds > 0


def test_the_same_photo_again_is_not_re_encoded_another_is(runtime: Runtime) -> None:
    photo = image(64, 48, seed=3)
    first_text, first = asyncio.run(generate(runtime, photo))  # type: ignore[misc]
    evals = runtime.scheduler.stats.media_evals
    again_text, again = asyncio.run(generate(runtime, photo))  # type: ignore[misc]
    assert again.cached_tokens > 80  # the whole photo came from the prefix cache
    assert runtime.scheduler.stats.media_evals == evals
    assert again_text == first_text  # and the KV it reused is the photo's
    other_text, other = asyncio.run(generate(runtime, image(64, 48, seed=4)))  # type: ignore[misc]
    assert runtime.scheduler.stats.media_evals == evals + 1  # a different photo is encoded
    assert other.cached_tokens < first.prompt_tokens - 80


def test_a_too_thin_image_is_refused_before_it_can_abort_the_process(runtime: Runtime) -> None:
    thin = image(16000, 1)
    with pytest.raises(BadRequestError) as caught:
        runtime.chat_prompt_with_media(ask(thin), media=(thin,))
    assert caught.value.param == thin.where and f"at most {MAX_IMAGE_TOKENS}" in caught.value.message


def test_a_clip_longer_than_the_limit_and_undecodable_audio_are_400s(runtime: Runtime) -> None:
    with pytest.raises(BadRequestError, match="at most 30 s"):
        runtime.chat_prompt_with_media(ask(wav(31.0)), media=(wav(31.0),), max_audio_seconds=30)
    junk = MediaItem("audio", b"RIFF....not audio", 0, 0, "ab" * 32, "messages.2.content.0")
    with pytest.raises(BadRequestError) as caught:
        runtime.chat_prompt_with_media(ask(junk), media=(junk,))
    assert caught.value.param == "messages.2.content.0"
    assert asyncio.run(generate(runtime, image(40, 30)))[1].error is None  # type: ignore[index]


def test_a_text_only_model_says_so(tmp_path: Path, tiny_gguf: Path) -> None:
    engine = {"n_ctx": 1024, "n_parallel": 1, "n_threads": 1, "n_threads_batch": 1}
    rt = open_runtime(load_settings(state_dir=tmp_path, model=str(tiny_gguf), engine=engine))
    try:
        assert rt.backend.info.modalities == ("text",)
        with pytest.raises(BadRequestError, match="served text-only"):
            rt.chat_prompt_with_media(ask(image(40, 30)), media=(image(40, 30),))
    finally:
        rt.close()


def test_cancel_and_deadline_during_encoding_free_the_slot(runtime: Runtime) -> None:
    """Encoding holds the engine thread; a cancel or deadline that arrives meanwhile takes effect as it ends."""
    import threading
    import time
    from dataclasses import replace

    backend = runtime.backend
    encode = backend.encode_media  # type: ignore[union-attr]
    entered, release = threading.Event(), threading.Event()

    def slow_encode(span: object) -> None:
        entered.set()
        release.wait(10)
        encode(span)  # type: ignore[arg-type]

    backend.encode_media = slow_encode  # type: ignore[union-attr]

    async def scenario(deadline_s: float | None, cancel: bool) -> tuple[object, object]:
        entered.clear()
        release.clear()
        photo = image(48, 48, seed=int(deadline_s or 0) + cancel)
        tokens, spans = runtime.chat_prompt_with_media(ask(photo), media=(photo,))
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        request = replace(runtime.request(tokens, sampling=GREEDY, max_tokens=50, deadline=deadline), media=spans)
        stream = runtime.scheduler.submit(request)
        await asyncio.to_thread(entered.wait, 10)
        if cancel:
            stream.cancel()
        else:
            await asyncio.sleep(deadline_s or 0)
        release.set()
        try:
            await stream.collect()
        except Exception as exc:  # a deadline before any text raises
            return exc, spans[0]
        return stream.result, spans[0]

    cancelled, span = asyncio.run(scenario(None, cancel=True))
    assert getattr(cancelled, "reason", None) == "cancelled"
    assert span.handle is None  # its encoded input was let go
    expired, _ = asyncio.run(scenario(0.2, cancel=False))
    assert getattr(expired, "reason", None) == "deadline" or "deadline" in str(expired)
    assert runtime.scheduler.idle() and runtime.scheduler.stats.active == 0
    backend.encode_media = encode  # type: ignore[union-attr]
    assert asyncio.run(generate(runtime, image(40, 30)))[1].error is None  # type: ignore[index]


def test_encode_and_embedding_decode_are_separate_steps_with_streams_decoding_between(runtime: Runtime) -> None:
    """A stream's longest stall is one of the two (the encoder, or the text model over the embeddings), never both."""
    backend = runtime.backend
    stats = runtime.scheduler.stats
    encode, decode = backend.encode_media, backend.decode_media  # type: ignore[union-attr]
    seen: list[tuple[str, int, int]] = []

    def spy_encode(span: object) -> None:
        seen.append(("encode", stats.steps, stats.generated_tokens))
        encode(span)  # type: ignore[arg-type]

    def spy_decode(seq: int, span: object, pos: int) -> None:
        seen.append(("decode", stats.steps, stats.generated_tokens))
        decode(seq, span, pos)  # type: ignore[arg-type]

    backend.encode_media, backend.decode_media = spy_encode, spy_decode  # type: ignore[union-attr]

    async def scenario() -> None:
        async def text() -> object:
            return await generate(runtime, max_tokens=40, text="A long plain answer please.")

        streaming = asyncio.ensure_future(text())
        while stats.generated_tokens < 2:  # the text stream is decoding before the photo arrives
            await asyncio.sleep(0.001)
        await generate(runtime, image(64, 48, seed=11), max_tokens=2)
        await streaming

    try:
        asyncio.run(scenario())
    finally:
        backend.encode_media, backend.decode_media = encode, decode  # type: ignore[union-attr]
    [(first, step_a, tokens_a), (second, step_b, tokens_b)] = seen
    assert (first, second) == ("encode", "decode")
    assert step_b > step_a  # not in the same scheduler step
    assert tokens_b > tokens_a  # the text stream generated between the two
