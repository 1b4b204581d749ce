"""Media in a chat request -> decoded, checked inputs for the engine, in the order of their markers.

:func:`collect_media` walks the user messages' content parts; every image and audio clip becomes one
:class:`MediaInput`, and every refusal is a 400 (or 413 for bytes) whose message and ``param`` name
the part (``messages.1.content.2``). It runs on the worker thread that tokenizes the prompt: decoding
a 12 MP JPEG costs tens of milliseconds, and an allowed remote URL is fetched here.

Images are decoded with Pillow (JPEG, PNG, WebP; the first frame of an animation): the pixel count
is checked from the header before any pixel is decoded (a 1 KB PNG can announce 10^10 pixels), EXIF
orientation is applied (phone photos are stored sideways), alpha is dropped as llama.cpp's loader
does, and the longest side is brought down to ``serve.media_max_side``. libmtmd resizes every image
to the projector's own budget anyway (Gemma 4: 70 to 1120 tokens of 48x48 px), so a larger image
gains nothing but costs memory and resize time; the cap also keeps very thin images within the
token budget whose overflow aborts libmtmd. Audio is checked, not decoded (:mod:`edgert.media.audio`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from edgert.errors import BadRequestError, PayloadTooLargeError
from edgert.media.audio import mp3_seconds, wav_seconds
from edgert.media.parts import ImageUrlPart, InputAudioPart
from edgert.media.remote import AllowedHost, fetch, parse_host_entry
from edgert.settings import ServeSettings

#: the only image formats accepted: what phones, cameras and browsers send. Pillow opens a camera's
#: multi-picture JPEG (MPO: a photo plus previews or a stereo pair) as format "MPO"; its first picture is used.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
#: the longest side of an image sent with ``detail: "low"`` (OpenAI's low detail is a 512 px image)
LOW_DETAIL_SIDE = 512


@dataclass(frozen=True, slots=True)
class MediaInput:
    """One medium of a request, ready for libmtmd; its marker is the n-th :data:`MEDIA_MARKER` of the prompt."""

    kind: Literal["image", "audio"]
    #: the part, for every error about it: "messages.1.content.2"
    where: str
    #: image: packed RGB, width * height * 3 bytes; audio: the encoded file as sent (mtmd decodes it)
    data: bytes
    width: int
    height: int
    format: Literal["jpeg", "png", "webp", "wav", "mp3"]
    #: SHA-256 hex of what the encoder gets (image: size and pixels; audio: the file): the prefix-cache key
    digest: str
    #: audio: the clip's length (0.0 for images)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """The ``serve.media_*`` settings, as :func:`collect_media` and the engine's audio decoding use them."""

    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_side: int = 2048
    max_count: int = 8
    #: longer clips are refused; the backend passes it to mtmd, which splits longer audio into 30 s windows
    max_audio_seconds: float = 30.0
    url_hosts: tuple[AllowedHost, ...] = ()
    url_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, serve: ServeSettings) -> MediaLimits:
        return cls(
            max_bytes=serve.media_max_bytes,
            max_pixels=serve.media_max_pixels,
            max_side=serve.media_max_side,
            max_count=serve.media_max_per_request,
            max_audio_seconds=serve.media_max_audio_seconds,
            url_hosts=tuple(parse_host_entry(entry) for entry in serve.media_url_hosts),
            url_timeout_s=serve.media_url_timeout_s,
        )


class ChatMessageLike(Protocol):
    """What :func:`collect_media` reads of a chat message (:class:`edgert.api.schemas.ChatMessage`)."""

    @property
    def content(self) -> str | Sequence[object] | None: ...


def collect_media(messages: Sequence[ChatMessageLike], limits: MediaLimits) -> list[MediaInput]:
    """Every medium of the messages, decoded and checked, in the order their markers take in the prompt."""
    parts: list[tuple[str, ImageUrlPart | InputAudioPart]] = []
    for index, message in enumerate(messages):
        if isinstance(message.content, str) or message.content is None:
            continue
        for number, part in enumerate(message.content):
            if isinstance(part, ImageUrlPart | InputAudioPart):  # the schema allows them in user turns only
                parts.append((f"messages.{index}.content.{number}", part))
    if len(parts) > limits.max_count:
        where = parts[limits.max_count][0]
        raise BadRequestError(
            f"{where}: a request may carry at most {limits.max_count} images and audio clips; this one has "
            f"{len(parts)} (serve.media_max_per_request)",
            param=where,
        )
    return [
        _image(part, where, limits) if isinstance(part, ImageUrlPart) else _audio(part, where, limits)
        for where, part in parts
    ]


def _image(part: ImageUrlPart, where: str, limits: MediaLimits) -> MediaInput:
    url = part.image_url.url
    if url.startswith("data:"):
        encoded = _data_url(url, "image/", where)
        data = _base64(encoded, where, limits.max_bytes)
    else:
        data = fetch(url, limits.url_hosts, max_bytes=limits.max_bytes, timeout_s=limits.url_timeout_s, where=where)
    side = min(limits.max_side, LOW_DETAIL_SIDE) if part.image_url.detail == "low" else limits.max_side
    return decode_image(data, where, max_pixels=limits.max_pixels, max_side=side)


def _audio(part: InputAudioPart, where: str, limits: MediaLimits) -> MediaInput:
    encoded = part.input_audio.data
    if encoded.startswith("data:"):
        encoded = _data_url(encoded, "audio/", where)
    data = _base64(encoded, where, limits.max_bytes)
    fmt = part.input_audio.format
    if fmt == "wav":
        seconds = wav_seconds(data, where)
    else:
        seconds = mp3_seconds(data, where, stop_after_s=limits.max_audio_seconds)
    if seconds > limits.max_audio_seconds:
        raise BadRequestError(
            f"{where}: the audio clip is longer than {limits.max_audio_seconds:g} s (serve.media_max_audio_seconds); "
            f"split it and send the parts in turn",
            param=where,
        )
    return MediaInput("audio", where, data, 0, 0, fmt, hashlib.sha256(data).hexdigest(), seconds)


def _data_url(url: str, family: str, where: str) -> str:
    """The base64 payload of ``data:<family>...;base64,<payload>``."""
    header, comma, payload = url.partition(",")
    media_type = header[len("data:") :].split(";", 1)[0].strip().lower()
    if not comma or not header.endswith(";base64"):
        raise BadRequestError(f"{where}: expected a data:{family}...;base64,<data> URL", param=where)
    if not media_type.startswith(family):
        raise BadRequestError(f"{where}: a data URL of type {media_type!r}; expected {family}*", param=where)
    return payload


def _base64(encoded: str, where: str, max_bytes: int) -> bytes:
    # Refused before decoding: 4 characters carry 3 bytes, so the decoded size is known from the length.
    if len(encoded) // 4 * 3 > max_bytes + 2:
        raise PayloadTooLargeError(
            f"{where}: about {len(encoded) // 4 * 3} bytes, more than the {max_bytes} a medium may have "
            f"(serve.media_max_bytes)",
            param=where,
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{where}: not valid base64 ({exc})", param=where) from None
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"{where}: {len(data)} bytes, more than the {max_bytes} a medium may have (serve.media_max_bytes)",
            param=where,
        )
    if not data:
        raise BadRequestError(f"{where}: the medium is empty", param=where)
    return data


def decode_image(data: bytes, where: str, *, max_pixels: int, max_side: int) -> MediaInput:
    """JPEG/PNG/WebP bytes -> upright RGB of at most ``max_side`` px on its longest side."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise BadRequestError(f"{where}: not a JPEG, PNG or WebP image", param=where) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (89 M pixels) fires on open, before ours could; with warnings as errors too
        raise BadRequestError(f"{where}: the image has more pixels than {max_pixels}", param=where) from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header Pillow cannot parse
        raise BadRequestError(f"{where}: unreadable image ({exc})", param=where) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:  # from the header: nothing is decoded yet
            raise BadRequestError(
                f"{where}: the image is {width}x{height} = {width * height} pixels, more than {max_pixels} "
                f"(serve.media_max_pixels)",
                param=where,
            )
        fmt = image.format
        try:
            rgb = _upright_rgb(image, max_side)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
            raise BadRequestError(f"{where}: the {fmt} image is corrupt or truncated ({exc})", param=where) from None
    pixels = rgb.tobytes()
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + pixels).hexdigest()
    fmt_name: Literal["jpeg", "png", "webp"] = "png" if fmt == "PNG" else "webp" if fmt == "WEBP" else "jpeg"
    return MediaInput("image", where, pixels, rgb.width, rgb.height, fmt_name, digest)


def _upright_rgb(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if image.format in ("JPEG", "MPO") and scale < 1:
        # JPEG decodes at 1/2, 1/4 or 1/8 scale for free, to no less than the size asked for: a 48 MP
        # photo need not be decoded in full to end at 2048 px (the resize below finishes the job).
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    upright = ImageOps.exif_transpose(image)
    if upright.mode in ("I;16", "I;16B", "I;16L", "I"):
        upright = upright.point(lambda value: value / 256).convert("L")  # 16-bit grey: keep the top 8 bits
    rgb = upright.convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb
