"""What ``edgert doctor`` finds: the frozen :class:`Report` and the checks that fill its problems.

:func:`build_report` gathers settings, build, hardware and the model choice into one value and
runs every check (state dir, model, fit, engine settings, disk); it prints nothing, so
:mod:`edgert.cli.doctor_output` can render the same report as tables or JSON.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from edgert.catalog import Catalog, ModelSpec
from edgert.engine.base import BackendCapabilities
from edgert.errors import EdgertError
from edgert.gguf_file import validate_gguf
from edgert.hardware import MIB, Hardware, Problem
from edgert.memory_fit import FitChoice, MemoryNeed, choose_model, kv_is_lean, memory_need
from edgert.memory_plan import file_estimates
from edgert.settings import Settings
from edgert.speed_fit import machine_estimates
from edgert.store import PROJECTOR_ARCHITECTURES, available_ids, model_path, projector_ids, resolve_projector

ModelSource = Literal["auto", "catalog", "path"]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What ``edgert serve`` would load with these settings."""

    source: ModelSource
    #: catalog id or file path; None when ``auto`` finds nothing
    name: str | None
    spec: ModelSpec | None
    path: Path | None
    installed: bool
    need: MemoryNeed | None
    #: the multimodal projector it would be served with; None = text only
    projector: Path | None = None
    #: what it would accept: "text", then the projector's media
    modalities: tuple[str, ...] = ("text",)
    #: why its projector cannot be used (a bad engine.mmproj, a projector for another model)
    projector_error: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    settings: Settings
    config_file: Path | None
    caps: BackendCapabilities
    hw: Hardware
    served: ServedModel
    #: the best installed model (what ``model = "auto"`` serves)
    auto: FitChoice
    #: the best model in the whole catalog (what to pull)
    recommended: FitChoice
    installed: frozenset[str]
    disk_free_mib: int | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not any(problem.severity == "error" for problem in self.problems)


# --------------------------------------------------------------------------- gathering


def build_report(
    settings: Settings,
    catalog: Catalog,
    caps: BackendCapabilities,
    hw: Hardware,
    config_file: Path | None,
    *,
    load_problem: Problem | None = None,
    config_problem: Problem | None = None,
) -> Report:
    installed = available_ids(settings.models_dir, catalog)
    projectors = projector_ids(settings.models_dir, catalog)
    # installed files: the memory model computed from each header; the rest: the catalog's measured figure
    computed = file_estimates(settings.models_dir, catalog, installed, settings.engine)
    speeds = machine_estimates(settings, catalog, installed, hw)  # bandwidth measured once per CPU, cached
    auto = choose_model(
        catalog,
        hw,
        settings.engine,
        installed=set(installed),
        projectors=projectors,
        file_mib=computed,
        tok_s=speeds,
    )
    recommended = choose_model(catalog, hw, settings.engine, file_mib=computed, tok_s=speeds)
    served = _with_projector(settings, _served_model(settings, catalog, auto, installed, computed), computed)
    writable_base = _existing_ancestor(settings.state_dir)
    disk_free = shutil.disk_usage(writable_base).free // MIB if writable_base.is_dir() else None
    problems = [
        *([load_problem] if load_problem else []),
        *([config_problem] if config_problem else []),
        *hw.problems,
        *_state_dir_problems(settings.state_dir, writable_base),
        *_model_problems(settings, served, auto, recommended, hw),
        *_projector_problems(settings, served),
        *_engine_problems(settings, hw, served),
        *_disk_problems(recommended, installed, disk_free),
        _onnx_note(),
    ]
    return Report(
        settings=settings,
        config_file=config_file,
        caps=caps,
        hw=hw,
        served=served,
        auto=auto,
        recommended=recommended,
        installed=installed,
        disk_free_mib=disk_free,
        problems=tuple(problems),
    )


def _served_model(
    settings: Settings, catalog: Catalog, auto: FitChoice, installed: frozenset[str], computed: dict[str, int]
) -> ServedModel:
    name = settings.model
    if name == "auto":
        spec = auto.chosen
        need = memory_need(spec, settings.engine, file_mib=computed.get(spec.id)) if spec else None
        return ServedModel("auto", spec.id if spec else None, spec, None, spec is not None, need)
    spec = next((s for s in catalog if s.id == name), None)
    if spec is not None:
        need = memory_need(spec, settings.engine, file_mib=computed.get(spec.id))
        return ServedModel("catalog", name, spec, None, spec.id in installed, need)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        return ServedModel("path", name, None, path, path.is_file(), None)
    return ServedModel("catalog", name, None, None, installed=False, need=None)


def _with_projector(settings: Settings, served: ServedModel, computed: dict[str, int]) -> ServedModel:
    """The projector ``edgert serve`` would load with the served model, what it reads, and its memory."""
    path = served.path or (model_path(settings.models_dir, served.spec) if served.spec else None)
    if path is None or not path.exists():  # not installed (reported), or the embedded model not assembled yet
        return served
    try:
        projector = resolve_projector(settings, served.spec, path)
        media = (
            validate_gguf(projector, architectures=PROJECTOR_ARCHITECTURES).projector_modalities if projector else ()
        )
    except EdgertError as exc:
        need = _need(settings, served.spec, computed, with_projector=False)
        return replace(served, projector_error=exc.message, need=need)
    return replace(
        served,
        projector=projector,
        modalities=("text", *media),
        need=_need(settings, served.spec, computed, with_projector=projector is not None),
    )


def _need(
    settings: Settings, spec: ModelSpec | None, computed: dict[str, int], *, with_projector: bool
) -> MemoryNeed | None:
    if spec is None:
        return None
    return memory_need(spec, settings.engine, projector=with_projector, file_mib=computed.get(spec.id))


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or os.sep in name or name.startswith("~")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _state_dir_problems(state_dir: Path, existing: Path) -> list[Problem]:
    hint = "set EDGERT_STATE_DIR (or state_dir in the config file) to a writable directory"
    if not existing.is_dir():
        return [Problem("error", f"state dir {state_dir}: {existing} is not a directory", hint)]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem("error", f"state dir {state_dir} is not writable by this user ({existing})", hint)]
    if existing != state_dir:
        return [Problem("info", f"state dir {state_dir} does not exist yet; edgert will create it")]
    return []


def _model_problems(
    settings: Settings, served: ServedModel, auto: FitChoice, recommended: FitChoice, hw: Hardware
) -> list[Problem]:
    best = recommended.chosen
    pull_best = f"edgert models pull {best.id}" if best else "lower engine.n_ctx; no catalog model fits"
    if served.source == "auto" and served.spec is None:
        return [Problem("error", "model = auto, but no installed catalog model fits this machine", pull_best)]
    if served.source == "path":
        if served.installed:
            return [Problem("info", f"model {served.name} is a file outside the catalog: memory not checked")]
        return [Problem("error", f"model file {served.path} does not exist", "fix model in the config")]
    if served.spec is None:
        return [
            Problem(
                "error",
                f"configured model {served.name!r} is not in the catalog ({settings.catalog or 'packaged'})",
                "edgert models list shows the ids; or set EDGERT_MODEL=auto",
            )
        ]
    problems = []
    if not served.installed:
        problems.append(
            Problem("error", f"model {served.spec.id} is not installed", f"edgert models pull {served.spec.id}")
        )
    problems.extend(_fit_problems(served, auto, recommended, hw))
    return problems


def _fit_problems(served: ServedModel, auto: FitChoice, recommended: FitChoice, hw: Hardware) -> list[Problem]:
    assert served.spec is not None and served.need is not None  # callers checked
    need, budget = served.need.total_mib, recommended.budget
    problems = []
    if need > budget.budget_mib:
        smaller = auto.chosen or recommended.chosen
        hint = f"use {smaller.id} or lower engine.n_ctx" if smaller else "lower engine.n_ctx"
        if served.need.projector_mib and served.need.text_only_mib <= budget.budget_mib:
            hint = f"serve text only: engine.multimodal = false (then {served.need.text_only_mib} MiB); or {hint}"
        with_projector = f" with its {served.need.projector_mib} MiB projector" if served.need.projector_mib else ""
        problems.append(
            Problem(
                "warning",
                f"model {served.spec.id} needs {need} MiB{with_projector} but the {budget.kind} budget is "
                f"{budget.budget_mib} MiB: expect swapping or an out-of-memory kill",
                hint,
            )
        )
    if budget.kind != "vram" and need > hw.ram_available_mib:
        problems.append(
            Problem(
                "info",
                f"only {hw.ram_available_mib} MiB of RAM is available right now; {served.spec.id} needs "
                f"{need} MiB (a running edgert serve already holds its model in that figure)",
            )
        )
    return problems


def _projector_problems(settings: Settings, served: ServedModel) -> list[Problem]:
    if served.projector_error is not None:
        return [
            Problem(
                "error",
                f"multimodal projector: {served.projector_error}",
                "fix engine.mmproj (or --mmproj), or serve text only: engine.multimodal = false",
            )
        ]
    spec = served.spec
    if spec is None or spec.projector is None or not served.installed or served.projector is not None:
        return []
    if not settings.engine.multimodal:
        return [Problem("info", f"engine.multimodal = false: {spec.id} serves text only (no images or audio)")]
    return [
        Problem(
            "warning",
            f"the multimodal projector of {spec.id} is not installed: it serves text only "
            f"(no {' or '.join(spec.projector.modalities)})",
            f"edgert models pull {spec.id}",
        )
    ]


def _engine_problems(settings: Settings, hw: Hardware, served: ServedModel) -> list[Problem]:
    engine = settings.engine
    problems = []  # a quantized KV cache without flash attention never gets here: the settings refuse it
    if not kv_is_lean(engine):
        extra = f" (+{served.need.kv_extra_mib} MiB for {served.name})" if served.need else ""
        problems.append(
            Problem(
                "warning",
                f"KV cache is not lean (flash_attn={engine.flash_attn}, swa_full={engine.swa_full}): "
                f"about 3x the KV memory at 8k context{extra}",
                "set engine.flash_attn = true and engine.swa_full = false",
            )
        )
    if served.spec is not None and engine.n_ctx > served.spec.context_length:
        problems.append(
            Problem(
                "warning",
                f"n_ctx {engine.n_ctx} exceeds the trained context of {served.spec.id} ({served.spec.context_length})",
                f"set engine.n_ctx <= {served.spec.context_length}",
            )
        )
    for field in ("n_threads", "n_threads_batch"):
        value = getattr(engine, field)
        if value is not None and value > hw.cpu.logical_cores:
            problems.append(
                Problem(
                    "warning",
                    f"engine.{field} = {value} exceeds the {hw.cpu.logical_cores} logical cores: "
                    "oversubscribed threads slow decoding down",
                    f"unset it (defaults to the {hw.cpu.physical_cores} physical cores)",
                )
            )
    return problems


def _disk_problems(recommended: FitChoice, installed: frozenset[str], disk_free_mib: int | None) -> list[Problem]:
    best = recommended.chosen
    if best is None or best.id in installed or disk_free_mib is None:
        return []
    size_mib = best.size_bytes // MIB
    if size_mib <= disk_free_mib:
        return []
    return [
        Problem(
            "warning",
            f"the recommended model {best.id} ({size_mib} MiB) does not fit the {disk_free_mib} MiB "
            "free under the state dir",
            "free disk space or point EDGERT_STATE_DIR at a larger volume",
        )
    ]


def _onnx_note() -> Problem:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        state = "onnxruntime-genai is not installed (pip install 'edgert[onnx]')"
    else:
        state = f"onnxruntime-genai {importlib.metadata.version('onnxruntime-genai')} serves ONNX model folders"
    return Problem(
        "info",
        f"ONNX backend: {state}; its 0.18 model builder does not support the per-layer embeddings of "
        "Gemma 4 E2B/E4B, so those run on llama.cpp [GGUF only]",
    )
