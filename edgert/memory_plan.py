"""Fitting a model into a memory budget: which settings to give up, cheapest for speed first.

:func:`plan` is pure (a :class:`~edgert.memory_model.ModelShape`, the engine settings, a budget); it walks
:data:`STEPS` in order and stops at the first set of settings whose predicted memory fits. The order is
the cost to decode speed measured on the shape-exact E2B (MEASUREMENTS.md, 2-core EPYC): lazy per-layer
embeddings ~0.92x, repack off ~0.84x together with lazy, a q8_0 KV cache (small drift, no speed cost on
CPU), then the MTP drafter (``speculative = off``: it frees the least, ~0.2 GiB for E2B's, and costs what
speculation earned: ~1.0x at one stream on that CPU, where ``auto`` declines to draft, ~0.85x at eight
streams, where it gained 1.17x; benchmarks/RESULTS.md), then a smaller context (shorter conversations),
then text only (no images or audio). The drafter goes before the last two because those take a
capability away, while dropping it leaves the output unchanged and only decodes slower.
:func:`fit_settings` applies it to a file before the daemon loads it (``memory_budget``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from edgert.catalog import ModelSpec
from edgert.errors import EdgertError, MemoryBudgetError
from edgert.gguf_file import read_layout
from edgert.memory_model import (
    MIB,
    MemoryBreakdown,
    ModelShape,
    drafter_shape,
    estimate,
    lazy_in_effect,
    machine_repack,
    repacked_bytes,
    shape_of,
)
from edgert.settings import EngineSettings, Settings
from edgert.store import drafter_path, model_path, pair_model, resolve_projector, with_release_drafter

log = logging.getLogger("edgert.memory_plan")

#: The budget changes, in order of their cost to speed.
STEPS = ("lazy_embeddings", "weight_repack", "kv_cache_type", "speculative", "n_ctx", "multimodal")
#: The smallest context the planner shrinks to (it halves n_ctx down to this).
MIN_CTX = 2048
#: A projector outside the catalog: its file is read into memory, plus the encoders' compute buffers
#: measured with the E2B projector (audio 101 MiB, vision 443 MiB at 1120 tokens; models.toml).
PROJECTOR_COMPUTE_MIB = 544


@dataclass(frozen=True, slots=True)
class Plan:
    """Settings that fit a budget (or the closest the planner got), and what it changed."""

    engine: EngineSettings
    breakdown: MemoryBreakdown
    budget_mib: int
    #: one line per change, e.g. "engine.lazy_embeddings: auto -> on (-1748 MiB)"
    changes: tuple[str, ...]
    #: the projector is left out (engine.multimodal = false)
    text_only: bool

    @property
    def fits(self) -> bool:
        return self.breakdown.total_mib <= self.budget_mib


def plan(
    shape: ModelShape,
    engine: EngineSettings,
    budget_mib: int,
    *,
    repack: dict[str, int],
    projector_mib: int = 0,
    drafter: ModelShape | None = None,
) -> Plan:
    """The first settings along :data:`STEPS` whose predicted memory fits ``budget_mib``.

    ``drafter`` is the MTP drafter's shape when one is configured (the ``speculative`` step turns it off).
    """
    current = estimate(shape, engine, repack=repack, projector_mib=projector_mib, drafter=drafter)
    changes: list[str] = []
    text_only = False
    for step in STEPS:
        if current.total_mib <= budget_mib:
            break
        for update in _step(step, shape, engine, repack, projector_mib, drafter is not None):
            candidate = engine.model_copy(update=update)
            proj = 0 if text_only or update.get("multimodal") is False else projector_mib
            after = estimate(shape, candidate, repack=repack, projector_mib=proj, drafter=drafter)
            if after.total_mib >= current.total_mib and after.total_mib > budget_mib:
                continue  # this change saves nothing here: try its next value, then the next step
            changes.extend(_describe(engine, candidate, current.total_mib - after.total_mib))
            engine, current, text_only = candidate, after, proj == 0 and projector_mib > 0
            if current.total_mib <= budget_mib:
                break
    return Plan(engine, current, budget_mib, tuple(changes), text_only)


def _step(
    step: str, shape: ModelShape, engine: EngineSettings, repack: dict[str, int], projector_mib: int, drafter: bool
) -> list[dict[str, object]]:
    """The setting values one step may try, mildest first."""
    if step == "lazy_embeddings":
        on = engine.model_copy(update={"lazy_embeddings": "on"})
        return [{"lazy_embeddings": "on"}] if lazy_in_effect(shape, on) and not lazy_in_effect(shape, engine) else []
    if step == "weight_repack":
        return [{"weight_repack": False}] if engine.weight_repack and repacked_bytes(shape, repack) else []
    if step == "kv_cache_type":
        return [{"kv_cache_type": "q8_0"}] if engine.kv_cache_type == "f16" and engine.flash_attn else []
    if step == "speculative":
        return [{"speculative": "off"}] if drafter and engine.speculative != "off" else []
    if step == "n_ctx":
        sizes: list[dict[str, object]] = []
        n_ctx = engine.n_ctx
        while n_ctx // 2 >= MIN_CTX:
            n_ctx //= 2
            sizes.append({"n_ctx": n_ctx})
        return sizes
    return [{"multimodal": False}] if projector_mib and engine.multimodal else []


def _describe(before: EngineSettings, after: EngineSettings, saved_mib: int) -> list[str]:
    changed = [name for name in STEPS if getattr(before, name) != getattr(after, name)]
    return [
        f"engine.{name}: {_show(getattr(before, name))} -> {_show(getattr(after, name))} (-{saved_mib} MiB)"
        for name in changed
    ]


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def breakdown_text(breakdown: MemoryBreakdown) -> str:
    """``4360 MiB = weights 1406 + per_layer_embeddings 1838 + ...`` (parts that are 0 left out)."""
    parts = " + ".join(f"{name} {mib}" for name, mib in breakdown.parts().items() if mib)
    return f"{breakdown.total_mib} MiB = {parts}"


def parse_budget(text: str) -> int:
    """``"4GiB"``, ``"3500MiB"``, ``"3.5 GB"`` -> MiB (the units pydantic's ByteSize reads)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError  # noqa: PLC0415

    try:
        return int(TypeAdapter(ByteSize).validate_python(text)) // MIB
    except ValidationError:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 3500MiB)") from None


def projector_mib(spec: ModelSpec | None, projector: Path | None) -> int:
    """What serving ``projector`` adds: the catalog's measured figure, else its file + the encoders' buffers."""
    if projector is None:
        return 0
    if spec is not None and spec.projector is not None:
        return spec.projector.ram_mib
    return -(-projector.stat().st_size // MIB) + PROJECTOR_COMPUTE_MIB


def file_estimates(
    models_dir: Path, specs: Iterable[ModelSpec], installed: AbstractSet[str], engine: EngineSettings
) -> dict[str, int]:
    """The memory model's MiB (without projector, with the drafter it would be served with) for each installed
    catalog model whose file reads cleanly."""
    repack: dict[str, int] | None = None
    found: dict[str, int] = {}
    for spec in specs:
        path = model_path(models_dir, spec)
        if spec.id not in installed or not path.is_file():
            continue
        try:
            shape = shape_of(read_layout(path))
        except EdgertError:
            continue  # a broken file is reported elsewhere (doctor, the load); the catalog figure stands
        repack = machine_repack() if repack is None else repack
        found[spec.id] = estimate(
            shape, engine, repack=repack, drafter=_catalog_drafter(models_dir, spec, engine)
        ).total_mib
    return found


def _catalog_drafter(models_dir: Path, spec: ModelSpec, engine: EngineSettings) -> ModelShape | None:
    """The drafter ``spec`` would be served with: ``engine.drafter``, else its installed catalog drafter."""
    if engine.drafter is not None or engine.speculative == "off":
        return served_drafter(engine)
    path = drafter_path(models_dir, spec)
    return served_drafter(engine.model_copy(update={"drafter": path})) if path is not None and path.is_file() else None


def beside_mib(settings: Settings, path: Path) -> int | None:
    """What loading the GGUF ``path`` beside a serving model adds, in MiB: the memory model's estimate for the
    settings it will load with (after ``memory_budget``'s fit, its projector included), without the process
    part the running daemon already holds. None for a model folder or a file whose header or projector does
    not read (the caller falls back on the file size; the load then reports what is wrong)."""
    model = pair_model(path) or path
    if model.is_dir():
        return None
    try:
        projector = resolve_projector(settings, None, model)
        settings = with_release_drafter(settings, model)
        fitted, projector = fit_settings(settings, None, model, projector)
        shape = shape_of(read_layout(model))
    except EdgertError:
        return None
    breakdown = estimate(
        shape,
        fitted.engine,
        repack=machine_repack(),
        projector_mib=projector_mib(None, projector),
        drafter=served_drafter(fitted.engine),
    )
    return breakdown.total_mib - breakdown.process_mib


def served_drafter(engine: EngineSettings) -> ModelShape | None:
    """The shape of the MTP drafter ``engine`` loads (none with ``speculative = off``, or when its header does
    not read: the load then refuses it with the reason)."""
    if engine.drafter is None or engine.speculative == "off":
        return None
    try:
        return drafter_shape(engine.drafter)
    except EdgertError:
        return None


def fit_settings(
    settings: Settings, spec: ModelSpec | None, path: Path, projector: Path | None
) -> tuple[Settings, Path | None]:
    """Settings (and projector) that fit ``settings.memory_budget``; unchanged without one or for ONNX folders.

    Logs each change; raises :class:`MemoryBudgetError` with the breakdown when even the last step does not fit.
    """
    if settings.memory_budget is None or path.is_dir():
        return settings, projector
    budget = parse_budget(settings.memory_budget)
    shape = shape_of(read_layout(path))
    result = plan(
        shape,
        settings.engine,
        budget,
        repack=machine_repack(),
        projector_mib=projector_mib(spec, projector),
        drafter=served_drafter(settings.engine),
    )
    if not result.fits:
        raise MemoryBudgetError(
            f"{path.name} does not fit memory_budget {budget} MiB even with "
            f"{', '.join(result.changes) or 'no change possible'}: it needs {breakdown_text(result.breakdown)}"
        )
    for change in result.changes:
        log.warning("memory_budget %d MiB: %s", budget, change)
    log.info("memory_budget %d MiB: %s predicted for %s", budget, breakdown_text(result.breakdown), path.name)
    return settings.model_copy(update={"engine": result.engine}), None if result.text_only else projector
