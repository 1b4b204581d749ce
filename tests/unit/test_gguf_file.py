"""GGUF validation: real files pass, every kind of broken file gets one precise line."""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

from edgert.catalog import load_catalog
from edgert.errors import IntegrityError, ModelFileError
from edgert.gguf_file import check_matches_spec, file_type_name, sha256_file, validate_gguf

MakeGGUF = Callable[..., Path]


@pytest.fixture
def make_gguf(tmp_path: Path) -> MakeGGUF:
    """Write a small GGUF with gguf.GGUFWriter (the reference writer llama.cpp's tools use)."""

    def make(
        name: str = "model.gguf",
        *,
        arch: str = "gemma3",
        context_length: int | None = 2048,
        chat_template: str | None = None,
        file_type: LlamaFileType | None = LlamaFileType.MOSTLY_F16,
        n_layers: int = 2,
    ) -> Path:
        path = tmp_path / name
        writer = GGUFWriter(path, arch)
        writer.add_name("edgert unit test")
        if context_length is not None:
            writer.add_context_length(context_length)
        if file_type is not None:
            writer.add_file_type(file_type)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        rng = np.random.default_rng(7)
        writer.add_tensor("token_embd.weight", rng.standard_normal((32, 64), dtype=np.float32).astype(np.float16))
        for layer in range(n_layers):
            writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(64, dtype=np.float32))
            # A Q4_K tensor given as raw blocks: 64 rows of 256 elements = 64 blocks of 144 bytes.
            blocks = rng.integers(0, 255, size=(64, 144), dtype=np.uint8)
            writer.add_tensor(f"blk.{layer}.attn_q.weight", blocks, raw_dtype=GGMLQuantizationType.Q4_K)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return make


def defect(path: Path) -> str:
    """The single-line message validate_gguf raises for ``path``, without the path prefix."""
    with pytest.raises(ModelFileError) as caught:
        validate_gguf(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


# --------------------------------------------------------------------------- valid files


def test_valid_file_reports_its_header(make_gguf: MakeGGUF) -> None:
    path = make_gguf(chat_template="{{ messages }}", file_type=LlamaFileType.MOSTLY_Q4_K_M)
    info = validate_gguf(path)
    assert info.path == path
    assert info.version == 3
    assert info.architecture == "gemma3"
    assert info.name == "edgert unit test"
    assert info.n_tensors == 5
    assert info.file_size == path.stat().st_size
    assert info.context_length == 2048
    assert info.has_chat_template is True
    assert info.file_type == "Q4_K_M"


def test_optional_keys_may_be_absent(make_gguf: MakeGGUF) -> None:
    info = validate_gguf(make_gguf(context_length=None, file_type=None))
    assert info.context_length is None
    assert info.file_type is None
    assert info.has_chat_template is False


def test_agrees_with_the_reference_reader(make_gguf: MakeGGUF) -> None:
    path = make_gguf(n_layers=3)
    info = validate_gguf(path)
    reader = GGUFReader(path)
    assert info.n_tensors == len(reader.tensors)
    assert info.data_offset == min(tensor.data_offset for tensor in reader.tensors)
    last = max(reader.tensors, key=lambda tensor: tensor.data_offset)
    assert last.data_offset + last.n_bytes <= info.file_size


def test_the_committed_tiny_gemma4_fixture_is_valid(tiny_gguf: Path) -> None:
    info = validate_gguf(tiny_gguf)
    assert info.architecture == "gemma4"
    assert info.name == "edgert tiny gemma4 test fixture"
    assert info.context_length == 8192
    assert info.has_chat_template is True
    assert info.file_size == 1_583_936


@pytest.mark.slow
def test_the_real_gemma3_270m_is_valid_and_checked_fast(gemma3_270m: Path) -> None:
    started = time.perf_counter()
    info = validate_gguf(gemma3_270m)
    elapsed = time.perf_counter() - started
    assert (info.architecture, info.file_type, info.n_tensors) == ("gemma3", "Q4_K_M", 236)
    assert info.context_length == 32768
    assert info.has_chat_template is False  # base model: edgert supplies the Gemma turn format
    assert elapsed < 1.0, f"header check took {elapsed:.2f}s; it must not read the weights"
    check_matches_spec(info, load_catalog().get("gemma-3-270m:q4_k_m"))


def test_validation_leaves_no_open_file_or_mapping(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    validate_gguf(path)
    with pytest.raises(ModelFileError):
        validate_gguf(_truncate(path, path.stat().st_size - 10))
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(path.resolve()) not in open_files
    assert str(path.resolve()) not in Path("/proc/self/maps").read_text()


# --------------------------------------------------------------------------- broken files


def test_truncated_tensor_data_names_the_tensor_and_both_sizes(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    full = path.stat().st_size
    info = validate_gguf(path)
    _truncate(path, full - 1000)
    message = defect(path)
    match = re.fullmatch(r"truncated: tensor (\S+) ends at byte (\d+) but the file has (\d+) bytes", message)
    assert match, message
    assert match.group(1) == "blk.1.attn_q.weight"
    assert int(match.group(2)) <= full
    assert int(match.group(2)) > full - 1000
    assert int(match.group(3)) == full - 1000
    assert info.file_size == full


def test_truncated_inside_the_tensor_table(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    cut = validate_gguf(path).data_offset - 40
    message = defect(_truncate(path, cut))
    assert re.fullmatch(rf"truncated: .+ needs \d+ bytes at offset \d+ but the file has {cut} bytes", message)


def test_truncated_early_in_the_header(make_gguf: MakeGGUF) -> None:
    message = defect(_truncate(make_gguf(), 100))
    assert message == "corrupt or truncated header: it claims 5 tensors, more than fit in 100 bytes"


def test_corrupted_magic(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    with path.open("r+b") as fh:
        fh.write(b"PK\x03\x04")
    assert defect(path) == r"not a GGUF file (magic b'PK\x03\x04')"


def test_unsupported_architecture(make_gguf: MakeGGUF) -> None:
    message = defect(make_gguf(arch="bert"))
    assert message.startswith("unsupported architecture 'bert' (edgert runs: ")
    assert "gemma4" in message


def test_architecture_set_is_configurable(make_gguf: MakeGGUF) -> None:
    path = make_gguf(arch="bert")
    assert validate_gguf(path, architectures=frozenset({"bert"})).architecture == "bert"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    assert defect(path) == "empty file (0 bytes)"


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    path.write_bytes(random.Random(1).randbytes(65536))
    assert defect(path).startswith("not a GGUF file (magic ")


def test_random_bytes_behind_a_valid_preamble_fail_fast(tmp_path: Path) -> None:
    rng = random.Random(2)
    for attempt in range(50):
        path = tmp_path / f"noise{attempt}.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.randbytes(200_000))
        started = time.perf_counter()
        with pytest.raises(ModelFileError):
            validate_gguf(path)
        assert time.perf_counter() - started < 0.5


def test_too_short_for_magic(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GG")
    assert defect(path) == "not a GGUF file (only 2 bytes)"


@pytest.mark.parametrize(
    ("version", "expected"), [(1, "unsupported GGUF version 1"), (7, "unsupported GGUF version 7")]
)
def test_unsupported_versions(make_gguf: MakeGGUF, version: int, expected: str) -> None:
    path = make_gguf()
    _patch(path, 4, struct.pack("<I", version))
    assert defect(path).startswith(expected)


def test_big_endian_file(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    _patch(path, 4, struct.pack(">I", 3))
    assert defect(path) == "big-endian GGUF is not supported"


def test_absurd_tensor_count(make_gguf: MakeGGUF) -> None:
    path = make_gguf()
    _patch(path, 8, struct.pack("<Q", 2**40))
    assert defect(path).startswith(f"corrupt or truncated header: it claims {2**40} tensors")


def test_unreadable_path(tmp_path: Path) -> None:
    assert defect(tmp_path).startswith("cannot read: ")
    assert defect(tmp_path / "absent.gguf").startswith("cannot read: ")


# Defects GGUFWriter refuses to produce, written byte by byte.


def test_unknown_tensor_type(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [("a.weight", (32,), 99, 0)], data=bytes(64))
    assert defect(path) == "tensor a.weight has unknown type 99"


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    f32 = int(GGMLQuantizationType.F32)
    path = _raw_gguf(tmp_path, [("a.weight", (8,), f32, 0), ("a.weight", (8,), f32, 32)], data=bytes(64))
    assert defect(path) == "duplicate tensor name a.weight"


def test_misaligned_tensor_offset(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [("a.weight", (8,), int(GGMLQuantizationType.F32), 4)], data=bytes(64))
    assert defect(path) == "tensor a.weight data offset 4 is not a multiple of 32"


def test_too_many_dimensions(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [("a.weight", (1, 1, 1, 1, 8), int(GGMLQuantizationType.F32), 0)], data=bytes(64))
    assert defect(path) == "tensor a.weight has 5 dimensions (GGUF allows 1 to 4)"


def test_row_not_a_multiple_of_the_block_size(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [("a.weight", (100,), int(GGMLQuantizationType.Q4_K), 0)], data=bytes(256))
    assert defect(path) == "tensor a.weight row of 100 elements is not a multiple of the Q4_K block size 256"


def test_missing_architecture(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [], data=b"", arch=None)
    assert defect(path) == "no general.architecture string in the metadata"


def test_a_hand_written_file_passes_when_correct(tmp_path: Path) -> None:
    path = _raw_gguf(tmp_path, [("a.weight", (8,), int(GGMLQuantizationType.F32), 0)], data=bytes(32))
    info = validate_gguf(path)
    assert (info.architecture, info.n_tensors, info.file_size) == ("gemma4", 1, path.stat().st_size)


# --------------------------------------------------------------------------- helpers under test


def test_sha256_file_streams_and_reports_progress(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    seen: list[int] = []
    assert sha256_file(path, progress=seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)
    assert len(seen) == 4  # 1 MiB chunks


def test_file_type_names() -> None:
    assert file_type_name(15) == "Q4_K_M"
    assert file_type_name(7) == "Q8_0"
    assert file_type_name(0) == "F32"
    assert file_type_name(999) == "unknown file type 999"


def test_check_matches_spec(tiny_gguf: Path, make_gguf: MakeGGUF) -> None:
    catalog = load_catalog()
    with pytest.raises(ModelFileError, match="architecture 'gemma3', but catalog entry gemma-4-e2b-it:q4_k_m"):
        check_matches_spec(validate_gguf(make_gguf()), catalog.get("gemma-4-e2b-it:q4_k_m"))
    with pytest.raises(IntegrityError, match=r"1583936 bytes, but catalog entry gemma-4-e2b-it:q4_k_m has 3106738272"):
        check_matches_spec(validate_gguf(tiny_gguf), catalog.get("gemma-4-e2b-it:q4_k_m"))


# --------------------------------------------------------------------------- helpers


def _truncate(path: Path, size: int) -> Path:
    with path.open("r+b") as fh:
        fh.truncate(size)
    return path


def _patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _raw_gguf(
    tmp_path: Path,
    tensors: Sequence[tuple[str, tuple[int, ...], int, int]],
    *,
    data: bytes,
    arch: str | None = "gemma4",
) -> Path:
    """A GGUF v3 file built by hand: (name, dims, ggml type, offset) per tensor, then ``data``."""
    kv = [] if arch is None else [_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch)]
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv)
    for name, dims, ggml_type, offset in tensors:
        header += _gguf_string(name) + struct.pack("<I", len(dims))
        header += b"".join(struct.pack("<Q", dim) for dim in dims)
        header += struct.pack("<IQ", ggml_type, offset)
    header += bytes(-len(header) % 32)
    path = tmp_path / "raw.gguf"
    path.write_bytes(header + data)
    return path
