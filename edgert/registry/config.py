"""``registry.json`` and metadata lifetimes: how long each role's signed metadata stays valid.

Owns the registry's one settings file (:class:`RegistryConfig`), the bounds and the
``7d`` / ``6h`` / ``30m`` text form of a lifetime, and the checks on per-role tables
(key counts, thresholds, lifetimes) that ``init`` and ``publish --expiry`` take. No I/O:
:class:`~edgert.registry.files.RegistryFiles` reads and writes the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgert.errors import RegistryError
from edgert.registry import keys

CONFIG_FILE: Final = "registry.json"
DEFAULT_EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
#: Bounds of a metadata lifetime: a minute (a short-lived timestamp is the defence against a freeze
#: attack, so hours and minutes are allowed) to ten years.
MIN_EXPIRY: Final = timedelta(minutes=1)
MAX_EXPIRY: Final = timedelta(days=3650)
_DURATION = re.compile(r"^(\d{1,9})([dhm]?)$")
_UNITS: Final = {"": "days", "d": "days", "h": "hours", "m": "minutes"}
#: Warn when less than this share of a role's expiry period is left.
WARN_FRACTION: Final = 0.25


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Lifetime of each role's metadata in seconds (``init --expiry`` / ``publish --expiry``).
    expiry_s: dict[str, int] = Field(default_factory=dict)
    #: The older form, whole days: still read for registries made before ``expiry_s``; expiry_s wins.
    expiry_days: dict[str, int] = Field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def role_period(config: RegistryConfig, role: str) -> timedelta:
    if role in config.expiry_s:
        return timedelta(seconds=config.expiry_s[role])
    return timedelta(days=config.expiry_days.get(role, DEFAULT_EXPIRY_DAYS[role]))


def parse_duration(text: str) -> timedelta:
    """A metadata lifetime: ``7`` or ``7d`` days, ``6h`` hours, ``30m`` minutes (a plain number is days)."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise RegistryError(f"expiry {text!r}: give days (7 or 7d), hours (6h) or minutes (30m)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def format_duration(period: timedelta) -> str:
    """The shortest of ``<n>d``, ``<n>h``, ``<n>m`` (else seconds) that states ``period`` exactly."""
    seconds = int(period.total_seconds())
    if seconds == 0:
        return "0m"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def role_expiry(config: RegistryConfig, role: str, now: datetime) -> datetime:
    return now + role_period(config, role)


def check_role_numbers(counts: dict[str, int], thresholds: dict[str, int], expiry: dict[str, timedelta]) -> None:
    for table in (counts, thresholds):
        _check_roles(table)
    for role in keys.ROLES:
        if not 1 <= thresholds[role] <= counts[role]:
            raise RegistryError(f"{role}: threshold {thresholds[role]} must be 1..{counts[role]} (its key count)")
    check_expiry(expiry)


def _check_roles(table: Mapping[str, object]) -> None:
    unknown = set(table) - set(keys.ROLES)
    if unknown:
        raise RegistryError(f"unknown role(s) {', '.join(sorted(unknown))} (roles: {', '.join(keys.ROLES)})")


def check_expiry(expiry: dict[str, timedelta]) -> None:
    _check_roles(expiry)
    for role, period in expiry.items():
        if not MIN_EXPIRY <= period <= MAX_EXPIRY:
            raise RegistryError(
                f"{role}: expiry {format_duration(period)} must be between {format_duration(MIN_EXPIRY)} "
                f"and {format_duration(MAX_EXPIRY)}"
            )


def first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
