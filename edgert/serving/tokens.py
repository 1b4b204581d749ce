"""Token bytes -> text deltas: UTF-8-safe detokenizing and stop strings.

Runs on the engine thread, once per sampled token, so it stays cheap: an
incremental UTF-8 decoder (a multi-byte character split across tokens is held
until it is complete) and a hold-back buffer no longer than the longest stop
string (text that could still be the start of a stop string is not emitted yet).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TextStep:
    #: text safe to send to the client now
    delta: str
    #: a stop string was found; ``delta`` ends right before it
    stopped: bool


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def feed(self, piece: bytes) -> TextStep:
        text = self._held + self._decoder.decode(piece)
        if not self._stop:
            self._held = ""
            return TextStep(text, stopped=False)
        cut = self._earliest_stop(text)
        if cut is not None:
            self._held = ""
            return TextStep(text[:cut], stopped=True)
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return TextStep(text[: len(text) - keep], stopped=False)

    def flush(self) -> str:
        """Text still held back when generation ends for another reason."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _earliest_stop(self, text: str) -> int | None:
        positions = [pos for pos in (text.find(s) for s in self._stop) if pos >= 0]
        return min(positions) if positions else None

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-length:]):
                    best = length
                    break
        return best
