"""tests/fixtures/tiny-gemma4-mmproj.gguf: libmtmd loads it beside tiny-gemma4.gguf, reads images and audio, evaluates.

Everything goes through llama-cpp-python's ctypes bindings to libmtmd (``llama_cpp.mtmd_cpp``), as edgert's
engine will. Test media are made here: PNG (zlib), BMP and PPM written by hand, JPEG through Pillow when it is
installed, WAV through the stdlib ``wave`` module. Token counts are what mtmd reports; the README explains them.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import io
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import llama_cpp
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as mtmd

from tests.media_samples import tone_wav

FIXTURES = Path(__file__).parent.parent / "fixtures"
TEXT_MODEL = FIXTURES / "tiny-gemma4.gguf"
MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
N_EMBD = 64
# Marker ids in tiny-gemma4.gguf (tests/fixtures/README.md).
IMAGE_BEGIN, AUDIO_BEGIN, IMAGE_END, AUDIO_END = 8185, 8186, 8189, 8190
CHUNK_TEXT, CHUNK_IMAGE, CHUNK_AUDIO = (
    mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT,
    mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE,
    mtmd.MTMD_INPUT_CHUNK_TYPE_AUDIO,
)


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_gemma4_mmproj", FIXTURES / "make_tiny_gemma4_mmproj.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- synthetic media ---------------------------------------------------------------------------------------


def gradient(width: int, height: int) -> np.ndarray:
    """An RGB image that is not flat, so the encoder sees varied patches."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def bmp(pixels: np.ndarray) -> bytes:
    height, width, _ = pixels.shape
    stride = (width * 3 + 3) // 4 * 4
    rows = b"".join(pixels[y, :, ::-1].tobytes().ljust(stride, b"\x00") for y in reversed(range(height)))  # BGR
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(rows), 0, 0, 14 + len(info)) + info + rows


def ppm(pixels: np.ndarray) -> bytes:
    height, width, _ = pixels.shape
    return f"P6\n{width} {height}\n255\n".encode() + pixels.tobytes()


def jpeg(pixels: np.ndarray) -> bytes:
    image_module = pytest.importorskip("PIL.Image", reason="Pillow writes the JPEG; PNG/BMP/PPM cover stb_image")
    out = io.BytesIO()
    image_module.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- libmtmd through ctypes --------------------------------------------------------------------------------


def mtmd_params() -> Any:
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 1, False
    return params


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    loaded = llama_cpp.llama_model_load_from_file(str(TEXT_MODEL).encode(), llama_cpp.llama_model_default_params())
    assert loaded
    yield loaded
    llama_cpp.llama_model_free(loaded)


@pytest.fixture(scope="module")
def mctx(model: Any) -> Iterator[Any]:
    ctx = mtmd.mtmd_init_from_file(str(MMPROJ).encode(), model, mtmd_params())
    assert ctx, "libmtmd refused tests/fixtures/tiny-gemma4-mmproj.gguf"
    yield ctx
    mtmd.mtmd_free(ctx)


class Bitmaps:
    """Owns the bitmaps a test makes and frees them."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.made: list[Any] = []

    def __call__(self, data: bytes) -> Any:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(data), False)
        if bitmap:
            self.made.append(bitmap)
        return bitmap


@pytest.fixture
def bitmaps(mctx: Any) -> Iterator[Bitmaps]:
    made = Bitmaps(mctx)
    yield made
    for bitmap in made.made:
        mtmd.mtmd_bitmap_free(bitmap)


def tokenize(ctx: Any, text: bytes, media: list[Any], *, add_special: bool = True) -> Any:
    """mtmd_tokenize with parse_special (and BOS unless told not); the caller frees the chunks."""
    chunks = mtmd.mtmd_input_chunks_init()
    inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=add_special, parse_special=True)
    array = (mtmd.mtmd_bitmap_p_ctypes * len(media))(*media)
    assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), array, len(media)) == 0
    return chunks


def chunk_list(chunks: Any) -> list[Any]:
    return [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]


def describe(chunks: Any) -> list[tuple[int, int]]:
    """(chunk type, token count) for each chunk."""
    return [(mtmd.mtmd_input_chunk_get_type(c), mtmd.mtmd_input_chunk_get_n_tokens(c)) for c in chunk_list(chunks)]


def text_tokens(chunk: Any) -> list[int]:
    n = ctypes.c_size_t()
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [tokens[i] for i in range(n.value)]


def media_tokens(ctx: Any, data: bytes, bitmaps: Bitmaps) -> list[tuple[int, int]]:
    """What one medium alone tokenizes into, markers included."""
    chunks = tokenize(ctx, mtmd.mtmd_default_marker(), [bitmaps(data)], add_special=False)
    try:
        return describe(chunks)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


# --- the fixture -------------------------------------------------------------------------------------------


def test_committed_fixture_is_what_the_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "mmproj.gguf"
    load_generator().build(out)
    assert out.read_bytes() == MMPROJ.read_bytes(), (
        "regenerate: .venv/bin/python tests/fixtures/make_tiny_gemma4_mmproj.py"
    )


def test_it_is_a_gemma4_vision_and_audio_projector(mctx: Any) -> None:
    caps = mtmd.mtmd_get_cap_from_file(str(MMPROJ).encode())
    assert (caps.inp_vision, caps.inp_audio) == (True, True)
    assert mtmd.mtmd_support_vision(mctx)
    assert mtmd.mtmd_support_audio(mctx)
    assert mtmd.mtmd_get_audio_sample_rate(mctx) == 16000


def test_text_image_and_audio_tokenize_into_marked_chunks(mctx: Any, bitmaps: Bitmaps) -> None:
    marker = mtmd.mtmd_default_marker()
    prompt = b"<|turn>user\nLook " + marker + b" and hear " + marker + b"<turn|>\n<|turn>model\n"
    chunks = tokenize(mctx, prompt, [bitmaps(png(gradient(40, 30))), bitmaps(tone_wav(1.0))])
    try:
        listed = chunk_list(chunks)
        kinds = [(kind, n) for kind, n in describe(chunks) if kind != CHUNK_TEXT]
        assert kinds == [(CHUNK_IMAGE, 80), (CHUNK_AUDIO, 25)]
        types = [mtmd.mtmd_input_chunk_get_type(c) for c in listed]
        assert types == [CHUNK_TEXT, CHUNK_IMAGE, CHUNK_TEXT, CHUNK_AUDIO, CHUNK_TEXT]
        # The template's begin/end markers wrap each medium, as in the real Gemma 4.
        assert text_tokens(listed[0])[-1] == IMAGE_BEGIN
        assert text_tokens(listed[2])[0] == IMAGE_END
        assert text_tokens(listed[2])[-1] == AUDIO_BEGIN
        assert text_tokens(listed[4])[0] == AUDIO_END
        # gemma4v reports its tokens as one row (nx = n_tokens, ny = 1), not as the 10x8 grid it pooled.
        image = mtmd.mtmd_input_chunk_get_tokens_image(listed[1])
        assert (mtmd.mtmd_image_tokens_get_nx(image), mtmd.mtmd_image_tokens_get_ny(image)) == (80, 1)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (40, 30, 80),  # upscaled to 120x96 px: the 70-token floor, in 12x12 px tokens
        (1, 1, 81),
        (640, 480, 1064),  # downscaled under the 1120-token ceiling
        (896, 896, 1089),
        (13440, 12, 1120),  # the widest image whose patch columns still fit the position table
    ],
)
def test_image_token_counts(mctx: Any, bitmaps: Bitmaps, width: int, height: int, tokens: int) -> None:
    assert media_tokens(mctx, png(gradient(width, height)), bitmaps) == [(0, 1), (CHUNK_IMAGE, tokens), (0, 1)]


@pytest.mark.parametrize(
    ("seconds", "audio_chunks"),
    [(0.5, [13]), (1.0, [25]), (10.0, [250]), (30.0, [750]), (31.0, [750, 25])],  # 40 ms a token, 30 s windows
)
def test_audio_token_counts(mctx: Any, bitmaps: Bitmaps, seconds: float, audio_chunks: list[int]) -> None:
    described = media_tokens(mctx, tone_wav(seconds), bitmaps)
    assert [n for kind, n in described if kind == CHUNK_AUDIO] == audio_chunks
    assert [kind for kind, _ in described] == [0] + [CHUNK_AUDIO] * len(audio_chunks) + [0]


def test_audio_at_another_sample_rate_is_resampled(mctx: Any, bitmaps: Bitmaps) -> None:
    assert media_tokens(mctx, tone_wav(1.0, rate=8000), bitmaps) == media_tokens(mctx, tone_wav(1.0), bitmaps)


@pytest.mark.parametrize("encode", [bmp, ppm, jpeg])
def test_other_image_formats_decode_alike(mctx: Any, bitmaps: Bitmaps, encode: Any) -> None:
    pixels = gradient(40, 30)
    bitmap = bitmaps(encode(pixels))
    assert bitmap
    assert not mtmd.mtmd_bitmap_is_audio(bitmap)
    assert (mtmd.mtmd_bitmap_get_nx(bitmap), mtmd.mtmd_bitmap_get_ny(bitmap)) == (40, 30)
    if encode is not jpeg:  # lossless: the very pixels come back
        data = mtmd.mtmd_bitmap_get_data(bitmap)
        assert bytes(data[: 40 * 30 * 3]) == pixels.tobytes()


def test_media_ids_are_content_hashes_carried_to_their_chunks(mctx: Any, bitmaps: Bitmaps) -> None:
    image, audio = png(gradient(40, 30)), tone_wav(0.5)
    chunks = tokenize(mctx, mtmd.mtmd_default_marker() * 2, [bitmaps(image), bitmaps(audio)])
    try:
        ids = [mtmd.mtmd_input_chunk_get_id(c) for c in chunk_list(chunks) if mtmd.mtmd_input_chunk_get_type(c)]
        assert ids == [hashlib.sha256(image).hexdigest().encode(), hashlib.sha256(audio).hexdigest().encode()]
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def test_undecodable_bytes_give_no_bitmap(bitmaps: Bitmaps) -> None:
    assert not bitmaps(b"not an image, not audio")
    assert not bitmaps(png(gradient(40, 30))[:60])  # a truncated PNG


def test_encoded_media_are_finite_text_embeddings(mctx: Any, bitmaps: Bitmaps) -> None:
    marker = mtmd.mtmd_default_marker()
    chunks = tokenize(mctx, marker + marker, [bitmaps(png(gradient(40, 30))), bitmaps(tone_wav(1.0))])
    try:
        for chunk in chunk_list(chunks):
            if mtmd.mtmd_input_chunk_get_type(chunk) == CHUNK_TEXT:
                continue
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(mctx, chunk) == 0
            embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(mctx), shape=(n_tokens, N_EMBD))
            assert np.isfinite(embd).all()
            assert np.ptp(embd, axis=0).max() > 0  # the tokens differ: the encoder used its input
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def test_chunks_evaluate_into_a_llama_context(model: Any, mctx: Any, bitmaps: Bitmaps) -> None:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 1024, 512, 512
    params.n_threads, params.n_threads_batch, params.swa_full = 1, 1, False
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    marker = mtmd.mtmd_default_marker()
    prompt = b"<|turn>user\nLook " + marker + b" and hear " + marker + b"<turn|>\n<|turn>model\n"
    chunks = tokenize(mctx, prompt, [bitmaps(png(gradient(40, 30))), bitmaps(tone_wav(1.0))])
    try:
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        assert n_past.value == mtmd.mtmd_helper_get_n_pos(chunks) == 8 + 80 + 6 + 25 + 6
        vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab_size,))
        assert np.isfinite(logits).all()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        llama_cpp.llama_free(ctx)


def test_a_projector_for_another_embedding_size_is_refused(model: Any, tmp_path: Path) -> None:
    wrong = tmp_path / "mmproj-48.gguf"
    load_generator().build(wrong, projection_dim=48)
    alone = mtmd.mtmd_init_from_file(str(wrong).encode(), None, mtmd_params())
    assert alone, "the 48-wide projector loads on its own: only the pairing is wrong"
    mtmd.mtmd_free(alone)
    assert not mtmd.mtmd_init_from_file(str(wrong).encode(), model, mtmd_params())


def test_an_image_too_thin_for_the_position_table_aborts_the_process(tmp_path: Path) -> None:
    """mtmd lets a 16000x1 image through as 4233 tokens (resized to 50796x12 px), past gemma4v's 1120-token
    ceiling, and encoding it reads past the 3360-row position table: ggml aborts the whole process. Every
    image within the ceiling fits the table, so a caller must refuse an image chunk of more than 1120 tokens
    after tokenizing, before encoding."""
    script = textwrap.dedent(
        f"""
        import ctypes, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd
        from test_mmproj_fixture import chunk_list, gradient, mtmd_params, png, tokenize
        text_model, mmproj = (arg.encode() for arg in sys.argv[1:])
        model = llama_cpp.llama_model_load_from_file(text_model, llama_cpp.llama_model_default_params())
        ctx = mtmd.mtmd_init_from_file(mmproj, model, mtmd_params())
        data = png(gradient(16000, 1))
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data),
                                                       len(data), False)
        image = chunk_list(tokenize(ctx, mtmd.mtmd_default_marker(), [bitmap]))[1]
        print("tokens", mtmd.mtmd_input_chunk_get_n_tokens(image), flush=True)
        mtmd.mtmd_encode_chunk(ctx, image)
        print("encoded", flush=True)
        """
    )
    command = [sys.executable, "-c", script, str(TEXT_MODEL), str(MMPROJ)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert "tokens 4233" in done.stdout
    assert "encoded" not in done.stdout
    assert done.returncode == -signal.SIGABRT
    assert "GGML_ASSERT(i01 >= 0 && i01 < ne01)" in done.stderr
