"""The memory-fit rules: which catalog model + quant this machine can hold, and why.

Pure functions of a :class:`~edgert.hardware.Hardware` value, the catalog and the engine settings;
no I/O, so every rule is tested on synthetic machines. :mod:`edgert.hardware` does the probing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

from edgert.catalog import ModelSpec
from edgert.hardware import Hardware
from edgert.settings import EngineSettings

MemoryKind = Literal["ram", "vram", "unified"]

#: RAM kept free for the OS, the edgert process itself and page cache when the model runs on the
#: CPU: 15 % of RAM, and never less than 1 GiB (a 2 GiB board still needs room for its OS).
RAM_HEADROOM_FRACTION = 0.15
RAM_HEADROOM_MIN_MIB = 1024
#: VRAM kept free on a CUDA device: the CUDA context and cuBLAS workspaces take 300-500 MiB
#: before any tensor is allocated, and a display may be attached.
VRAM_HEADROOM_FRACTION = 0.10
VRAM_HEADROOM_MIN_MIB = 512
#: Metal may keep only ``recommendedMaxWorkingSetSize`` resident on the GPU, about 2/3 of RAM on
#: 8-16 GiB Apple silicon; the rest of unified memory stays with macOS.
UNIFIED_GPU_FRACTION = 2 / 3

#: The catalog's figures assume lean KV settings (flash attention on, small sliding-window
#: cache). llama-cpp-python's defaults (flash attention off, ``swa_full``) give every
#: sliding-window layer a full-context cache. Measured (MEASUREMENTS.md): E2B KV 96/192/768 MiB
#: at ctx 4096/8192/32768 instead of 36/60/204, i.e. 24 MiB per 1k tokens = 4.0x the lean slope
#: of 6; E4B at 32768 2432 instead of 552 MiB, 76 MiB per 1k = 4.75x its lean slope of 16. We
#: take the larger factor, and add (factor - 1) x lean slope x n_ctx on top of the lean figure:
#: that ignores the small fixed lean sliding cache, so it errs on the side of "needs more".
NON_LEAN_KV_FACTOR = 4.75

#: Approximate bits per weight of GGUF quantizations (llama.cpp ``llama-quantize`` table). Used
#: to rank quants by precision and to estimate a variant's parameter count from its file size.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_1": 6.0,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_0": 5.5,
    "Q4_1": 5.0,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_0": 4.5,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "MXFP4": 4.25,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "IQ3_M": 3.66,
    "Q3_K_S": 3.5,
    "IQ3_XXS": 3.06,
    "Q2_K": 2.96,
    "IQ2_M": 2.7,
    "IQ2_XXS": 2.06,
    "IQ1_S": 1.56,
}


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """How much memory a model may occupy, and why."""

    kind: MemoryKind
    total_mib: int
    headroom_mib: int
    reason: str

    @property
    def budget_mib(self) -> int:
        return max(0, self.total_mib - self.headroom_mib)


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """Resident memory one catalog model needs under the given engine settings."""

    #: ``spec.ram_needed_mib(n_ctx)``: mapped weights + CPU repacked copy + lean KV + compute buffer
    lean_mib: int
    #: extra KV when flash attention is off or swa_full is on (0 with lean settings)
    kv_extra_mib: int
    #: the multimodal projector's weights + encoder compute buffer (0 when served text only)
    projector_mib: int = 0

    @property
    def total_mib(self) -> int:
        return self.lean_mib + self.kv_extra_mib + self.projector_mib

    @property
    def text_only_mib(self) -> int:
        """What the model needs without its projector (``engine.multimodal = false``)."""
        return self.lean_mib + self.kv_extra_mib


@dataclass(frozen=True, slots=True)
class Candidate:
    spec: ModelSpec
    need: MemoryNeed
    fits: bool
    #: None when installed-ness was not asked about
    installed: bool | None
    eligible: bool
    line: str
    #: estimated decode tokens/s (None when not estimated)
    tok_s: float | None = None
    #: at or above engine.min_decode_tok_s (True when not estimated or the minimum is 0)
    fast_enough: bool = True


@dataclass(frozen=True, slots=True)
class FitChoice:
    chosen: ModelSpec | None
    budget: MemoryBudget
    candidates: tuple[Candidate, ...]
    explanation: str

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(candidate.line for candidate in self.candidates)


# --------------------------------------------------------------------------- pure rules


def kv_is_lean(engine: EngineSettings) -> bool:
    return engine.flash_attn and not engine.swa_full


def serves_projector(spec: ModelSpec, engine: EngineSettings, projectors: AbstractSet[str] | None = None) -> bool:
    """Whether ``spec`` would be served with its projector: it has one, ``engine.multimodal`` is on and (when
    ``projectors`` names the ids whose projector is installed) it is installed."""
    if spec.projector is None or not engine.multimodal:
        return False
    return projectors is None or spec.id in projectors


def memory_need(
    spec: ModelSpec, engine: EngineSettings, *, projector: bool | None = None, file_mib: int | None = None
) -> MemoryNeed:
    """What ``spec`` occupies at ``engine.n_ctx`` with ``engine``'s KV settings, and its projector when served.

    ``projector`` None counts the projector whenever :func:`serves_projector` says so for an installed one.
    ``file_mib`` is the memory model's figure for the installed file without its projector
    (:func:`edgert.memory_plan.file_estimates`); it replaces the catalog's ``ram_mib`` arithmetic, which
    remains for models not installed (nothing to read the shape from).
    """
    lean = spec.ram_needed_mib(engine.n_ctx) if file_mib is None else file_mib
    with_projector = serves_projector(spec, engine) if projector is None else projector
    projector_mib = spec.projector.ram_mib if with_projector and spec.projector is not None else 0
    if kv_is_lean(engine) or file_mib is not None:  # the memory model counts the KV layout itself
        return MemoryNeed(lean_mib=lean, kv_extra_mib=0, projector_mib=projector_mib)
    extra = (NON_LEAN_KV_FACTOR - 1) * spec.kv_mib_per_1k_ctx * engine.n_ctx / 1024
    return MemoryNeed(lean_mib=lean, kv_extra_mib=math.ceil(extra), projector_mib=projector_mib)


def memory_budget(hw: Hardware, engine: EngineSettings) -> MemoryBudget:
    """Where the model lives (VRAM, unified memory or RAM) and how much of it edgert may use."""
    if hw.backend == "cuda" and engine.n_gpu_layers == -1 and hw.gpus:
        # llama.cpp splits layers over all GPUs, but one device must hold the biggest share
        # plus the output layer: sizing against the largest single GPU keeps the choice safe.
        # The catalog figure counted against it includes llama.cpp's CPU repacked copy (~869 MiB
        # for E2B Q4_K_M), which offloaded weights do not get: the need is overstated, never under.
        gpu = max(hw.gpus, key=lambda g: g.vram_total_mib)
        headroom = max(math.ceil(gpu.vram_total_mib * VRAM_HEADROOM_FRACTION), VRAM_HEADROOM_MIN_MIB)
        reason = (
            f"VRAM of GPU {gpu.index} ({gpu.name}): {gpu.vram_total_mib} MiB total - {headroom} MiB "
            f"headroom ({VRAM_HEADROOM_FRACTION:.0%}, at least {VRAM_HEADROOM_MIN_MIB} MiB, for the CUDA "
            f"context and workspaces), all layers offloaded"
        )
        return MemoryBudget("vram", gpu.vram_total_mib, headroom, reason)
    if hw.backend == "metal" and engine.n_gpu_layers != 0:
        headroom = hw.ram_total_mib - math.floor(hw.ram_total_mib * UNIFIED_GPU_FRACTION)
        reason = (
            f"unified memory: {hw.ram_total_mib} MiB total - {headroom} MiB kept for macOS (Metal "
            f"keeps at most about {UNIFIED_GPU_FRACTION:.0%} of RAM resident on the GPU)"
        )
        return MemoryBudget("unified", hw.ram_total_mib, headroom, reason)
    headroom = max(math.ceil(hw.ram_total_mib * RAM_HEADROOM_FRACTION), RAM_HEADROOM_MIN_MIB)
    reason = (
        f"RAM: {hw.ram_total_mib} MiB total - {headroom} MiB headroom ({RAM_HEADROOM_FRACTION:.0%}, at "
        f"least {RAM_HEADROOM_MIN_MIB} MiB, for the OS and edgert itself)"
    )
    if hw.backend == "cuda" and engine.n_gpu_layers == -1:
        reason += "; the CUDA GPU's VRAM could not be read, so RAM is the budget"
    elif hw.backend in ("cuda", "metal") and engine.n_gpu_layers > 0:
        # Partial offload: the layer split is not known here, so count everything against RAM.
        reason += f"; only {engine.n_gpu_layers} layers offloaded, so the whole model is counted in RAM"
    return MemoryBudget("ram", hw.ram_total_mib, headroom, reason)


def quant_bits(quant: str) -> float:
    """Approximate bits per weight; unknown names fall back to the first number in them."""
    known = BITS_PER_WEIGHT.get(quant.upper())
    if known is not None:
        return known
    digits = re.search(r"\d+", quant)
    return float(digits.group()) + 0.5 if digits else 8.0


def variant_of(spec: ModelSpec) -> str:
    """``gemma-4-e2b:q4_k_m`` -> ``gemma-4-e2b``: the quants of one variant share it."""
    return spec.id.split(":", 1)[0]


def _variant_params(specs: Iterable[ModelSpec]) -> dict[str, float]:
    """Estimated parameters per variant: file bits / bits per weight, the largest over its quants.

    Names are no guide ("E2B" is 2B *effective*, ~5B stored), file sizes are.
    """
    params: dict[str, float] = {}
    for spec in specs:
        estimate = spec.size_bytes * 8 / quant_bits(spec.quant)
        params[variant_of(spec)] = max(params.get(variant_of(spec), 0.0), estimate)
    return params


def rank(specs: Iterable[ModelSpec]) -> list[ModelSpec]:
    """Best first: the largest variant, then the highest-precision quant."""
    pool = list(specs)
    params = _variant_params(pool)
    return sorted(pool, key=lambda s: (-params[variant_of(s)], -quant_bits(s.quant), s.id))


def choose_model(
    catalog_specs: Iterable[ModelSpec],
    hw: Hardware,
    engine_settings: EngineSettings,
    installed: set[str] | None = None,
    projectors: AbstractSet[str] | None = None,
    file_mib: Mapping[str, int] | None = None,
    tok_s: Mapping[str, float] | None = None,
) -> FitChoice:
    """The largest catalog model + quant that fits the memory budget and decodes fast enough.

    With ``installed`` given, only those ids are eligible; the others are still listed so the
    caller can suggest a download. A model's projector counts when ``engine.multimodal`` is on and,
    with ``projectors`` given (the ids whose projector is installed), when it is installed. ``file_mib``
    holds the memory model's figure for installed files (see :func:`memory_need`). ``tok_s`` holds estimated
    decode rates (:func:`edgert.speed_fit.speed_estimates`): a candidate below ``engine.min_decode_tok_s`` is
    passed over, unless no eligible one reaches it; then the fastest eligible one is chosen. Pure: no I/O.
    """
    budget = memory_budget(hw, engine_settings)
    computed = file_mib or {}
    rates = tok_s or {}
    candidates = tuple(
        _candidate(
            spec,
            budget,
            engine_settings,
            installed,
            serves_projector(spec, engine_settings, projectors),
            computed.get(spec.id),
            rates.get(spec.id),
        )
        for spec in rank(catalog_specs)
    )
    chosen = next((c.spec for c in candidates if c.eligible and c.fast_enough), None)
    slow_pick = chosen is None and any(c.eligible for c in candidates)
    if slow_pick:  # nothing reaches the minimum: serving slowly beats refusing to serve
        chosen = max((c for c in candidates if c.eligible), key=lambda c: c.tok_s or 0.0).spec
    explanation = _explain(chosen, budget, candidates, engine_settings, installed)
    if slow_pick:
        explanation += _explain_slow(chosen, candidates, engine_settings)
    elif chosen is not None and any(c.eligible and not c.fast_enough for c in candidates):
        skipped = ", ".join(c.spec.id for c in candidates if c.eligible and not c.fast_enough)
        explanation += (
            f" Passed over as too slow (estimated below engine.min_decode_tok_s = "
            f"{engine_settings.min_decode_tok_s:g} tok/s): {skipped}."
        )
    return FitChoice(chosen=chosen, budget=budget, candidates=candidates, explanation=explanation)


def _candidate(
    spec: ModelSpec,
    budget: MemoryBudget,
    engine: EngineSettings,
    installed: set[str] | None,
    projector: bool,
    file_mib: int | None,
    tok_s: float | None = None,
) -> Candidate:
    need = memory_need(spec, engine, projector=projector, file_mib=file_mib)
    fits = need.total_mib <= budget.budget_mib
    is_installed = None if installed is None else spec.id in installed
    too_long = engine.n_ctx > spec.context_length
    eligible = fits and is_installed is not False and not too_long
    verdict = "fits" if fits else "does not fit"
    sign = "<=" if fits else ">"
    line = f"{spec.id}: needs {_need_text(need)} {sign} budget {budget.budget_mib} MiB, {verdict}"
    if not fits and need.projector_mib and need.text_only_mib <= budget.budget_mib:
        line += f"; text only ({need.text_only_mib} MiB, engine.multimodal = false) would fit"
    if too_long:
        line += f"; n_ctx {engine.n_ctx} exceeds its trained context {spec.context_length}"
    if is_installed is not None:
        line += "; installed" if is_installed else "; not installed"
    minimum = engine.min_decode_tok_s
    fast_enough = tok_s is None or minimum <= 0 or tok_s >= minimum
    if tok_s is not None:
        line += f"; ~{tok_s:.1f} tok/s" + ("" if fast_enough else f", below engine.min_decode_tok_s {minimum:g}")
    return Candidate(spec, need, fits, is_installed, eligible, line, tok_s, fast_enough)


def _need_text(need: MemoryNeed) -> str:
    parts = [f"{need.lean_mib} lean"] if need.kv_extra_mib or need.projector_mib else []
    if need.kv_extra_mib:
        parts.append(f"{need.kv_extra_mib} non-lean KV")
    if need.projector_mib:
        parts.append(f"{need.projector_mib} projector")
    return f"{need.total_mib} MiB ({' + '.join(parts)})" if parts else f"{need.total_mib} MiB"


def _explain(
    chosen: ModelSpec | None,
    budget: MemoryBudget,
    candidates: tuple[Candidate, ...],
    engine: EngineSettings,
    installed: set[str] | None,
) -> str:
    parts = [f"Budget {budget.budget_mib} MiB = {budget.reason}."]
    pool = "installed catalog model" if installed is not None else "catalog model"
    if chosen is not None:
        need = next(c.need for c in candidates if c.spec.id == chosen.id)
        projector = f" + its multimodal projector, {need.projector_mib} MiB" if need.projector_mib else ""
        parts.append(
            f"Chose {chosen.id}, the largest {pool} that fits: it needs {need.total_mib} MiB at "
            f"n_ctx {engine.n_ctx} (mapped weights + llama.cpp's CPU repacked copy + KV cache + compute "
            f"buffer{projector}), leaving {budget.budget_mib - need.total_mib} MiB of the budget."
        )
    elif not candidates:
        parts.append("The catalog is empty.")
    else:
        parts.append(_explain_none(candidates, budget, installed))
    if not kv_is_lean(engine):
        parts.append(_explain_non_lean(engine, chosen))
    return " ".join(parts)


def _explain_none(candidates: tuple[Candidate, ...], budget: MemoryBudget, installed: set[str] | None) -> str:
    fitting = [c for c in candidates if c.fits]
    if installed is not None and fitting:
        nothing = not any(c.installed for c in candidates)
        lead = "No catalog model is installed" if nothing else "No installed catalog model fits"
        best = fitting[0]
        return f"{lead}; the largest one that would fit is {best.spec.id} ({best.need.total_mib} MiB)."
    if fitting:
        return "The models that fit were trained for less context than n_ctx; lower engine.n_ctx."
    text_only = [c for c in candidates if c.need.projector_mib and c.need.text_only_mib <= budget.budget_mib]
    if text_only:
        best = text_only[0]
        return (
            f"Nothing fits with its multimodal projector; served text only (engine.multimodal = false), "
            f"{best.spec.id} needs {best.need.text_only_mib} MiB."
        )
    smallest = min(candidates, key=lambda c: c.need.total_mib)
    return (
        f"Nothing fits: the smallest, {smallest.spec.id}, needs {smallest.need.total_mib} MiB > "
        f"{budget.budget_mib} MiB. Lower engine.n_ctx, or use lean KV settings."
    )


def _explain_slow(chosen: ModelSpec | None, candidates: tuple[Candidate, ...], engine: EngineSettings) -> str:
    rate = next((c.tok_s for c in candidates if chosen is not None and c.spec.id == chosen.id), None)
    shown = f"~{rate:.1f} tok/s" if rate is not None else "speed unknown"
    return (
        f" No model that qualifies reaches engine.min_decode_tok_s = {engine.min_decode_tok_s:g} tok/s here "
        f"(estimated), so the fastest of them was chosen ({shown}); set engine.min_decode_tok_s = 0 to pick by "
        f"memory only."
    )


def _explain_non_lean(engine: EngineSettings, chosen: ModelSpec | None) -> str:
    causes = []
    if not engine.flash_attn:
        causes.append("flash_attn is off")
    if engine.swa_full:
        causes.append("swa_full is on")
    text = (
        f"KV is not lean ({' and '.join(causes)}): llama.cpp then keeps a full-context cache for every "
        f"sliding-window layer. Measured for Gemma 4 E2B: 96/192/768 MiB of KV at ctx 4096/8192/32768 "
        f"instead of 36/60/204 MiB (about 3x at 8k); so each model's lean figure gets "
        f"({NON_LEAN_KV_FACTOR:g} - 1) x its KV MiB per 1k tokens x n_ctx/1024 added"
    )
    if chosen is not None:
        extra = memory_need(chosen, engine).kv_extra_mib
        text += f" ({extra} MiB for {chosen.id} at n_ctx {engine.n_ctx})"
    return text + ". Set engine.flash_attn = true and engine.swa_full = false to get it back."
