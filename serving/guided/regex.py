"""Regular expressions as guided decoding follows them: a "regex" format (vLLM's guided_regex, TGI's grammar {"type":
"regex"}: the output is a string the pattern fullmatches) and JSON Schema pattern strings, through one NFA.

The pattern is parsed by Python's own parser (re._parser) and built into a Thompson NFA over characters: each state
consumes one character of a class (sorted code point ranges) or is the accepting state. A multi-byte character is
taken byte by byte (`step`): a lead byte (and each continuation) is allowed only when some character it can still
become is in the class, so no token leads into a dead end. patterns.py's StringPattern is the matcher over it (a
state: the sorted tuple of the NFA states reachable, each a one-frame stack, so `Grammar`'s memo, masks and bounds
apply unchanged); positions.py counts its positions, masks.py computes their masks (prepare_masks).

Supported: literals, `.` (not newline), classes `[...]` and `[^...]` with ranges, \\d \\w \\s (written as ASCII: a
subset of Python's Unicode classes, so what is written always matches) and \\D \\W \\S (exactly what re matches),
alternation `|`, groups (capturing or not), `?` `*` `+` `{m}` `{m,n}` (lazy forms as greedy: the same set of
strings), `^` at the start and `$` / `\\Z` at the end. Refused with the construct named: backreferences,
lookarounds, conditionals, inline flags, other anchors. Bounded: MAX_NFA states after expanding repeats.
`build_nfa(pattern, where, exclude)`: its classes hold no code point in `exclude` (what JSON escapes, in a string).
"""

from __future__ import annotations

import bisect
import functools
import re
from typing import Any

from meshserve.serving.guided.spec import GuideError
from meshserve.serving.guided.strings import utf8_lead

try:  # Python 3.11+: the parser behind `re`
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - older layouts
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

__all__ = ["build_nfa", "MAX_NFA", "MAX_PATTERN", "WHOLE"]

MAX_NFA = 20_000  # NFA states after `{m,n}` copies (a{1000}{1000} would be a million)
MAX_PATTERN = 4096  # characters of a pattern
WHOLE = -1  # a pending character whose every completion is in the class (_Nfa._pending)
_TOP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_ASCII = {
    _c.CATEGORY_DIGIT: [(0x30, 0x39)],
    _c.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    _c.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
}
# What Python's re matches for each class in a str pattern (sre: isdecimal, isalnum or "_", isspace).
_UNICODE_TEST = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_SPACE: str.isspace,
}


@functools.cache
def _unicode(category) -> tuple[tuple[int, int], ...]:
    """The code point ranges Python's re matches for \\d, \\w or \\s (computed once: ~0.2 s)."""
    test = _UNICODE_TEST[category]
    ranges: list[tuple[int, int]] = []
    for code in range(_TOP + 1):
        if test(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return _normalize(ranges)


_ANCHORS = {_c.AT_BOUNDARY: "\\b", _c.AT_NON_BOUNDARY: "\\B", _c.AT_BEGINNING: "^", _c.AT_END: "$",
            _c.AT_BEGINNING_STRING: "\\A", _c.AT_END_STRING: "\\Z"}  # fmt: skip
_NEGATED = {_c.CATEGORY_NOT_DIGIT: _c.CATEGORY_DIGIT, _c.CATEGORY_NOT_WORD: _c.CATEGORY_WORD,
            _c.CATEGORY_NOT_SPACE: _c.CATEGORY_SPACE}  # fmt: skip


def _normalize(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged code point ranges without the surrogates."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges: tuple[tuple[int, int], ...], top: int = _TOP) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for lo, hi in _normalize(list(ranges)):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= top:
        out.append((at, top))
    return _normalize(out)


def _overlaps(ranges: tuple[tuple[int, int], ...], lo: int, hi: int) -> bool:
    """Whether some code point lo..hi is in `ranges` (sorted, disjoint): a bisection (\\W is 734 ranges, and every
    byte of every position of a pattern asks this)."""
    i = bisect.bisect_right(ranges, (hi, _TOP + 1)) - 1  # the last range beginning at or before hi
    return i >= 0 and ranges[i][1] >= lo


def _contains(ranges: tuple[tuple[int, int], ...], lo: int, hi: int) -> bool:
    """Whether every code point lo..hi is in `ranges` (sorted, disjoint, adjacent ones merged: one range holds them)."""
    i = bisect.bisect_right(ranges, (lo, _TOP + 1)) - 1
    return i >= 0 and hi <= ranges[i][1]


def _without(ranges: tuple[tuple[int, int], ...], taken: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The code points of `ranges` not in `taken`."""
    out, kept = [], _complement(taken)
    for lo, hi in ranges:
        for a, b in kept:
            if max(lo, a) <= min(hi, b):
                out.append((max(lo, a), min(hi, b)))
    return _normalize(out)


class _Nfa:
    """Thompson NFA: `edges[s]` = (class ranges, next state) for a consuming state, None for the accept state and
    epsilon-only states (whose successors are in `eps[s]`). `exclude`: code points no class may hold (a JSON
    string's escaped characters: patterns.py); a class left empty by it is a branch nothing can take (its end is
    reached from nowhere), not an error."""

    def __init__(self, where: str, exclude: tuple[tuple[int, int], ...] = ()) -> None:
        self.where = where
        self.exclude = exclude
        self.edges: list[tuple[tuple[tuple[int, int], ...], int] | None] = []
        self.eps: list[list[int]] = []
        self.start = self.accept = -1  # set by build_nfa
        self._closures: dict[int, tuple[int, ...]] = {}
        self._blocks: list[tuple[int, ...]] | None = None

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA:
            raise GuideError(
                f"{self.where}: more than {MAX_NFA} states once its repeats are expanded (make it smaller)"
            )
        self.edges.append(None)
        self.eps.append([])
        return len(self.edges) - 1

    def between_blocks(self) -> list[tuple[int, ...]]:
        """The bytes that can start a character (ASCII and UTF-8 lead bytes) in groups every class treats alike, so
        that a step of one serves its group: ASCII bytes every class holds all or none of; lead bytes of one
        continuation pattern (count and first range) whose characters every class holds all or none of (they lead
        to the same canonical place: `.` needs 7 steps, not 51); each other lead byte alone."""
        if self._blocks is None:
            classes = {edge[0] for edge in self.edges if edge is not None}
            blocks = [(1 << 0x80) - 1]  # bit sets, refined by each class's ASCII bits
            for ranges in classes:
                bits = sum((1 << min(hi, 0x7F) + 1) - (1 << lo) for lo, hi in ranges if lo < 0x80)
                blocks = [part for block in blocks for part in (block & bits, block & ~bits) if part]
            leads: dict[tuple, list[int]] = {}
            for b in range(0xC2, 0xF5):
                need, lo, hi = utf8_lead(b)
                first, last = _span((b,), need, lo, hi)
                held = [_contains(r, first, last) if _overlaps(r, first, last) else False for r in classes]
                partly = any(_overlaps(r, first, last) and not whole for r, whole in zip(classes, held, strict=True))
                leads.setdefault((b,) if partly else (need, lo, hi, *held), []).append(b)
            self._blocks = [tuple(b for b in range(0x80) if block >> b & 1) for block in blocks]
            self._blocks += [tuple(group) for group in leads.values()]
        return self._blocks

    def closure(self, state: int) -> tuple[int, ...]:
        """The consuming (or accepting) NFA states reachable from `state` by epsilon moves, sorted."""
        out = self._closures.get(state)
        if out is None:
            seen, todo, found = set(), [state], []
            while todo:
                s = todo.pop()
                if s in seen:
                    continue
                seen.add(s)
                if self.edges[s] is not None or s == self.accept:
                    found.append(s)
                todo.extend(self.eps[s])
            out = self._closures[state] = tuple(sorted(found))
        return out

    def step(self, at: tuple, b: int) -> list[tuple]:
        """The places after byte b from place `at` = (nfa state, *bytes of a character begun): (s,) for each state
        of the next closure once a character is whole, (state, *pending) while one is not."""
        edge = self.edges[at[0]]
        if edge is None:
            return []
        ranges, nxt = edge
        pending = at[1:]
        if not pending:
            if b < 0x80:
                return [(s,) for s in self.closure(nxt)] if _overlaps(ranges, b, b) else []
            lead = utf8_lead(b)
            if lead is None:
                return []
            need, lo, hi = lead
            return self._pending(at[0], ranges, (b,), need, lo, hi)
        if pending[0] == WHOLE:  # (WHOLE, continuation bytes left, next byte's range): every completion is in
            _, left, low, high = pending
            if not low <= b <= high:
                return []
            if left == 1:
                return [(s,) for s in self.closure(nxt)]
            return [(at[0], WHOLE, left - 1, 0x80, 0xBF)]
        need, lo, hi = utf8_lead(pending[0])
        low, high = (lo, hi) if len(pending) == 1 else (0x80, 0xBF)
        if not low <= b <= high:
            return []
        got = (*pending, b)
        if len(got) == need + 1:
            code = bytes(got).decode("utf-8")
            return [(s,) for s in self.closure(nxt)] if _overlaps(ranges, ord(code), ord(code)) else []
        return self._pending(at[0], ranges, got, need, lo, hi)

    @staticmethod
    def _pending(state: int, ranges, got: tuple[int, ...], need: int, lo: int, hi: int) -> list[tuple]:
        """The place after the bytes `got` of a character begun in NFA state `state`: none when no completion is in
        the class; a canonical (WHOLE, ...) one when every completion is (so `.` or [^"] after any lead byte is
        one of a few positions, not one per prefix: masks are computed per position); else the bytes themselves."""
        first, last = _span(got, need, lo, hi)
        if not _overlaps(ranges, first, last):
            return []
        if _contains(ranges, first, last):
            low, high = (lo, hi) if len(got) == 1 else (0x80, 0xBF)
            return [(state, WHOLE, need + 1 - len(got), low, high)]
        return [(state, *got)]

    def build(self, items: Any, start: int, where: str, top: bool = False) -> int:
        """Connect `items` (a parsed subpattern; `top`: the whole pattern) from `start`; returns its end state."""
        at = start
        for i, (op, arg) in enumerate(items):
            at = self.item(op, arg, at, where, first=top and i == 0, last=top and i == len(items) - 1)
        return at

    def char(self, ranges: tuple[tuple[int, int], ...], start: int) -> int:
        """One character of `ranges` after `start` (through a fresh consuming state: `start` may have other moves)."""
        if self.exclude:
            ranges = _without(ranges, self.exclude)
            if not ranges:
                return self.state()  # nothing can be written here: a dead end, unreachable
        if not ranges:
            raise GuideError(f"{self.where}: a class that matches no character")
        mid, end = self.state(), self.state()
        self.eps[start].append(mid)
        self.edges[mid] = (ranges, end)
        return end

    def item(self, op, arg, start: int, where: str, first: bool, last: bool) -> int:
        if op == _c.LITERAL:
            return self.char(_normalize([(arg, arg)]), start)
        if op == _c.NOT_LITERAL:
            return self.char(_complement(((arg, arg),)), start)
        if op == _c.ANY:
            return self.char(_complement(((0x0A, 0x0A),)), start)
        if op == _c.IN:
            return self.char(_class(arg, where), start)
        if op == _c.BRANCH:
            end = self.state()
            for alternative in arg[1]:
                begin = self.state()
                self.eps[start].append(begin)
                self.eps[self.build(alternative, begin, where)].append(end)
            return end
        if op == _c.SUBPATTERN:
            _, add_flags, del_flags, sub = arg
            if add_flags or del_flags:
                raise GuideError(f"{where}: inline flags (?...) are not supported")
            return self.build(sub, start, where)
        # Possessive repeats (a*+, a{1,3}+) never give back what they took: another set of strings (a*+a matches
        # nothing), refused below by name with the other constructs an NFA of this kind cannot follow.
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = arg
            at = start
            for _ in range(lo):
                at = self.build(sub, at, where)
            if hi == _c.MAXREPEAT:
                loop = self.state()
                self.eps[at].append(loop)
                self.eps[self.build(sub, loop, where)].append(loop)
                end = self.state()
                self.eps[loop].append(end)
                return end
            end = self.state()
            for _ in range(hi - lo):
                self.eps[at].append(end)
                at = self.build(sub, at, where)
            self.eps[at].append(end)
            return end
        if op == _c.AT:
            if (arg in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING) and first) or (
                arg in (_c.AT_END, _c.AT_END_STRING) and last
            ):
                return start  # the whole output is matched anyway (fullmatch)
            anchor = _ANCHORS.get(arg, str(arg).lower())
            raise GuideError(f"{where}: the anchor {anchor} is supported only as ^ at the start or $ at the end")
        names = {_c.GROUPREF: "backreferences", _c.ASSERT: "lookaheads/lookbehinds",
                 _c.ASSERT_NOT: "negative lookarounds", _c.GROUPREF_EXISTS: "conditionals"}  # fmt: skip
        names[getattr(_c, "POSSESSIVE_REPEAT", None)] = "possessive repeats (*+ ++ ?+ {m,n}+)"
        names[getattr(_c, "ATOMIC_GROUP", None)] = "atomic groups (?>...)"
        name = names.get(op, str(op).lower())
        raise GuideError(f"{where}: {name} are not supported")


def _class(items: Any, where: str) -> tuple[tuple[int, int], ...]:
    """A `[...]` class's code point ranges."""
    ranges: list[tuple[int, int]] = []
    negate = any(op == _c.NEGATE for op, _ in items)
    for op, arg in items:
        if op == _c.NEGATE:
            continue
        if op == _c.LITERAL:
            ranges.append((arg, arg))
        elif op == _c.RANGE:
            ranges.append(arg)
        elif op == _c.CATEGORY and arg in _ASCII:
            # \d \w \s write ASCII (a subset of what re matches); inside [^...] the exact set is taken away.
            ranges += _unicode(arg) if negate else _ASCII[arg]
        elif op == _c.CATEGORY and arg in _NEGATED:
            ranges += _complement(_unicode(_NEGATED[arg]))  # \D \W \S: exactly what re matches
        else:
            raise GuideError(f"{where}: {str(op).lower()} {str(arg).lower()} inside a class is not supported")
    out = _normalize(ranges)
    return _complement(out) if negate else out


def _span(got: tuple[int, ...], need: int, lo: int, hi: int) -> tuple[int, int]:
    """The lowest and highest code points a UTF-8 character beginning with bytes `got` can be (lead byte's first
    continuation range lo..hi)."""

    def value(rest: list[int]) -> int:
        data = [*got, *rest]
        code = data[0] & (0x7F >> (need + 1))
        for byte in data[1:]:
            code = code << 6 | (byte & 0x3F)
        return code

    left = need + 1 - len(got)
    first = len(got) == 1
    return (value(([lo] if first else []) + [0x80] * (left - first)),
            value(([hi] if first else []) + [0xBF] * (left - first)))  # fmt: skip


def build_nfa(pattern: str, where: str, exclude: tuple[tuple[int, int], ...] = ()) -> _Nfa:
    """The NFA of `pattern` (fullmatch), its `start` and `accept` states set; no class holds a code point in
    `exclude`. GuideError naming `where` for what it cannot guide to."""
    if not isinstance(pattern, str) or not pattern:
        raise GuideError(f"{where}: expected a non-empty pattern")
    if len(pattern) > MAX_PATTERN:
        raise GuideError(f"{where}: {len(pattern)} characters exceed the limit of {MAX_PATTERN}")
    try:
        parsed = _parser.parse(pattern)
    except re.error as e:
        raise GuideError(f"{where}: not a valid regular expression (Python's re syntax): {e}") from None
    if parsed.state.flags & ~(re.UNICODE | getattr(re, "U", 0)):
        raise GuideError(f"{where}: flags are not supported")
    nfa = _Nfa(where, exclude)
    nfa.start = nfa.state()
    nfa.accept = nfa.build(list(parsed), nfa.start, where, top=True)
    return nfa
