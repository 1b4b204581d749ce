"""Synthetic media for tests: a sine-tone WAV and random-pixel images, made on the spot (nothing downloaded)."""

from __future__ import annotations

import io
import wave

import numpy as np


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    """16-bit mono PCM: a 440 Hz tone with a slow sweep, so the projector's mel frames differ."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * (440 + 200 * t) * t) * 12000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.tobytes())
    return out.getvalue()


def noise_rgb(width: int, height: int, seed: int = 0) -> bytes:
    """Packed RGB pixels, random but the same for a seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()


def noise_png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.frombuffer(noise_rgb(width, height, seed), dtype=np.uint8).reshape(height, width, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
