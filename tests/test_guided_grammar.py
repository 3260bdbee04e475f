"""Guided decoding's grammar, byte by byte: JSON per RFC 8259 (numbers, escapes, UTF-8), the whitespace and digit
bounds, the schema subset, Hermes tool calls, canonical states, and every unsupported schema refused by its path."""

from __future__ import annotations

import json
import re

import pytest
from meshserve.errors import UserError
from meshserve.serving.guided import GuideError, GuideSpec, compile_spec
from meshserve.serving.guided.grammar import MAX_OPEN, NUM_DIGITS, WS_INDENT
from meshserve.serving.guided.schema import MAX_DEPTH


def schema_grammar(schema):
    return compile_spec(GuideSpec("json_schema", schema=json.dumps(schema)))


def whole(grammar, data: bytes) -> bool:
    """`data` is a whole output of the grammar."""
    state = grammar.advance(grammar.start(), data)
    return state is not None and grammar.accepts(state)


def prefix(grammar, data: bytes) -> bool:
    return grammar.advance(grammar.start(), data) is not None


ANY_OBJECT = compile_spec(GuideSpec("json_object"))


@pytest.mark.parametrize(
    "text",
    [
        b"{}",
        b'\n  {"a": 1}',
        b'{"a": [1, -0, 0.5, -12.25e-3, 1E+9, true, false, null, {}, []], "b": {"c": "d"}}',
        '{"é": "日本 🙂 \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uD83D\\uDE00"}'.encode(),
        json.dumps({"x": [{"y": [1, {"z": None}]}]}, indent=2).encode(),
        json.dumps({"k" * 3: list(range(3)), "w": {"v": "é"}}, indent=4, ensure_ascii=False).encode(),
    ],
)
def test_json_object_accepts_valid_json(text):
    assert whole(ANY_OBJECT, text), text
    state = ANY_OBJECT.advance(ANY_OBJECT.start(), text)
    assert ANY_OBJECT.must_end(state)  # after the top-level "}" nothing may follow
    assert json.loads(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        b"[]",  # json_object: the top level is an object
        b'"a"',
        b"{,}",
        b'{"a" 1}',
        b'{"a": 01}',  # no leading zeros
        b'{"a": 1.}',
        b'{"a": .5}',
        b'{"a": +1}',
        b'{"a": 1e}',
        b'{"a": tru}',
        b'{"a": "\x01"}',  # raw control byte in a string
        b'{"a": "\\x"}',  # unknown escape
        b'{"a": "\\u12G4"}',
        b'{"a": "\xc0\xaf"}',  # overlong
        b'{"a": "\xed\xa0\x80"}',  # UTF-8 surrogate
        b'{"a": "\xf4\x90\x80\x80"}',  # past U+10FFFF
        b'{"a": "\xe6\x97"}',  # a character cut short by the quote
        b'{"a": 1,}',
        b'{"a": 1} ',  # nothing after the top-level object
        b'{"a": [1 2]}',
    ],
)
def test_json_object_rejects_invalid_json(text):
    assert not whole(ANY_OBJECT, text), text


def test_whitespace_and_digit_runs_are_bounded():
    assert prefix(ANY_OBJECT, b"{\n" + b" " * WS_INDENT)
    assert not prefix(ANY_OBJECT, b"{\n" + b" " * (WS_INDENT + 1))
    assert prefix(ANY_OBJECT, b'{"a": ') and prefix(ANY_OBJECT, b'{"a":\n\t\t')
    for gap in (b"  ", b"\n\n", b" \n", b"\t", b"\r\n"):  # one space, or a newline and indentation: nothing else
        assert not prefix(ANY_OBJECT, b'{"a":' + gap), gap
    pretty = b'{\n  "a": {\n    "b": [\n      1,\n      2\n    ]\n  },\n  "c": null\n}'
    assert whole(ANY_OBJECT, pretty) and whole(ANY_OBJECT, b'{"a":{"b":[1,2]},"c":null}')  # json.dumps' two forms
    digits = b"1" * NUM_DIGITS
    assert whole(ANY_OBJECT, b'{"a": ' + digits + b"." + digits + b"e" + digits + b"}")
    assert not prefix(ANY_OBJECT, b'{"a": ' + digits + b"1")
    assert not prefix(ANY_OBJECT, b'{"a": 1.' + digits + b"1")


def test_states_are_canonical():
    g = ANY_OBJECT
    a = g.advance(g.start(), b'{"key": [1, "x"')
    b = g.advance(g.advance(g.advance(g.start(), b'{"ke'), b'y": [1'), b', "x"')
    assert a == b and hash(a) == hash(b)
    # The same position through different keys of an any-object: the key's text is not remembered.
    assert g.advance(g.start(), b'{"a": ') == g.advance(g.start(), b'{"bcd": ')
    s = schema_grammar({"anyOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]})
    assert len(s.advance(s.start(), b'"ab')) == 2 and len(s.advance(s.start(), b'"abc')) == 1


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 4},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"name": "Bo", "age": 3}', True),
        ('{"name": "Bo", "age": 3, "email": null, "tags": ["a", 3]}', True),
        ('{"name": "Bo", "age": 3, "tags": ["b"]}', True),
        ('{"name": "Bo"}', False),  # age is required
        ('{"age": 3, "name": "Bo"}', False),  # properties in the schema's order
        ('{"name": "", "age": 3}', False),  # minLength
        ('{"name": "Bobby", "age": 3}', False),  # maxLength
        ('{"name": "日本人", "age": 3}', True),  # lengths count characters, not bytes
        ('{"name": "Bo", "age": 3.5}', False),  # integer
        ('{"name": "Bo", "age": 3, "tags": []}', False),  # minItems
        ('{"name": "Bo", "age": 3, "tags": ["a", "b", "a"]}', False),  # maxItems
        ('{"name": "Bo", "age": 3, "tags": ["c"]}', False),  # enum
        ('{"name": "Bo", "age": 3, "x": 1}', False),  # no keys beyond properties
    ],
)
def test_schema_subset(text, ok):
    assert whole(schema_grammar(PERSON), text.encode()) is ok


def test_refs_consts_prefix_items_and_top_level_values():
    tree = {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
            }
        },
    }
    g = schema_grammar(tree)
    assert whole(g, b'{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}')
    assert not whole(g, b'{"v": 1, "kids": [{"kids": []}]}')
    g = schema_grammar({"const": {"a": [1, "x"], "b": None}})
    assert whole(g, b'{"a": [1, "x"], "b": null}') and whole(g, b'{"a":[1,"x"],"b":null}')
    assert not whole(g, b'{"a": [1, "y"], "b": null}')
    g = schema_grammar({"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "items": False})
    assert whole(g, b"[true, null]") and whole(g, b"[]") and not whole(g, b"[true, null, 1]")
    g = schema_grammar({"type": "number"})  # a top-level number may end, or take more digits
    state = g.advance(g.start(), b" 12")
    assert g.accepts(state) and not g.must_end(state) and whole(g, b"12.5")
    g = schema_grammar({"enum": ["a", "ab", 1, True]})
    state = g.advance(g.start(), b'"a"')
    assert g.must_end(state) and whole(g, b'"ab"') and whole(g, b"true") and not whole(g, b'"b"')


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        (
            {"type": "object", "properties": {"age": {"type": "number", "minimum": 0}}},
            "schema.properties.age.minimum: followed for type integer only",
        ),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "schema: no integer is within its bounds (5 > 4)"),
        ({"type": "integer", "maximum": "7"}, "schema.maximum: expected a number"),
        (
            {"type": "string", "contentEncoding": "base64"},
            "schema.contentEncoding: not supported (supported keywords: type,",
        ),
        ({"type": "array", "uniqueItems": True}, "schema.uniqueItems"),
        ({"not": {}}, "schema.not"),
        ({"if": {}, "then": {}}, "schema.if"),
        ({"type": "object", "patternProperties": {}}, "schema.patternProperties"),
        ({"type": "number", "multipleOf": 2}, "schema.multipleOf"),
        ({"type": "object", "properties": {"a": {"items": [{}]}}}, "schema.properties.a.items"),
        ({"type": "thing"}, "schema.type"),
        ({"$ref": "http://x/y"}, "schema.$ref"),
        ({"$ref": "#/$defs/missing", "$defs": {}}, "schema.$ref"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "schema.$defs.a: refers only to itself"),
        ({"allOf": [{}, {}]}, "schema.allOf"),
        ({"anyOf": []}, "schema.anyOf"),
        ({"anyOf": [{"type": "string"}], "maxLength": 3}, "schema: anyOf together with maxLength"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, 'schema.required: "b"'),
        ({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}, "additionalProperties"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "schema.minItems"),
        ({"type": "string", "maxLength": -1}, "schema.maxLength"),
        ({"enum": []}, "schema.enum"),
        ({"type": "string", "enum": [1, 2]}, "schema.enum: no value has type"),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"format": "x", "minimum": 1}]}}},
            "schema.properties.a.anyOf[0].minimum",
        ),  # fmt: skip
        ([1], "schema: expected a JSON Schema object"),
    ],
)
def test_unsupported_schemas_name_their_place(schema, where):
    with pytest.raises(GuideError, match=None) as err:
        schema_grammar(schema)
    assert where in str(err.value)
    assert isinstance(err.value, UserError)


def test_bad_specs_name_their_field():
    with pytest.raises(GuideError, match=r"^schema: not valid JSON"):
        compile_spec(GuideSpec("json_schema", schema="{nope"))
    tools = [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]
    with pytest.raises(GuideError, match=r'^tools: no tool named "x" \(tools: a, b\)'):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), tool_name="x"))
    bad = [
        *tools,
        {"type": "function", "function": {"name": "c", "parameters": {"type": "object", "minProperties": 1}}},
    ]
    with pytest.raises(GuideError, match=r"^tools\[2\]\.function\.parameters\.minProperties: not supported"):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps(bad)))
    with pytest.raises(GuideError, match=r"^tools\[1\]: expected"):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps([tools[0], {"type": "x"}])))
    with pytest.raises(GuideError, match=r'^tools\[1\]\.function\.name: "a" is also'):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps([tools[0], tools[0]])))
    with pytest.raises(GuideError, match=r"^parser:"):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), parser="mistral"))
    with pytest.raises(GuideError, match=r"^kind: 'xml' is not supported"):
        compile_spec(GuideSpec("xml"))
    # Cached per spec: the same spec gives the same grammar object.
    assert compile_spec(GuideSpec("json_object")) is compile_spec(GuideSpec("json_object"))


def test_tool_call_text():
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}},
             {"type": "function", "function": {"name": "time"}}]  # fmt: skip
    one = compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), parallel=False))
    call = b'<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    state = one.advance(one.start(), call)
    assert one.must_end(state)
    assert not prefix(one, call + b"\n<")
    assert not whole(one, b'<tool_call>{"name": "weather", "arguments": {}}</tool_call>')  # city is required
    assert not whole(one, b'<tool_call>{"arguments": {}, "name": "time"}</tool_call>')  # name first
    assert whole(one, b'<tool_call>{"name": "time", "arguments": {"any": [1]}}</tool_call>')
    many = compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools)))
    two = call + b'\n<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    state = many.advance(many.start(), two)
    assert many.accepts(state) and not many.must_end(state)
    named = compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), tool_name="time"))
    assert not prefix(named, b'<tool_call>{"name": "w') and prefix(named, b'<tool_call>{"name": "t')


RECURSIVE = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}}] * 2}}, "$ref": "#/$defs/x"}


def test_identical_alternatives_are_one_and_overlapping_ones_are_bounded():
    """Two equal anyOf branches under a recursive $ref compile to one alternative (they doubled at each "[", a
    stall of every request on the engine); branches that differ but overlap are refused past MAX_OPEN."""
    g = schema_grammar(RECURSIVE)
    state = g.advance(g.start(), b"[" * 40)
    assert state is not None and len(state) == 1
    overlapping = json.loads(json.dumps(RECURSIVE))
    overlapping["$defs"]["x"]["anyOf"][1]["maxItems"] = 5
    g = schema_grammar(overlapping)
    state, depth = g.start(), 0
    with pytest.raises(GuideError, match=f"more than {MAX_OPEN} alternatives open"):
        while depth < 40:
            state, depth = g.advance(state, b"["), depth + 1
    assert MAX_OPEN // 2 < len(state) <= MAX_OPEN  # refused at the "[" that would pass the bound, not before
    enum = schema_grammar({"enum": [f"v{i}" for i in range(2 * MAX_OPEN)]})  # literals do not count
    assert whole(enum, f'"v{2 * MAX_OPEN - 1}"'.encode())


def test_nesting_is_bounded_with_the_path_named():
    def nested(levels: int) -> dict:
        schema: dict = {"type": "integer"}
        for _ in range(levels):
            schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
        return schema

    g = schema_grammar(nested(MAX_DEPTH - 1))
    assert whole(g, b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1))
    with pytest.raises(GuideError, match=f"schema.properties.a.*: nested deeper than {MAX_DEPTH} levels"):
        schema_grammar(nested(200))  # past Python's recursion limit unbounded: an internal error before
    with pytest.raises(GuideError, match=r"^schema.const: NaN is not a JSON value"):
        compile_spec(GuideSpec("json_schema", schema='{"const": NaN}'))


def test_choice_is_exactly_one_of_its_strings():
    g = compile_spec(GuideSpec("choice", choices=("yes", "no", "not sure", "no", "día")))
    for text in ("yes", "no", "not sure", "día"):
        assert whole(g, text.encode()), text
    for text in (b"not", b"maybe", b" yes", b"yes ", b"yess", b'"yes"', b"d\xc3"):
        assert not whole(g, text), text
    assert g.must_end(g.advance(g.start(), b"yes")) and not g.must_end(g.advance(g.start(), b"no"))  # "not sure"
    for bad, message in [((), "choices: expected at least one string"), (("a", ""), "choices[1]: expected a non-empty"),
                         (("a",) * 5000, "choices: 5000 strings exceed the limit")]:  # fmt: skip
        with pytest.raises(GuideError, match=re.escape(message)):
            compile_spec(GuideSpec("choice", choices=bad))


def test_bounded_integers_write_only_values_in_range():
    """minimum / maximum / exclusiveMinimum / exclusiveMaximum on type integer: a digit is allowed only when some
    completion stays in range, and the number may end only in range (every integer from -300 to 300 checked)."""
    for schema in (
        {"type": "integer", "minimum": -5, "maximum": 120},
        {"type": "integer", "exclusiveMinimum": 17},
        {"type": "integer", "exclusiveMaximum": -2.5},
        {"type": "integer", "minimum": 0.5, "maximum": 3},
    ):
        g = schema_grammar(schema)
        lo = max([schema.get("minimum", -1e9), schema.get("exclusiveMinimum", -1e9) + 1e-9])
        hi = min([schema.get("maximum", 1e9), schema.get("exclusiveMaximum", 1e9) - 1e-9])
        for n in range(-300, 301):
            text = str(n).encode()
            assert whole(g, text) == (lo <= n <= hi), (schema, n)
            if lo <= n <= hi:  # every prefix of a value in range is alive
                assert all(g.advance(g.start(), text[:k]) is not None for k in range(1, len(text)))
    g = schema_grammar({"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 130}}})
    assert whole(g, b'{"age": 99}') and not whole(g, b'{"age": 9}') and prefix(g, b'{"age": 1')
    assert not prefix(g, b'{"age": 2') or whole(g, b'{"age": 25}')  # 2 -> 20..29 in range
    assert not prefix(g, b'{"age": 0') and not prefix(g, b'{"age": -')
