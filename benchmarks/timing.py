"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so they import this as `timing`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], repeats: int, warm: int = 1) -> float:
    """Median wall time of fn() in ms over `repeats` calls, after `warm` untimed ones. fn must wait for its own
    result (the engine's decode/verify copy theirs to the host)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
