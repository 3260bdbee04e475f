"""A regex's positions (the matcher states its pattern can reach: finitely many), counted within bounds, and their
token masks prepared before a request is queued (`prepare_masks`), so the engine thread only looks them up. Used by
"regex" formats (regex.py) and, for the count alone, by JSON Schema pattern strings (patterns.py).
"""

from __future__ import annotations

import time

from meshserve.serving.guided.grammar import Grammar
from meshserve.serving.guided.spec import GuideError

__all__ = ["positions", "prepare_masks", "MAX_POSITIONS", "MAX_WORK", "PREPARE_S"]

# A regex has finitely many positions (matcher states): their masks are all computed before the request is queued,
# on the caller's thread, so the engine thread only looks them up. Each costs a walk of the vocabulary (~0.1 s for
# a 32,000-token BPE when most tokens fit, as in .{0,300}: 300 positions, 30 s): bounded in count and time.
MAX_POSITIONS = 1024
MAX_WORK = 2048  # the positions' stacks added up: each costs every mask that walks it (~5 ms per stack, 32k vocabulary)
PREPARE_S = 10.0


def positions(grammar: Grammar, max_positions: int = MAX_POSITIONS, max_work: int = MAX_WORK) -> list:
    """Every position (matcher state) the pattern can reach, found by trying each byte from each. GuideError past
    `max_positions`, or when the positions' stacks add up past `max_work` (a mask's cost grows with its state's
    stacks: 250 overlapping alternatives made one mask cost ~1 s). Deterministic: the same pattern is accepted or
    refused whatever is cached and however loaded the machine is."""
    seen = {grammar.start(): None}
    todo = [grammar.start()]
    work = len(grammar.start())
    while todo:
        state = todo.pop()
        row = grammar.row(state)
        for b in range(256):
            nxt = row[b] if b in row else grammar.fill(row, state, b)
            if nxt is None or nxt in seen:
                continue
            work += len(nxt)
            if len(seen) >= max_positions or work > max_work:
                what = f"{max_positions} positions" if len(seen) >= max_positions else f"{max_work} position-stacks"
                raise GuideError(f"{grammar.where}: more than {what} to prepare token masks for (use * or + for long "
                                 "repeats, or a smaller bound; fewer overlapping alternatives)")  # fmt: skip
            seen[nxt] = None
            todo.append(nxt)
    return list(seen)


def prepare_masks(guide, max_positions: int = MAX_POSITIONS, seconds: float = PREPARE_S) -> int:
    """Compute the mask of every position a regex guide's pattern can reach and pin them on the guide (the engine
    thread then only looks them up, whatever the table's cache evicts); returns how many. GuideError past the
    bounds of `positions`, or past `seconds` of mask work (a backstop for a very large vocabulary)."""
    grammar, table = guide.grammar, guide.table
    start = time.perf_counter()
    for state in positions(grammar, max_positions):
        guide.pinned[state] = table.mask(grammar, state)
        if time.perf_counter() - start > seconds:
            raise GuideError(f"{grammar.where}: its token masks take more than {seconds:g} s to prepare ("
                             f"{len(guide.pinned)} positions so far; use * or + for long repeats)")  # fmt: skip
    return len(guide.pinned)
