"""Bounds of JSON Schema `pattern` / `format` strings in guided decoding (serving/guided/patterns.py, regex.py,
masks.py, schema.py): a format that cannot be enforced within the position bounds together with minLength /
maxLength stays an annotation (pydantic's HttpUrl compiles and writes strings within its lengths) while an explicit
pattern is refused up front naming the length keyword; refusals are cached (a retry does no work); the class lookups
(bisections) agree with a linear scan; alternatives that open too many stacks where a value begins are refused at
compile time naming their path; the mask cache counts its bytes and keeps no grammar or matcher alive."""

from __future__ import annotations

import gc
import json
import random
import threading
import weakref

import numpy as np
import pytest
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.guided import Guide, GuideError, GuideSpec, TokenTable, compile_spec, masks, patterns, regex
from meshserve.serving.guided.grammar import MAX_OPEN
from meshserve.serving.guided.positions import MAX_POSITIONS
from test_guided_masks import walk

HTTP_URL = {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}  # pydantic's HttpUrl


def grammar(schema):
    return compile_spec(GuideSpec("json_schema", schema=json.dumps(schema)))


def whole(g, data: bytes) -> bool:
    state = g.advance(g.start(), data)
    return state is not None and g.accepts(state)


def test_a_format_past_the_bounds_with_lengths_stays_an_annotation():
    """HttpUrl (uri, 1-2083 characters) compiled before formats were followed and compiles again: the plain string
    with its lengths, as JSON Schema allows for format; random walks write strings within the lengths. A format
    that fits its lengths is still enforced, and an explicit pattern past the bounds is still refused."""
    g = grammar({"type": "object", "properties": {"url": HTTP_URL}, "required": ["url"]})
    assert [n for n in g.nodes if n[0] in ("str", "pat")][-1] == ("str", 1, 2083)
    inner = grammar(HTTP_URL)
    assert whole(inner, b'"' + b"x" * 2083 + b'"') and not whole(inner, b'"' + b"x" * 2084 + b'"')
    assert not whole(inner, b'""')
    table = TokenTable.of(ByteTokenizer(), 264)
    ended = 0
    for seed in range(6):
        text, finished, _ = walk(Guide(g, table), random.Random(seed), limit=400)
        if finished:
            ended += 1
            assert 1 <= len(json.loads(text)["url"]) <= 2083, text
    assert ended >= 4
    assert grammar({"type": "string", "format": "uri", "maxLength": 255}).nodes[-1] == ("str", 0, 255)
    assert grammar({"type": "string", "format": "date", "maxLength": 5}).nodes[-1] == ("str", 0, 5)  # no date fits
    dated = grammar({"type": "string", "format": "date", "minLength": 10, "maxLength": 12})
    assert dated.nodes[-1][0] == "pat" and whole(dated, b'"2024-02-29"') and not whole(dated, b'"2024-02-30"')
    with pytest.raises(GuideError, match=r"^schema\.pattern: counting characters for maxLength 2083 makes more than"):
        grammar({"type": "string", "pattern": "[a-z:/.]+", "minLength": 1, "maxLength": 2083})


@pytest.mark.parametrize(
    ("lengths", "keyword"),
    [({"maxLength": 300000}, "maxLength 300000"), ({"minLength": 300000}, "minLength 300000"),
     ({"minLength": 2, "maxLength": 5000}, "maxLength 5000")],
)  # fmt: skip
def test_an_explicit_pattern_past_the_bounds_is_refused_up_front_naming_the_length(lengths, keyword):
    """Refused in StringPattern's constructor, from the count a match reaches (each count is a position): before
    the liveness table (300,000 levels) and the positions are built; the count is found as the sets of NFA states
    after each count repeat (periodically), not by walking 300,000 counts."""
    min_length, max_length = lengths.get("minLength", 0), lengths.get("maxLength", -1)
    with pytest.raises(GuideError, match=rf"^x: counting characters for {keyword} makes more than {MAX_POSITIONS} "):
        patterns.StringPattern("[a-z]*", min_length, max_length, "x")
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]*", **lengths}}}
    with pytest.raises(GuideError, match=rf"^schema\.properties\.s\.pattern: counting characters for {keyword}"):
        grammar(schema)
    periodic = "(ab|cd){1,9}(efg)*"  # matches of 2k + 3j characters (k 1-9): 1024 is one
    with pytest.raises(GuideError, match="counting characters for maxLength 1100 .* 1024 characters or more fit"):
        patterns.StringPattern(periodic, 0, 1100, "x")
    assert patterns.StringPattern(periodic, 0, 900, "x").cap == 900  # under the bound: the positions decide


def test_a_refused_pattern_is_refused_again_without_work(monkeypatch):
    """The second request with a pattern refused after counting its positions takes the cached reason (no
    positions counted again: the counting walks are counted), named after its own path; requests sending the same
    new pattern at once build it once (the others wait for it)."""
    walks = []
    count = patterns.positions
    monkeypatch.setattr(patterns, "positions", lambda g, *a: walks.append(g.matcher.pattern) or count(g, *a))
    pattern = r"[^\w\d]+\W+\S+"  # refused at its 2048th position-stack
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": pattern}}}
    with pytest.raises(GuideError, match=r"^schema\.properties\.a\.pattern: more than 2048 position-stacks"):
        grammar(schema)
    assert walks == [pattern]
    schema["properties"]["b"] = schema["properties"].pop("a")
    with pytest.raises(GuideError, match=r"^schema\.properties\.b\.pattern: more than 2048 position-stacks"):
        grammar(schema)
    with pytest.raises(GuideError, match=r"^y: more than 2048 position-stacks"):
        patterns.compile_pattern(pattern, 0, -1, "y")
    assert walks == [pattern]  # nothing counted again: the reason was cached
    errors: list[str] = []

    def refuse(i: int) -> None:
        try:
            patterns.compile_pattern(r"\W{1,3}", 0, -1, f"r{i}")
        except GuideError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=refuse, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.split(":")[0] for e in errors) == ["r0", "r1", "r2", "r3"]
    assert walks == [pattern, r"\W{1,3}"] and not patterns._BUILDING


def test_class_lookups_agree_with_a_linear_scan():
    """_overlaps / _contains (bisections over sorted disjoint ranges) against their definitions, on \\W (734
    ranges), a JSON-escaped-free class and random intervals around every range's ends."""
    word = regex._unicode(regex._c.CATEGORY_WORD)
    classes = [regex._complement(word), regex._without(regex._complement(word), patterns.JSON_ESCAPED), ((5, 9),)]
    rng = random.Random(0)
    for ranges in classes:
        ends = [x for a, b in ranges for x in (a - 1, a, b, b + 1)]
        for _ in range(4000):
            lo = rng.choice(ends) if rng.random() < 0.7 else rng.randrange(0x110000)
            hi = lo + rng.choice((0, 0, 1, 63, 4095))
            assert regex._overlaps(ranges, lo, hi) == any(a <= hi and lo <= b for a, b in ranges), (lo, hi)
            assert regex._contains(ranges, lo, hi) == any(a <= lo and hi <= b for a, b in ranges), (lo, hi)


def _choices(suffix: str) -> dict:
    return {"type": "string", "pattern": "(" + "|".join(f"{i:03d}{suffix}" for i in range(150)) + ")"}


def test_alternatives_opening_too_many_stacks_are_refused_at_compile_naming_the_path():
    """Two pattern strings of 150 alternatives each under one anyOf open 300 stacks at the opening quote: refused
    when compiled (at submit), named by the anyOf's path, nested or not (nested, the first mask did not reach it:
    the request failed on the engine thread after part of its output). Formats side by side still compile."""
    two = {"anyOf": [_choices("a"), _choices("b")]}
    cases = [(two, "schema"), ({"type": "object", "properties": {"x": two}}, r"schema\.properties\.x"),
             ({"type": "array", "items": {"oneOf": [_choices("c"), _choices("d")]}}, r"schema\.items")]  # fmt: skip
    for schema, path in cases:
        with pytest.raises(GuideError, match=rf"^{path}: keeps more than {MAX_OPEN} alternatives open at once where "
                                             r"its value begins \(300"):  # fmt: skip
            grammar(schema)
    assert grammar({"type": "object", "properties": {"x": {"anyOf": [_choices("a"), {"type": "string"}]}}})
    formats = [{"type": "string", "format": f} for f in ("ipv6", "hostname", "email", "uri")]
    assert grammar({"type": "object", "properties": {"x": {"anyOf": formats}}})


def test_the_mask_cache_keeps_no_matcher_or_grammar_alive():
    """Masks are keyed by numbers, not by the grammar or matcher they belong to: once a pattern leaves the
    compiled patterns' cache and a grammar leaves compile_spec's, they are freed (a key holding them kept 6000
    patterns' tables alive, +387 MiB past a 256 MiB cap)."""
    table = TokenTable(ByteTokenizer().token_bytes(), 264)
    matcher = patterns.compile_pattern("[a-f]{1,3}-gone[0-9]", 0, -1, "x")
    assert len(table.pattern_masks(matcher, list(range(len(matcher.positions))))) == len(matcher.positions)
    g = grammar({"type": "object", "properties": {"k": {"type": "string", "pattern": "[a-f]{1,3}-gone[0-9]"}}})
    table.mask(g, g.start())
    table.mask(g, g.advance(g.start(), b'{"k":"ab'))
    refs = [weakref.ref(matcher), weakref.ref(g)]
    del matcher, g
    patterns._COMPILED.clear()
    compile_spec.cache_clear()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert len(table._masks) > len(refs)


def test_the_mask_cache_counts_its_bytes_within_its_bound():
    """The cache's counted bytes are its entries' (mask, entry and a state key's tuples) and stay within its bound,
    evicting the oldest."""
    table = TokenTable(ByteTokenizer().token_bytes(), 264, cache_bytes=64 << 10)
    g = grammar({"type": "object", "properties": {"k": {"type": "string", "pattern": "[a-f]{1,3}-kept[0-9]"}}})
    for data in (b"", b"{", b'{"k":', b'{"k":"ab'):
        table.mask(g, g.advance(g.start(), data))
    cache = table._masks
    assert cache and cache.nbytes == sum(masks._cost(k, m) for k, m in cache.items())
    state_keys = [k for k in cache if k[0] != "pat"]
    assert state_keys and all(masks._cost(k, cache[k]) > cache[k].nbytes + masks._ENTRY for k in state_keys)
    added = len(cache)
    for n in range(200):  # distinct patterns' masks: the oldest go, the bytes stay within the bound
        m = patterns.compile_pattern(f"[a-z]{{1,2}}{n}", 0, -1, "x")
        added += len(table.pattern_masks(m, list(range(len(m.positions)))))
        assert cache.nbytes <= 64 << 10 and cache.nbytes == sum(masks._cost(k, v) for k, v in cache.items())
    assert len(cache) < added and ("pat", m.key, 0) in cache
    cache.clear()
    assert cache.nbytes == 0 and not cache


@pytest.mark.parametrize("pattern", [r"\p{L}+", r"(?<year>\d{4})"])
def test_ecma_only_syntax_names_python_re(pattern):
    with pytest.raises(GuideError, match=r"^schema\.pattern: not a valid regular expression \(Python's re syntax\)"):
        grammar({"type": "string", "pattern": pattern})


def test_masks_of_a_fallen_back_format_match_a_token_check():
    """The HttpUrl node is a plain string: its masks are the plain strings' (every token tried alone agrees)."""
    g = grammar(HTTP_URL)
    table = TokenTable.of(ByteTokenizer(), 264)
    for data in (b'"', b'"' + b"x" * 2082, b'"' + b"y" * 2083):
        state = g.advance(g.start(), data)
        allowed = np.unpackbits(table.mask(g, state).view(np.uint8), bitorder="little").astype(bool)
        expected = [bool(d) and g.advance(state, d) is not None for d in table.bytes]
        assert allowed[: len(expected)].tolist() == expected
