"""Integers with bounds (JSON Schema minimum / maximum / exclusiveMinimum / exclusiveMaximum on type integer) for
the JSON grammar: the schema's bounds read (`read_bounds`), a frame (RNG, node, negative, digits' value, digit count)
and whether a prefix can still become an integer in range. A digit is allowed only when some completion of the number stays within the bounds, so the
output never needs a number it cannot finish; the number may end only when its value is in range.
"""

from __future__ import annotations

import math

from meshserve.serving.guided.spec import GuideError, show

__all__ = ["RNG", "BOUNDS", "read_bounds", "begin", "step", "complete"]

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")  # followed on type integer only

RNG = 7  # the frame tag (after grammar.py's VAL, OBJ, ARR, STR, NUM, LIT, TOOLS)
MAX_DIGITS = 20  # as grammar.NUM_DIGITS: a number's integer part


def _viable(lo: int | None, hi: int | None, negative: bool, value: int, count: int) -> bool:
    """Whether an integer in [lo, hi] (None: unbounded) begins with this prefix (sign, `count` digits of `value`)."""
    if count == 0:  # only "-" so far: any magnitude
        spans = [(0, 10**MAX_DIGITS - 1)]
    elif count == 1 and value == 0:  # "0" or "-0": nothing may follow (no leading zeros)
        spans = [(0, 0)]
    else:
        spans = [(value * 10**k, value * 10**k + 10**k - 1) for k in range(MAX_DIGITS - count + 1)]
    for low, high in spans:
        first, last = (-high, -low) if negative else (low, high)
        if (lo is None or last >= lo) and (hi is None or first <= hi):
            return True
    return False


def begin(node: int, lo: int | None, hi: int | None, b: int) -> tuple | None:
    """The frame after byte b starts a bounded integer, or None."""
    if b == 0x2D:
        return (RNG, node, 1, 0, 0) if _viable(lo, hi, True, 0, 0) else None
    if 0x30 <= b <= 0x39:
        return (RNG, node, 0, b - 0x30, 1) if _viable(lo, hi, False, b - 0x30, 1) else None
    return None


def step(frame: tuple, lo: int | None, hi: int | None, b: int) -> tuple | None:
    """The frame after digit b, or None when b is no digit or leads out of range (the caller then tries to end the
    number before b: `complete`)."""
    _, node, negative, value, count = frame
    if not 0x30 <= b <= 0x39 or count >= MAX_DIGITS or (count == 1 and value == 0):
        return None
    value = value * 10 + b - 0x30
    return (RNG, node, negative, value, count + 1) if _viable(lo, hi, bool(negative), value, count + 1) else None


def complete(frame: tuple, lo: int | None, hi: int | None) -> bool:
    """Whether the number written may end here: at least one digit, its value in range."""
    _, _, negative, value, count = frame
    number = -value if negative else value
    return count > 0 and (lo is None or number >= lo) and (hi is None or number <= hi)


def read_bounds(schema: dict, path: str) -> tuple[int | None, int | None]:
    """An integer schema's inclusive (lo, hi) from minimum / maximum / exclusiveMinimum / exclusiveMaximum."""
    lo = hi = None
    for key in BOUNDS:
        if key not in schema:
            continue
        value = schema[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) > 1e20:
            raise GuideError(f"{path}.{key}: expected a number of at most 20 digits, got {show(value)}")
        if key == "minimum" or key == "exclusiveMinimum":
            low = math.ceil(value) if key == "minimum" else math.floor(value) + 1
            lo = low if lo is None else max(lo, low)
        else:
            high = math.floor(value) if key == "maximum" else math.ceil(value) - 1
            hi = high if hi is None else min(hi, high)
    if lo is not None and hi is not None and lo > hi:
        raise GuideError(f"{path}: no integer is within its bounds ({lo} > {hi})")
    return lo, hi
