"""JSON Schema `pattern` (and `format`, as a pattern from formats.py) on strings: the string's content is written as
a regex match (`StringPattern`), through regex.py's NFA (the one implementation of the regex subset).

Semantics:
- JSON Schema's pattern is an unanchored ECMA-262 search; what is generated fullmatches the pattern (Python's
  `re.fullmatch`, a leading `^` and trailing `$` being no-ops there), so it also satisfies the search: the output
  is always valid, only stricter than the schema asks for an unanchored pattern (`abc` writes exactly "abc"), as
  outlines and xgrammar do. The pattern is read by Python's parser, with regex.py's subset (\\d \\w \\s write ASCII).
  An empty pattern (it matches every string) is no constraint.
- Characters are written raw, never as JSON escapes: every class is intersected with the characters JSON allows
  unescaped (not '"', not '\\\\', not U+0000-U+001F; nor U+2028, U+2029, U+FEFF, which ECMA's `.` / \\S do not
  match though Python's do), so the decoded string is the text that matched. A pattern whose
  every match needs such a character (e.g. `^"$`, `\\n`) is refused at compile time, naming its path.
- minLength / maxLength together with a pattern are followed: characters (code points) are counted in the frame,
  capped at maxLength (or minLength when there is no maxLength), and a character or the closing quote is allowed
  only where some completion satisfies both the pattern and the lengths (a table of the NFA states that can still
  accept at each count, built at compile time), so the output never reaches a dead end. Lengths every match of the
  pattern already has (a date with maxLength 10) are not counted: no extra positions.
- Bounds: regex.py's MAX_PATTERN characters and MAX_NFA states, positions.py's MAX_POSITIONS positions and MAX_WORK
  position-stacks (counted at compile time, deterministically, counts included: each position has a mask of its
  own), grammar.py's MAX_OPEN alternatives, and MAX_COUNTED (NFA states x counted lengths in the table). Past any
  of them the schema is refused with a GuideError naming the path (`schema.properties.x.pattern: ...`).
- Masks: a position's plain tokens (no quote, backslash or control: they stay inside the string) do not depend on
  where the string is, so masks.py computes one mask per position with the table `next` built here (the position
  after each byte) and shares it across states, schemas and requests; compiled patterns are cached by (pattern,
  minLength, maxLength).

Frames: (PAT, node, count, nfa state, *pending bytes of a character begun) (strings.py steps them in the grammar).
"""

from __future__ import annotations

import functools

import numpy as np
from meshserve.serving.guided.formats import format_pattern
from meshserve.serving.guided.grammar import MAX_OPEN, Grammar
from meshserve.serving.guided.positions import MAX_POSITIONS, MAX_WORK, positions
from meshserve.serving.guided.regex import build_nfa
from meshserve.serving.guided.spec import GuideError, show
from meshserve.serving.guided.strings import PAT

__all__ = ["StringPattern", "compile_pattern", "read_pattern", "JSON_ESCAPED", "MAX_COUNTED"]

# Never written in a pattern string: what a JSON string cannot hold raw (controls, '"', '\\'), and U+2028, U+2029,
# U+FEFF, which Python's `.` and \S match and ECMA-262's (the schema's regex dialect) do not: output is valid both ways.
JSON_ESCAPED = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x2028, 0x2029), (0xFEFF, 0xFEFF))
MAX_COUNTED = 1 << 20  # NFA states x (the counted length + 1): the liveness table's entries


class StringPattern:
    """A pattern string's matcher: `begin(node)` (frames after the opening quote), `step(frame, b)`, `closes(frame)`
    (the closing quote may follow). Frames are the grammar's (PAT, node, count, nfa state, *pending)."""

    def __init__(self, pattern: str, min_length: int, max_length: int, where: str):
        self.where = where
        self.positions: list = []  # every position (a state of _Positions), once counted (compile_pattern)
        self.index: dict = {}  # position -> its number
        self.next = np.zeros((1, 256), np.int16)  # [P + 1, 256]: the position after each byte; P: none (row P: P)
        self.nfa = nfa = build_nfa(pattern, where, JSON_ESCAPED)
        self.min, self.max = min_length, max_length
        # Counts past `cap` change nothing: with a maxLength none comes, without one every count >= minLength is alike.
        self.cap = max_length if max_length >= 0 else min_length
        states = sorted({s for s in range(len(nfa.edges)) if nfa.edges[s] is not None} | {nfa.accept})
        succ = {}  # each character's next closure; refused at the first too wide (each costs up to every NFA state)
        for s in [-1, *states]:  # -1: the start's closure, first
            if s != nfa.accept:
                nxt = nfa.closure(nfa.start) if s < 0 else succ.setdefault(s, nfa.closure(nfa.edges[s][1]))
                if len(nxt) > MAX_OPEN:
                    raise GuideError(f"{where}: the format keeps more than {MAX_OPEN} alternatives open at once (a "
                                     "regex's | and optional repeats): simplify it")  # fmt: skip
        live = self._coreachable(succ)
        if not any(s in live for s in nfa.closure(nfa.start)):
            raise GuideError(f"{where}: every string it matches needs a character JSON writes escaped ('\"', "
                             "'\\\\' or a control character): a pattern's characters are written raw")  # fmt: skip
        shortest, longest = self._extent(succ, live)
        if shortest >= self.min and (self.max < 0 or longest <= self.max):  # the pattern bounds its lengths itself
            self.min, self.max, self.cap = 0, -1, 0
        elif len(states) * (self.cap + 1) > MAX_COUNTED:
            raise GuideError(f"{where}: counting {self.cap} characters (minLength / maxLength) over a pattern of "
                             f"{len(states)} states passes the limit of {MAX_COUNTED} (use a smaller length)")  # fmt: skip
        self.live = self._live(succ, live)
        self.start = tuple(s for s in nfa.closure(nfa.start) if s in self.live[0])
        if not self.start:
            count = f"at least {min_length}" if max_length < 0 else f"{min_length} to {max_length}"
            raise GuideError(f"{where}: no string it matches has {count} characters (minLength / maxLength)")

    def _coreachable(self, succ: dict[int, tuple[int, ...]]) -> frozenset[int]:
        """The NFA states from which the accept state can be reached (by characters a JSON string holds raw)."""
        before: dict[int, list[int]] = {}
        for s, nxt in succ.items():
            for t in nxt:
                before.setdefault(t, []).append(s)
        live, todo = {self.nfa.accept}, [self.nfa.accept]
        while todo:
            for s in before.get(todo.pop(), ()):
                if s not in live:
                    live.add(s)
                    todo.append(s)
        return frozenset(live)

    def _extent(self, succ: dict[int, tuple[int, ...]], live: frozenset[int]) -> tuple[int, float]:
        """The fewest and most characters of a match (inf: a repeat without bound), over the live states."""
        nfa, accept = self.nfa, self.nfa.accept
        first = [s for s in nfa.closure(nfa.start) if s in live]
        edges = {s: [t for t in succ[s] if t in live] if s != accept else [] for s in live}
        depth, todo = dict.fromkeys(first, 0), list(first)
        for s in todo:  # breadth first (todo grows as it is read): each edge is one character
            for t in edges[s]:
                if t not in depth:
                    depth[t] = depth[s] + 1
                    todo.append(t)
        indegree = dict.fromkeys(depth, 0)  # depth holds every state reachable from the start
        for s in depth:
            for t in edges[s]:
                indegree[t] += 1
        longest, ready, done = dict.fromkeys(depth, 0), [s for s in depth if not indegree[s]], 0
        while ready:  # Kahn's order: a state left over lies on a cycle (an unbounded repeat)
            s = ready.pop()
            done += 1
            for t in edges[s]:
                longest[t] = max(longest[t], longest[s] + 1)
                indegree[t] -= 1
                if not indegree[t]:
                    ready.append(t)
        return depth[accept], float("inf") if done < len(depth) else longest[accept]

    def _live(self, succ: dict[int, tuple[int, ...]], coreachable: frozenset[int]) -> list[frozenset[int]]:
        """live[c]: the NFA states (consuming or accepting) from which, with c characters written, some completion
        matches and has a length within bounds. live[c] for a consuming state: some state of its next closure is
        live at c + 1 (at the cap without a maxLength: at the cap again, a fixed point)."""
        accept = self.nfa.accept
        # At maxLength only the end; at the cap without one (>= minLength), plain co-reachability of the end.
        levels = [frozenset([accept])] if self.max >= 0 else [coreachable]
        for count in range(self.cap - 1, -1, -1):
            above = levels[-1]
            level = {s for s, nxt in succ.items() if any(t in above for t in nxt)}
            if count >= self.min:
                level.add(accept)
            levels.append(frozenset(level))
        return levels[::-1]

    def begin(self, node: int) -> list[tuple]:
        return [(PAT, node, 0, s) for s in self.start]

    def step(self, frame: tuple, b: int) -> list[tuple]:
        node, count = frame[1], frame[2]
        out = []
        for at in self.nfa.step(frame[3:], b):
            if len(at) > 1:  # a character under way: its state can still take one (live at this count)
                if at[0] in self.live[count]:
                    out.append((PAT, node, count, *at))
                continue
            done = count + 1 if self.max >= 0 else min(count + 1, self.cap)
            if done <= self.cap and at[0] in self.live[done]:
                out.append((PAT, node, done, at[0]))
        return out

    def closes(self, frame: tuple) -> bool:
        return len(frame) == 4 and frame[3] == self.nfa.accept and frame[2] >= self.min


class _Positions(Grammar):
    """A pattern string alone (no quotes) as a `Grammar` (frames with node 0): positions.positions counts its
    positions, and compile_pattern reads their table `next` from it."""

    def __init__(self, matcher: StringPattern):
        self.matcher = matcher
        super().__init__([], [(frame,) for frame in matcher.begin(0)], matcher.where)

    def _step(self, stack: tuple, b: int) -> list[tuple]:
        return [(frame,) for frame in self.matcher.step(stack[0], b)]

    def _can_end(self, stack: tuple) -> bool:
        return self.matcher.closes(stack[0])

    def string_room(self, state) -> None:
        return None


def read_pattern(schema: dict, path: str) -> tuple[str, str]:
    """A string schema's pattern (its own, or its format's from formats.py) and the path to name in its errors; ""
    when it has none (an empty pattern matches every string; a format not in the table is an annotation)."""
    pattern, name = schema.get("pattern"), schema.get("format")
    if pattern is not None and not isinstance(pattern, str):
        raise GuideError(f"{path}.pattern: expected a regular expression (a string), got {show(pattern)}")
    implied = format_pattern(name)
    if pattern and implied:
        raise GuideError(f"{path}: pattern together with format {name!r} is not supported (use one of them)")
    return (pattern, f"{path}.pattern") if pattern else (implied or "", f"{path}.format")


def compile_pattern(pattern: str, min_length: int, max_length: int, where: str) -> StringPattern:
    """The matcher of a string whose content fullmatches `pattern` with min_length..max_length (-1: no bound)
    characters, its positions counted within regex.py's bounds. GuideError naming `where` otherwise. Cached by
    pattern and lengths (a format used in many places, or in many schemas, is built once; ~0.5 s for hostname)."""
    try:
        return _compile(pattern, min_length, max_length)
    except GuideError as e:  # named after a placeholder: the cached matcher serves every path
        raise GuideError(where + str(e)[len(_WHERE) :]) from None


_WHERE = "pattern"


@functools.lru_cache(maxsize=128)  # a matcher holds its positions and their table: up to ~1 MB
def _compile(pattern: str, min_length: int, max_length: int) -> StringPattern:
    matcher = StringPattern(pattern, min_length, max_length, _WHERE)
    alone = _Positions(matcher)  # dropped after: its byte memo (up to 2^18 entries) is not needed once `next` is
    matcher.positions = positions(alone, MAX_POSITIONS, MAX_WORK)
    matcher.index = {state: i for i, state in enumerate(matcher.positions)}
    dead = len(matcher.positions)
    matcher.next = np.full((dead + 1, 256), dead, np.int16)  # MAX_POSITIONS fits
    for i, state in enumerate(matcher.positions):
        for b in range(256):
            after = alone.step(state, b)
            if after is not None:
                matcher.next[i, b] = matcher.index[after]
    return matcher
