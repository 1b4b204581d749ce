"""Check a GGUF file before anything tries to load it.

Just over ~400 lines as one module on purpose: it is one header parser whose steps share a private
cursor and defect type, and splitting it would turn those internals into a cross-module API.

llama.cpp reacts to a truncated or foreign file with an abort or a vague
"failed to load model"; this module answers the same question in well under a
second with one precise line: ``<path>: <defect>``.

It reads only the header (metadata and tensor table) with plain buffered reads:
``gguf.GGUFReader`` takes seconds on a 262k-token Gemma vocabulary and memory-maps
the whole file, which a 32-bit device cannot do for a multi-GB model. The file is
closed, and nothing stays mapped, when :func:`validate_gguf` returns.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from edgert.catalog import ModelSpec
from edgert.errors import IntegrityError, ModelFileError

MAGIC: Final = b"GGUF"
SUPPORTED_VERSIONS: Final = frozenset({2, 3})
#: ``general.architecture`` values edgert's llama.cpp build runs and the chat layer understands.
SUPPORTED_ARCHITECTURES: Final = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "llama"})
DEFAULT_ALIGNMENT: Final = 32
#: llama.cpp's GGML_MAX_DIMS.
MAX_DIMS: Final = 4

_CHUNK: Final = 1 << 20
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64_MAX: Final = 2**63 - 1

# GGUF metadata value types and the byte size of the fixed-width ones.
_T_STRING: Final = 8
_T_ARRAY: Final = 9
_FIXED_SIZES: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMATS: Final = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}  # fmt: skip
# Smallest possible encodings, used to reject absurd counts before looping over them.
_MIN_KV_BYTES: Final = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES: Final = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, 1 dim, type, offset
_MAX_ARRAY_NESTING: Final = 4
#: BPE merges: :func:`read_layout` keeps their number under this key (the memory model counts them).
MERGES_KEY: Final = "tokenizer.ggml.merges"
#: Longest array kept as a value (per-layer hyperparameters); longer ones are skipped.
_MAX_SHORT_ARRAY: Final = 4096

# Metadata keys read into memory; every other value is skipped without decoding.
_WANTED_KEYS: Final = frozenset(
    {
        "general.architecture",
        "general.name",
        "general.alignment",
        "general.file_type",
        "tokenizer.chat_template",
        "clip.has_vision_encoder",
        "clip.has_audio_encoder",
    }
)
#: ``<arch>.context_length`` and ``<arch>.embedding_length``; a projector's ``clip.{vision,audio}.projection_dim``.
_WANTED_SUFFIXES: Final = (".context_length", ".embedding_length", ".projection_dim")
#: A projector's encoders: ``clip.has_<kind>_encoder`` -> the medium it reads.
_ENCODERS: Final = (("vision", "image"), ("audio", "audio"))


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a valid GGUF file says about itself."""

    path: Path
    version: int
    architecture: str
    name: str | None
    n_tensors: int
    n_kv: int
    file_size: int
    #: ``<arch>.context_length``: the longest context the model was trained for.
    context_length: int | None
    #: The file carries ``tokenizer.chat_template`` (base models often do not).
    has_chat_template: bool
    #: Quantization from ``general.file_type``, e.g. ``Q4_K_M``; None when the key is absent.
    file_type: str | None
    #: Byte offset where tensor data begins.
    data_offset: int
    #: ``<arch>.embedding_length``: the width a multimodal projector must project into; None when absent.
    embedding_length: int | None = None
    #: A projector (architecture ``clip``): the media its encoders read, e.g. ``("image", "audio")``.
    projector_modalities: tuple[str, ...] = ()
    #: A projector: each encoder's ``projection_dim`` (the language model's width it was made for).
    projection_dims: tuple[int, ...] = ()


class _DefectError(Exception):
    """Internal: one sentence describing what is wrong; becomes a ModelFileError."""


def validate_gguf(path: Path, *, architectures: frozenset[str] = SUPPORTED_ARCHITECTURES) -> GGUFInfo:
    """Return the header facts of ``path`` or raise :class:`ModelFileError` naming its defect."""
    return read_layout(path, architectures=architectures, keep_prefix=None).info


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """One tensor of the file: name, shape (``ne``, fastest dimension first), ggml type and byte size."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFLayout:
    """A valid file's header facts, its tensor table and the metadata kept (for the memory model)."""

    info: GGUFInfo
    #: scalars, strings and short arrays of numbers/bools whose key starts with the asked prefix; and
    #: under :data:`MERGES_KEY` the number of BPE merges
    metadata: dict[str, object]
    tensors: tuple[TensorLayout, ...]


def read_layout(
    path: Path, *, architectures: frozenset[str] = SUPPORTED_ARCHITECTURES, keep_prefix: str | None = ""
) -> GGUFLayout:
    """:func:`validate_gguf` plus the tensor table and the metadata under ``keep_prefix`` ("" = the
    architecture's own keys, ``<arch>.``); raises :class:`ModelFileError` naming a defect."""
    try:
        with path.open("rb") as raw:
            return _parse(path, _Cursor(raw, path.stat().st_size), architectures, keep_prefix)
    except _DefectError as defect:
        raise ModelFileError(f"{path}: {defect}") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_matches_spec(info: GGUFInfo, spec: ModelSpec) -> None:
    """Raise when a valid GGUF is not the file catalog entry ``spec`` describes."""
    if info.architecture != spec.architecture:
        raise ModelFileError(
            f"{info.path}: architecture {info.architecture!r}, but catalog entry {spec.id} says {spec.architecture!r}"
        )
    if spec.sha256 is not None and info.file_size != spec.size_bytes:
        raise IntegrityError(f"{info.path}: {info.file_size} bytes, but catalog entry {spec.id} has {spec.size_bytes}")


def sha256_file(path: Path, *, progress: Callable[[int], None] | None = None) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks; ``progress`` gets the bytes of each chunk."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def file_type_name(value: int) -> str:
    """``general.file_type`` as a quant name: 15 -> ``Q4_K_M``."""
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return f"unknown file type {value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _parse(path: Path, cur: _Cursor, architectures: frozenset[str], keep_prefix: str | None) -> GGUFLayout:
    version, n_tensors, n_kv = _read_preamble(cur)
    meta = _read_metadata(cur, n_kv, keep_prefix)
    architecture = _architecture(meta, architectures)
    alignment = _alignment(meta)
    tensors = _read_tensor_infos(cur, n_tensors)
    data_offset = _align(cur.offset, alignment)
    _check_tensors(tensors, data_offset, alignment, cur.size)
    context = meta.get(f"{architecture}.context_length")
    file_type = meta.get("general.file_type")
    name = meta.get("general.name")
    embedding = meta.get(f"{architecture}.embedding_length") if architecture != "clip" else None
    encoders = [(kind, medium) for kind, medium in _ENCODERS if meta.get(f"clip.has_{kind}_encoder") is True]
    dims = [meta.get(f"clip.{kind}.projection_dim") for kind, _ in encoders]
    info = GGUFInfo(
        path=path,
        version=version,
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        n_tensors=n_tensors,
        n_kv=n_kv,
        file_size=cur.size,
        context_length=context if isinstance(context, int) else None,
        has_chat_template="tokenizer.chat_template" in meta,
        file_type=file_type_name(file_type) if isinstance(file_type, int) else None,
        data_offset=data_offset,
        embedding_length=embedding if isinstance(embedding, int) else None,
        projector_modalities=tuple(medium for _, medium in encoders),
        projection_dims=tuple(dim for dim in dims if isinstance(dim, int)),
    )
    if keep_prefix is None:
        return GGUFLayout(info, {}, ())
    prefix = keep_prefix or f"{architecture}."
    kept = {key: value for key, value in meta.items() if key.startswith(prefix) or key == MERGES_KEY}
    table = tuple(TensorLayout(t.name, t.dims, t.ggml_type, _tensor_nbytes(t)) for t in tensors)
    return GGUFLayout(info, kept, table)


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    if cur.size == 0:
        raise _DefectError("empty file (0 bytes)")
    if cur.size < 4:
        raise _DefectError(f"not a GGUF file (only {cur.size} bytes)")
    magic = cur.take(4)
    if magic != MAGIC:
        raise _DefectError(f"not a GGUF file (magic {magic!r})")
    if cur.size < 4 + 4 + 8 + 8:
        raise _DefectError(f"truncated: the header needs 24 bytes but the file has {cur.size}")
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        if _U32.unpack(_U32.pack(version)[::-1])[0] in SUPPORTED_VERSIONS:
            raise _DefectError("big-endian GGUF is not supported")
        raise _DefectError(f"unsupported GGUF version {version} (edgert reads versions 2 and 3)")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    if n_kv * _MIN_KV_BYTES > cur.remaining:
        raise _DefectError(
            f"corrupt or truncated header: it claims {n_kv} metadata entries, more than fit in {cur.size} bytes"
        )
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise _DefectError(
            f"corrupt or truncated header: it claims {n_tensors} tensors, more than fit in {cur.size} bytes"
        )
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int, keep_prefix: str | None) -> dict[str, object]:
    wanted: dict[str, object] = {}
    for index in range(n_kv):
        key = cur.string(f"metadata key #{index}")
        value_type = cur.u32()
        # the architecture is not known yet while reading, so "" keeps every key but the tokenizer's
        kept = keep_prefix is not None and key.startswith(keep_prefix) and not key.startswith("tokenizer.")
        if key in _WANTED_KEYS or key.endswith(_WANTED_SUFFIXES) or kept:
            wanted[key] = _read_value(cur, value_type, key)
        elif keep_prefix is not None and key == MERGES_KEY and value_type == _T_ARRAY:
            wanted[key] = _count_strings(cur, key)  # llama.cpp's tokenizer holds each merge in a map
        else:
            _skip_value(cur, value_type, key, depth=0)
    return wanted


def _read_value(cur: _Cursor, value_type: int, key: str) -> object:
    if value_type == _T_STRING:
        return cur.string(key)
    if value_type == _T_ARRAY:
        return _read_short_array(cur, key)
    scalar = _SCALAR_FORMATS.get(value_type)
    if scalar is None:
        _skip_value(cur, value_type, key, depth=0)
        return None
    return scalar.unpack(cur.take(scalar.size))[0]


def _count_strings(cur: _Cursor, key: str) -> int:
    """Skip an array of strings, answering how many it held."""
    element_type = cur.u32()
    count = cur.u64()
    if element_type != _T_STRING:
        raise _DefectError(f"metadata {key!r} should be an array of strings, not of type {element_type}")
    cur.skip_strings(count, key)
    return count


def _read_short_array(cur: _Cursor, key: str) -> tuple[object, ...] | None:
    """A per-layer array of numbers or bools (``feed_forward_length``, ``sliding_window_pattern``); None otherwise."""
    element_type = cur.u32()
    count = cur.u64()
    scalar = _SCALAR_FORMATS.get(element_type)
    if scalar is None or count > _MAX_SHORT_ARRAY:
        _skip_elements(cur, key, element_type, count, depth=0)
        return None
    return tuple(scalar.unpack(cur.take(scalar.size, key))[0] for _ in range(count))


def _skip_value(cur: _Cursor, value_type: int, key: str, *, depth: int) -> None:
    if value_type in _FIXED_SIZES:
        cur.skip(_FIXED_SIZES[value_type], key)
    elif value_type == _T_STRING:
        cur.skip(cur.u64(), key)
    elif value_type == _T_ARRAY:
        _skip_array(cur, key, depth=depth)
    else:
        raise _DefectError(f"metadata {key!r} has unknown value type {value_type}")


def _skip_array(cur: _Cursor, key: str, *, depth: int) -> None:
    if depth >= _MAX_ARRAY_NESTING:
        raise _DefectError(f"metadata {key!r} nests arrays more than {_MAX_ARRAY_NESTING} deep")
    _skip_elements(cur, key, cur.u32(), cur.u64(), depth=depth)


def _skip_elements(cur: _Cursor, key: str, element_type: int, count: int, *, depth: int) -> None:
    element_size = _FIXED_SIZES.get(element_type)
    if element_size is not None:
        cur.skip(count * element_size, key)
    elif element_type == _T_STRING:
        cur.skip_strings(count, key)
    elif element_type == _T_ARRAY:
        if count * 12 > cur.remaining:
            raise _DefectError(f"metadata {key!r} claims {count} nested arrays, more than fit in the file")
        for _ in range(count):
            _skip_array(cur, key, depth=depth + 1)
    else:
        raise _DefectError(f"metadata {key!r} is an array of unknown type {element_type}")


def _architecture(meta: dict[str, object], architectures: frozenset[str]) -> str:
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        raise _DefectError("no general.architecture string in the metadata")
    if architecture not in architectures:
        supported = ", ".join(sorted(architectures))
        raise _DefectError(f"unsupported architecture {architecture!r} (edgert runs: {supported})")
    return architecture


def _alignment(meta: dict[str, object]) -> int:
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _DefectError(f"general.alignment {alignment!r} is not a positive power of two")
    return alignment


@dataclass(frozen=True, slots=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[_TensorInfo]:
    tensors = []
    for index in range(n_tensors):
        name = cur.string(f"tensor #{index} name")
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise _DefectError(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        offset = cur.u64()
        tensors.append(_TensorInfo(name, dims, ggml_type, offset))
    return tensors


def _check_tensors(tensors: list[_TensorInfo], data_offset: int, alignment: int, file_size: int) -> None:
    if data_offset > file_size and tensors:
        raise _DefectError(
            f"truncated: tensor data should start at byte {data_offset} but the file has {file_size} bytes"
        )
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise _DefectError(f"duplicate tensor name {tensor.name}")
        seen.add(tensor.name)
        end = data_offset + tensor.offset + _tensor_nbytes(tensor)
        if tensor.offset % alignment:
            raise _DefectError(f"tensor {tensor.name} data offset {tensor.offset} is not a multiple of {alignment}")
        if end > file_size:
            raise _DefectError(f"truncated: tensor {tensor.name} ends at byte {end} but the file has {file_size} bytes")


def _tensor_nbytes(tensor: _TensorInfo) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    except (ValueError, KeyError):
        raise _DefectError(f"tensor {tensor.name} has unknown type {tensor.ggml_type}") from None
    n_elements = math.prod(tensor.dims)
    if n_elements > _I64_MAX:
        raise _DefectError(f"tensor {tensor.name} has too many elements ({tensor.dims})")
    if tensor.dims[0] % block_size:
        raise _DefectError(
            f"tensor {tensor.name} row of {tensor.dims[0]} elements is not a multiple of the "
            f"{GGMLQuantizationType(tensor.ggml_type).name} block size {block_size}"
        )
    return n_elements // block_size * type_size


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


class _Cursor:
    """Sequential little-endian reader over a file, refilled in 1 MiB chunks.

    Every read is bounds-checked against the file size first, so a lying length
    field turns into a "truncated" defect instead of a huge allocation.
    """

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self._buf = b""
        self._pos = 0  # index into _buf
        self._base = 0  # file offset of _buf[0]

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    def take(self, n: int, what: str = "header") -> bytes:
        self._need(n, what)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def u32(self) -> int:
        self._need(4, "header")
        (value,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return int(value)

    def u64(self) -> int:
        self._need(8, "header")
        (value,) = _U64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return int(value)

    def string(self, what: str) -> str:
        length = self.u64()
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _DefectError(f"{what} is not valid UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self._truncated(what, n)
        if self._pos + n <= len(self._buf):
            self._pos += n
            return
        target = self.offset + n
        self._fh.seek(target)
        self._buf, self._pos, self._base = b"", 0, target

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings; the hot loop for 262k-token vocabularies."""
        if count * 8 > self.remaining:
            raise _DefectError(f"metadata {what!r} claims {count} strings, more than fit in the file")
        unpack = _U64.unpack_from
        while count:
            buf, pos, end = self._buf, self._pos, len(self._buf)
            while count and pos + 8 <= end:
                (length,) = unpack(buf, pos)
                if pos + 8 + length > end:
                    break
                pos += 8 + length
                count -= 1
            self._pos = pos
            if count:  # the next string straddles the buffer end: take the slow, refilling path
                self.skip(self.u64(), what)
                count -= 1

    def _need(self, n: int, what: str) -> None:
        if self._pos + n <= len(self._buf):
            return
        if n > self.remaining:
            raise self._truncated(what, n)
        rest = self._buf[self._pos :]
        chunk = self._fh.read(max(n - len(rest), _CHUNK))
        self._base += self._pos
        self._buf, self._pos = rest + chunk, 0
        if len(self._buf) < n:  # the file shrank while we read it
            raise self._truncated(what, n)

    def _truncated(self, what: str, n: int) -> _DefectError:
        return _DefectError(
            f"truncated: {what} needs {n} bytes at offset {self.offset} but the file has {self.size} bytes"
        )
