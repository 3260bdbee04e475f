"""Progress for long commands: tqdm's bar when stderr is a terminal, plain lines when it is a log file.

tqdm redraws its bar with a carriage return up to ten times a second; in a log (a server's, a job's, a CI run's)
that is hundreds of unreadable updates. `progress` gives a LogProgress there instead: a line when its block starts,
one at most every 10 s, and one at the end. It lives at the package root (beside errors.py) because every floor
draws bars: model/ (demo training), analytics/ (calibrate, Pareto sweeps) and serving/ (compiles, jobs, bench).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["LogProgress", "progress"]


class LogProgress:
    """Progress for a stderr that is not a terminal (a log file): a plain line at most every `interval` seconds and
    one at the end, where tqdm would redraw its bar with a carriage return up to ten times a second (hundreds of
    updates in a log), and one when its block starts (a log shows at once what the job is doing, e.g. compiling).
    The part of tqdm's interface the commands use: reset(total), update(n), set_postfix(**values) (shown on the
    next line), write(text), close(), and use as a context manager."""

    def __init__(self, desc: str, unit: str, total: float | None = None, interval: float = 10.0,
                 file: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.desc, self.unit, self.interval, self.file, self.clock = desc, unit, interval, file or sys.stderr, clock
        self.postfix = ""
        self.reset(total)

    def reset(self, total: float | None = None) -> None:
        self.total, self.n, self.shown = total, 0, 0
        self.start = self.last = self.clock()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        """Values said after the counts on the next line (tqdm's `k=v, ...`), e.g. the loss so far."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str, file: IO[str] | None = None) -> None:
        """A line of the command's own (tqdm.write's place: between the bar's lines)."""
        print(text, file=file or self.file, flush=True)

    def _line(self) -> None:
        self.last = self.clock()
        self.shown = self.n
        seconds = self.last - self.start
        done = f"{self.n:.0f}/{self.total:.0f} {self.unit}" if self.total else f"{self.n:.0f} {self.unit}"
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        rate = f", {self.n / seconds:.1f} {self.unit}/s" if self.n and seconds > 0 else ""  # none at the start
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{share}, {seconds:.0f} s{rate}{postfix}", file=self.file, flush=True)

    def close(self) -> None:
        if self.n != self.shown:  # the end, unless the last line said it already
            self._line()

    def __enter__(self) -> LogProgress:
        self._line()  # the start, as tqdm draws its empty bar: a log says at once what the job is doing
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(desc: str, unit: str = "it", total: float | None = None, disable: bool = False, **bar: Any) -> Any:
    """tqdm's bar on a terminal's stderr, else a LogProgress; `disable` draws nothing (tqdm's no-op bar, e.g. under
    --json); `bar`: more tqdm arguments, for the bar only (leave=False, unit_scale=True, dynamic_ncols=True)."""
    if disable or sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, **bar)
    return LogProgress(desc, unit, total)
