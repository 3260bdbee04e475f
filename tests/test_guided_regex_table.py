"""A regex request's masks through its pattern's position table (serving/guided/masks.py pattern_masks over every
token, as a JSON Schema pattern string's over the plain tokens): equal to the trie walk and to a token-by-token check
on patterns with quotes, backslashes, control characters and multi-byte classes, over a BPE and a hand-made
vocabulary whose tokens split characters; regex refusals are cached (a retry builds nothing); compile_spec's cache
is bounded in bytes, its count of a grammar's bytes near what tracemalloc measures."""

from __future__ import annotations

import gc
import random
import re
import threading
import tracemalloc

import numpy as np
import pytest
from meshserve.serving.guided import Guide, GuideError, GuideSpec, TokenTable, compile_spec, patterns
from meshserve.serving.guided.masks import prepare_masks
from test_guided_masks import bits, bpe, brute, walk  # noqa: F401  (bpe: the fixture)

PATTERNS = [r'"[a-z\\]{1,3}"', r"[\x00-\x1f]{1,2}x\\?", r'(\\"|\t)+\n', r'[α-ω€"]{1,3}\\?', r"é+\S", r'[^"\\]{0,4}"',
            r".\W", r"(\d+\.)?\d+", "[😀-😃]a|\u2028"]  # fmt: skip


def regex(pattern: str):
    return compile_spec(GuideSpec("regex", pattern=pattern))


def crafted() -> TokenTable:
    """Every byte, and tokens holding quotes, backslashes and controls, or splitting a character across two."""
    euro, clef = "€".encode(), "𝄞".encode()
    pieces = [bytes([b]) for b in range(256)] + [b'"a', b'a"', b'\\"', b"\\\\", b"\n\t", b"\x00x", b'x"\\', b"\t\n",
              "α".encode(), "αβ".encode(), euro[:2], euro[2:] + b'"', "é".encode()[1:], "€€".encode(), clef[:3],
              clef[3:], "😀a".encode(), None, b"", b"\\\n", "é\\".encode()]  # fmt: skip
    return TokenTable(pieces, len(pieces) + 5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_table_masks_equal_the_trie_walk_and_a_token_check(bpe, pattern):  # noqa: F811
    """Every position's pinned mask (the table run) equals the trie walk's mask of that state (what a regex's masks
    were before) and the token-by-token definition; the positions are every state a walk reaches."""
    grammar = regex(pattern)
    for table in (TokenTable(bpe.token_bytes(), bpe.vocab_size + 8), crafted()):
        stop = [table.vocab_size - 1]  # past the tokenizer's ids: never content
        guide = Guide(grammar, table, stop)
        assert prepare_masks(guide) == len(guide.pinned) > 1
        for state, mask in guide.pinned.items():
            np.testing.assert_array_equal(mask, table._compute(grammar, state))
            np.testing.assert_array_equal(bits(mask), brute(table, grammar, state))
        for seed in range(3):
            text, finished, states = walk(Guide(grammar, table, stop), random.Random(seed), limit=12)
            assert all(state in guide.pinned for state in states)
            assert not finished or re.fullmatch(pattern, text.decode()), (pattern, text)


def test_a_refused_regex_is_refused_again_without_work(monkeypatch):
    """A regex refused when compiled (its NFA too large) or when its masks are prepared (too many positions) is
    refused from the cache on a retry, even once compile_spec's grammar is gone: no positions counted again; its NFA
    is built once per compile (its positions are counted on the grammar's own matcher); four requests at once with a
    new refused regex count its positions once."""
    built, walks = [], []
    build_nfa, count = patterns.build_nfa, patterns.positions
    monkeypatch.setattr(patterns, "build_nfa", lambda *a: built.append(a[0]) or build_nfa(*a))
    monkeypatch.setattr(patterns, "positions", lambda g, *a: walks.append(g.matcher.pattern) or count(g, *a))
    table = crafted()
    for _ in range(2):
        with pytest.raises(GuideError, match=r"^pattern: more than 20000 states"):
            regex(r"(b{100}){300}")
    assert built == [r"(b{100}){300}"] and not walks
    for _ in range(2):
        with pytest.raises(GuideError, match=r"^pattern: more than 1024 positions to prepare token masks for"):
            prepare_masks(Guide(regex(r"x.{0,300}"), table))
        compile_spec.cache_clear()  # the grammar is compiled again (its NFA): its positions' refusal is cached
    assert built.count(r"x.{0,300}") == 2 and walks == [r"x.{0,300}"]
    with pytest.raises(GuideError, match=r"^pattern: more than 1024 positions"):
        prepare_masks(Guide(regex(r"x.{0,300}"), table))
    assert walks == [r"x.{0,300}"]
    errors: list[str] = []

    def refuse() -> None:
        try:
            prepare_masks(Guide(regex(r"y.{0,299}"), table))
        except GuideError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=refuse) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and all(e.startswith("pattern: more than 1024 positions") for e in errors)
    assert walks == [r"x.{0,300}", r"y.{0,299}"] and not patterns._BUILDING


def test_a_regex_is_built_once_and_its_count_serves_later_compiles(monkeypatch):
    """compile_spec builds a regex's NFA once (validation); prepare_masks counts the positions on that matcher, not
    on a second build; once counted, a later compile of the pattern (compile_spec's grammar evicted) takes the
    counted matcher from the compiled patterns' cache: no NFA built, no positions counted."""
    built = []
    build_nfa = patterns.build_nfa
    monkeypatch.setattr(patterns, "build_nfa", lambda *a: built.append(a[0]) or build_nfa(*a))
    table = crafted()
    grammar = regex(r"[a-c]{1,4}-once")
    assert not grammar.matcher.counted
    guide = Guide(grammar, table)
    assert prepare_masks(guide) == len(guide.pinned) > 4
    assert grammar.indexed() is grammar.matcher and grammar.matcher.counted and built == [r"[a-c]{1,4}-once"]
    compile_spec.cache_clear()
    again = regex(r"[a-c]{1,4}-once")
    assert again is not grammar and again.matcher is grammar.matcher and built == [r"[a-c]{1,4}-once"]
    assert prepare_masks(Guide(again, table)) == len(guide.pinned)


def _measured(spec: GuideSpec) -> tuple[object, int]:
    """The spec's grammar compiled afresh (the compiled patterns' cache emptied) and the bytes it holds, measured."""
    patterns._COMPILED.clear()
    gc.collect()
    tracemalloc.start()
    try:
        grammar = compile_spec.__wrapped__(spec)
        gc.collect()
        return grammar, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_compile_spec_cache_is_bounded_in_bytes(monkeypatch):
    """Grammars are counted as they are cached (an NFA's states, a pattern's positions and nodes: within 2x of what
    tracemalloc measures), the oldest dropped past the byte bound, the newest kept."""
    big_schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "format": "email"} for i in range(3)}}
    for spec in [GuideSpec("regex", pattern="a{5000}"), GuideSpec("regex", pattern="(ab|cd|ef){1000}"),
                 GuideSpec("json_schema", schema=__import__("json").dumps(big_schema))]:  # fmt: skip
        grammar, measured = _measured(spec)
        assert measured / 2 < patterns.held_bytes(grammar) < measured * 2, (spec, measured)
    cache = compile_spec.cache
    compile_spec.cache_clear()
    monkeypatch.setattr(cache, "max_bytes", 4 << 20)
    specs = [GuideSpec("regex", pattern=f"{c}{{3000}}") for c in "abcdefgh"]  # ~1.7 MB each
    grammars = [compile_spec(spec) for spec in specs]
    assert 1 < len(cache) < len(specs) and cache.nbytes <= cache.max_bytes
    assert cache.nbytes == sum(patterns.held_bytes(g) for g in cache.values())
    assert compile_spec(specs[-1]) is grammars[-1] and compile_spec(specs[0]) is not grammars[0]
    compile_spec.cache_clear()
    assert not cache and cache.nbytes == 0


def test_alternatives_opened_anywhere_are_refused_when_compiled():
    """Every NFA state's closure is checked when a regex is compiled, as a pattern string's (one check): a regex
    opening too many alternatives after its first character is refused at compile_spec (the request's validation),
    not when its masks are prepared at submit."""
    for pattern in (r"(?:b?){300}", r"a(?:b?){300}"):
        with pytest.raises(GuideError, match=r"^pattern: the format keeps more than 256 alternatives open at once"):
            regex(pattern)


def test_a_regex_refused_for_time_is_refused_again_at_once(monkeypatch):
    """prepare_masks' time backstop depends on the machine's load: its refusal is cached per grammar and table, so
    a retry is refused at once (no mask computed: not accepted when the machine is idler), and another vocabulary
    decides afresh."""
    vocab = [bytes([b]) for b in range(32, 127)] + [b"ab", b"hello world"]
    table = TokenTable(vocab, len(vocab))
    grammar = compile_spec(GuideSpec("regex", pattern="[A-Za-z ]{1,200}"))
    with pytest.raises(GuideError, match="take more than 0 s to prepare"):
        prepare_masks(Guide(grammar, table), seconds=0.0)
    monkeypatch.setattr(table, "pattern_masks", lambda *a: pytest.fail("masks computed again"))
    with pytest.raises(GuideError, match="take more than 0 s to prepare"):
        prepare_masks(Guide(grammar, table), seconds=60.0)
    assert prepare_masks(Guide(grammar, TokenTable(vocab, len(vocab)))) == 201
