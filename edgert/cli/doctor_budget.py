"""``edgert doctor --budget 4GiB``: the served model's memory, part by part, and what would make it fit.

The breakdown is the memory model's (:mod:`edgert.memory_model`, computed from the model file's header);
the changes are the planner's (:mod:`edgert.memory_plan`), in the order the daemon applies them for
``memory_budget``: lazy embeddings, repack off, q8_0 KV, speculative off (no drafter), a smaller n_ctx, text only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from edgert.cli.doctor_report import Report
from edgert.errors import EdgertError
from edgert.gguf_file import read_layout
from edgert.hardware import Hardware
from edgert.memory_model import MemoryBreakdown, estimate, repack_rule, shape_of
from edgert.memory_plan import Plan, plan, projector_mib, served_drafter
from edgert.store import model_path, with_release_drafter


@dataclass(frozen=True, slots=True)
class BudgetReport:
    model: str
    #: the breakdown with the settings as they are
    now: MemoryBreakdown
    plan: Plan


def budget_report(report: Report, budget_mib: int) -> BudgetReport | str:
    """The served model's breakdown and plan for ``budget_mib``; a sentence instead when it cannot be computed."""
    served = report.served
    path: Path | None = served.path or (model_path(report.settings.models_dir, served.spec) if served.spec else None)
    if path is None or not path.is_file():
        return f"no model file to measure ({served.name or 'model = auto found none'} is not installed)"
    try:
        shape = shape_of(read_layout(path))
    except EdgertError as exc:
        return exc.message
    repack = _repack(report.hw)
    extra = projector_mib(served.spec, served.projector)
    engine = with_release_drafter(report.settings, path, served.spec).engine  # its own drafter counts too
    drafter = served_drafter(engine)
    now = estimate(shape, engine, repack=repack, projector_mib=extra, drafter=drafter)
    fitted = plan(shape, engine, budget_mib, repack=repack, projector_mib=extra, drafter=drafter)
    return BudgetReport(str(path), now, fitted)


def _repack(hw: Hardware) -> dict[str, int]:
    # weights offloaded to a GPU are not repacked for the CPU
    return {} if hw.backend != "cpu" and hw.gpus else repack_rule(hw.cpu.simd)


def budget_json(result: BudgetReport | str, budget_mib: int) -> dict[str, object]:
    if isinstance(result, str):
        return {"budget_mib": budget_mib, "error": result}
    return {
        "budget_mib": budget_mib,
        "model": result.model,
        "now": {"total_mib": result.now.total_mib, **result.now.parts()},
        "fits_now": result.now.total_mib <= budget_mib,
        "changes": list(result.plan.changes),
        "after": {"total_mib": result.plan.breakdown.total_mib, **result.plan.breakdown.parts()},
        "fits": result.plan.fits,
    }


def budget_table(result: BudgetReport | str, budget_mib: int) -> Table:
    table = Table(title=f"Memory budget {budget_mib} MiB", title_justify="left")
    if isinstance(result, str):
        table.add_column("problem")
        table.add_row(result)
        return table
    table.add_column("part")
    table.add_column("now MiB", justify="right")
    table.add_column("to fit MiB", justify="right")
    after = result.plan.breakdown.parts()
    for name, mib in result.now.parts().items():
        table.add_row(name.replace("_", " "), str(mib), str(after[name]))
    table.add_row("total", str(result.now.total_mib), str(result.plan.breakdown.total_mib), style="bold")
    changes = "; ".join(result.plan.changes) or "none needed"
    verdict = "fits" if result.plan.fits else "does NOT fit even so"
    table.caption = f"{result.model}: changes {changes}; {verdict}"
    return table
