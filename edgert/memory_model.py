"""The memory model: what a GGUF file will occupy in RAM under given engine settings, computed from its header.

Pure functions of a :class:`ModelShape` (read once from the file's header by :func:`shape_of`) and the
engine settings; :func:`estimate_file` is the one function here that reads a file. Every part follows what
the vendored llama.cpp (llama-cpp-python 0.3.36) allocates and what the process actually touches, checked
against measured RSS of ``edgert serve`` in ``benchmarks/memory_model_check.py`` (benchmarks/RESULTS.md):

* **weights**: with mmap every tensor's pages are read in at load (``MAP_POPULATE`` / ``WILLNEED``), so the
  whole tensor data counts; without mmap the same bytes are read into anonymous memory.
* **per-layer embeddings** (Gemma 4's ``per_layer_token_embd``, 1.8 GiB of an E2B Q4_K_M): resident like
  any weight, unless ``engine.lazy_embeddings`` makes llama.cpp read its rows on demand; then only the rows
  of the tokens seen are paged in (``LAZY_ROWS`` distinct tokens counted, a fault-around window each).
* **CPU repack**: with ``engine.weight_repack`` llama.cpp copies the matrices of some quant types into an
  interleaved layout (``ggml-cpu/repack.cpp``, ``ggml_repack_get_optimal_repack_type``); with mmap the
  mapped originals stay resident too, so the copy is a duplicate. Which types depends on the CPU.
* **KV cache**: per layer that owns a cache (Gemma 4's last ``shared_kv_layers`` reuse earlier ones), K and
  V rows of the layer's width at the KV type's size, for n_ctx cells (full attention) or the sliding-window
  cache's ``pad256(min(n_ctx, n_swa x n_seq + n_ubatch))`` cells (``llama-kv-cache-iswa.cpp``). llama.cpp
  clears the buffers, so all of it is resident from the start.
* **compute**: llama.cpp reserves a worst-case buffer (E2B: 521 MiB, 512 of them logits for a whole
  ubatch); edgert asks for one logit row per sequence, so only those rows, the output buffer and the
  activations of a ubatch are ever touched.
* **drafter**: the MTP drafter (``engine.drafter`` unless ``speculative = off``), see :func:`drafter_bytes`.
* **process**: the Python interpreter, edgert, its libraries and llama.cpp's code, measured; plus the
  tokenizer's BPE merges, which llama.cpp keeps in a map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgert.drafter_file import DRAFTER_ARCHITECTURE
from edgert.gguf_file import MERGES_KEY, GGUFLayout, read_layout
from edgert.settings import EngineSettings

MIB = 1024 * 1024
#: Resident memory of ``edgert serve`` besides the model: interpreter, edgert, uvicorn, pydantic, numpy,
#: libllama's code and a 262k-token vocabulary. Measured: the 270M daemon's RSS less the parts below
#: (468 - 349 MiB; benchmarks/RESULTS.md).
PROCESS_MIB = 120
#: llama.cpp keeps a BPE tokenizer's merges in a map: E2B's 514,906 merges took 64 MiB more than the
#: 270M's SentencePiece vocabulary of the same size (RSS less the other parts), ~130 bytes each.
BYTES_PER_MERGE = 130
#: Distinct tokens whose per-layer embedding rows a lazily read table is counted with. Each row read faults
#: in the kernel's fault-around window (64 KiB: 16 pages when the file is in the page cache), not just its
#: 7 KiB. Measured on E2B: a short chat left ~34 MiB of the table resident; llama-bench's random-token
#: prompts (pp64 + tg32, 4 runs) 542 MiB of its 1838. 1024 rows (64 MiB) covers chat in one language
#: for a while; the table's residency grows with every new token up to its full size.
LAZY_ROWS = 1024
FAULT_AROUND = 64 * 1024
#: Tensors read by row lookup (GET_ROWS), never multiplied, so never repacked.
LOOKUP_TENSORS = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})
PER_LAYER_EMBEDDINGS = "per_layer_token_embd.weight"
#: llama.cpp's LLAMA_LAZY_MODE_AUTO reads a marked tensor lazily only above this size.
LAZY_AUTO_MIN_BYTES = 4 * 1024**3
#: Architectures whose llama.cpp loader creates the output tensor before ``token_embd`` (models/gemma4.cpp):
#: with a tied embedding the duplicate check then misses, and without mmap both copies are allocated and read
#: (E2B: +314 MiB measured, the 315 MiB token_embd). With mmap both point into the mapping.
OUTPUT_BEFORE_EMBEDDING = frozenset({"gemma4"})
#: KV element sizes (bytes per value): f16, and the q8_0 / q4_0 blocks of 32 values.
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Activations kept per ubatch token in the compute buffer, in units of n_embd floats. Measured from
#: llama.cpp's reserved compute buffer less its logits: 2.5 MiB for the 270M (n_embd 640), 9 MiB for E2B
#: (1536), both at n_ubatch 512.
ACTIVATION_WIDTHS = 3
#: The drafter's own vocabulary tables (token texts, scores, the text -> id map) and its context's graph, per
#: vocabulary token. Measured: loading the E2B-shape assistant (Q8_0, 262,144 tokens) beside the E2B-shape
#: model added 199 MiB RSS at 1 sequence and 213 MiB at 12, its F16 twin 282 MiB at 12; less the weights
#: (78 / 147 MiB), the merges map (64 MiB) and one logit row per sequence, 56-59 MiB remain: ~228 bytes a
#: token (only one vocabulary size was measured; scaling with it is how llama.cpp's token tables grow).
DRAFTER_BYTES_PER_TOKEN = 228


# --------------------------------------------------------------------------- the CPU's repack rules

#: ggml type -> the row multiple its repacked layout needs, per CPU feature (``ggml_repack_get_optimal_repack_type``).
_REPACK_X86_AVX2 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
_REPACK_X86_AVX512 = {"Q2_K": 8}
_REPACK_ARM_DOTPROD = {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4, "Q1_0": 4}


def repack_rule(simd: Sequence[str]) -> dict[str, int]:
    """Which quant types llama.cpp repacks on a CPU with these llama.cpp SIMD flags, and the row multiple each needs.

    ``simd`` is :attr:`edgert.hardware.CpuInfo.simd` (``"AVX2"``, ``"AVX512"``, ``"DOTPROD"``...); builds of
    llama-cpp-python compile the repack code in by default (``GGML_CPU_REPACK``).
    """
    flags = set(simd)
    rule: dict[str, int] = {}
    if "AVX2" in flags:
        rule |= _REPACK_X86_AVX2
    if "AVX512" in flags:
        rule |= _REPACK_X86_AVX512
    if "DOTPROD" in flags or "MATMUL_INT8" in flags:
        rule |= _REPACK_ARM_DOTPROD
    return rule


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True, slots=True)
class Matrix:
    name: str
    type_name: str
    rows: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class KvLayer:
    """One layer that owns a KV cache: its K and V widths (heads x head size) and whether it slides."""

    k_width: int
    v_width: int
    sliding: bool


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the memory model needs from a GGUF header."""

    architecture: str
    tensor_bytes: int
    n_vocab: int
    n_embd: int
    n_head: int
    n_swa: int
    kv_layers: tuple[KvLayer, ...]
    #: the 2-D tensors a matrix multiplication reads (candidates for the CPU repack)
    matrices: tuple[Matrix, ...]
    per_layer_embd_bytes: int
    per_layer_embd_row_bytes: int
    #: no ``output.weight``: the output projection reuses ``token_embd`` (a repack candidate then)
    tied_output: bool
    #: BPE merges in the tokenizer (0 for SentencePiece vocabularies)
    n_merges: int = 0
    #: bytes of ``token_embd`` when it doubles as the output projection (0 otherwise)
    tied_embd_bytes: int = 0


def shape_of(layout: GGUFLayout) -> ModelShape:
    """The memory-relevant shape of a model from its header (:func:`edgert.gguf_file.read_layout`)."""
    arch = layout.info.architecture
    meta = layout.metadata
    tensors = {t.name: t for t in layout.tensors}
    n_layer = _int(meta, f"{arch}.block_count", 0)
    n_embd = _int(meta, f"{arch}.embedding_length", 0)
    embd = tensors.get("token_embd.weight")
    n_vocab = embd.dims[1] if embd is not None and len(embd.dims) > 1 else 0
    ple = tensors.get(PER_LAYER_EMBEDDINGS)
    matrices = tuple(
        Matrix(t.name, _type_name(t.ggml_type), t.dims[1], t.nbytes)
        for t in layout.tensors
        if len(t.dims) == 2 and t.name not in LOOKUP_TENSORS
    )
    tied = "output.weight" not in tensors and embd is not None
    if tied and embd is not None:
        matrices += (Matrix("output.weight (token_embd)", _type_name(embd.ggml_type), embd.dims[1], embd.nbytes),)
    return ModelShape(
        architecture=arch,
        tensor_bytes=sum(t.nbytes for t in layout.tensors),
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_head=_per_layer(meta, f"{arch}.attention.head_count", n_layer)[0] if n_layer else 0,
        n_swa=_int(meta, f"{arch}.attention.sliding_window", 0),
        kv_layers=_kv_layers(arch, meta, n_layer),
        matrices=matrices,
        per_layer_embd_bytes=ple.nbytes if ple is not None else 0,
        per_layer_embd_row_bytes=ple.nbytes // ple.dims[1] if ple is not None and len(ple.dims) > 1 else 0,
        tied_output=tied,
        n_merges=_int(meta, MERGES_KEY, 0),
        tied_embd_bytes=embd.nbytes if tied and embd is not None else 0,
    )


def _kv_layers(arch: str, meta: Mapping[str, object], n_layer: int) -> tuple[KvLayer, ...]:
    heads_kv = _per_layer(meta, f"{arch}.attention.head_count_kv", n_layer)
    key = _int(meta, f"{arch}.attention.key_length", 0)
    value = _int(meta, f"{arch}.attention.value_length", key)
    key_swa = _int(meta, f"{arch}.attention.key_length_swa", key)
    value_swa = _int(meta, f"{arch}.attention.value_length_swa", value)
    sliding = _sliding_layers(arch, meta, n_layer)
    # Gemma 4 (and 3n): the last shared_kv_layers layers read the cache of an earlier layer of their kind.
    owners = n_layer - _int(meta, f"{arch}.attention.shared_kv_layers", 0)
    layers = []
    for il in range(max(0, owners)):
        swa = sliding[il]
        k, v = (key_swa, value_swa) if swa else (key, value)
        layers.append(KvLayer(heads_kv[il] * k, heads_kv[il] * v, swa))
    return tuple(layers)


def _sliding_layers(arch: str, meta: Mapping[str, object], n_layer: int) -> tuple[bool, ...]:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple) and len(pattern) == n_layer:
        return tuple(bool(flag) for flag in pattern)
    if arch == "gemma3" and f"{arch}.attention.sliding_window" in meta:
        # llama.cpp's gemma3 hparams: set_swa_pattern(6), every 6th layer attends to the full context
        return tuple((il + 1) % 6 != 0 for il in range(n_layer))
    if arch == "gemma2" and f"{arch}.attention.sliding_window" in meta:
        return tuple(il % 2 == 0 for il in range(n_layer))
    return (False,) * n_layer  # unknown: a full-context cache everywhere, the larger answer


def _per_layer(meta: Mapping[str, object], key: str, n_layer: int) -> tuple[int, ...]:
    value = meta.get(key)
    if isinstance(value, tuple) and len(value) == n_layer:
        return tuple(int(v) for v in value if isinstance(v, int | float))
    return (_int(meta, key, 0),) * n_layer


def _int(meta: Mapping[str, object], key: str, default: int) -> int:
    value = meta.get(key)
    return int(value) if isinstance(value, int) else default


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def type_bytes(type_name: str, n_values: int) -> int:
    """Bytes of ``n_values`` of a ggml type (for synthetic shapes in tests)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return n_values // block * size


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Resident memory of a served model, part by part (MiB, rounded up)."""

    weights_mib: int
    per_layer_embd_mib: int
    repack_mib: int
    kv_mib: int
    compute_mib: int
    projector_mib: int
    process_mib: int
    #: the settings it was computed for, as the operator names them
    lazy_embeddings: bool
    weight_repack: bool
    kv_cache_type: str
    n_ctx: int
    #: the MTP drafter (0 without one, or with speculative = off)
    drafter_mib: int = 0

    @property
    def total_mib(self) -> int:
        return (
            self.weights_mib
            + self.per_layer_embd_mib
            + self.repack_mib
            + self.kv_mib
            + self.compute_mib
            + self.projector_mib
            + self.drafter_mib
            + self.process_mib
        )

    def parts(self) -> dict[str, int]:
        """Each part by name, in the order doctor prints them."""
        return {
            "weights": self.weights_mib,
            "per_layer_embeddings": self.per_layer_embd_mib,
            "repack": self.repack_mib,
            "kv_cache": self.kv_mib,
            "compute": self.compute_mib,
            "projector": self.projector_mib,
            "drafter": self.drafter_mib,
            "process": self.process_mib,
        }


def lazy_in_effect(shape: ModelShape, engine: EngineSettings) -> bool:
    """Whether llama.cpp will read the per-layer embeddings on demand (auto = only above 4 GiB).

    Also without mmap: llama.cpp's loader maps the file for its lazy tensors whatever the load mode
    (llama-model-loader.cpp, "read_lazy also requires mmap ... usable even when --load-mode is not mmap");
    measured on E4B-shape, lazy on + mmap off peaks at 3.9 GiB where mmap off alone is 6 GiB."""
    if not shape.per_layer_embd_bytes:
        return False
    if engine.lazy_embeddings == "auto":
        return shape.per_layer_embd_bytes > LAZY_AUTO_MIN_BYTES
    return engine.lazy_embeddings == "on"


def repacked_bytes(shape: ModelShape, rule: Mapping[str, int]) -> int:
    """Bytes of the matrices llama.cpp repacks under ``rule`` (:func:`repack_rule`)."""
    return sum(m.nbytes for m in shape.matrices if m.type_name in rule and m.rows % rule[m.type_name] == 0)


def kv_bytes(shape: ModelShape, engine: EngineSettings) -> int:
    """The KV cache llama.cpp allocates for ``engine``'s context, slots and KV type."""
    n_seq = engine.n_parallel + engine.prefix_cache_entries
    n_ctx = _pad(engine.n_ctx, 256)
    if engine.kv_unified:
        full_cells = n_ctx
        swa_cells = _pad(min(n_ctx, shape.n_swa * n_seq + engine.n_ubatch), 256)
    else:  # one stream per sequence, each of n_ctx / n_seq cells padded to 256 (llama-context.cpp)
        per_seq = _pad(max(1, n_ctx // n_seq), 256)
        full_cells = per_seq * n_seq
        swa_cells = min(per_seq, _pad(shape.n_swa + engine.n_ubatch, 256)) * n_seq
    if engine.swa_full or shape.n_swa == 0:
        swa_cells = full_cells
    per_value = KV_BYTES[engine.kv_cache_type]
    total = 0.0
    for layer in shape.kv_layers:
        cells = swa_cells if layer.sliding else full_cells
        total += cells * (layer.k_width + layer.v_width) * per_value
    return math.ceil(total)


def compute_bytes(shape: ModelShape, engine: EngineSettings) -> int:
    """The parts of llama.cpp's compute and output buffers that serving touches."""
    n_seq = engine.n_parallel + engine.prefix_cache_entries
    logits = 2 * shape.n_vocab * 4 * n_seq  # one row per sequence in the compute buffer and the output buffer
    activations = min(engine.n_ubatch, engine.n_batch) * shape.n_embd * 4 * ACTIVATION_WIDTHS
    scores = 0
    if not engine.flash_attn:  # without flash attention the KQ scores of a ubatch are materialised
        scores = min(engine.n_ubatch, engine.n_batch) * _pad(engine.n_ctx, 256) * shape.n_head * 4
    return logits + activations + scores


def drafter_bytes(drafter: ModelShape, engine: EngineSettings, *, repack: Mapping[str, int]) -> int:
    """What loading the MTP drafter adds (:class:`edgert.engine.llama.drafter.MtpDrafter`): its weights, mapped
    and read in (llama.cpp's default model parameters, so also repacked under the CPU's rule whatever
    ``engine.weight_repack`` says), its tokenizer's vocabulary and merges, one logit row and one token's
    activations per sequence (no KV cache: it views the model's). E2B-shape: 200 / 211 / 280 MiB predicted for
    199 / 213 / 282 MiB measured (benchmarks/RESULTS.md)."""
    n_seq = engine.n_parallel + engine.prefix_cache_entries
    # one row per drafting sequence is written (measured: 12 sequences cost 14 MiB more than 1, at 1 MiB a row)
    logits = drafter.n_vocab * 4 * n_seq
    activations = n_seq * drafter.n_embd * 4 * ACTIVATION_WIDTHS
    return (
        drafter.tensor_bytes
        + repacked_bytes(drafter, repack)
        + drafter.n_merges * BYTES_PER_MERGE
        + drafter.n_vocab * DRAFTER_BYTES_PER_TOKEN
        + logits
        + activations
    )


def estimate(
    shape: ModelShape,
    engine: EngineSettings,
    *,
    repack: Mapping[str, int],
    projector_mib: int = 0,
    drafter: ModelShape | None = None,
) -> MemoryBreakdown:
    """Resident memory of ``shape`` served with ``engine`` on a CPU whose repack rule is ``repack``; ``drafter``
    (the MTP drafter's shape) counts unless ``engine.speculative`` is ``off``, which never loads it."""
    lazy = lazy_in_effect(shape, engine)
    if lazy:
        rows = min(LAZY_ROWS, shape.n_vocab)
        ple = min(shape.per_layer_embd_bytes, rows * max(shape.per_layer_embd_row_bytes, FAULT_AROUND))
    else:
        ple = shape.per_layer_embd_bytes
    repacked = repacked_bytes(shape, repack) if engine.weight_repack else 0
    # without mmap the repacked matrices are read straight into their new layout: no duplicate remains
    duplicate = repacked if engine.use_mmap else 0
    weights = shape.tensor_bytes - shape.per_layer_embd_bytes
    if not engine.use_mmap and shape.tied_output and shape.architecture in OUTPUT_BEFORE_EMBEDDING:
        weights += shape.tied_embd_bytes
    return MemoryBreakdown(
        weights_mib=_mib(weights),
        per_layer_embd_mib=_mib(ple),
        repack_mib=_mib(duplicate),
        kv_mib=_mib(kv_bytes(shape, engine)),
        compute_mib=_mib(compute_bytes(shape, engine)),
        projector_mib=projector_mib,
        process_mib=PROCESS_MIB + _mib(shape.n_merges * BYTES_PER_MERGE),
        lazy_embeddings=lazy,
        weight_repack=engine.weight_repack and repacked > 0,
        kv_cache_type=engine.kv_cache_type,
        n_ctx=engine.n_ctx,
        drafter_mib=_mib(drafter_bytes(drafter, engine, repack=repack))
        if drafter is not None and engine.speculative != "off"
        else 0,
    )


def drafter_shape(path: Path) -> ModelShape:
    """The shape of a Gemma 4 MTP drafter GGUF (``gemma4-assistant``) for :func:`estimate`'s ``drafter``."""
    return shape_of(read_layout(path, architectures=frozenset({DRAFTER_ARCHITECTURE})))


def estimate_file(
    path: Path, engine: EngineSettings, *, repack: Mapping[str, int], projector_mib: int = 0
) -> MemoryBreakdown:
    """:func:`estimate` for a GGUF file (reads its header: well under a second for a 262k vocabulary)."""
    return estimate(shape_of(read_layout(path)), engine, repack=repack, projector_mib=projector_mib)


def machine_repack() -> dict[str, int]:
    """The repack rule of this machine's llama.cpp build (loads libllama)."""
    from edgert.engine.llama import capabilities  # noqa: PLC0415 - maps the native library only when asked
    from edgert.hardware import simd_flags  # noqa: PLC0415

    return repack_rule(simd_flags(capabilities().system_info))


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _mib(nbytes: int) -> int:
    return -(-nbytes // MIB)
