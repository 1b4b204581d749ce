"""What ``edgert fleet status|watch`` shows: one row per device, one summary per served release (pure).

Rows are plain JSON objects (``--json`` prints them as they are; the table is drawn from the same
objects), so a script and a person read the same figures. Request figures come from the device's
per-release counters since its daemon started (all releases it served added up); tokens/s and queue
depth are its latest telemetry reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from edgert.api.mqtt_schemas import TTFT_BUCKETS_S
from edgert.fleet.counters import Totals
from edgert.fleet.observe import DeviceView
from edgert.registry.publish import version_key

#: phases in which a device is not (yet) healthy on what it serves
_UNHEALTHY_PHASES = frozenset({"rolling_back", "disabled"})


def device_totals(view: DeviceView) -> Totals | None:
    """Every release's counters of the device added up, None without telemetry counters."""
    if view.telemetry is None or not view.telemetry.versions:
        return None
    total = Totals()
    for counters in view.telemetry.versions:
        total += Totals.of(counters)
    return total


def device_row(view: DeviceView) -> dict[str, Any]:
    """One device as ``fleet status --json`` gives it (README "Fleet operations" lists the fields)."""
    deploy, telemetry = view.deploy, view.telemetry
    totals = device_totals(view)
    return {
        "device_id": view.device_id,
        "state": view.status.state if view.status else "unknown",
        "since": view.since,
        "group": view.group,
        "model": view.release,
        "channel": deploy.channel if deploy else None,
        "phase": view.phase,
        "phase_since": deploy.phase_since if deploy else None,
        "pending": deploy.pending if deploy else None,
        "last_error": deploy.last_error if deploy else None,
        "rolled_back": deploy.rolled_back if deploy else None,
        "rollback_reason": deploy.rollback_reason if deploy else None,
        "evaluation": deploy.evaluation.model_dump(mode="json") if deploy and deploy.evaluation else None,
        "edgert_version": view.edgert_version,
        "uptime_s": view.uptime_s,
        "requests": totals.requests if totals else (telemetry.requests_finished if telemetry else None),
        "requests_failed": totals.requests_failed if totals else None,
        "error_rate": totals.error_rate if totals else None,
        "tokens_per_s": telemetry.tokens_per_s if telemetry else None,
        "ttft_p50_s": totals.ttft(0.5) if totals else None,
        "ttft_p95_s": totals.ttft(0.95) if totals else None,
        "queue_depth": telemetry.queue_depth if telemetry else None,
        "active": telemetry.active if telemetry else None,
        "rss_bytes": telemetry.memory.rss_bytes if telemetry else None,
        "available_bytes": telemetry.memory.available_bytes if telemetry else None,
        "telemetry_ts": telemetry.ts if telemetry else None,
        "seen": view.seen,
    }


def rows(views: Iterable[DeviceView]) -> list[dict[str, Any]]:
    return [device_row(view) for view in sorted(views, key=lambda view: view.device_id)]


@dataclass(frozen=True)
class ReleaseSummary:
    """One release across the fleet: who serves it, who failed it, who rolled back from it."""

    release: str
    #: devices that serve it, and of those the ones online and not rolling back
    devices: int = 0
    online: int = 0
    healthy: int = 0
    #: devices installing it now (it is their pending release)
    updating: int = 0
    #: devices that refused it (blocklisted: a failed health check, evaluation or hook) but did not roll back from it
    failed: int = 0
    #: devices that rolled back from it
    rolled_back: int = 0

    def line(self) -> str:
        return (
            f"{self.release}: {self.devices} device(s), {self.healthy} healthy, {self.online} online, "
            f"{self.updating} updating, {self.failed} failed, {self.rolled_back} rolled back"
        )


def summaries(views: Iterable[DeviceView]) -> list[ReleaseSummary]:
    """One summary per release a device serves, installs, refused or rolled back from; newest first."""
    counts: dict[str, dict[str, int]] = {}

    def bump(release: str | None, key: str) -> None:
        if release is not None:
            entry = counts.setdefault(release, {})
            entry[key] = entry.get(key, 0) + 1

    for view in views:
        served, deploy = view.release, view.deploy
        bump(served, "devices")
        if view.online:
            bump(served, "online")
            if view.phase not in _UNHEALTHY_PHASES:
                bump(served, "healthy")
        if deploy is None:
            continue
        if deploy.pending is not None and deploy.pending != served:
            bump(deploy.pending, "updating")
        bump(deploy.rolled_back, "rolled_back")
        for refused in deploy.blocklist:
            if refused != deploy.rolled_back:
                bump(refused, "failed")
    return [
        ReleaseSummary(release, **entry)
        for release, entry in sorted(counts.items(), key=lambda item: _release_key(item[0]), reverse=True)
    ]


def _release_key(release: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    model, _, version = release.rpartition("@")
    return (version_key(version), model) if model else ((), release)


def rollout_target(views: Iterable[DeviceView]) -> str | None:
    """The release being rolled out, by default: the newest one a device installs (deploy.pending), else the
    newest one a device serves (deploy.current)."""
    deploys = [view.deploy for view in views if view.deploy is not None]
    for candidates in ([d.pending for d in deploys], [d.current for d in deploys]):
        releases = {release for release in candidates if release is not None}
        if releases:
            return max(releases, key=_release_key)
    return None


# --------------------------------------------------------------------------- drawing
def ago(seconds: float | None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def ttft_text(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= TTFT_BUCKETS_S[-1]:
        return f">={TTFT_BUCKETS_S[-1]:g}s"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}M"


def note(row: dict[str, Any]) -> str:
    """What needs an operator's eye, most telling first: a rollback, the last update error, an evaluation."""
    if row["rollback_reason"] and row["rolled_back"]:
        return f"rolled back {row['rolled_back']}: {row['rollback_reason']}"
    if row["last_error"]:
        return str(row["last_error"])
    evaluation = row["evaluation"]
    if evaluation:
        verdict = "passed" if evaluation["score"] >= evaluation["threshold"] else "below threshold"
        return f"eval {evaluation['release']}: {evaluation['score']:.2f} ({verdict} {evaluation['threshold']:.2f})"
    return ""


def status_table(device_rows: list[dict[str, Any]], now: float) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    # ids and releases fold rather than end in an ellipsis: a cut name names nothing
    for name in ("DEVICE", "GROUP", "STATE", "MODEL", "CHANNEL", "PHASE", "EDGERT", "UP"):
        table.add_column(name, no_wrap=name not in ("DEVICE", "MODEL"), overflow="fold")
    for name in ("REQ", "ERR%", "TOK/S", "TTFT p50/p95", "QUEUE", "RSS"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("NOTE", overflow="fold")
    for row in device_rows:
        state = row["state"]
        since = ago(now - row["since"]) if row["since"] is not None else "-"
        style = "green" if state == "online" else "red"
        phase = row["phase"] or "-"
        if row["phase_since"] is not None and phase != "idle":
            phase += f" {ago(now - row['phase_since'])}"
        error_rate = row["error_rate"]
        table.add_row(
            row["device_id"],
            row["group"] or "-",
            Text(f"{state} {since}", style=style),
            row["model"] or "-",
            row["channel"] or "-",
            phase,
            row["edgert_version"] or "-",
            ago(row["uptime_s"]),
            _num(row["requests"], "{:d}"),
            _num(None if error_rate is None else error_rate * 100),
            _num(row["tokens_per_s"]),
            f"{ttft_text(row['ttft_p50_s'])}/{ttft_text(row['ttft_p95_s'])}",
            _num(row["queue_depth"], "{:d}"),
            _mib(row["rss_bytes"]),
            Text(note(row), style="yellow"),
        )
    return table


def rollout_progress(views: list[DeviceView], target: str | None) -> Table:
    """A progress bar: how many devices serve ``target``, and how many refused or rolled back from it."""
    grid = Table.grid(padding=(0, 1))
    if target is None:
        grid.add_row("rollout: no release is being rolled out (no deploy state names one)")
        return grid
    summary = next((entry for entry in summaries(views) if entry.release == target), ReleaseSummary(target))
    total = len(views)
    grid.add_row(
        f"rollout {target}",
        ProgressBar(total=max(total, 1), completed=summary.devices, width=30),
        f"{summary.devices}/{total} serve it, {summary.updating} updating, {summary.failed} failed, "
        f"{summary.rolled_back} rolled back",
    )
    return grid
