"""JSON Schema `pattern` and `format` on strings in guided decoding (serving/guided/patterns.py, formats.py): the
matcher agrees with re.fullmatch on a string's decoded content (written raw, never escaped), minLength / maxLength
are counted beside a pattern without dead ends, each format accepts exactly its table's subset of valid values,
what cannot be followed is refused naming its path and keyword, schemas without them compile as before, random walks
over the token masks (a byte-level BPE and the byte tokenizer) write JSON whose strings match and validate, and a
date-format request through the engine on the tiny model answers a real date."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import random
import re
import string
import urllib.parse
import uuid

import numpy as np
import pytest
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.guided import Guide, GuideError, GuideSpec, TokenTable, compile_spec
from meshserve.serving.guided.formats import FORMATS
from meshserve.serving.guided.grammar import MAX_OPEN
from meshserve.serving.guided.masks import _pattern_positions, prepare_patterns
from meshserve.serving.guided.patterns import MAX_COUNTED, compile_pattern
from meshserve.serving.guided.positions import MAX_POSITIONS, MAX_WORK
from meshserve.serving.guided.regex import MAX_NFA, MAX_PATTERN
from meshserve.serving.guided.strings import PAT
from test_guided_grammar import PERSON, RECURSIVE
from test_guided_masks import SCHEMAS, bits, bpe, brute, walk  # noqa: F401  (bpe: the fixture)


def grammar(schema):
    return compile_spec(GuideSpec("json_schema", schema=json.dumps(schema)))


def whole(g, data: bytes) -> bool:
    state = g.advance(g.start(), data)
    return state is not None and g.accepts(state)


def string_schema(**keywords):
    return grammar({"type": "string", **keywords})


PATTERNS = [r"^\d{4}-\d{2}-\d{2}$", r"[A-Z][a-z]+( [A-Z][a-z]+)*", r"^(yes|no)$", r"é+[^a-c]?", r"^[^\s]+$",
            r"(ab){1,3}c", r".{0,5}", r"\w+@\w+\.(com|org)", r"^[\w.-]+$", r"a?b?"]  # fmt: skip
SAMPLES = ["2024-01-02", "2024-1-02", "Hello World", "Hello world", "yes", "no", "yesno", "ééx", "éa", "é", "ab",
           "abababc", "abc", "", "a\"b", "a\\b", "tab\there", "line\nbreak", "x y", "xy", "joe@mail.com",
           "joe@mail.net", "a.b-c_d", "a\u2028b", "\u2028", "12345", "123456", "🙂🙂", "b"]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_pattern_string_matches_what_fullmatch_accepts(pattern):
    """The decoded string fullmatches the pattern, written raw: a character JSON must escape ('"', '\\\\', a
    control) is never taken, in either form (raw it is not JSON, escaped it is not the pattern's raw text)."""
    g = string_schema(pattern=pattern)
    for text in SAMPLES:
        raw = json.dumps(text, ensure_ascii=False).encode()
        raw_ok = not any(c in text for c in '"\\\u2028\u2029\ufeff') and all(ord(c) >= 0x20 for c in text)
        expected = raw_ok and re.fullmatch(pattern, text, re.ASCII) is not None  # \\w \\d \\s: written as ASCII
        assert whole(g, raw) == expected, (pattern, text)
        if expected:  # every prefix of a match is alive (no dead ends), and the JSON value search-matches too
            assert all(g.advance(g.start(), raw[:k]) is not None for k in range(1, len(raw)))
            assert re.search(pattern, json.loads(raw))
        escaped = json.dumps(text)  # non-ASCII as \\u escapes: accepted only where that is the raw text itself
        assert not whole(g, escaped.encode()) or escaped == raw.decode()


def test_min_and_max_length_are_counted_beside_a_pattern():
    """Every string of up to 7 characters over a small alphabet: accepted iff it fullmatches and its length is
    within bounds; every accepted prefix can still be completed (the liveness table leaves no dead end)."""
    alphabet = "abc"
    for pattern, lo, hi in [("(ab)*", 3, 5), ("[a-c]+x?", 2, 4), ("a*b", 0, 3), ("(a|bc)+", 4, -1), ("c?", 1, -1)]:
        keywords = {"pattern": pattern, "minLength": lo, **({"maxLength": hi} if hi >= 0 else {})}
        g = string_schema(**keywords)
        texts = ["".join(p) for n in range(8) for p in itertools.product(alphabet + "x", repeat=n)]
        for text in texts:
            ok = re.fullmatch(pattern, text) is not None and lo <= len(text) and (hi < 0 or len(text) <= hi)
            assert whole(g, f'"{text}"'.encode()) == ok, (keywords, text)
        alive = {t for t in texts if g.advance(g.start(), f'"{t}'.encode()) is not None}
        for text in alive:
            assert any(whole(g, f'"{text}{rest}"'.encode()) for rest in texts if len(text) + len(rest) <= 9), text


def test_lengths_the_pattern_implies_are_not_counted():
    """A date with maxLength 10, or a pattern of fixed length with equal bounds, keeps the pattern's positions (no
    count in the frame); a bound that does cut the pattern is counted."""
    assert compile_pattern(FORMATS["date"], 0, 10, "x").cap == 0
    assert compile_pattern(r"\d{5}", 5, 5, "x").cap == 0
    assert compile_pattern(r"\d+", 0, 5, "x").cap == 5
    g = string_schema(format="date", maxLength=10, minLength=10)
    assert whole(g, b'"2024-02-29"') and not whole(g, b'"2023-02-29"')


YEARS = (0, 1, 4, 9, 10, 99, 100, 400, 999, 1000, 1582, 1900, 2000, 2023, 2024, 2100, 2400, 9996, 9999)


def _dates():
    for year, month, day in itertools.product(YEARS, range(0, 14), range(0, 33)):
        text = f"{year:04d}-{month:02d}-{day:02d}"
        try:
            datetime.date(year, month, day)
            yield text, True
        except ValueError:
            yield text, False


def test_date_and_time_formats_accept_exactly_valid_values():
    date, time_, stamp = (string_schema(format=f) for f in ("date", "time", "date-time"))
    for text, valid in _dates():  # years 0000-9999 (0000 refused by datetime), months 00-13, days 00-32, leap years
        assert whole(date, f'"{text}"'.encode()) == valid, text
    for g in (date, stamp):  # year 0000 is never written: not even its prefix is alive
        assert g.advance(g.start(), b'"0000') is None and g.advance(g.start(), b'"0001-') is not None
    for text in ("12:30:00Z", "23:59:59.123456789+05:30", "00:00:00-00:00", "09:05:07.5Z"):
        assert whole(time_, f'"{text}"'.encode()), text
        assert datetime.time.fromisoformat(text)
        assert whole(stamp, f'"2024-02-29T{text}"'.encode())
    for text in ("24:00:00Z", "12:60:00Z", "12:30:00", "12:30Z", "1:30:00Z", "12:30:00.Z", "12:30:00+5:30",
                 "12:30:00.1234567890Z", "12:30:00z"):  # fmt: skip
        assert not whole(time_, f'"{text}"'.encode()), text
    assert not whole(stamp, b'"2024-02-29 12:00:00Z"') and not whole(stamp, b'"2023-02-29T12:00:00Z"')


def test_network_and_identifier_formats():
    cases = {
        "uuid": ([str(uuid.UUID(int=random.Random(i).getrandbits(128))) for i in range(5)]
                 + ["123E4567-E89B-12D3-A456-426614174000"],
                 ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400", "g23e4567-e89b-12d3-a456-"
                  "426614174000"]),
        "ipv4": (["0.0.0.0", "255.255.255.255", "10.1.20.199"], ["256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.5"]),
        "ipv6": (["::", "::1", "1::", "2001:db8::ff00:42:8329", "fe80:0:0:0:0:0:0:1", "1:2:3:4:5:6:7::",
                  "ABCD:ef01::9"], ["1::2::3", ":::", "12345::", "1:2:3:4:5:6:7:8:9", "1:2", ":1:2"]),
        "hostname": (["localhost", "api.example.com", "a-b.c0", "x" * 62 + ".y"],
                     ["-a.com", "a-.com", "a..b", "a.b.c.d.e", "x" * 63, "a_b.com", "a.com."]),
        "email": (["joe@example.com", "first.last+tag@mail.example.co", "a!#$%&'*+/=?^_`{|}~-@b.io"],
                  ["joe", "@example.com", "joe@com", "joe..x@ex.com", ".joe@ex.com", "joe@ex.c0m", "joe@-ex.com"]),
        "uri": (["https://example.com/a/b?q=1&r=%20#frag", "mailto:joe@example.com", "urn:isbn:0451450523", "a:",
                 "file:///etc/hosts", "http://host:65535"], ["example.com", "http://host:65536", "1http://x", "http://a b", "http://x:y",
                                                             "http://[::1]/", "http://x/%zz", "ht tp://x"]),
    }  # fmt: skip
    for name, (good, bad) in cases.items():
        g = string_schema(format=name)
        for text in good:
            assert whole(g, json.dumps(text).encode()), (name, text)
            assert valid(name, text), (name, text)  # the checker the walks use agrees
        for text in bad:
            assert not whole(g, json.dumps(text).encode()), (name, text)


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_URI_CHARS = set(string.ascii_letters + string.digits + "-._~:/?#@!$&'()*+,;=%")


def _hostname(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and all(len(x) <= 63 and _LABEL.fullmatch(x) for x in labels)


def valid(name: str, text: str) -> bool:
    """Whether `text` is a valid value of format `name`, checked by Python's own parsers where it has them and by
    the RFCs' rules written out here where it does not (independent of formats.py's patterns)."""
    if name == "date":
        return bool(re.fullmatch(r"\d{4}-\d\d-\d\d", text)) and datetime.date.fromisoformat(text) is not None
    if name == "time":
        return bool(re.fullmatch(r"[\d:.]+(Z|[+-]\d\d:\d\d)", text)) and datetime.time.fromisoformat(text).tzinfo
    if name == "date-time":
        return "T" in text and valid("date", text[:10]) and text[10] == "T" and valid("time", text[11:])
    if name == "uuid":
        return len(text) == 36 and str(uuid.UUID(text)) == text.lower()
    if name in ("ipv4", "ipv6"):
        return ipaddress.ip_address(text).version == int(name[-1])
    if name == "hostname":
        return _hostname(text)
    if name == "email":
        local, _, domain = text.partition("@")
        atoms = local.split(".")
        return (text.isascii() and "@" not in domain and 0 < len(local) <= 64 and len(text) <= 254
                and all(a and not set(a) & set('"(),:;<>@[\\] ') for a in atoms)
                and "." in domain and _hostname(domain) and domain.rsplit(".", 1)[1].isalpha())  # fmt: skip
    if name == "uri":
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # a port that is not a number raises ValueError
        escapes_ok = all(re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1 : i + 3]) for i, c in enumerate(text) if c == "%")
        return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme)) and set(text) <= _URI_CHARS and escapes_ok
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"pattern": '^"$'}, r"^schema\.properties\.x\.pattern: every string it matches needs a character JSON "
                             r"writes escaped"),
        ({"pattern": r"a\nb"}, r"^schema\.properties\.x\.pattern: every string it matches needs a character"),
        ({"pattern": r"[\\]+"}, r"^schema\.properties\.x\.pattern: every string it matches needs a character"),
        ({"pattern": "a", "format": "date"}, r'^schema\.properties\.x: pattern together with format "date" is not '
                                             r"supported"),
        ({"pattern": 5}, r"^schema\.properties\.x\.pattern: expected a regular expression \(a string\), got 5"),
        ({"pattern": r"(a)\1"}, r"^schema\.properties\.x\.pattern: backreferences are not supported"),
        ({"pattern": r"a(?=b)"}, r"^schema\.properties\.x\.pattern: lookaheads/lookbehinds are not supported"),
        ({"pattern": "a" * (MAX_PATTERN + 1)}, rf"^schema\.properties\.x\.pattern: {MAX_PATTERN + 1} characters "
                                               rf"exceed the limit of {MAX_PATTERN}"),
        ({"pattern": r"(a{100}){300}"}, rf"^schema\.properties\.x\.pattern: more than {MAX_NFA} states"),
        ({"pattern": r"[a-z]{0,2000}"}, rf"^schema\.properties\.x\.pattern: more than {MAX_POSITIONS} positions"),
        ({"pattern": "[a-z]+", "maxLength": 2000}, rf"^schema\.properties\.x\.pattern: counting characters for "
                                                   rf"maxLength 2000 makes more than {MAX_POSITIONS} positions"),
        ({"pattern": "(?:" + "|".join(f"[^\\x{i:02x}]" for i in range(40, 200)) + "){0,8}"},
         rf"^schema\.properties\.x\.pattern: more than {MAX_WORK} position-stacks"),
        ({"pattern": "(?:a?){4000}"}, rf"^schema\.properties\.x\.pattern: the format keeps more than {MAX_OPEN} "),
        ({"pattern": r"\d{4}", "maxLength": 3}, r"^schema\.properties\.x\.pattern: no string it matches has 0 to 3 "
                                                r"characters \(minLength / maxLength\)"),
        ({"pattern": "[a-z]{1,80}", "maxLength": 20000, "minLength": 2}, rf"^schema\.properties\.x\.pattern: "
                                                                         rf"counting 20000 .* limit of {MAX_COUNTED}"),
    ],
)  # fmt: skip
def test_what_cannot_be_followed_is_refused_naming_the_path(keywords, message):
    schema = {"type": "object", "properties": {"x": {"type": "string", **keywords}}}
    with pytest.raises(GuideError, match=message):
        grammar(schema)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}  # a tool's schema names its own path
    with pytest.raises(GuideError, match=message.replace("^schema", r"^tools\[0\]\.function\.parameters")):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps([tool])))


def _annotated(schema):
    """`schema` with formats no table entry has and empty patterns added to each string schema (no constraint)."""
    if isinstance(schema, dict):
        out = {k: _annotated(v) for k, v in schema.items()}
        if out.get("type") == "string" or out.get("type") == ["string", "null"]:
            out.update(format="int32", pattern="")
        return out
    return [_annotated(v) for v in schema] if isinstance(schema, list) else schema


@pytest.mark.parametrize("schema", [*SCHEMAS, PERSON, RECURSIVE])
def test_schemas_without_pattern_or_format_compile_as_before(schema):
    """No pattern-string node; unknown formats and empty patterns change nothing (the same nodes, the same start);
    "format" beside anyOf / enum is not applied and not refused (as when format was only an annotation)."""
    g = grammar(schema)
    assert {node[0] for node in g.nodes} <= {"alt", "obj", "arr", "str", "num", "int", "lit"}
    other = grammar(_annotated(schema))
    assert other.nodes == g.nodes and other.start() == g.start()
    for beside in ({"anyOf": [{"type": "string"}, {"type": "null"}]}, {"enum": ["x", 1]}, {"$ref": "#/$defs/a",
                   "$defs": {"a": {"type": "string"}}}, {"allOf": [{"type": "string"}]}):  # fmt: skip
        assert grammar({**beside, "format": "date"}).nodes == grammar(beside).nodes


WALK_SCHEMA = {
    "type": "object",
    "properties": {
        "day": {"type": "string", "format": "date"},
        "at": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"},
        "word": {"type": "string", "pattern": r"^[a-zé]+$", "minLength": 2, "maxLength": 6},
        "note": {"type": ["string", "null"], "pattern": r"^[^\s]*$", "maxLength": 8},
        "free": {"type": "string", "format": "x-unknown"},
    },
    "required": ["day", "at", "id", "code", "word"],
}
FORMAT_SCHEMA = {"type": "object", "properties": {f: {"type": "string", "format": f} for f in FORMATS},
                 "required": list(FORMATS)}  # fmt: skip


def _check(value: dict, schema: dict) -> None:
    for key, item in value.items():
        spec = schema["properties"][key]
        if item is None:
            continue
        if "pattern" in spec:
            assert re.fullmatch(spec["pattern"], item) and re.search(spec["pattern"], item), (key, item)
        if spec.get("format") in FORMATS:
            assert valid(spec["format"], item), (key, item)
            assert re.fullmatch(FORMATS[spec["format"]], item), (key, item)
        assert spec.get("minLength", 0) <= len(item) <= spec.get("maxLength", 1 << 30), (key, item)
    assert set(schema["required"]) <= set(value)


@pytest.mark.parametrize("schema", [WALK_SCHEMA, FORMAT_SCHEMA], ids=["patterns", "formats"])
def test_random_walks_write_strings_that_match_and_validate(bpe, schema):  # noqa: F811
    """Walks through the masks end in JSON whose strings match and validate; every state inside a pattern string
    takes its plain tokens from the pattern's position masks (prepared first, for the BPE), equal to a token-by-token
    check; the byte tokenizer's masks are computed when reached."""
    g = grammar(schema)
    for tokenizer in (bpe, ByteTokenizer()):
        table = TokenTable.of(tokenizer, tokenizer.vocab_size + 8)
        stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        if tokenizer is bpe:
            assert prepare_patterns(Guide(g, table)) > 0 and prepare_patterns(Guide(g, table)) == 0  # cached
        ended, inside = 0, 0
        for seed in range(4):
            rng = random.Random(seed)
            text, finished, states = walk(Guide(g, table, stop), rng, limit=700)
            if finished:
                ended += 1
                _check(json.loads(text), schema)
            for state in states:
                if all(stack[-1][0] == PAT for stack in state):
                    assert _pattern_positions(g, state) is not None  # a position of its pattern, not a full walk
                    inside += 1
                    if seed == 0:  # masks agree with each token tried alone
                        np.testing.assert_array_equal(bits(table.mask(g, state)), brute(table, g, state))
            for state in rng.sample(states, min(2, len(states))):
                np.testing.assert_array_equal(bits(table.mask(g, state)), brute(table, g, state))
        assert ended >= 3 and inside > 20, (schema, tokenizer, ended, inside)


def test_a_tool_call_with_a_date_pattern_parses_back(bpe):  # noqa: F811
    from meshserve.serving.openai_tools import parse_tool_calls

    params = {"type": "object", "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
              "city": {"type": "string", "maxLength": 8}}, "required": ["date"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "book", "parameters": params}}]
    g = compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), parallel=False))
    table = TokenTable.of(bpe, bpe.vocab_size)
    for seed in range(3):
        text, finished, _ = walk(Guide(g, table, [bpe.eos_id]), random.Random(seed))
        if finished:
            _, calls = parse_tool_calls(text.decode())
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", json.loads(calls[0].arguments)["date"]), text


def test_a_date_format_request_through_the_engine_answers_a_date():
    """The tiny model (random weights) through a real Orchestrator: the answer parses and its date is a real one."""
    import jax
    from meshserve.model.config import get_config
    from meshserve.model.params import init_params
    from meshserve.model.sampling import SamplingParams
    from meshserve.serving.engine import Engine
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.plan import make_plan
    from meshserve.serving.requests import Request
    from meshserve.serving.scheduler import Scheduler

    config = get_config("tiny")
    kw = dict(max_batch=4, max_context=128, length_buckets=(16,), decode_buckets=(4,), context_buckets=(128,))
    engine = Engine(init_params(config, jax.random.key(5)), config, make_plan(config, **kw))
    engine.warm_up(phases=("generate",))
    schema = {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]}
    spec = GuideSpec("json_schema", schema=json.dumps(schema))
    compact = {ord(c): -100 for c in " \t\n\r"}  # a random model would fill the whitespace JSON allows
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        handles = [orch.submit(Request([3, 14, 15 + i], 60, SamplingParams(temperature=1.0, seed=i,
                                                                             logit_bias=compact), guide=spec))
                   for i in range(3)]  # fmt: skip
        for h in handles:
            while (event := h.events.get(timeout=120)).finish_reason is None:
                pass
            assert event.finish_reason == "stop", h.text
            when = json.loads(h.text)["when"]
            assert datetime.date.fromisoformat(when).isoformat() == when, h.text
    finally:
        orch.stop()
    assert orch.error is None and len(orch.guides) == 0
