"""A pattern's position masks (masks.TokenTable.pattern_masks through token_groups.py: tokens grouped by the byte
classes the position table sees, one walk per group, a mask per distinct result; the table itself written a block of
bytes at a time by positions.py) against a straightforward reference: each token, from each position, stepped byte by
byte through the matcher (a fresh PatternGrammar, no table, no memo shared). Over a vocabulary of every byte and
random cuts of multi-byte UTF-8 text (tokens that end or begin mid-character), for regexes with multi-byte classes,
negated classes, counted repeats and alternatives, for a regex's every token and a JSON pattern string's plain ones;
the grouped walk, the ungrouped one (every token) and the reference agree; grouping is chosen where it costs less."""

from __future__ import annotations

import random

import numpy as np
import pytest
from meshserve.serving.guided import Guide, GuideError, GuideSpec, TokenTable, compile_spec, token_groups
from meshserve.serving.guided.masks import _plain_chars, prepare_masks
from meshserve.serving.guided.patterns import PatternGrammar, compile_pattern
from meshserve.serving.guided.token_groups import expand, group_tokens, token_matrix, walk, worth_grouping

TEXT = 'Ab 09 é€𝄞 日本語 αβγ ü-ß 😀! x@y.com 12:30 \u2028\t\n"\\ {ok} ÿĀ \u07ff\u0800\uffff\U00010000\U0010ffff'
PATTERNS = [r"\d{4}-\d{2}-\d{2}", r"[a-z]{1,3}( [a-z]{1,3}){0,2}", r"(yes|no|maybe)", r"\d{1,3}(\.\d{1,2})?",
            r".{0,5}", r"\w+", r"[α-ω€]{1,3}x?", r"[^a-z]{1,3}", r"x\Wy", r"[é-ü😀-😃]+", r"(ab|a€|€b){1,2}",
            r"[\u0800-\uffff]{1,2}", r"[^\n]{0,4}é", r"\s\S\s?", r"[A-Z][a-z]+ \w+: .{0,3}"]  # fmt: skip


def vocabulary(seed: int = 0) -> list[bytes | None]:
    """Every byte, then 600 random byte cuts (1-7 bytes) of TEXT's UTF-8 (some repeated: the same bytes under two
    ids): whole and partial characters; a special (None) and an empty token too."""
    rng, data = random.Random(seed), TEXT.encode()
    pieces = [bytes([b]) for b in range(256)]
    for _ in range(600):
        at = rng.randrange(len(data))
        pieces.append(data[at : at + rng.randint(1, 7)])
    return [*pieces, None, b""]


def reference(matcher, vocab: list[bytes | None], size: int) -> list[np.ndarray]:
    """bool [size] per position: each token stepped byte by byte through a fresh matcher grammar from it (only the
    plain tokens for a JSON pattern string)."""
    grammar = PatternGrammar(matcher)
    out = []
    for position in matcher.positions:
        allowed = np.zeros(size, bool)
        for v, data in enumerate(vocab):
            if data and (matcher.raw or _plain_chars(data)):
                allowed[v] = grammar.advance(position, data) is not None
        out.append(allowed)
    return out


def bits(mask: np.ndarray) -> np.ndarray:
    return np.unpackbits(mask.view(np.uint8), bitorder="little").astype(bool)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_equal_a_token_by_token_reference(pattern):
    """Every position's mask, grouped and ungrouped (every token walked) and as pattern_masks gives it (cached, by
    whichever way worth_grouping picks), equals the reference."""
    vocab = vocabulary()
    for raw in (True, False):
        try:
            matcher = compile_pattern(pattern, 0, -1, "pattern", raw=raw)
        except GuideError:  # a pattern string whose every match needs an escaped character (\s\S\s? needs none)
            assert not raw
            continue
        table = TokenTable(vocab, len(vocab) + 3)  # ids past the tokenizer's: never allowed
        expected = reference(matcher, vocab, table.words * 32)
        every = np.arange(len(matcher.positions))
        groups = group_tokens(matcher.next, table._matrices[raw], table.words * 32)
        assert len(groups.rows[0]) <= len(table._matrices[raw].ids)
        ways = {"grouped": expand(walk(matcher.next, groups, every), groups.of_id),
                "ungrouped": expand(walk(matcher.next, table._ungrouped[raw], every), table._ungrouped[raw].of_id),
                "pattern_masks": table.pattern_masks(matcher, every.tolist())}  # fmt: skip
        for way, masks in ways.items():
            for p, mask in enumerate(masks):
                np.testing.assert_array_equal(bits(mask), expected[p], err_msg=f"{pattern} raw={raw} {way} {p}")
                assert not mask.flags.writeable


def test_tokens_in_a_group_step_alike():
    """Tokens of one group end in the same position from every start (what lets one representative stand for them),
    and a class sequence cut after a byte no position takes: `\\d{4}-\\d{2}-\\d{2}` has a handful of groups."""
    vocab = vocabulary(1)
    matcher = compile_pattern(r"\d{4}-\d{2}-\d{2}", 0, -1, "pattern", raw=True)
    matrix = token_matrix([(v, data) for v, data in enumerate(vocab) if data])
    groups = group_tokens(matcher.next, matrix, len(vocab) + 31)
    assert len(groups.rows[0]) < 40
    finish = {}
    for v, data in enumerate(vocab):
        if not data:
            assert groups.of_id[v] == len(groups.rows[0])  # never allowed
            continue
        ends = []
        for start in range(len(matcher.positions)):
            at = start
            for b in data:
                at = int(matcher.next[at, b])
            ends.append(at)
        assert finish.setdefault(int(groups.of_id[v]), ends) == ends, data


def test_positions_sharing_a_result_share_a_mask():
    """.{0,40} on a vocabulary of short tokens: the positions with more room than the longest token allow the same
    tokens, one mask array among them; a regex's prepare_masks pins every position's mask."""
    vocab = vocabulary()
    grammar = compile_spec(GuideSpec("regex", pattern=r".{0,40}"))
    table = TokenTable(vocab, len(vocab))
    guide = Guide(grammar, table)
    assert prepare_masks(guide) == len(guide.pinned) > 40
    distinct = {id(mask) for mask in guide.pinned.values()}
    assert len(distinct) < len(guide.pinned) / 3
    matcher = grammar.indexed()
    for state, mask in guide.pinned.items():
        np.testing.assert_array_equal(mask, table.pattern_masks(matcher, [matcher.index[state]])[0])


def test_grouping_is_chosen_where_the_walk_would_cost_more():
    """A few positions of a pattern most tokens start with walk every token (grouping would key them all); many
    positions, or a pattern few tokens can start, group."""
    table = TokenTable(vocabulary(), 900)
    matrix = table._matrices[True]
    anything = compile_pattern(r".{0,3}", 0, -1, "pattern", raw=True)  # nearly every token starts it
    digits = compile_pattern(r"\d{4}-\d{2}", 0, -1, "pattern", raw=True)  # only digit-led tokens
    assert not worth_grouping(anything.next, matrix, [0, 1])
    assert worth_grouping(anything.next, matrix, list(range(len(anything.positions))) * 20)
    assert worth_grouping(digits.next, matrix, [0, 1])
    table.pattern_masks(anything, [0, 1])
    assert anything.key not in table._groups
    table.pattern_masks(digits, [0, 1])
    assert digits.key in table._groups


def test_hash_collisions_fall_back_to_the_sequences(monkeypatch):
    """Class sequences are grouped by a 64-bit hash, each token checked against its group's first: with the hash
    made to collide (its multiplier 0: only the last class counts) the groups it merged are split by the sequences
    themselves, and the masks still equal the reference; a vocabulary with a token hundreds of bytes long too."""
    monkeypatch.setattr(token_groups, "_MIX", np.uint64(0))
    vocab = [*vocabulary(2), b"ab" * 150, b" " * 200, "é".encode() * 90]
    for pattern in (r"[a-z]{1,3}( [a-z]{1,3}){0,2}", r".{0,5}", r"(ab|a€|€b){1,2}"):
        matcher = compile_pattern(pattern, 0, -1, "pattern", raw=True)
        table = TokenTable(vocab, len(vocab))
        groups = group_tokens(matcher.next, table._matrices[True], table.words * 32)
        expected = reference(matcher, vocab, table.words * 32)
        every = np.arange(len(matcher.positions))
        for p, mask in enumerate(expand(walk(matcher.next, groups, every), groups.of_id)):
            np.testing.assert_array_equal(bits(mask), expected[p], err_msg=f"{pattern} position {p}")
