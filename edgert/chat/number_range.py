"""GBNF for integers and numbers within ``minimum`` / ``maximum`` bounds, where it stays small.

A tool's ``quantity`` from 1 to 99, an ``aisle`` from 1 to 40, a ``rating`` from 1 to 5, a
``latitude`` from -90 to 90: the grammar lists the allowed integer parts, so a constrained call never
writes a value out of range. Enforced:

- integers with both bounds at most :data:`SMALL_RANGE` apart (every value listed);
- integers with only a lower bound of 0 or 1, or only an upper bound of 0 or -1 (a sign rule);
- numbers with integer bounds at most :data:`SMALL_RANGE` apart (integer parts listed, any fraction
  below the upper bound, no exponent), and numbers with only ``minimum: 0``.

Anything else (wide or fractional bounds, ``multipleOf``) is left to the shape alone: :func:`range_rule`
answers None and the caller uses the unbounded rule.
"""

from __future__ import annotations

import math
from typing import Any

#: the widest range whose values (integer parts) are listed one by one
SMALL_RANGE = 256
_DIGITS = "[1-9] [0-9]{0,15}"
_FRACTION = '("." [0-9]{1,16})?'


def range_rule(kind: str, schema: dict[str, Any]) -> str | None:
    """The GBNF body for ``kind`` ("integer" | "number") within the schema's bounds, or None.

    Raises ValueError when no value can satisfy the bounds.
    """
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum", max)
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum", min)
    if low is None and high is None:
        return None
    if kind == "integer":
        return _integers(
            None if low is None else math.floor(low) + 1 if low_open and low == math.floor(low) else math.ceil(low),
            None
            if high is None
            else math.ceil(high) - 1
            if high_open and high == math.ceil(high)
            else math.floor(high),
        )
    if low_open or high_open or any(b is not None and b != int(b) for b in (low, high)):
        return None
    return _numbers(None if low is None else int(low), None if high is None else int(high))


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, pick: Any) -> tuple[float | None, bool]:
    """The tighter of the inclusive and exclusive bound, and whether it is exclusive."""
    found: list[tuple[float, bool]] = []
    for key, is_open in ((inclusive, False), (exclusive, True)):
        value = schema.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        found.append((float(value), is_open))
    if not found:
        return None, False
    best = pick(value for value, _ in found)
    return best, any(is_open for value, is_open in found if value == best)


def _integers(low: int | None, high: int | None) -> str | None:
    if low is not None and high is not None:
        if low > high:
            raise ValueError(f"no integer lies between {low} and {high}")
        if high - low <= SMALL_RANGE:
            return " | ".join(f'"{value}"' for value in range(low, high + 1))
        return None
    if high is None and low in (0, 1):
        return f'"0" | {_DIGITS}' if low == 0 else _DIGITS
    if low is None and high in (0, -1):
        return f'"0" | "-" {_DIGITS}' if high == 0 else f'"-" {_DIGITS}'
    return None


def _numbers(low: int | None, high: int | None) -> str | None:
    if high is None:
        if low == 0:  # no minus sign: every JSON number left is >= 0
            return f'("0" | {_DIGITS}) {_FRACTION} ([eE] [-+]? [0-9]{{1,2}})?'
        return None
    if low is None or high - low > SMALL_RANGE:
        return None
    if low > high:
        raise ValueError(f"no number lies between {low} and {high}")
    alternatives = []
    if high >= 0:  # 0 <= value: integer part k with a fraction while k < high; high itself only as .0...
        alternatives += [f'"{k}" {_FRACTION}' for k in range(max(low, 0), high)]
        alternatives.append(f'"{high}" ("." "0"{{1,16}})?')
    if low < 0:  # value = -(k + fraction): k from -min(high, 0) up to -low, -low itself only as .0...
        top = -low
        alternatives += [f'"-{k}" {_FRACTION}' for k in range(max(-high, 0), top) if not (k == 0 and high >= 0)]
        alternatives.append(f'"-{top}" ("." "0"{{1,16}})?')
        if high >= 0:
            alternatives.append('"-0" "." [0-9]{1,16}')  # -0.x: between -1 and 0
    return " | ".join(alternatives)
