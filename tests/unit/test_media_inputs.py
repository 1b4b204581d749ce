"""Media in chat requests: content parts, decoding, limits and refusals (edgert.media).

Every medium is made here: images with Pillow, WAV with the stdlib ``wave`` module; the one MP3 is
tests/fixtures/speech-0.6s.mp3 (25 frames cut from llama.cpp's tools/mtmd/test-2.mp3, 5 KB).
"""

from __future__ import annotations

import base64
import io
import struct
import time
import wave
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from edgert.api.schemas import ChatCompletionRequest, ChatMessage
from edgert.errors import BadRequestError, PayloadTooLargeError
from edgert.media import MEDIA_MARKER, MediaLimits, collect_media
from edgert.media.audio import mp3_seconds
from edgert.media.remote import AllowedHost, check_url, parse_host_entry
from edgert.settings import ServeSettings

MP3 = Path(__file__).parents[1] / "fixtures" / "speech-0.6s.mp3"
RED, BLUE = (255, 0, 0), (0, 0, 255)


# ------------------------------------------------------------------ making media
def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def halves(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue: where each lands shows the orientation."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image.convert(mode) if mode != "RGB" else image


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    image_url: dict[str, Any] = {"url": url}
    if detail is not None:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def audio_part(data: bytes | str, fmt: str) -> dict[str, Any]:
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode()
    return {"type": "input_audio", "input_audio": {"data": encoded, "format": fmt}}


def wav(seconds: float, *, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    frames = int(seconds * rate)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames * width * channels))
    return out.getvalue()


def float_wav(frames: int = 1600, rate: int = 16000) -> bytes:
    """IEEE-float WAV (format tag 3), which miniaudio reads but edgert's PCM-only rule refuses."""
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    data = bytes(frames * 4)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces ``width`` x ``height`` in 66 bytes: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def request(*contents: list[dict[str, Any]] | str, role: str = "user") -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": role, "content": content} for content in contents]}
    )


def collect(*parts: dict[str, Any], limits: MediaLimits | None = None) -> list[Any]:
    return collect_media(request(list(parts)).messages, limits or MediaLimits())


def refusal(*parts: dict[str, Any], limits: MediaLimits | None = None) -> BadRequestError:
    with pytest.raises(BadRequestError) as caught:
        collect(*parts, limits=limits)
    return caught.value


# ------------------------------------------------------------------ schema and template
def test_parts_keep_their_order_and_the_template_sees_a_marker_for_each_medium() -> None:
    image = data_url(encode(halves(40, 30), "PNG"))
    body = request(
        [
            {"type": "text", "text": "Compare "},
            image_part(image),
            {"type": "text", "text": " with "},
            audio_part(wav(0.5), "wav"),
            {"type": "text", "text": "."},
        ]
    )
    assert body.messages[0].text() == "Compare  with ."  # the size bound counts text only
    assert body.message_dicts()[0]["content"] == f"Compare {MEDIA_MARKER} with {MEDIA_MARKER}."
    media = collect_media(body.messages, MediaLimits())
    assert [(m.kind, m.where, m.format) for m in media] == [
        ("image", "messages.0.content.1", "png"),
        ("audio", "messages.0.content.3", "wav"),
    ]


def test_the_marker_is_random_per_process_and_not_in_plain_text() -> None:
    assert MEDIA_MARKER.startswith("<__media_") and MEDIA_MARKER.endswith("__>")
    assert len(MEDIA_MARKER) == len("<__media_") + 32 + len("__>")
    assert ChatMessage(role="user", content="<__media_x__>").template_dict()["content"] == "<__media_x__>"


@pytest.mark.parametrize("role", ["system", "assistant", "developer"])
def test_media_outside_user_messages_is_a_400_naming_the_part(role: str) -> None:
    parts = [{"type": "text", "text": "look"}, image_part(data_url(encode(halves(8, 8), "PNG")))]
    with pytest.raises(BadRequestError) as caught:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": role, "content": parts}, {"role": "user", "content": "hi"}]}
        )
    assert caught.value.param == "messages.0.content.1"
    assert "user messages only" in caught.value.message


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_video", "input_video": {"data": "AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}},
        {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": {"url": "data:,", "detail": "ultra"}},
    ],
)
def test_malformed_parts_fail_validation(part: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        request([part])


# ------------------------------------------------------------------ images
@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_jpeg_png_and_webp_become_packed_rgb(fmt: str, name: str) -> None:
    (image,) = collect(image_part(data_url(encode(halves(64, 32), fmt, quality=95), f"image/{name}")))
    assert (image.kind, image.format, image.width, image.height) == ("image", name, 64, 32)
    assert len(image.data) == 64 * 32 * 3
    decoded = Image.frombytes("RGB", (64, 32), image.data)
    left, right = decoded.getpixel((8, 16)), decoded.getpixel((56, 16))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert left[0] > 200 and left[2] < 60  # red stays left, blue right: not mirrored, not rotated
    assert right[2] > 200 and right[0] < 60


def test_a_multi_picture_jpeg_is_a_jpeg_of_its_first_picture() -> None:
    mpo = encode(
        Image.new("RGB", (32, 24), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (32, 24), BLUE)]
    )
    (image,) = collect(image_part(data_url(mpo, "image/jpeg")))
    assert (image.format, image.width, image.height) == ("jpeg", 32, 24)
    assert image.data[0] > 200 and image.data[2] < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": how a phone held upright stores a landscape sensor frame
    stored = encode(halves(40, 20), "JPEG", exif=exif.tobytes(), quality=95)
    (image,) = collect(image_part(data_url(stored, "image/jpeg")))
    assert (image.width, image.height) == (20, 40)
    upright = Image.frombytes("RGB", (20, 40), image.data)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and bottom[2] > 200  # the left half (red) is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "1", "CMYK"])
def test_any_pixel_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    (image,) = collect(image_part(data_url(encode(halves(16, 8, mode), fmt))))
    assert len(image.data) == 16 * 8 * 3


def test_sixteen_bit_grey_keeps_its_brightness() -> None:
    grey = Image.new("I;16", (8, 8), 0x8000)  # mid grey on 16 bits
    (image,) = collect(image_part(data_url(encode(grey, "PNG"))))
    assert image.data[:3] == bytes([128, 128, 128])


def test_large_images_are_downscaled_to_the_longest_side_setting() -> None:
    big = encode(halves(3000, 1000), "PNG")
    (image,) = collect(image_part(data_url(big)))
    assert (image.width, image.height) == (2048, 683)
    (small,) = collect(image_part(data_url(big)), limits=MediaLimits(max_side=300))
    assert (small.width, small.height) == (300, 100)


def test_a_large_jpeg_is_drafted_then_resized_to_the_exact_bound() -> None:
    photo = encode(halves(4000, 3000), "JPEG", quality=80)
    url = data_url(photo, "image/jpeg")
    full, low = collect(image_part(url), image_part(url, "low"))  # low: decoded at 1/4 scale, then resized
    assert (full.width, full.height, low.width, low.height) == (2048, 1536, 512, 384)
    corner = Image.frombytes("RGB", (512, 384), low.data).getpixel((5, 5))
    assert isinstance(corner, tuple) and corner[0] > 200


def test_low_detail_means_512_px_and_a_different_cache_key() -> None:
    url = data_url(encode(halves(1024, 768), "PNG"))
    low, high, again = collect(image_part(url, "low"), image_part(url, "high"), image_part(url))
    assert (low.width, low.height) == (512, 384)
    assert (high.width, high.height) == (1024, 768)
    assert high.digest == again.digest != low.digest  # same pixels, same key; other pixels, another


def test_small_and_single_pixel_images_pass_unchanged() -> None:
    (image,) = collect(image_part(data_url(encode(Image.new("RGB", (1, 1), RED), "PNG"))))
    assert (image.width, image.height, image.data) == (1, 1, bytes(RED))


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_header_only(6000, 5000)  # 30 M pixels (90 MB of RGB) in 66 bytes
    started = time.perf_counter()
    error = refusal({"type": "text", "text": "hi"}, image_part(data_url(bomb)))
    assert time.perf_counter() - started < 1.0  # decoding 90 MB would not get here; a bound, not a benchmark
    assert error.param == "messages.0.content.1"
    assert "6000x5000" in error.message and "serve.media_max_pixels" in error.message


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (20_000, 20_000)])
def test_pillows_own_bomb_guard_is_a_400_too(width: int, height: int) -> None:
    # 100 M pixels: Pillow warns (an error under pytest's filter); 400 M: Pillow refuses to open it
    error = refusal(image_part(data_url(png_header_only(width, height))))
    assert error.param == "messages.0.content.0" and "pixels" in error.message


def test_the_pixel_limit_is_a_setting() -> None:
    url = data_url(encode(halves(100, 100), "PNG"))
    error = refusal(image_part(url), limits=MediaLimits(max_pixels=9_999))
    assert "10000 pixels" in error.message


def test_a_truncated_jpeg_is_a_400_naming_the_part() -> None:
    photo = encode(halves(256, 256), "JPEG")
    error = refusal({"type": "text", "text": "?"}, image_part(data_url(photo[: len(photo) // 2], "image/jpeg")))
    assert error.param == "messages.0.content.1"
    assert "corrupt or truncated" in error.message


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (encode(halves(8, 8), "GIF"), "not a JPEG, PNG or WebP"),
        (encode(halves(8, 8), "BMP"), "not a JPEG, PNG or WebP"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a JPEG, PNG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
    ],
)
def test_unknown_or_broken_formats_are_a_400(payload: bytes, needle: str) -> None:
    error = refusal(image_part(data_url(payload)))
    assert error.param == "messages.0.content.0" and needle in error.message


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("data:image/png;base64,iVBOR$$$", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # bad padding
        ("data:image/png;base64,", "empty"),
        ("data:image/png,rawbytes", "base64"),
        ("data:text/plain;base64,aGk=", "'text/plain'"),
        ("data:audio/wav;base64,aGk=", "expected image/*"),
    ],
)
def test_bad_data_urls_are_a_400_naming_the_part(url: str, needle: str) -> None:
    error = refusal({"type": "text", "text": "?"}, image_part(url))
    assert error.param == "messages.0.content.1" and needle in error.message


def test_bytes_per_medium_is_a_413_before_and_after_decoding() -> None:
    png = encode(halves(64, 64), "PNG")
    limits = MediaLimits(max_bytes=len(png) - 1)
    with pytest.raises(PayloadTooLargeError) as caught:
        collect(image_part(data_url(png)), limits=limits)
    assert caught.value.http_status == 413 and caught.value.param == "messages.0.content.0"
    with pytest.raises(PayloadTooLargeError):  # refused from the base64 length alone, never decoded
        collect(image_part("data:image/png;base64," + "A" * 4096), limits=MediaLimits(max_bytes=1024))


def test_media_per_request_is_limited_naming_the_first_one_too_many() -> None:
    url = data_url(encode(halves(8, 8), "PNG"))
    body = request([image_part(url), image_part(url)], [{"type": "text", "text": "and"}, image_part(url)])
    with pytest.raises(BadRequestError) as caught:
        collect_media(body.messages, MediaLimits(max_count=2))
    assert caught.value.param == "messages.1.content.1"
    assert "at most 2" in caught.value.message
    assert len(collect_media(body.messages, MediaLimits(max_count=3))) == 3


# ------------------------------------------------------------------ audio
def test_pcm_wav_passes_through_with_its_length() -> None:
    clip = wav(1.5, rate=16000, width=2, channels=2)
    (audio,) = collect(audio_part(clip, "wav"))
    assert (audio.kind, audio.format, audio.data, audio.width, audio.height) == ("audio", "wav", clip, 0, 0)
    assert audio.seconds == pytest.approx(1.5)
    assert len(audio.digest) == 64


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_integer_pcm_width_is_accepted(width: int) -> None:
    (audio,) = collect(audio_part(wav(0.25, rate=8000, width=width), "wav"))
    assert audio.seconds == pytest.approx(0.25)


def test_a_float_wav_is_a_400_naming_the_part() -> None:
    error = refusal({"type": "text", "text": "transcribe"}, audio_part(float_wav(), "wav"))
    assert error.param == "messages.0.content.1"
    assert "not a PCM WAV" in error.message and "unknown format: 3" in error.message


def test_a_truncated_wav_is_a_400() -> None:
    clip = wav(1.0)
    error = refusal(audio_part(clip[: len(clip) // 2], "wav"))
    assert "truncated" in error.message and error.param == "messages.0.content.0"
    assert "header" in refusal(audio_part(clip[:30], "wav")).message


def test_an_empty_wav_and_mp3_bytes_sent_as_wav_are_a_400() -> None:
    assert "no samples" in refusal(audio_part(wav(0.0), "wav")).message
    assert "not a PCM WAV" in refusal(audio_part(MP3.read_bytes(), "wav")).message


def test_audio_longer_than_the_limit_is_refused() -> None:
    error = refusal(audio_part(wav(31.0, rate=1000, width=1), "wav"))
    assert "longer than 30 s" in error.message and "serve.media_max_audio_seconds" in error.message
    (audio,) = collect(audio_part(wav(29.9, rate=1000, width=1), "wav"))
    assert audio.seconds == pytest.approx(29.9)
    assert refusal(audio_part(wav(2.0), "wav"), limits=MediaLimits(max_audio_seconds=1.5)).param


def test_an_mp3_passes_through_with_its_length_from_its_frames() -> None:
    clip = MP3.read_bytes()
    (audio,) = collect(audio_part(clip, "mp3"))
    assert (audio.format, audio.data) == ("mp3", clip)
    assert audio.seconds == pytest.approx(25 * 1152 / 44100)
    assert "longer than 0.5 s" in refusal(audio_part(clip, "mp3"), limits=MediaLimits(max_audio_seconds=0.5)).message


def test_an_mp3_whose_info_header_announces_more_frames_counts_as_that_long() -> None:
    # miniaudio sizes its output by the Xing/Info frame count: a short file announcing an hour is an hour
    clip = MP3.read_bytes()
    id3 = 10 + int.from_bytes(clip[6:10], "big")  # the fixture's ID3 size bytes are all < 0x80
    length = 144 * 64000 // 44100 + (clip[id3 + 2] >> 1 & 1)  # 64 kbit/s at 44.1 kHz, plus its padding bit
    frame = bytearray(clip[id3 : id3 + length])
    frame[4:] = bytes(len(frame) - 4)
    frame[4 + 17 : 4 + 17 + 12] = b"Info" + (1).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # mono MPEG-1
    forged = clip[:id3] + bytes(frame) + clip[id3:]
    assert mp3_seconds(forged, "x") == pytest.approx(100_000 * 1152 / 44100)
    assert "longer than 30 s" in refusal(audio_part(forged, "mp3")).message


@pytest.mark.parametrize("payload", [b"ID3" + bytes(20), bytes(4096), wav(0.5), b"\xff\xfb" + bytes(30)])
def test_bytes_that_are_no_mp3_are_a_400(payload: bytes) -> None:
    error = refusal({"type": "text", "text": "?"}, audio_part(payload, "mp3"))
    assert error.param == "messages.0.content.1" and "not an MP3" in error.message


def test_audio_may_come_as_a_data_url_but_base64_must_be_strict() -> None:
    (audio,) = collect(audio_part(data_url(wav(0.5), "audio/wav"), "wav"))
    assert audio.seconds == pytest.approx(0.5)
    encoded = base64.b64encode(wav(0.5)).decode()
    assert "not valid base64" in refusal(audio_part(encoded[:40] + "\n" + encoded[40:], "wav")).message
    assert "expected audio/*" in refusal(audio_part(data_url(wav(0.5), "image/png"), "wav")).message


# ------------------------------------------------------------------ URL policy (fetching: tests/integration)
@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://example.com/cat.jpg", "remote image URLs are refused"),
        ("http://169.254.169.254/latest/meta-data", "remote image URLs are refused"),
        ("file:///etc/passwd", "file:// URLs are never read"),
        ("ftp://example.com/cat.jpg", "unsupported URL scheme"),
        ("cat.jpg", "unsupported URL scheme"),
    ],
)
def test_urls_are_refused_by_default(url: str, needle: str) -> None:
    error = refusal({"type": "text", "text": "?"}, image_part(url))
    assert error.param == "messages.0.content.1" and needle in error.message


def test_file_urls_are_refused_even_for_an_allowed_host() -> None:
    hosts = (parse_host_entry("localhost"), parse_host_entry("http://localhost"))
    with pytest.raises(BadRequestError, match="never read"):
        check_url("file://localhost/etc/passwd", hosts, "messages.0.content.0")


@pytest.mark.parametrize(
    ("entry", "allowed"),
    [
        ("images.example.com", AllowedHost("https", "images.example.com", 443)),
        ("Images.Example.com:8443", AllowedHost("https", "images.example.com", 8443)),
        ("http://cam.local", AllowedHost("http", "cam.local", 80)),
        ("http://127.0.0.1:8080/", AllowedHost("http", "127.0.0.1", 8080)),
    ],
)
def test_host_entries(entry: str, allowed: AllowedHost) -> None:
    assert parse_host_entry(entry) == allowed


def test_an_allowlisted_host_allows_only_its_scheme_and_port() -> None:
    hosts = (parse_host_entry("images.example.com"),)
    check_url("https://images.example.com/a.jpg", hosts, "p")
    check_url("https://IMAGES.example.com:443/a.jpg?x=1", hosts, "p")
    for url in ("http://images.example.com/a.jpg", "https://images.example.com:8443/a.jpg", "https://example.com/"):
        with pytest.raises(BadRequestError, match="refused"):
            check_url(url, hosts, "p")


@pytest.mark.parametrize("entry", ["https://host/path", "ftp://host", "user@host", "host name", "*.example.com"])
def test_bad_host_entries_are_refused_at_load(entry: str) -> None:
    with pytest.raises(ValidationError):
        ServeSettings(media_url_hosts=[entry])


def test_limits_come_from_the_serve_settings() -> None:
    serve = ServeSettings(
        media_max_bytes=2048,
        media_max_pixels=1000,
        media_max_side=100,
        media_max_per_request=1,
        media_max_audio_seconds=5,
        media_url_hosts=["cdn.example.com", "http://cam.local:8080"],
        media_url_timeout_s=3,
    )
    assert MediaLimits.from_settings(serve) == MediaLimits(
        max_bytes=2048,
        max_pixels=1000,
        max_side=100,
        max_count=1,
        max_audio_seconds=5.0,
        url_hosts=(AllowedHost("https", "cdn.example.com", 443), AllowedHost("http", "cam.local", 8080)),
        url_timeout_s=3.0,
    )
    defaults = MediaLimits.from_settings(ServeSettings())
    assert defaults == MediaLimits()  # the dataclass defaults are the settings' defaults
