"""JSON string content for the grammar (grammar.py): UTF-8 lead bytes, plain strings (any content, escapes allowed,
min/max length in characters) and pattern strings (a JSON Schema `pattern` or `format`: content a regex matches,
written raw; the matcher is serving/guided/patterns.py's `StringPattern`, kept in the node).

Frames (the top of a stack while a string is being written):
  (STR, node, count, esc, more, lo, hi)   a plain string: characters so far (capped), the escape under way (1 after
                                          the backslash, 2..5 in a \\uXXXX), continuation bytes still to come of a
                                          multi-byte character and the next one's allowed range
  (PAT, node, count, nfa state, *pending) a pattern string (patterns.py says what the fields mean)
Both pop at the closing quote, leaving their container in the state it takes once the value ends.
"""

from __future__ import annotations

__all__ = ["PAT", "STR", "utf8_lead", "plain", "pattern"]

STR = 3  # grammar.py's tag for a plain string frame (VAL, OBJ, ARR, STR, ...)
PAT = 8  # a pattern string's frame (after ranges.RNG = 7)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')


def utf8_lead(b: int) -> tuple[int, int, int] | None:
    """(continuation bytes to come, lowest, highest allowed next byte) after lead byte b >= 0x80; None if invalid.
    The ranges exclude overlong forms, surrogates and code points past U+10FFFF."""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if b == 0xE0:
        return 2, 0xA0, 0xBF
    if b == 0xED:
        return 2, 0x80, 0x9F
    if 0xE1 <= b <= 0xEF:
        return 2, 0x80, 0xBF
    if b == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= b <= 0xF3:
        return 3, 0x80, 0xBF
    if b == 0xF4:
        return 3, 0x80, 0x8F
    return None


def plain(spec: tuple, top: tuple, rest: tuple, b: int) -> list[tuple]:
    """Stacks after byte b inside a plain string (`spec`: its ("str", min_length, max_length | -1) node)."""
    _, node, count, esc, more, lo, hi = top
    _, min_len, max_len = spec
    cap = max_len if max_len >= 0 else min_len  # counting past this changes nothing: keep states few
    done = min(count + 1, cap)
    if esc == 1:
        if b in _ESCAPES:
            return [rest + ((STR, node, done, 0, 0, 0, 0),)]
        return [rest + ((STR, node, count, 2, 0, 0, 0),)] if b == 0x75 else []
    if esc:
        if b not in _HEX:
            return []
        if esc == 5:
            return [rest + ((STR, node, done, 0, 0, 0, 0),)]
        return [rest + ((STR, node, count, esc + 1, 0, 0, 0),)]
    if more:
        if not lo <= b <= hi:
            return []
        if more == 1:
            return [rest + ((STR, node, done, 0, 0, 0, 0),)]
        return [rest + ((STR, node, count, 0, more - 1, 0x80, 0xBF),)]
    if b == 0x22:
        return [rest] if count >= min_len else []
    if b < 0x20 or (0 <= max_len <= count):
        return []
    if b == 0x5C:
        return [rest + ((STR, node, count, 1, 0, 0, 0),)]
    if b < 0x80:
        return [rest + ((STR, node, done, 0, 0, 0, 0),)]
    lead = utf8_lead(b)
    return [rest + ((STR, node, count, 0) + lead,)] if lead else []


def pattern(matcher, top: tuple, rest: tuple, b: int) -> list[tuple]:
    """Stacks after byte b inside a pattern string (`matcher`: its node's StringPattern). The closing quote ends it
    where the pattern matches what was written (no class holds a quote: characters are written raw)."""
    if b == 0x22:
        return [rest] if matcher.closes(top) else []
    return [rest + (frame,) for frame in matcher.step(top, b)]
