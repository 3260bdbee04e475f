"""Guided decoding's "regex" format (serving/guided/regex.py): the matcher agrees with Python's re.fullmatch on
strings around each pattern (ASCII and multi-byte), refuses what it cannot guide to by name, and random walks over
its token masks (a byte-level BPE and the byte tokenizer) write only strings the pattern matches whole; masks equal
a token-by-token check."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.guided import Guide, GuideError, GuideSpec, TokenTable, compile_spec
from meshserve.serving.guided.masks import prepare_masks
from test_guided_masks import bits, bpe, brute, walk  # noqa: F401  (bpe: the fixture)

PATTERNS = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]+( [A-Z][a-z]+){0,3}", r"é+x", r"[^a-c]{2}", r"a?b?",
            r"\w{1,8}@\w{1,8}\.(com|org)", r"^[0-9]{1,3}$", r"(ab){2,4}c", r"[α-ω]{1,3}€?", r"(\d+\.)?\d+", r"[\s]x\S"]  # fmt: skip
SAMPLES = ["123-4567", "12-4567", "yes", "maybe", "mayb", "Hello World", "Hello world", "hello", "éééx", "x", "dd",
           "ab", "ée", "\n\n", "", "a", "b", "ba", "joe@mail.com", "joe@mail.net", "7", "1234", "ababc", "abc",
           "abababababc", "ça", "αβ€", "αβγδ", "ω", "12.5", ".5", "3.", " xy", "\txé"]  # fmt: skip


def regex(pattern: str):
    return compile_spec(GuideSpec("regex", pattern=pattern))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_matcher_agrees_with_fullmatch(pattern):
    grammar = regex(pattern)
    for text in SAMPLES:
        state = grammar.advance(grammar.start(), text.encode())
        got = state is not None and grammar.accepts(state)
        assert got == (re.fullmatch(pattern, text) is not None), (pattern, text)
        for cut in range(1, len(text.encode())):  # every prefix of a match is alive (no dead ends)
            if re.fullmatch(pattern, text):
                assert grammar.advance(grammar.start(), text.encode()[:cut]) is not None, (pattern, text, cut)


def test_classes_write_only_what_re_matches():
    """\\d \\w \\s write ASCII (a subset of Python's Unicode classes); \\D \\W \\S and [^...] take away exactly
    what re's classes hold, so nothing written fails re.fullmatch."""
    for pattern, text, expected in [(r"\s", "\u2028", False), (r"\S", "é", True), (r"\S", "\u2028", False),
                                    (r"[^\d]", "\u0663", False), (r"[^\d]", "a", True), (r"\D", "\u0663", False),
                                    (r"\W", "é", False), (r"\W", "-", True), (r"\d", "\u0663", False)]:  # fmt: skip
        grammar = regex(pattern)
        state = grammar.advance(grammar.start(), text.encode())
        assert (state is not None and grammar.accepts(state)) == expected, (pattern, text)
        assert not expected or re.fullmatch(pattern, text)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(a)\1", "backreferences are not supported"),
        (r"(?=a)a", "lookaheads/lookbehinds are not supported"),
        (r"(?i)abc", "flags are not supported"),
        (r"a*+a", "possessive repeats (*+ ++ ?+ {m,n}+) are not supported"),
        (r"(?>ab|a)b", "atomic groups (?>...) are not supported"),
        (r"a\bb", r"the anchor \b is supported only as ^ at the start or $ at the end"),
        (r"a(^b)", r"the anchor ^ is supported only as ^ at the start or $ at the end"),
        (r"[", "not a valid regular expression"),
        ("a" * 5000, "5000 characters exceed the limit of 4096"),
        (r"(a{100}){300}", "more than 20000 states"),
        ("", "expected a non-empty pattern"),
    ],
)
def test_what_it_cannot_guide_to_is_named(pattern, message):
    with pytest.raises(GuideError, match=re.escape(f"pattern: {message}")):
        regex(pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_random_walks_write_only_matches(bpe, pattern):  # noqa: F811
    grammar = regex(pattern)
    for tokenizer in (bpe, ByteTokenizer()):
        table = TokenTable.of(tokenizer, tokenizer.vocab_size + 8)
        stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        ended = 0
        for seed in range(5):
            rng = random.Random(seed)
            text, finished, states = walk(Guide(grammar, table, stop), rng, limit=60)
            if finished:
                ended += 1
                assert re.fullmatch(pattern, text.decode()), (pattern, text)
            else:  # cut short: still a prefix some match has
                assert grammar.advance(grammar.start(), text) is not None
            for state in rng.sample(states, min(2, len(states))):
                np.testing.assert_array_equal(bits(table.mask(grammar, state)), brute(table, grammar, state))
        # The byte tokenizer has no stop token: its walks end only where nothing may follow.
        assert ended >= 3 or not stop, pattern


def test_every_position_is_prepared_before_the_request_runs():
    """A regex's positions are finite: their masks are all computed on the caller's thread (prepare_masks) and pinned
    on the request's guide (the table's cache may evict them; the engine thread never computes one), and a pattern
    with too many positions or too costly ones is refused the same way every time, before it is queued."""
    table = TokenTable.of(ByteTokenizer(), 256)
    guide = Guide(regex(r".*x"), table)
    assert prepare_masks(guide) <= 16  # a multi-byte character's positions are shared (not one per prefix)
    state = guide.grammar.advance(guide.grammar.start(), "é€".encode() + b"\xf0\x9f")
    assert state in guide.pinned
    table._masks.clear()  # evicted from the shared cache: the guide still has it
    guide.state = state
    assert guide.mask() is guide.pinned[state] and not table._masks
    for _ in range(2):  # refused again on a retry, whatever the first try cached
        with pytest.raises(GuideError, match=r"pattern: more than 1024 positions to prepare token masks for"):
            prepare_masks(Guide(regex(r".{0,300}"), table))
    overlapping = "(?:" + "|".join(f"[^\\x{i:02x}]" for i in range(1, 200)) + "){0,3}"
    with pytest.raises(GuideError, match=r"pattern: more than 2048 position-stacks"):
        prepare_masks(Guide(regex(overlapping), table))
    with pytest.raises(GuideError, match=r"pattern: its token masks take more than 0 s to prepare"):
        prepare_masks(Guide(regex(r"[a-z]{0,30}"), table), seconds=0.0)
    with pytest.raises(GuideError, match=r"pattern: the format keeps more than 256 alternatives open"):
        regex("(?:a?){4000}")


def test_a_pattern_matching_only_the_empty_string_needs_a_stop_token():
    table = TokenTable.of(ByteTokenizer(), 256)
    with pytest.raises(GuideError, match=r"pattern: the format is complete with nothing written, and this request "
                                         r"has no stop token"):  # fmt: skip
        Guide(regex("a{0}"), table).mask()
    assert np.flatnonzero(bits(Guide(regex("a{0}"), table, [7]).mask())).tolist() == [7]  # only the stop
