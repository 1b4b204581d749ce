"""Audio checks before a clip is queued: is it the format it claims, and how long is it.

No audio is decoded here: libmtmd decodes WAV and MP3 itself (miniaudio, resampled to 16 kHz mono).
What this module does is refuse, with a 400 naming the part, what miniaudio would choke on or what
is longer than ``serve.media_max_audio_seconds``, before the clip takes a queue slot.

- WAV is read with the stdlib :mod:`wave` module: integer PCM only (8/16/24/32-bit; float,
  A-law and compressed WAVs are refused), every frame the header announces must be present.
- MP3 has no header with a length, so its MPEG audio frames are walked (each names its bitrate,
  sample rate and samples), an ID3v2 tag skipped; the sum of their samples is the duration. A
  Xing/Info or VBRI header in the first frame announces a frame count, which miniaudio trusts (it
  sizes its output by it: a 5 KB file announcing an hour would make it allocate an hour of samples),
  so the longer of the two is the clip's length.
"""

from __future__ import annotations

import io
import wave
from typing import Final

from edgert.errors import BadRequestError

# Bitrates in kbit/s by bitrate index 1-14 (0 = "free", 15 = invalid), per MPEG version and layer.
_BITRATES: Final = {
    (1, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (2, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
#: sample rates by the header's 2-bit version field (0 = MPEG 2.5, 2 = MPEG 2, 3 = MPEG 1)
_SAMPLE_RATES: Final = {0: (11025, 12000, 8000), 2: (22050, 24000, 16000), 3: (44100, 48000, 32000)}
_ID3V2_HEADER = 10


def wav_seconds(data: bytes, where: str) -> float:
    """The length of a PCM WAV file; a 400 naming ``where`` for anything else."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            channels, width, rate, frames = (
                reader.getnchannels(),
                reader.getsampwidth(),
                reader.getframerate(),
                reader.getnframes(),
            )
            present = len(reader.readframes(frames)) // max(1, channels * width)
    except wave.Error as exc:
        # the stdlib names the cause: "unknown format: 3" (IEEE float), "file does not start with RIFF id"
        raise BadRequestError(
            f"{where}: not a PCM WAV file ({exc}); send 8/16/24/32-bit integer PCM, or MP3", param=where
        ) from None
    except EOFError:
        raise BadRequestError(f"{where}: the WAV file is truncated inside its header", param=where) from None
    if channels < 1 or rate < 1:
        raise BadRequestError(f"{where}: the WAV header has {channels} channels at {rate} Hz", param=where)
    if frames == 0:
        raise BadRequestError(f"{where}: the WAV file holds no samples", param=where)
    if present < frames:
        raise BadRequestError(
            f"{where}: the WAV file is truncated: its header announces {frames} frames, {present} are present",
            param=where,
        )
    return frames / rate


def mp3_seconds(data: bytes, where: str, *, stop_after_s: float | None = None) -> float:
    """The length of an MP3 file by its frames; a 400 naming ``where`` when it has none.

    ``stop_after_s``: stop counting once past this (the caller refuses anything longer anyway).
    """
    position = _skip_id3v2(data)
    frames = 0
    seconds = 0.0
    announced = 0.0
    while position + 4 <= len(data):
        header = _frame(data, position)
        if header is None:
            break  # after the last frame: an ID3v1 / APE tag or trailing bytes, which decoders skip
        length, samples, rate = header
        if frames == 0:
            if position + length + 4 <= len(data) and _frame(data, position + length) is None:
                break  # a lone sync pattern in noise is not an MP3: the next frame must follow at once
            announced = _announced_frames(data, position) * samples / rate
        frames += 1
        seconds += samples / rate
        if stop_after_s is not None and max(seconds, announced) > stop_after_s:
            break
        position += length
    if frames == 0:
        raise BadRequestError(f"{where}: not an MP3 file (no MPEG audio frame where one must start)", param=where)
    return max(seconds, announced)


def _skip_id3v2(data: bytes) -> int:
    if len(data) < _ID3V2_HEADER or data[:3] != b"ID3":
        return 0
    size = 0
    for byte in data[6:10]:  # "synchsafe": 7 bits per byte
        size = (size << 7) | (byte & 0x7F)
    footer = _ID3V2_HEADER if data[5] & 0x10 else 0
    return _ID3V2_HEADER + size + footer


def _announced_frames(data: bytes, position: int) -> int:
    """The frame count a Xing/Info or VBRI header in the frame at ``position`` announces; 0 without one."""
    mpeg1, mono = (data[position + 1] >> 3) & 3 == 3, data[position + 3] >> 6 == 3
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    xing = position + 4 + side_info
    flags = data[xing + 4 : xing + 8]
    if data[xing : xing + 4] in (b"Xing", b"Info") and len(flags) == 4 and flags[3] & 1:
        return int.from_bytes(data[xing + 8 : xing + 12], "big")  # flag bit 0: the frame count follows
    vbri = position + 36
    if data[vbri : vbri + 4] == b"VBRI":
        return int.from_bytes(data[vbri + 14 : vbri + 18], "big")
    return 0


def _frame(data: bytes, position: int) -> tuple[int, int, int] | None:
    """(frame bytes, samples, sample rate) of the MPEG audio frame header at ``position``, or None."""
    b0, b1, b2 = data[position], data[position + 1], data[position + 2]
    if b0 != 0xFF or b1 & 0xE0 != 0xE0:
        return None
    version_bits, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version_bits == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values, and "free format" bitrates, which no common encoder writes
    layer = 4 - layer_bits
    mpeg1 = version_bits == 3
    bitrate = _BITRATES[(1 if mpeg1 else 2, layer)][bitrate_index - 1] * 1000
    rate = _SAMPLE_RATES[version_bits][rate_index]
    samples = 384 if layer == 1 else 1152 if layer == 2 or mpeg1 else 576
    length = samples // 8 * bitrate // rate + padding * (4 if layer == 1 else 1)
    return length, samples, rate
