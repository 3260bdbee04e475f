"""JSON Schema `pattern` (and `format`, as a pattern from formats.py) on strings, and a regex request's whole output:
text a pattern fullmatches (`StringPattern`, over regex.py's NFA: the one implementation of the regex subset; a
`PatternGrammar` where the pattern is all the output).

Semantics of a pattern string:
- JSON Schema's pattern is an unanchored ECMA-262 search; what is generated fullmatches the pattern (Python's
  `re.fullmatch`, a leading `^` and trailing `$` being no-ops there), so it also satisfies the search: the output
  is always valid, only stricter than the schema asks for an unanchored pattern (`abc` writes exactly "abc"), as
  outlines and xgrammar do. The pattern is read by Python's parser, with regex.py's subset (\\d \\w \\s write ASCII).
  An empty pattern (it matches every string) is no constraint.
- Characters are written raw, never as JSON escapes: every class is intersected with the characters JSON allows
  unescaped (not '"', not '\\\\', not U+0000-U+001F; nor U+2028, U+2029, U+FEFF, which ECMA's `.` / \\S do not
  match though Python's do), so the decoded string is the text that matched. A pattern whose every match needs
  such a character (e.g. `^"$`, `\\n`) is refused at compile time, naming its path. A regex request's output (`raw`)
  excludes nothing.
- minLength / maxLength together with a pattern are followed: characters (code points) are counted in the frame,
  capped at maxLength (or minLength when there is no maxLength), and a character or the closing quote is allowed
  only where some completion satisfies both the pattern and the lengths (a table of the NFA states that can still
  accept at each count, built at compile time), so the output never reaches a dead end. Lengths every match of the
  pattern already has (a date with maxLength 10) are not counted: no extra positions.
- Bounds: regex.py's MAX_PATTERN characters and MAX_NFA states, positions.py's MAX_POSITIONS positions and MAX_WORK
  position-stacks (counted at compile time, counts included; lengths whose counts alone pass MAX_POSITIONS are
  refused before anything is built, naming minLength / maxLength), grammar.py's MAX_OPEN alternatives, and
  MAX_COUNTED (NFA states x counted lengths). Past any of them the schema is refused with a GuideError naming the
  path (`schema.properties.x.pattern: ...`). A format past them with minLength / maxLength is not refused: it stays
  an annotation (`string_node`: the plain string with its lengths, as before formats were followed).
- Positions and masks: positions.py counts a pattern's positions and writes their table (`next`: the position after
  each byte) in one walk; masks.py runs it over tokens' bytes for each position's mask, shared across states,
  schemas and requests (a pattern string's plain tokens: no quote, backslash or control, so they stay inside the
  string; a regex's every token). Compiled patterns, and refusals, are cached by (pattern, lengths, raw).

Frames: (PAT, node, count, nfa state, *pending bytes of a character begun) (strings.py steps them in the grammar).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
from meshserve.serving.guided.formats import format_pattern
from meshserve.serving.guided.grammar import MAX_OPEN, Grammar, new_key
from meshserve.serving.guided.positions import MAX_POSITIONS, MAX_WORK, positions
from meshserve.serving.guided.regex import build_nfa
from meshserve.serving.guided.spec import GuideError, SizedCache, show
from meshserve.serving.guided.strings import PAT

__all__ = ["StringPattern", "PatternGrammar", "compile_pattern", "compile_regex", "read_pattern", "string_node",
           "JSON_ESCAPED", "MAX_COUNTED"]  # fmt: skip

# Never written in a pattern string: what a JSON string cannot hold raw (controls, '"', '\\'), and U+2028, U+2029,
# U+FEFF, which Python's `.` and \S match and ECMA-262's (the schema's regex dialect) do not: output is valid both ways.
JSON_ESCAPED = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x2028, 0x2029), (0xFEFF, 0xFEFF))
MAX_COUNTED = 1 << 20  # NFA states x (the counted length + 1): the liveness table's entries


class StringPattern:
    """A pattern string's matcher: `begin(node)` (frames after the opening quote), `step(frame, b)`, `closes(frame)`
    (the closing quote may follow). Frames are the grammar's (PAT, node, count, nfa state, *pending). `raw`: a
    regex request's whole output (no JSON escaping: every character may be written, and every token's bytes are
    run through its table, not only the plain ones)."""

    def __init__(self, pattern: str, min_length: int, max_length: int, where: str, raw: bool = False):
        self.pattern, self.where, self.raw = pattern, where, raw
        self.spec = (pattern, min_length, max_length, raw)  # what it was built from: compile_pattern's cache key
        self.key = new_key()  # masks.py's cache keys its masks by this, not by the matcher (which it would keep)
        self.counted = False  # True once the three below are set (compile_pattern, in place)
        self.positions: list = []  # every position (a state of PatternGrammar), once counted (compile_pattern)
        self.index: dict = {}  # position -> its number
        self.next = np.zeros((1, 256), np.int16)  # [P + 1, 256]: the position after each byte; P: none (row P: P)
        self._nbytes: tuple = (None, 0)  # (counted, nbytes()) as last computed
        self.nfa = nfa = build_nfa(pattern, where, () if raw else JSON_ESCAPED)
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
        shortest, longest = (0, 0) if self.min == 0 and self.max < 0 else self._extent(succ, live)  # no lengths
        if shortest >= self.min and (self.max < 0 or longest <= self.max):  # the pattern bounds its lengths itself
            self.min, self.max, self.cap = 0, -1, 0
        elif (reach := self._longest_count(succ, live, longest)) >= MAX_POSITIONS:
            # Each count 0..reach is a position of its own (counts are in the frame): refused before the table and
            # the positions are built (`[a-z]*` with maxLength 300000 cost ~0.8 s to refuse that way).
            which, why = (("maxLength", f"and matches of {reach} characters or more fit") if self.max >= 0
                          else ("minLength", "up to it"))  # fmt: skip
            raise GuideError(f"{where}: counting characters for {which} {max(self.min, self.max)} makes more than "
                             f"{MAX_POSITIONS} positions to prepare token masks for (one per count, {why}): use a "
                             f"smaller {which}")  # fmt: skip
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

    def _longest_count(self, succ: dict[int, tuple[int, ...]], live: frozenset[int], longest: float) -> int:
        """A count frames reach once lengths are counted (so positions >= it + 1), to refuse up front when it is
        MAX_POSITIONS or more: without a maxLength, minLength itself (counts stop there, and every match is at least
        that long), 0 if no match is; with one, the fewest characters of a match within minLength..maxLength that are
        at least MAX_POSITIONS, else 0 (the positions' own count decides). Found by stepping the set of NFA states
        reached after each count, which repeats with some period after a few counts (`[a-z]*`: from the first), so
        a maxLength of 300000 is not walked through; 0 (undecided) past a small amount of work."""
        if self.max < 0:
            return self.min if longest >= self.min else 0
        low = max(self.min, MAX_POSITIONS)
        if self.max < low:
            return 0
        accept, nfa = self.nfa.accept, self.nfa
        now = frozenset(s for s in nfa.closure(nfa.start) if s in live)
        sets, seen, work = [], {}, 0
        for count in range(self.max + 1):
            if count >= low and accept in now:
                return count
            if not now or count >= 8 * MAX_POSITIONS or work > 1 << 18:
                return 0
            if now in seen:  # the sets repeat from seen[now] with this period: a later count with the end?
                first, period = seen[now], count - seen[now]
                ends = [c for c in range(first, count) if accept in sets[c]]
                start = max(low, count)
                hits = [start + (c - start) % period for c in ends]
                return min((c for c in hits if c <= self.max), default=0)
            seen[now] = count
            sets.append(now)
            work += len(now)
            now = frozenset(t for s in now if s != accept for t in succ[s] if t in live)
        return 0

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

    def nbytes(self) -> int:
        """About the bytes this matcher holds (tracemalloc on patterns of 80-16,000 NFA states and on the formats:
        within ~30%): ~280 an NFA state with its edge, 8 a cached closure's or the liveness table's entry, ~350 a
        counted position's stack (its state's tuples, the index) and the positions' table."""
        if self._nbytes[0] != self.counted:  # only counting adds to it (every closure is found in __init__)
            entries = sum(map(len, self.nfa._closures.values())) + sum(map(len, self.live))
            stacks = sum(map(len, self.positions))
            self._nbytes = (self.counted, 280 * len(self.nfa.edges) + 8 * entries + 350 * stacks + self.next.nbytes)
        return self._nbytes[1]

    def begin(self, node: int) -> list[tuple]:
        return [(PAT, node, 0, s) for s in self.start]

    def step(self, frame: tuple, b: int) -> list[tuple]:
        node, count = frame[1], frame[2]
        places = self.nfa.step(frame[3:], b)  # a character under way (one place), or the states after one (or none)
        if places and len(places[0]) > 1:  # its state can still take one (live at this count)
            return [(PAT, node, count, *at) for at in places if at[0] in self.live[count]]
        done = count + 1 if self.max >= 0 else min(count + 1, self.cap)
        live = self.live[done] if done <= self.cap else ()
        return [(PAT, node, done, at[0]) for at in places if at[0] in live]

    def closes(self, frame: tuple) -> bool:
        return len(frame) == 4 and frame[3] == self.nfa.accept and frame[2] >= self.min


class PatternGrammar(Grammar):
    """A pattern alone as a `Grammar` (one-frame stacks, node 0): a regex request's whole output (compile_regex),
    and a pattern string's content while compile_pattern counts its positions and their table."""

    def __init__(self, matcher: StringPattern, where: str = ""):
        self.matcher = matcher
        super().__init__([], [(frame,) for frame in matcher.begin(0)], where or matcher.where)

    def _step(self, stack: tuple, b: int) -> list[tuple]:
        return [(frame,) for frame in self.matcher.step(stack[0], b)]

    def _can_end(self, stack: tuple) -> bool:
        return self.matcher.closes(stack[0])

    def indexed(self) -> StringPattern:
        """The matcher with its positions counted and their table (masks.prepare_masks): this grammar's own, counted
        in place the first time (its NFA is not built again), or the compiled patterns' cached one of the same
        pattern; refusals are cached per pattern (GuideError naming this grammar's `where`)."""
        m = self.matcher
        return m if m.counted else compile_pattern(*m.spec[:3], self.where, m.raw, uncounted=m)


def compile_regex(pattern: str, where: str = "regex") -> PatternGrammar:
    """The matcher of outputs `pattern` fullmatches, written raw (a regex request): the compiled patterns' cached
    one when the pattern was counted before, else a new one whose positions are counted when its masks are prepared
    (PatternGrammar.indexed, on this matcher: one NFA built per pattern). GuideError naming `where` for what it
    cannot guide to; cached refusals, as a pattern string's."""
    return PatternGrammar(compile_pattern(pattern, 0, -1, where, raw=True, counted=False), where)


# Bytes a grammar's (state, byte) memo holds an entry, about (tracemalloc while filling JSON object, schema and regex
# memos: 46-130).
_MEMO_ENTRY = 100
_MATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # grammar -> its distinct matchers (held_bytes)


def held_bytes(grammar: Grammar) -> int:
    """About the bytes a compiled grammar holds now (compile_spec's cache counts them again at each put and hit, as
    its memo grows): ~320 a node (tracemalloc on a schema of 900 nodes), its patterns' matchers (StringPattern.nbytes;
    a matcher shared with other grammars, a format in several schemas, is counted in each of them: more than is
    held, never less) and its (state, byte) memo as filled so far (~_MEMO_ENTRY an entry, at most
    grammar._MEMO_LIMIT entries)."""
    matchers = _MATCHERS.get(grammar)
    if matchers is None:  # the nodes never change: found once (a put recounts every cached grammar)
        found = [grammar.matcher] if isinstance(grammar, PatternGrammar) else [n[1] for n in grammar.nodes
                                                                               if n[0] == "pat"]  # fmt: skip
        matchers = _MATCHERS[grammar] = list({id(m): m for m in found}.values())
    return 320 * len(grammar.nodes) + sum(m.nbytes() for m in matchers) + _MEMO_ENTRY * grammar._size


def read_pattern(schema: dict, path: str) -> tuple[str, str]:
    """A string schema's pattern (its own, or its format's from formats.py) and the path to name in its errors; ""
    when it has none (an empty pattern matches every string; a format not in the table is an annotation)."""
    pattern, name = schema.get("pattern"), schema.get("format")
    if pattern is not None and not isinstance(pattern, str):
        raise GuideError(f"{path}.pattern: expected a regular expression (a string), got {show(pattern)}")
    implied = format_pattern(name)
    if pattern and implied:
        raise GuideError(f"{path}: pattern together with format {show(name)} is not supported (use one of them)")
    return (pattern, f"{path}.pattern") if pattern else (implied or "", f"{path}.format")


def string_node(schema: dict, min_length: int, max_length: int, path: str) -> tuple:
    """A string schema's grammar node: ("pat", StringPattern) for a pattern or a format in the table, else ("str",
    min_length, max_length). A format that cannot be enforced together with minLength / maxLength (past the bounds:
    pydantic's HttpUrl, a uri of 1 to 2083 characters, is a position per count; or no string of the table's subset
    has those lengths) stays an annotation, as JSON Schema allows: the plain string with its lengths. An explicit
    pattern is refused instead (GuideError naming `path`.pattern)."""
    pattern, where = read_pattern(schema, path)
    if not pattern:
        return ("str", min_length, max_length)
    try:
        return ("pat", compile_pattern(pattern, min_length, max_length, where))
    except GuideError:
        if schema.get("pattern") or (min_length == 0 and max_length < 0):  # a table format alone always compiles
            raise
        return ("str", min_length, max_length)


def compile_pattern(
    pattern: str,
    min_length: int,
    max_length: int,
    where: str,
    raw: bool = False,
    counted: bool = True,
    uncounted: StringPattern | None = None,
) -> StringPattern:
    """The matcher of a string whose content fullmatches `pattern` with min_length..max_length (-1: no bound)
    characters (`raw`: StringPattern's), its positions counted within positions.py's bounds and their table built
    (`counted`; else the matcher alone, for a regex's validation: compile_spec caches its grammar, whose positions
    are counted later on it, `uncounted`, in place, not on a second build). GuideError naming `where` otherwise.
    Counted matchers are cached by pattern and lengths (a format used in many places, or in many schemas, is built
    once; ~0.5 s for hostname; a regex's, once counted, serves its later compiles), and so are refusals (a retry of
    a pattern refused after ~0.3 s of counting is refused at once)."""
    spec = (pattern, min_length, max_length, raw)
    if (hit := _COMPILED.hit(spec)) is not None:
        return hit
    key = (*spec, counted)
    with _GUARD:
        building = _BUILDING.setdefault(key, [threading.Lock(), 0])
        building[1] += 1
    try:
        with building[0]:  # requests for a pattern being built wait for it, then take it (or its refusal) cached
            reason = _REFUSED.get(key)
            if reason is None:
                if (hit := _COMPILED.hit(spec)) is not None:
                    return hit
                try:
                    matcher = uncounted or StringPattern(pattern, min_length, max_length, _WHERE, raw)
                    if not counted:
                        return matcher
                    if not matcher.counted:  # (counted by another caller and already evicted: as it is)
                        _count(matcher)
                    return _COMPILED.put(spec, matcher)
                except GuideError as e:
                    reason = _REFUSED.put(key, str(e)[len(_WHERE) :])
    finally:
        with _GUARD:
            building[1] -= 1
            if not building[1]:
                del _BUILDING[key]
    raise GuideError(where + reason)  # named after a placeholder: the cached message serves every path


# The patterns being built, each with a lock and how many callers want it: several requests sending the same new
# pattern at once build it once (each build is Python on a caller's thread, sharing the GIL with the engine thread).
_BUILDING: dict[tuple, list] = {}
_GUARD = threading.Lock()
# Why each refused pattern is refused (a message after the placeholder path): at most 1024, 16 MB with the patterns.
_REFUSED = SizedCache(1024, 16 << 20, lambda key, reason: 100 + len(key[0]) + len(reason))
# Counted matchers by (pattern, min_length, max_length, raw): at most 128 and 128 MiB (StringPattern.nbytes: a
# 20,000-state NFA is ~6 MB, a format ~0.1 MB).
_COMPILED = SizedCache(128, 128 << 20, lambda _, matcher: matcher.nbytes())
_WHERE = "pattern"


def _count(matcher: StringPattern) -> None:
    """Count the matcher's positions and write their table, in place (one walk; the grammar it walks, with its byte
    memo, is dropped after). `counted` is set last: a matcher is read as counted only once all of it is."""
    try:
        matcher.positions, matcher.next = positions(PatternGrammar(matcher), MAX_POSITIONS, MAX_WORK)
    except GuideError as e:
        if not matcher.cap:
            raise
        raise GuideError(f"{e}; minLength / maxLength are counted here, each count a position of its own: a smaller "
                         "bound, or none, makes fewer") from None  # fmt: skip
    matcher.index = {state: i for i, state in enumerate(matcher.positions)}
    matcher.counted = True
