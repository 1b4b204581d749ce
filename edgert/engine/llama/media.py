"""Images and audio through libmtmd: the projector beside a llama.cpp model.

A :class:`Projector` owns one ``mtmd_context`` (the vision and/or audio encoder of a Gemma 4
``mmproj`` GGUF). It turns a rendered prompt whose media markers stand for the request's media into
text tokens plus :class:`~edgert.engine.base.MediaSpan` pieces (``mtmd_tokenize``, on the caller's
thread: it only decodes and counts), and evaluates one span into a sequence of the model's context on
the engine thread in two calls a scheduler step apart: :meth:`Projector.encode` (the vision/audio
encoder) and :meth:`Projector.decode` (the text model over the embeddings), so running streams decode
between them and never wait longer than the longer of the two.

Placeholder tokens: a span's positions carry a negative id derived from the medium's digest. They
never reach llama.cpp (the span is evaluated as embeddings); they make the prefix cache, which
compares token sequences, tell two photos apart and recognise the same one again.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd

from edgert.engine.base import MediaItem, MediaSpan
from edgert.engine.llama.process import log_reason
from edgert.errors import BadRequestError, EngineError, ModelLoadError

log = logging.getLogger("edgert.engine")

#: clip.cpp bounds a Gemma 4 image to 70..1120 tokens; a very thin image can still come out longer, and
#: encoding it reads past the projector's position table and aborts the process, so it is refused first.
MAX_IMAGE_TOKENS = 1120


def placeholder_token(digest: str) -> int:
    """A negative stand-in token for every position of the medium with this digest."""
    return -1 - int(digest[:15], 16) % (2**31 - 2)


class Projector:
    def __init__(self, path: Path, model: Any, *, n_threads: int, use_gpu: bool, marker: str) -> None:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self._marker = marker.encode()  # kept alive: mtmd keeps the pointer
        params.media_marker = self._marker
        self._ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not self._ctx:
            raise ModelLoadError(f"{path}: libmtmd could not load the projector for this model: {log_reason()}")
        self.vision = bool(mtmd.mtmd_support_vision(self._ctx))
        self.audio = bool(mtmd.mtmd_support_audio(self._ctx))
        self.sample_rate = int(mtmd.mtmd_get_audio_sample_rate(self._ctx)) if self.audio else 0

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image",) * self.vision + ("audio",) * self.audio

    # ------------------------------------------------------------ tokenizing
    def tokenize(
        self, text: str, media: list[MediaItem], *, add_special: bool, max_audio_seconds: float
    ) -> tuple[list[int], list[MediaSpan]]:
        bitmaps = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for item in media:
                bitmaps.append(self._bitmap(item, max_audio_seconds))
            raw = text.encode()
            inp = mtmd.mtmd_input_text(text=raw, text_len=len(raw), add_special=add_special, parse_special=True)
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
            if rc == 1:
                raise BadRequestError(
                    f"messages: {len(media)} media but the rendered prompt holds a different number of media "
                    "places (a text part may not contain the media marker)",
                    param="messages",
                )
            if rc != 0:
                raise BadRequestError(
                    f"messages: the projector could not preprocess the media ({rc})", param="messages"
                )
            return self._pieces(chunks, media)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, item: MediaItem, max_audio_seconds: float) -> Any:
        if item.kind == "image":
            if not self.vision:
                raise BadRequestError(f"{item.where}: this model's projector takes no images", param=item.where)
            if len(item.data) != item.width * item.height * 3:
                raise EngineError(f"{item.where}: image data is not width x height RGB")
            pixels = (ctypes.c_ubyte * len(item.data)).from_buffer_copy(item.data)
            bitmap = mtmd.mtmd_bitmap_init(item.width, item.height, pixels)
        else:
            if not self.audio:
                raise BadRequestError(f"{item.where}: this model's projector takes no audio", param=item.where)
            buffer = (ctypes.c_uint8 * len(item.data)).from_buffer_copy(item.data)
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buffer, len(item.data), False)
            if not bitmap or not mtmd.mtmd_bitmap_is_audio(bitmap):
                if bitmap:
                    mtmd.mtmd_bitmap_free(bitmap)
                raise BadRequestError(
                    f"{item.where}: the audio could not be decoded (WAV PCM or MP3 expected)", param=item.where
                )
            seconds = mtmd.mtmd_bitmap_get_n_bytes(bitmap) / 4 / self.sample_rate
            if seconds > max_audio_seconds:
                mtmd.mtmd_bitmap_free(bitmap)
                raise BadRequestError(
                    f"{item.where}: the clip is {seconds:.1f} s long; at most {max_audio_seconds:g} s per clip "
                    "(serve.media_max_audio_seconds)",
                    param=item.where,
                )
        if not bitmap:
            raise EngineError(f"{item.where}: libmtmd could not take the medium")
        mtmd.mtmd_bitmap_set_id(bitmap, item.digest.encode())
        return bitmap

    def _pieces(self, chunks: Any, media: list[MediaItem]) -> tuple[list[int], list[MediaSpan]]:
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        owners = iter(media)
        current: MediaItem | None = None
        try:
            for index in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, index)
                kind = mtmd.mtmd_input_chunk_get_type(chunk)
                if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t(0)
                    text_tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    tokens.extend(text_tokens[: count.value])
                    continue
                digest = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
                if current is None or current.digest != digest:
                    current = next(owners)  # a long clip comes as several chunks of one medium
                n_tokens = _checked_size(chunk, kind, current)
                kind_name = "image" if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE else "audio"
                spans.append(MediaSpan(len(tokens), n_tokens, kind_name, digest, mtmd.mtmd_input_chunk_copy(chunk)))
                tokens.extend([placeholder_token(digest)] * n_tokens)
        except BaseException:
            for span in spans:
                self.release(span)
            raise
        return tokens, spans

    # ------------------------------------------------------------ evaluating
    def encode(self, span: MediaSpan, n_embd: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Run the encoder on the medium; its embeddings, copied (the next encode overwrites mtmd's)."""
        if span.handle is None:
            raise EngineError("the medium was already evaluated or released")
        rc = mtmd.mtmd_encode_chunk(self._ctx, span.handle)
        if rc != 0:
            raise EngineError(f"libmtmd could not encode the {span.kind} ({rc}): {log_reason()}")
        out = mtmd.mtmd_get_output_embd(self._ctx)
        if not out:
            raise EngineError(f"libmtmd gave no embeddings for the {span.kind}")
        return np.ctypeslib.as_array(out, (span.n_tokens * n_embd,)).copy()

    def decode(
        self,
        lctx: Any,
        seq: int,
        span: MediaSpan,
        pos: int,
        embeddings: np.ndarray[Any, np.dtype[np.float32]],
        *,
        n_batch: int,
        n_ubatch: int,
    ) -> None:
        """Write encoded embeddings into ``seq`` from ``pos`` (a decode of the text model over them)."""
        if span.handle is None:
            raise EngineError("the medium was already evaluated or released")
        if span.n_tokens > n_ubatch and mtmd.mtmd_decode_use_non_causal(self._ctx, span.handle):
            # attention over these embeddings is non-causal: llama.cpp needs them in one micro-batch
            raise EngineError(f"the {span.kind} is {span.n_tokens} tokens; engine.n_ubatch must be at least that")
        new_pos = llama_cpp.llama_pos(0)
        data = embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        no_callback = mtmd.mtmd_helper_post_decode_callback()
        rc = mtmd.mtmd_helper_decode_image_chunk(
            self._ctx, lctx, span.handle, data, pos, seq, n_batch, ctypes.byref(new_pos), no_callback, None
        )
        if rc != 0:
            raise EngineError(f"llama.cpp could not take the {span.kind}'s embeddings ({rc}): {log_reason()}")
        if new_pos.value != pos + span.n_tokens:
            raise EngineError(f"the {span.kind} took {new_pos.value - pos} positions, {span.n_tokens} expected")

    def release(self, span: MediaSpan) -> None:
        if span.handle is not None:
            mtmd.mtmd_input_chunk_free(span.handle)
            span.handle = None

    def close(self) -> None:
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None


def _checked_size(chunk: Any, kind: int, owner: MediaItem) -> int:
    """The medium's token count, once it is one this engine can evaluate."""
    n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
    if n_tokens != int(mtmd.mtmd_input_chunk_get_n_pos(chunk)):
        raise BadRequestError("messages: this projector's media positions (M-RoPE) are not supported")
    if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE and n_tokens > MAX_IMAGE_TOKENS:
        raise BadRequestError(
            f"{owner.where}: the image's shape is too extreme ({owner.width}x{owner.height} px would be "
            f"{n_tokens} tokens, at most {MAX_IMAGE_TOKENS}); crop or pad it",
            param=owner.where,
        )
    return n_tokens
