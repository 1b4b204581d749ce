"""Fit for speed: an estimated decode rate (tokens/s) for each catalog model on this machine.

Decoding one token on a CPU is bound by memory bandwidth: every weight matrix is read once per token, while the
lookup tables (``token_embd``, Gemma 4's per-layer embeddings) give one row each. So the estimate is

    seconds per token = bytes read per token / (EFFICIENCY x measured bandwidth) + TOKEN_OVERHEAD_S

with the bandwidth measured here (a numpy copy, cached in the state dir per CPU model) and the two constants
fitted on llama-bench decode rates of the 270M and the shape-exact Gemma 4 E2B, the E4B held out
(benchmarks/speed_fit_check.py, benchmarks/RESULTS.md). Installed files give their bytes per token from the GGUF
header; models not installed from the catalog's file size (see :data:`DENSE_FRACTION`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from contextlib import suppress
from pathlib import Path

from edgert.catalog import ModelSpec
from edgert.errors import EdgertError
from edgert.gguf_file import read_layout
from edgert.hardware import Hardware
from edgert.memory_fit import memory_budget
from edgert.memory_model import ModelShape, shape_of
from edgert.settings import Settings
from edgert.store import model_path

log = logging.getLogger("edgert.speed_fit")

#: Effective bandwidth of llama.cpp's decode (2 threads) over the numpy copy's figure. Fitted on a 2-vCPU EPYC
#: together with :data:`TOKEN_OVERHEAD_S` (benchmarks/speed_fit_check.py --fit: 1.089 and 1.044 in two runs):
#: above 1 because the copy runs on one thread and also writes.
EFFICIENCY = 1.07
#: Per-token cost that does not scale with the weights (graph build, sampling, thread sync; 3.8 ms in both
#: fits): why the 270M decodes at ~83 tok/s rather than the ~120 its 246 MB alone would allow.
TOKEN_OVERHEAD_S = 0.0038
#: Share of a catalog file that a token reads, for models not installed (no header to read): Gemma 4's
#: per-layer embedding table is most of the file but gives one row per token. Measured on the shape-exact
#: Q4_K_M files (matrices / file): E2B 1472 of 3400 MB, E4B 2972 of 5286 MB. Other variants: the whole file.
DENSE_FRACTION: dict[str, float] = {"gemma-4-e2b": 0.433, "gemma-4-e4b": 0.563}
#: Size of the array the bandwidth probe copies: far beyond any last-level cache.
PROBE_BYTES = 256 * 1024 * 1024
PROBE_REPEATS = 4
BANDWIDTH_FILE = "memory-bandwidth.json"


def bytes_per_token(shape: ModelShape) -> int:
    """Bytes of weights one decoded token reads: every matrix (the output projection included) and one row of the
    per-layer embedding table (the token embedding's single row is negligible)."""
    return sum(m.nbytes for m in shape.matrices) + shape.per_layer_embd_row_bytes


def catalog_bytes_per_token(spec: ModelSpec) -> int:
    """:func:`bytes_per_token` for a model not installed, from its catalog file size."""
    fraction = next((f for prefix, f in DENSE_FRACTION.items() if spec.id.startswith(prefix)), 1.0)
    return int(spec.size_bytes * fraction)


def decode_tok_s(nbytes_per_token: int, bandwidth_bytes_s: float) -> float:
    """Estimated single-stream decode rate; falls with bytes per token, rises with bandwidth."""
    if bandwidth_bytes_s <= 0:
        raise ValueError("bandwidth must be positive")
    return 1.0 / (nbytes_per_token / (EFFICIENCY * bandwidth_bytes_s) + TOKEN_OVERHEAD_S)


def measure_bandwidth() -> float:
    """Memory bandwidth in bytes/s: the best of a few copies of a 256 MiB array (read + write), ~0.3 s."""
    import numpy as np  # noqa: PLC0415 - only the probe needs it

    src = np.ones(PROBE_BYTES // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        np.copyto(dst, src)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * src.nbytes / max(elapsed, 1e-9))
    return best


def machine_bandwidth(state_dir: Path, cpu_model: str) -> float:
    """The bandwidth cached in ``state_dir`` for this CPU model, measured (and cached) when there is none."""
    path = state_dir / BANDWIDTH_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("cpu_model") == cpu_model and float(cached["bytes_per_s"]) > 0:
            return float(cached["bytes_per_s"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, unreadable or another CPU: measure again
    bandwidth = measure_bandwidth()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"cpu_model": cpu_model, "bytes_per_s": bandwidth}), encoding="utf-8")
    except OSError as exc:  # a read-only state dir costs a re-measure next time, nothing more
        log.debug("could not cache the memory bandwidth in %s: %s", path, exc)
    return bandwidth


def speed_estimates(
    models_dir: Path, specs: Iterable[ModelSpec], installed: AbstractSet[str], bandwidth_bytes_s: float
) -> dict[str, float]:
    """Estimated decode tok/s for every catalog model: from the header when installed, else from the catalog."""
    found: dict[str, float] = {}
    for spec in specs:
        nbytes = catalog_bytes_per_token(spec)
        path = model_path(models_dir, spec)
        if spec.id in installed and path.is_file():
            with suppress(EdgertError):  # a broken file is reported elsewhere; the catalog figure stands
                nbytes = bytes_per_token(shape_of(read_layout(path)))
        found[spec.id] = decode_tok_s(nbytes, bandwidth_bytes_s)
    return found


def machine_estimates(
    settings: Settings, specs: Iterable[ModelSpec], installed: AbstractSet[str], hw: Hardware
) -> dict[str, float]:
    """:func:`speed_estimates` with this machine's bandwidth, when the model runs on the CPU; empty otherwise
    (offloaded layers read GPU memory, whose bandwidth the probe does not see)."""
    if memory_budget(hw, settings.engine).kind != "ram":
        return {}
    bandwidth = machine_bandwidth(settings.state_dir, hw.cpu.model)
    return speed_estimates(settings.models_dir, specs, installed, bandwidth)
