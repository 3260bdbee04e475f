"""Which steps the engine compiles, in which order, and which compiled step serves a shape.

A plan lists one compiled step per bucket: prefill (with its insert) per (batch, length), extend per (batch, length,
context), decode per (batch, context), score per (batch, length), and one slot-release step. Compiling them all
takes a while: about 1.5 s a step on a 2-core CPU for the 85 steps of the demo model, longer for a 7B model on a
GPU host. The largest bucket of each kind can run every request its smaller buckets would (padded with rows that are
dropped and positions that are masked), so `compile_order` puts those "covering" steps first: a server can start
answering once they are compiled (`Engine.warm_up(defer=True)`) and compile the others in the background, where
each one, once compiled, takes over the shapes it fits better (`covering`). Nothing ever compiles on the request
path: a shape that no compiled step covers is refused (KeyError), as with the whole plan compiled.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from meshserve.serving.plan import EnginePlan, guide_buckets

__all__ = ["PHASES", "BackgroundCompile", "CompileJob", "compile_order", "covering", "upfront_steps"]

PHASES = ("generate", "score")  # what Engine.warm_up compiles by default


@dataclass(frozen=True)
class CompileJob:
    """One step to compile: kind "release" | "prefill" (with its insert) | "extend" | "decode" | "verify" | "score"
    | "resample", and its bucket key: (b, T) for prefill and score, (b, T, C) for extend, (b, C) for decode and
    verify, (G,) for resample (guided rows), () for release."""

    kind: str
    key: tuple[int, ...]
    first: bool = False  # a covering step: compiled before a deferred warm-up returns

    @property
    def units(self) -> int:
        """Steps it counts for in `EnginePlan.compile_count` (a prefill and its insert count two)."""
        return 2 if self.kind == "prefill" else 1

    @property
    def label(self) -> str:
        """E.g. "decode b=4 C=128": the kind and its bucket, for logs and progress."""
        names = {"prefill": ("b", "T"), "score": ("b", "T"), "extend": ("b", "T", "C"), "decode": ("b", "C"),
                 "verify": ("b", "C"), "resample": ("G",)}  # fmt: skip
        return " ".join([self.kind, *(f"{n}={v}" for n, v in zip(names.get(self.kind, ()), self.key, strict=True))])


def _keys(plan: EnginePlan, phases: tuple[str, ...]) -> dict[str, list[tuple[int, ...]]]:
    """Each kind's bucket keys, smallest first (by padded tokens, then lexicographically)."""
    keys: dict[str, list[tuple[int, ...]]] = {}
    if "generate" in phases:
        keys["prefill"] = [(b, t) for b in plan.prefill_batches for t in plan.prefill_lengths]
        keys["extend"] = [(b, t, c) for b in plan.prefill_batches for t in plan.extend_lengths for c in plan.contexts()]
        keys["decode"] = [(b, c) for b in plan.decode_batches for c in plan.contexts()]
        keys["verify"] = [(b, c) for b in plan.verify_batches for c in plan.contexts()]
    if "score" in phases:
        keys["score"] = [(b, t) for b in plan.score_batches for t in plan.prefill_lengths]
    return {kind: sorted(ks, key=lambda k: (math.prod(k), k)) for kind, ks in keys.items() if ks}


def compile_order(plan: EnginePlan, phases: tuple[str, ...] = PHASES) -> list[CompileJob]:
    """Every step the plan has for `phases`: the release step and each kind's largest bucket first (`first`), then
    the other buckets, kinds taking turns, smallest first (the buckets light traffic uses)."""
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"phases must be among {PHASES}, got {sorted(unknown)}")
    keys = _keys(plan, phases)
    jobs = [CompileJob("release", (), first=True)] if "generate" in phases else []
    jobs += [CompileJob(kind, ks[-1], first=True) for kind, ks in keys.items()]
    rounds: Iterator[tuple[Any, ...]] = zip_longest(*(ks[:-1] for ks in keys.values()))
    for keys_of_round in rounds:
        jobs += [CompileJob(kind, k) for kind, k in zip(keys, keys_of_round, strict=True) if k is not None]
    if "generate" in phases:  # last: until they are in, guided steps read the previous step first (tracker.py)
        jobs += [CompileJob("resample", (g,)) for g in guide_buckets(plan.max_batch)]
    return jobs


def upfront_steps(plan: EnginePlan, phases: tuple[str, ...] = PHASES, defer: bool = False) -> int:
    """Steps `Engine.warm_up(phases=..., defer=...)` compiles before it returns (a prefill and its insert count two):
    the whole plan, or with defer only the covering steps. For a progress bar's total."""
    return sum(job.units for job in compile_order(plan, phases) if job.first or not defer)


def covering(table: dict[tuple[int, ...], Any], key: tuple[int, ...], what: str) -> tuple[tuple[int, ...], Any]:
    """(bucket, compiled step) for `key`: its own bucket when compiled, else the compiled bucket at least as large in
    every dimension with the fewest padded elements. KeyError (naming `what`) when none is."""
    step = table.get(key)
    if step is not None:
        return key, step
    # list() copies the keys under the GIL in one call: a background warm-up may add buckets meanwhile.
    fits = [k for k in list(table) if all(a >= b for a, b in zip(k, key, strict=True))]
    if not fits:
        raise KeyError(f"no compiled {what} step covers {key}; compiled: {sorted(table)}")
    best = min(fits, key=lambda k: (math.prod(k), k))
    return best, table[best]


class BackgroundCompile:
    """`engine.compile_pending` on a thread, as a context: entering starts it, `stop` (or leaving) asks it to end
    after the step in flight and waits for that step, since a process that exits while XLA compiles on another
    thread aborts (SIGABRT, exit 134: seen with batch-generate). `start` without the context works too. on_failure(job, error) for each step that failed to
    compile (its shapes stay with larger buckets); on_done(failed steps) once everything else compiled, unless
    stopped first."""

    def __init__(
        self,
        engine,
        on_failure: Callable[[CompileJob, Exception], None],
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        self.engine, self.on_failure, self.on_done = engine, on_failure, on_done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshserve-compile", daemon=True)

    def _run(self) -> None:
        failed = self.engine.compile_pending(stop=self._stop)
        for job, error in failed:
            self.on_failure(job, error)
        if self.on_done is not None and not self._stop.is_set() and not self.engine.pending_steps():
            self.on_done(sum(job.units for job, _ in failed))

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def __enter__(self) -> BackgroundCompile:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, wait: bool = True) -> None:
        """No step after the one in flight; with `wait`, wait for that one too."""
        self._stop.set()
        if wait and self._thread.ident is not None:  # started
            self._thread.join()
