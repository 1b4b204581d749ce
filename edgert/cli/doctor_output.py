"""How ``edgert doctor`` shows a :class:`~edgert.cli.doctor_report.Report`: rich tables or one JSON object.

Both views show the settings through :func:`_shown_settings`, so URLs lose their credentials
in either.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgert.catalog import PACKAGED_CATALOG, ModelSpec
from edgert.cli.doctor_report import Report, ServedModel
from edgert.hardware import parse_system_info
from edgert.log import scrub_urls
from edgert.memory_fit import FitChoice, MemoryNeed
from edgert.settings import Settings

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
        "projector_mib": served.need.projector_mib if served.need else None,
        "projector": str(served.projector) if served.projector else None,
        "modalities": list(served.modalities),
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
                "projector_mib": c.need.projector_mib,
                "modalities": list(_candidate_modalities(c.spec, c.need)),
                "fits": c.fits,
                "installed": c.installed,
                "decode_tok_s_estimate": round(c.tok_s, 1) if c.tok_s is not None else None,
                "fast_enough": c.fast_enough,
                "line": c.line,
            }
            for c in choice.candidates
        ],
    }


def _candidate_modalities(spec: ModelSpec, need: MemoryNeed) -> tuple[str, ...]:
    """What a candidate accepts as the fit counted it: with its projector, or text only."""
    return spec.modalities if need.projector_mib else ("text",)


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
        ("needs", _served_need(served.need)),
        ("accepts", ", ".join(served.modalities)),
        ("projector", str(served.projector) if served.projector else "none (text only)"),
        ("best installed (auto)", auto.id if auto else "none"),
        ("best in catalog", best.id if best else "none"),
    ]
    return _kv_table("Model", rows)


def _fit_table(report: Report) -> Table:
    choice = report.recommended
    table = Table(title=f"Catalog fit (budget {choice.budget.budget_mib} MiB)", title_justify="left")
    for column in ("model", "needs MiB", "fits", "installed", "input", "est. tok/s"):
        table.add_column(column)
    for candidate in choice.candidates:
        mark = " *" if choice.chosen and candidate.spec.id == choice.chosen.id else ""
        table.add_row(
            candidate.spec.id + mark,
            _need_cell(candidate.need),
            _yes(candidate.fits),
            _yes(candidate.spec.id in report.installed),
            "+".join(_candidate_modalities(candidate.spec, candidate.need)),
            _speed_cell(candidate.tok_s, candidate.fast_enough),
        )
    return table


def _speed_cell(tok_s: float | None, fast_enough: bool) -> str:
    if tok_s is None:
        return "-"
    return f"{tok_s:.1f}" + ("" if fast_enough else " (slow)")


def _need_cell(need: MemoryNeed) -> str:
    extras = [f"+{need.kv_extra_mib} KV"] if need.kv_extra_mib else []
    if need.projector_mib:
        extras.append(f"+{need.projector_mib} proj")
    return f"{need.total_mib} ({', '.join(extras)})" if extras else str(need.total_mib)


def _served_need(need: MemoryNeed | None) -> str:
    if need is None:
        return "-"
    projector = f" (incl. {need.projector_mib} MiB multimodal projector)" if need.projector_mib else ""
    return f"{need.total_mib} MiB{projector}"


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
