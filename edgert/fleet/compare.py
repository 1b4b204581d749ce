"""``edgert fleet compare``: two releases side by side from the devices' per-release counters (pure).

Without a window the figures are the counters as retained now (each device's lifetime since its daemon
started); with a window, the difference between the reading at its start and the latest one at its end,
per device and release (:func:`edgert.fleet.counters.window`, which takes a restart's new reading whole).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rich.table import Table

from edgert.api.mqtt_schemas import VersionCounters
from edgert.fleet.counters import Totals, window
from edgert.fleet.observe import DeviceView
from edgert.fleet.view import ttft_text

#: (device id, release) -> that device's cumulative counters of that release
Readings = dict[tuple[str, str], VersionCounters]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RELEASE = re.compile(r"^[^@\s]+@[^@\s]+$")


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``1.5h``, ``2d`` -> seconds (> 0); ValueError names what is expected."""
    match = _DURATION.match(text.strip())
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise ValueError(f"expected a duration such as 90s, 10m or 1h, got {text!r}")
    return seconds


def parse_release(text: str) -> str:
    """``<model-id>@<version>``, as devices name what they serve; ValueError otherwise."""
    if not _RELEASE.match(text):
        raise ValueError(f"expected MODEL@VERSION (e.g. gemma-4-e2b@3), got {text!r}")
    return text


def readings(views: Iterable[DeviceView]) -> Readings:
    """Every device's latest per-release counters."""
    found: Readings = {}
    for view in views:
        if view.telemetry is not None:
            for counters in view.telemetry.versions:
                found[view.device_id, counters.release] = counters
    return found


def totals(release: str, end: Readings, start: Readings | None = None) -> Totals:
    """``release`` summed over the devices that report it: lifetime (``start`` None) or over a window."""
    total = Totals()
    for (device_id, name), counters in end.items():
        if name == release:
            total += Totals.of(counters) if start is None else window(start.get((device_id, name)), counters)
    return total


def missing(release: str, end: Readings) -> str:
    """The one-line error for a release no device has counters for."""
    known = sorted({name for _, name in end})
    devices = len({device_id for device_id, _ in end})
    listed = ", ".join(known) if known else "none"
    return f"no device reports counters for {release} ({devices} device(s) report; releases with data: {listed})"


def row(release: str, total: Totals) -> dict[str, Any]:
    """One release as ``fleet compare --json`` gives it."""
    return {
        "release": release,
        "devices": total.devices,
        "requests": total.requests,
        "requests_failed": total.requests_failed,
        "error_rate": total.error_rate,
        "ttft_p50_s": total.ttft(0.5),
        "ttft_p95_s": total.ttft(0.95),
        "tokens_per_s": total.tokens_per_s,
        "prompt_tokens_per_request": total.prompt_tokens_per_request,
        "completion_tokens_per_request": total.completion_tokens_per_request,
    }


def _change(old: Any, new: Any) -> str:
    if not isinstance(old, int | float) or not isinstance(new, int | float) or old == 0:
        return "-"
    return f"{(new - old) / old * 100:+.0f}%"


_METRICS: tuple[tuple[str, str], ...] = (
    ("devices", "devices"),
    ("requests", "requests"),
    ("error_rate", "error rate"),
    ("ttft_p50_s", "TTFT p50"),
    ("ttft_p95_s", "TTFT p95"),
    ("tokens_per_s", "tok/s (decode)"),
    ("prompt_tokens_per_request", "prompt tokens/request"),
    ("completion_tokens_per_request", "completion tokens/request"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "error_rate":
        return f"{value * 100:.2f}%"
    if key.startswith("ttft"):
        return ttft_text(value)
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def compare_table(old: dict[str, Any], new: dict[str, Any], title: str) -> Table:
    table = Table(title=title, box=None, pad_edge=False, header_style="bold", title_justify="left")
    table.add_column("")
    for name in (old["release"], new["release"], "change"):
        table.add_column(name, justify="right")
    for key, label in _METRICS:
        table.add_row(label, _cell(key, old[key]), _cell(key, new[key]), _change(old[key], new[key]))
    return table
