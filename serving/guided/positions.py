"""A pattern's positions (the matcher states it can reach: finitely many), counted within bounds in one walk that
also writes their table, the position after each byte: for a regex request and a JSON Schema pattern string alike
(patterns.py). masks.py runs the table over tokens' bytes for a position's mask.
"""

from __future__ import annotations

import numpy as np
from meshserve.serving.guided.grammar import Grammar
from meshserve.serving.guided.regex import WHOLE
from meshserve.serving.guided.spec import GuideError

__all__ = ["positions", "MAX_POSITIONS", "MAX_WORK"]

# A regex's masks are all computed on the caller's thread before it is queued and pinned on its request (the engine
# thread only looks them up). Grouped tokens (token_groups.py) made them cheap (1001 positions of [a-z ]: 3.8 s ->
# 0.07 s at 128k tokens), so the bound is kept for what a request holds: up to one mask a position (19 KB at 152k).
MAX_POSITIONS = 1024
MAX_WORK = 2048  # the positions' stacks added up: each costs every byte the walk steps (250 overlapping: ~1 s a mask)

# The bytes that can follow a position: between characters ASCII or a UTF-8 lead byte (regex._Nfa.between_blocks),
# inside one a continuation byte (the bytes written so far decide which: all of a position's frames are between
# characters or none is).
_CONTINUATIONS = [(b,) for b in range(0x80, 0xC0)]


def _continuations(state: tuple) -> list[tuple[int, ...]]:
    """The continuation bytes in groups that lead from `state` (inside a character) to one place: when every frame's
    character is whole (regex._WHOLE: every completion in its class, the next byte in a range low..high), the
    ranges' bounds cut 0x80-0xBF into intervals (a `.` position: 1 to 3 steps, not 64); else each byte alone."""
    cuts = {0x80, 0xC0}
    for (frame,) in state:  # (PAT, node, count, nfa state, _WHOLE, left, low, high)
        if frame[4] != WHOLE:
            return _CONTINUATIONS
        cuts.update((frame[6], frame[7] + 1))
    bounds = sorted(cuts)
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def positions(grammar: Grammar, max_positions: int, max_work: int) -> tuple[list, np.ndarray]:
    """Every position a pattern (patterns.PatternGrammar) can reach, found by trying each byte from each, and their
    table int16 [P + 1, 256]: the position after each byte, P where none follows (row P all P). GuideError past
    `max_positions`, or when the positions' stacks add up past `max_work` (a mask's cost grew with its state's
    stacks: 250 overlapping alternatives made one cost ~1 s). Deterministic: the same pattern is accepted or refused
    whatever is cached and however loaded the machine is (masks.prepare_masks' time backstop is not: its refusals
    are cached instead)."""
    start, between = grammar.start(), grammar.matcher.nfa.between_blocks()  # one step serves a block
    index, todo, rows, work = {start: 0}, [start], {}, len(start)
    while todo:
        state = todo.pop()
        memo, row = grammar.row(state), rows.setdefault(index[state], [-1] * 256)
        for block in _continuations(state) if len(state[0][0]) > 4 else between:  # a character begun, or none
            b = block[0]
            nxt = memo[b] if b in memo else grammar.fill(memo, state, b)
            if nxt is None:
                continue
            if nxt not in index:
                work += len(nxt)
                if len(index) >= max_positions or work > max_work:
                    what = (
                        f"{max_positions} positions" if len(index) >= max_positions else f"{max_work} position-stacks"
                    )
                    raise GuideError(f"{grammar.where}: more than {what} to prepare token masks for (use * or + for "
                                     "long repeats, or a smaller bound; fewer overlapping alternatives)")  # fmt: skip
                index[nxt] = len(index)
                todo.append(nxt)
            for b in block:
                row[b] = index[nxt]
    dead = len(index)
    table = np.array([rows[i] for i in range(dead)] + [[dead] * 256], np.int16)  # MAX_POSITIONS fits
    table[table < 0] = dead
    return list(index), table
