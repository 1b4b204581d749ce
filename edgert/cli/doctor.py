"""``edgert doctor``: what this machine can run, what edgert would load, and what is wrong.

The command gathers everything into one frozen :class:`Report` (settings, build, hardware,
model choice, problems), then renders it either as rich tables or as one JSON object. Exit
status (see :mod:`edgert.cli.exitcodes`): 0 = no problem of severity "error", so ``edgert serve``
should be able to start; 1 = at least one such problem; 6 = the settings or the catalog are invalid
(nothing else could be checked).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgert.catalog import PACKAGED_CATALOG, Catalog, ModelSpec, load_catalog
from edgert.cli import exitcodes
from edgert.engine.base import BackendCapabilities
from edgert.errors import ConfigError
from edgert.hardware import MIB, Hardware, Problem, detect, parse_system_info
from edgert.log import scrub_urls
from edgert.memory_fit import FitChoice, MemoryNeed, choose_model, kv_is_lean, memory_need
from edgert.settings import Settings, config_file_path, ignored_local_config, load_settings
from edgert.store import available_ids

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


def doctor(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Check this machine and edgert's setup: backend, devices, memory, model fit, config."""
    try:
        settings = load_settings()
        catalog = load_catalog(settings.catalog)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None
    caps, load_problem = _capabilities()
    ignored = ignored_local_config()
    config_problem = Problem("warning", ignored) if ignored else None
    report = build_report(
        settings,
        catalog,
        caps,
        detect(caps),
        config_file_path(),
        load_problem=load_problem,
        config_problem=config_problem,
    )
    if json_output:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        render(report, Console())
    raise typer.Exit(exitcodes.OK if report.ok else exitcodes.FAILURE)


def _capabilities() -> tuple[BackendCapabilities, Problem | None]:
    """The llama.cpp build's capabilities; a broken install is a problem to report, not a crash."""
    try:
        # Imported here: loading llama_cpp maps the native library, which other commands never need.
        from edgert.engine.llama import capabilities  # noqa: PLC0415

        return capabilities(), None
    except (ImportError, OSError) as exc:
        problem = Problem(
            "error",
            f"llama-cpp-python cannot be loaded: {exc}",
            "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36",
        )
        return BackendCapabilities("llama.cpp", "unavailable", gpu_offload=False, system_info=""), problem


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
    auto = choose_model(catalog, hw, settings.engine, installed=set(installed))
    recommended = choose_model(catalog, hw, settings.engine)
    served = _served_model(settings, catalog, auto, installed)
    writable_base = _existing_ancestor(settings.state_dir)
    disk_free = shutil.disk_usage(writable_base).free // MIB if writable_base.is_dir() else None
    problems = [
        *([load_problem] if load_problem else []),
        *([config_problem] if config_problem else []),
        *hw.problems,
        *_state_dir_problems(settings.state_dir, writable_base),
        *_model_problems(settings, served, auto, recommended, hw),
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


def _served_model(settings: Settings, catalog: Catalog, auto: FitChoice, installed: frozenset[str]) -> ServedModel:
    name = settings.model
    if name == "auto":
        spec = auto.chosen
        need = memory_need(spec, settings.engine) if spec else None
        return ServedModel("auto", spec.id if spec else None, spec, None, spec is not None, need)
    spec = next((s for s in catalog if s.id == name), None)
    if spec is not None:
        need = memory_need(spec, settings.engine)
        return ServedModel("catalog", name, spec, None, spec.id in installed, need)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        return ServedModel("path", name, None, path, path.is_file(), None)
    return ServedModel("catalog", name, None, None, installed=False, need=None)


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
        problems.append(
            Problem(
                "warning",
                f"model {served.spec.id} needs {need} MiB but the {budget.kind} budget is "
                f"{budget.budget_mib} MiB: expect swapping or an out-of-memory kill",
                f"use {smaller.id} or lower engine.n_ctx" if smaller else "lower engine.n_ctx",
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


def _engine_problems(settings: Settings, hw: Hardware, served: ServedModel) -> list[Problem]:
    engine = settings.engine
    problems = []
    if engine.kv_cache_type != "f16" and not engine.flash_attn:
        problems.append(
            Problem(
                "error",
                f"kv_cache_type {engine.kv_cache_type} needs flash attention: llama.cpp refuses a quantized "
                "V cache without it",
                "set engine.flash_attn = true or engine.kv_cache_type = 'f16'",
            )
        )
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


# --------------------------------------------------------------------------- JSON


def report_json(report: Report) -> dict[str, object]:
    hw, caps, settings = report.hw, report.caps, report.settings
    return {
        "ok": report.ok,
        "backend": {
            "name": hw.backend,
            "library": caps.name,
            "version": caps.version,
            "gpu_offload": caps.gpu_offload,
            "simd": list(hw.cpu.simd),
            "system_info": caps.system_info,
        },
        "devices": {
            "system": hw.system,
            "machine": hw.machine,
            "cpu": {
                "model": hw.cpu.model,
                "physical_cores": hw.cpu.physical_cores,
                "logical_cores": hw.cpu.logical_cores,
            },
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "vram_total_mib": g.vram_total_mib,
                    "vram_free_mib": g.vram_free_mib,
                }
                for g in hw.gpus
            ],
            "driver_version": hw.driver_version,
            "notes": list(hw.notes),
        },
        "memory": {
            "ram_total_mib": hw.ram_total_mib,
            "ram_available_mib": hw.ram_available_mib,
            "vram_total_mib": sum(g.vram_total_mib for g in hw.gpus),
            "vram_free_mib": sum(g.vram_free_mib for g in hw.gpus),
            "budget": {
                "kind": report.recommended.budget.kind,
                "total_mib": report.recommended.budget.total_mib,
                "headroom_mib": report.recommended.budget.headroom_mib,
                "budget_mib": report.recommended.budget.budget_mib,
                "reason": report.recommended.budget.reason,
            },
            "disk_free_mib": report.disk_free_mib,
        },
        "chosen_model": _served_json(report.served),
        "auto_model": _choice_json(report.auto),
        "recommended_model": _choice_json(report.recommended),
        "installed_models": sorted(report.installed),
        "config": {
            "config_file": str(report.config_file) if report.config_file else None,
            "models_dir": str(settings.models_dir),
            "catalog_file": str(settings.catalog or PACKAGED_CATALOG),
            "settings": _shown_settings(settings),
            "effective_n_threads": settings.engine.n_threads or hw.cpu.physical_cores,
        },
        "problems": [{"severity": p.severity, "message": p.message, "hint": p.hint} for p in report.problems],
    }


def _served_json(served: ServedModel) -> dict[str, object]:
    return {
        "id": served.name,
        "source": served.source,
        "installed": served.installed,
        "need_mib": served.need.total_mib if served.need else None,
    }


def _choice_json(choice: FitChoice) -> dict[str, object]:
    return {
        "id": choice.chosen.id if choice.chosen else None,
        "explanation": choice.explanation,
        "candidates": [
            {
                "id": c.spec.id,
                "need_mib": c.need.total_mib,
                "kv_extra_mib": c.need.kv_extra_mib,
                "fits": c.fits,
                "installed": c.installed,
                "line": c.line,
            }
            for c in choice.candidates
        ],
    }


# --------------------------------------------------------------------------- tables


def render(report: Report, console: Console) -> None:
    tables = (_build_table, _devices_table, _memory_table, _model_table, _fit_table)
    for table in tables:
        console.print(table(report))
    console.print(Text.assemble(("Why: ", "bold"), report.recommended.explanation, "\n"))
    console.print(_config_table(report))
    console.print(_problems_table(report))
    console.print("[green]ok[/green]" if report.ok else "[red]problems found[/red]")


def _kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", expand=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _build_table(report: Report) -> Table:
    caps, hw = report.caps, report.hw
    compiled = ", ".join(parse_system_info(caps.system_info)) or "-"
    return _kv_table(
        "Backend & build",
        [
            ("backend", hw.backend),
            ("library", f"{caps.name} {caps.version}"),
            ("GPU offload in build", _yes(caps.gpu_offload)),
            ("compiled backends", compiled),
            ("SIMD", " ".join(hw.cpu.simd) or "-"),
        ],
    )


def _devices_table(report: Report) -> Table:
    hw = report.hw
    rows = [
        ("platform", f"{hw.system} {hw.machine}"),
        ("CPU", f"{hw.cpu.model} ({hw.cpu.physical_cores} physical / {hw.cpu.logical_cores} logical cores)"),
    ]
    rows += [(f"GPU {g.index}", f"{g.name}, {g.vram_total_mib} MiB VRAM ({g.vram_free_mib} MiB free)") for g in hw.gpus]
    if hw.driver_version:
        rows.append(("NVIDIA driver", hw.driver_version))
    rows += [("note", note) for note in hw.notes]
    return _kv_table("Devices", rows)


def _memory_table(report: Report) -> Table:
    hw, budget = report.hw, report.recommended.budget
    rows = [("RAM", f"{hw.ram_total_mib} MiB total, {hw.ram_available_mib} MiB available")]
    if hw.gpus:
        total = sum(g.vram_total_mib for g in hw.gpus)
        free = sum(g.vram_free_mib for g in hw.gpus)
        rows.append(("VRAM", f"{total} MiB total, {free} MiB free"))
    rows.append(("model budget", f"{budget.budget_mib} MiB ({budget.reason})"))
    if report.disk_free_mib is not None:
        rows.append(("disk free (state dir)", f"{report.disk_free_mib} MiB"))
    return _kv_table("Memory", rows)


def _model_table(report: Report) -> Table:
    served, auto, best = report.served, report.auto.chosen, report.recommended.chosen
    state = "installed" if served.installed else "not installed"
    rows = [
        ("configured", report.settings.model),
        ("serving", f"{served.name or 'nothing'} ({served.source}, {state})"),
        ("needs", f"{served.need.total_mib} MiB" if served.need else "-"),
        ("best installed (auto)", auto.id if auto else "none"),
        ("best in catalog", best.id if best else "none"),
    ]
    return _kv_table("Model", rows)


def _fit_table(report: Report) -> Table:
    choice = report.recommended
    table = Table(title=f"Catalog fit (budget {choice.budget.budget_mib} MiB)", title_justify="left")
    for column in ("model", "needs MiB", "fits", "installed"):
        table.add_column(column)
    for candidate in choice.candidates:
        mark = " *" if choice.chosen and candidate.spec.id == choice.chosen.id else ""
        table.add_row(
            candidate.spec.id + mark,
            _need_cell(candidate.need),
            _yes(candidate.fits),
            _yes(candidate.spec.id in report.installed),
        )
    return table


def _need_cell(need: MemoryNeed) -> str:
    return f"{need.total_mib} (+{need.kv_extra_mib} KV)" if need.kv_extra_mib else str(need.total_mib)


def _config_table(report: Report) -> Table:
    settings = report.settings
    rows = [
        ("config file", str(report.config_file) if report.config_file else "none (defaults + EDGERT_* env)"),
        ("models dir", str(settings.models_dir)),
    ]
    dump = _shown_settings(settings)
    dump["catalog"] = dump["catalog"] or f"packaged ({PACKAGED_CATALOG})"
    rows += [(key, _setting_text(value)) for key, value in _flatten(dump)]
    if settings.engine.n_threads is None:
        rows.append(("effective n_threads", f"{report.hw.cpu.physical_cores} (physical cores)"))
    return _kv_table("Effective config", rows)


def _shown_settings(settings: Settings) -> dict[str, object]:
    """The settings dump as it may be shown: URLs without user:password or query (they carry tokens)."""
    return _scrub_strings(settings.model_dump(mode="json"))


def _scrub_strings(data: dict[str, object]) -> dict[str, object]:
    clean: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            clean[key] = _scrub_strings(value)
        elif isinstance(value, str):
            clean[key] = scrub_urls(value)
        else:
            clean[key] = value
    return clean


def _flatten(data: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def _setting_text(value: object) -> str:
    return "unset" if value is None else str(value)


def _problems_table(report: Report) -> Table:
    table = Table(title="Problems", title_justify="left")
    for column in ("severity", "problem", "hint"):
        table.add_column(column, overflow="fold")
    colour = {"error": "red", "warning": "yellow", "info": "cyan"}
    for problem in sorted(report.problems, key=lambda p: ("error", "warning", "info").index(p.severity)):
        table.add_row(
            Text(problem.severity, style=colour[problem.severity]),
            escape(problem.message),
            escape(problem.hint or ""),
        )
    return table
