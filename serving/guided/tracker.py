"""The engine loop's side of guided decoding: each guided request's `Guide`, moved past every token it is given,
and the masks its slot needs before the next step.

A guided row's mask for step n + 1 depends on its token of step n. The engine loop runs such steps one of two ways,
per decode bucket, whichever has been faster on this machine (`PipelineChoice`, timed as it serves):
- pipelined: step n + 1 is dispatched before step n is read (as free text always is, so the device need not wait
  for the host), runs the row under its old mask, and once the host has the new mask `resample` writes it and
  samples those rows again from the step's logits (Engine.resample_async: the token the step would have drawn with
  the mask in place), a second small step whose tokens the loop merges into the step's output;
- read first: step n is read and the masks written (`flush`) before step n + 1 is dispatched: no second step, but
  the device waits while the host reads tokens and computes masks.
On this 2-core CPU (where the host and the "device" share the cores) reading first was faster; on an accelerator
the second step is a few small kernels against the host's whole turn. Masks are computed on the host
(serving/guided/: cached per grammar state) and written into the decode state's `allowed` rows in one small
compiled scatter per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
from meshserve.serving.requests import Request

__all__ = ["GuideTracker", "PipelineChoice"]

log = logging.getLogger(__name__)


class PipelineChoice:
    """Per decode bucket b, whether steps with guided rows run pipelined (True) or read the previous step first
    (False): each way's seconds per step (the interval between consecutive dispatches with nothing else run between
    them) kept as a running mean, and the faster way used. The first TRIAL steps of a bucket are pipelined, the next
    TRIAL read first; after that the slower way is timed again for TRIAL steps in every EXPLORE (a batch's mix and
    the machine's load change), which costs at most TRIAL / EXPLORE of the difference."""

    TRIAL = 8  # steps per timing of one way: enough to smooth a step's noise, few enough to cost little
    EXPLORE = 256
    SMOOTH = 0.2  # a new interval's weight in its way's running mean

    def __init__(self, fixed: bool | None = None):
        """fixed: always that way, timed all the same (benchmarks and tests compare the two); None: choose."""
        self.fixed = fixed
        self._mean: dict[tuple[int, bool], float] = {}  # (b, pipelined) -> seconds per step
        self._steps: dict[int, int] = {}  # b -> guided steps decided

    def pipelined(self, b: int) -> bool:
        """The way to run the next guided step over bucket b (counted as decided)."""
        if self.fixed is not None:
            return self.fixed
        n = self._steps.get(b, 0)
        self._steps[b] = n + 1
        if n < 2 * self.TRIAL:
            return n < self.TRIAL
        inf = float("inf")
        fast = self._mean.get((b, True), inf) <= self._mean.get((b, False), inf)
        return fast if n % self.EXPLORE >= self.TRIAL else not fast

    def record(self, b: int, pipelined: bool, seconds: float) -> None:
        """A step of bucket b run that way took `seconds` (dispatch to the next dispatch)."""
        before = self.faster(b)
        old = self._mean.get((b, pipelined))
        self._mean[(b, pipelined)] = seconds if old is None else old + self.SMOOTH * (seconds - old)
        if (after := self.faster(b)) != before and (b, not pipelined) in self._mean:  # both timed: say which won
            way, ms = ("pipelined", "read first"), [1e3 * self._mean[(b, w)] for w in (True, False)]
            log.info("guided steps at batch %d now run %s (%.2f ms a step; %s %.2f ms)", b, way[not after],
                     ms[not after], way[after], ms[after])  # fmt: skip

    def faster(self, b: int) -> bool | None:
        """The way now believed faster for bucket b (None: neither timed yet)."""
        if (b, True) not in self._mean and (b, False) not in self._mean:
            return None
        inf = float("inf")
        return self._mean.get((b, True), inf) <= self._mean.get((b, False), inf)


class GuideTracker:
    """Guides of the guided requests an orchestrator holds, by request id, and the masks waiting to be written, by
    slot. `add` runs on the callers' threads (it builds the vocabulary's table once, and the first mask); the rest
    on the engine thread."""

    def __init__(self, tokenizer, engine, metrics=None):
        self.tokenizer, self.engine = tokenizer, engine  # the engine's config is read at the first guided request
        self.metrics = metrics  # ServerMetrics: guided requests by kind, engine-thread seconds (None: not counted)
        self._table = None  # TokenTable: built by `prepare` (a server at start) or the first guided request
        self._table_lock = threading.Lock()
        self._guides: dict[int, object] = {}  # request id -> its Guide
        self._masks: dict[int, np.ndarray] = {}  # slot -> its next mask, uint32 [W]
        self.choice = PipelineChoice()
        self._last_dispatch: tuple[int, bool, float] | None = None  # (b, pipelined, time) of a guided step
        self.tokens = 0  # guided tokens moved past on the engine thread
        self.seconds = 0.0  # engine-thread time spent on them: moving guides, their masks, the masks' writes

    def _token_table(self):
        from meshserve.serving.guided import TokenTable  # the grammar modules load with the first guided request

        with self._table_lock:  # built once (a vocabulary's trie: up to a second for 100k+ tokens)
            if self._table is None:
                self._table = TokenTable.of(self.tokenizer, self.engine.config.vocab_size)
            return self._table

    def prepare(self) -> None:
        """Build the vocabulary's table now (a server calls it on a thread at start), not at the first guided
        request. A tokenizer the table cannot read is left for that request to report."""
        try:
            self._token_table()
        except Exception as e:  # noqa: BLE001 (the first guided request raises it again, to its caller)
            log.info("guided decoding's token table not built at start: %s: %s", type(e).__name__, e)

    def add(self, requests: Iterable[Request]) -> None:
        """Start a Guide for each guided request (before it is queued); its first mask is computed here, and a
        regex's every mask, a schema's pattern strings' position masks not cached yet (masks.prepare_patterns) and a
        reasoning block's (masks.prepare_thinking).
        All or none: a GuideError (a format past its bounds) leaves no guide behind."""
        started = {}
        for r in requests:
            if r.guide is not None:
                from meshserve.serving.guided import Guide, compile_spec

                grammar = compile_spec(r.guide)
                guide = Guide(grammar, self._token_table(), r.stop_ids)
                from meshserve.serving.guided.masks import prepare_masks, prepare_patterns, prepare_thinking

                if r.guide.think:  # the reasoning block's masks (serve --reasoning-parser)
                    prepare_thinking(guide)
                if r.guide.kind == "regex":  # finitely many positions: all their masks now, none on the engine thread
                    prepare_masks(guide)
                else:  # a schema's pattern strings: their plain tokens' masks (cached per pattern: once per server)
                    prepare_patterns(guide)
                guide.mask()  # the start state's mask, cached for the prefill
                started[r.id] = guide
        self._guides.update(started)

    def queued(self, requests: Iterable[Request]) -> None:
        """The requests were queued (after `add`): count the guided ones in the metrics."""
        if self.metrics is not None:
            for r in requests:
                if r.guide is not None:
                    self.metrics.guided_requests.labels(r.guide.kind).inc()

    def prefill_kwargs(self, requests: Sequence[Request]) -> dict[str, list[np.ndarray | None]]:
        """Engine.prefill_insert's `guides` for a prefill batch (per request, the mask its first token must follow,
        None when not guided); no keyword when none is guided."""
        t0 = time.perf_counter()
        masks = [None if (g := self._guides.get(r.id)) is None else g.mask() for r in requests]
        if not any(m is not None for m in masks):
            return {}
        self._spent(time.perf_counter() - t0)
        return {"guides": masks}

    def step_mode(self, owners: Sequence[Request | None]) -> bool | None:
        """How the next step over these slots' requests runs: None (no guided row: pipelined, nothing to resample),
        True (pipelined, its guided rows resampled), False (the step in flight is read and the masks written
        first: also while no resample step for that many rows is compiled)."""
        guided = sum(r is not None and r.id in self._guides for r in owners) if self._guides else 0
        if not guided:
            return None
        if not self.engine.resamples(guided):  # its resample step not compiled yet (a deferred warm-up's last)
            return False
        return self.choice.pipelined(len(owners))

    def dispatched(self, b: int, mode: bool | None, now: float) -> None:
        """A decode step over bucket b was dispatched at `now` in `mode` (step_mode's): the interval since the
        previous one, when that was a guided step of the same bucket and way dispatched with nothing else run since,
        is that way's cost. An interval across a change of way is not: after a pipelined step, a read-first one
        waits for it too (about two steps' time); after a read-first one, the next dispatch does not wait (about
        none), and counting either would favour reading first."""
        last = self._last_dispatch
        if last is not None and last[0] == b and last[1] == mode:
            self.choice.record(b, mode, now - last[2])
        self._last_dispatch = None if mode is None else (b, mode, now)

    def untimed(self) -> None:
        """Something else ran on the device (a prefill, a verify step) or nothing was dispatched: the next
        interval is not a step's."""
        self._last_dispatch = None

    def advance(self, request: Request, tokens: Sequence[int]) -> bool:
        """Move the request's guide past its new tokens; True when the format is complete and nothing may follow
        (the request ends now). Otherwise its next mask waits for `flush`. ValueError: a token the mask did not
        allow (a bug: the engine samples only allowed tokens)."""
        guide = self._guides.get(request.id)
        if guide is None:
            return False
        t0 = time.perf_counter()
        try:
            for token in tokens:
                guide.advance(int(token))
            if guide.done:
                return True
            if request.slot is not None:
                self._masks[request.slot] = guide.mask()
            return False
        finally:
            self.tokens += len(tokens)
            self._spent(time.perf_counter() - t0)

    def forget(self, request: Request, slot: int | None) -> None:
        """The request ended: drop its guide and any mask still waiting for its slot."""
        if self._guides.pop(request.id, None) is not None and slot is not None:
            self._masks.pop(slot, None)

    def flush(self) -> None:
        """Write the waiting masks into their slots (before the next step is dispatched)."""
        if self._masks:
            t0 = time.perf_counter()
            slots = list(self._masks)
            self.engine.guide(slots, [self._masks[s] for s in slots])
            self._masks.clear()
            self._spent(time.perf_counter() - t0)

    def resample(self, owners: Sequence[Request | None]) -> tuple[list[int], tuple] | None:
        """Right after a step over slots [0, len(owners)) was dispatched: the masks computed since (from the
        previous step's tokens) are written and those rows sampled again (Engine.resample_async). -> (slots, the
        device tokens and log-probs [G] to put in that step's output for them), or None when no mask waits. A mask
        for a slot the step does not hold waits for `flush`."""
        slots = [s for s in self._masks if s < len(owners) and owners[s] is not None]
        if not slots:
            return None
        t0 = time.perf_counter()
        out = self.engine.resample_async(slots, [self._masks.pop(s) for s in slots])
        self._spent(time.perf_counter() - t0)
        return slots, out

    def _spent(self, seconds: float) -> None:
        self.seconds += seconds
        if self.metrics is not None:
            self.metrics.guided_seconds.inc(seconds)

    def __len__(self) -> int:
        return len(self._guides)
