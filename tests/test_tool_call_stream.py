"""Tool calls streamed as they are generated (serving/tool_call_stream.py), without a server: JsonScan against Python's
JSON decoder and json.dumps (random values written every way json.dumps writes them, and random mutations of them:
valid, invalid and truncated alike), when a call opens and its fragments go out, arguments-first blocks held and sent
whole, escapes and surrogate pairs split between pieces, an unclosed last block, a call cut inside its arguments,
repeated keys, parallel_tool_calls false, NaN / Infinity / 1e400 refused (not JSON). The property that the deltas
reassemble to the whole-text parse over random splits is in tests/test_openai_tools.py (`replay` there is shared).
"""

from __future__ import annotations

import json
import random

import pytest
from meshserve.serving.json_scan import ARGS, DECODER, JsonScan
from meshserve.serving.openai_tools import parse_tool_calls
from meshserve.serving.tool_call_stream import ToolCallDeltas
from test_openai_tools import replay

LEAVES = [0, -0.0, 1.5, -12, 10**20, 1e-7, 2.5e300, True, False, None, "", 'a"b\\c', "é🙂\n\t\x01/", "}{][", "\ud83d",
          "</tool_call>", '{"name": "x", "arguments": 1}']  # fmt: skip
FORMATS = [{}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t", "sort_keys": True}]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.4:
        return rng.choice(LEAVES)
    if r < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "é", "a b", '"', "\\", "name"]) + str(i): random_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}  # fmt: skip


def test_scan_writes_arguments_as_json_dumps():
    rng = random.Random(0)
    for _ in range(1500):
        value = random_value(rng)
        raw = json.dumps(value, **rng.choice(FORMATS))
        text = '{"name": "f", "arguments": ' + raw + ', "after": [1]}'
        scan = JsonScan()
        scan.advance(text)
        assert (scan.state, scan.pos, scan.head, scan.name) == ("done", len(text), ARGS, "f")
        assert scan.arguments() == json.dumps(json.loads(raw), ensure_ascii=False)


def test_scan_agrees_with_the_json_decoder_on_broken_text():
    decoder, rng = DECODER, random.Random(1)  # strict: NaN, Infinity and 1e400 refused by both
    alphabet = list('{}[]",:\\ \n0123456789.-+eEtrufalsnNI/ux') + ["\x01", "é"]
    for _ in range(3000):
        chars = list(json.dumps({"name": "f", "arguments": random_value(rng)}, **rng.choice(FORMATS)))
        for _ in range(rng.randint(1, 3)):  # delete, insert or cut at random places
            op, i = rng.random(), rng.randrange(len(chars) + 1)
            if op < 0.4 and i < len(chars):
                del chars[i]
            elif op < 0.8:
                chars.insert(i, rng.choice(alphabet))
            else:
                chars = chars[:i]
        raw = "".join(chars).lstrip(" \t\n\r")  # a block's JSON is read from its first non-blank character
        scan = JsonScan()
        scan.advance(raw)
        try:
            obj, end = decoder.raw_decode(raw)
        except ValueError:
            assert scan.state in ("bad", "open"), raw
            continue
        if scan.state == "open":  # a bare number at the very end may go on: never a call either way
            assert isinstance(obj, (int, float)) and end == len(raw), raw
        else:
            assert (scan.state, scan.pos) == ("done", end), raw


def feed_chars(text: str, stream: ToolCallDeltas | None = None) -> list[tuple[int, list]]:
    """(characters fed, what came out) after each character, then the finish's."""
    stream = stream or ToolCallDeltas()
    out = [(i + 1, stream.feed(ch)) for i, ch in enumerate(text)]
    return [*out, (len(text), stream.finish())]


def test_a_call_opens_after_its_head_and_its_arguments_stream():
    head = '<tool_call>\n{"name": "search", "arguments": '
    args = '{"q": "a \\"b\\" {c}", "n": [1, 2.50, -0], "ok": true}'
    text = head + args + "}\n</tool_call>"
    steps = feed_chars(text)
    items = [(n, item) for n, got in steps for item in got]
    (n, opening), *fragments = items
    assert n == len(head) - 1 and opening["index"] == 0 and opening["function"] == {"name": "search", "arguments": ""}
    assert opening["id"].startswith("call_") and len(opening["id"]) == 29 and opening["type"] == "function"
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for _, f in fragments)
    assert len(fragments) > 10 and fragments[-1][0] <= len(head) + len(args)  # all of it out before the block's }
    joined = "".join(f["function"]["arguments"] for _, f in fragments)
    assert joined == '{"q": "a \\"b\\" {c}", "n": [1, 2.5, 0], "ok": true}' == parse_tool_calls(text)[1][0].arguments
    # What went out after 8 characters of the arguments: those characters, normalized, and nothing more.
    assert "".join(f["function"]["arguments"] for m, f in fragments if m <= len(head) + 8) == '{"q": "a'


def test_escapes_and_surrogate_pairs_split_anywhere():
    args = '{"s": "\\u00e9\\ud83d\\ude42\\n\\/ \\ud83d x \\u0041", "t": "Grüße 你好"}'
    text = '<tool_call>{"name": "f", "arguments": ' + args + "}</tool_call>"
    (call,) = parse_tool_calls(text)[1]
    # json.dumps' form, but the lone surrogate written back as its escape (UTF-8, so gRPC and SSE, cannot carry it)
    assert json.loads(call.arguments) == json.loads(args) and "é🙂\\n/" in call.arguments
    assert call.arguments == json.dumps(json.loads(args), ensure_ascii=False).replace("\ud83d ", "\\ud83d ")
    call.arguments.encode("utf-8")
    for size in (1, 2, 3, 5, 7):
        content, calls, _ = replay(text, [size] * len(text))
        assert content == "" and calls == [("f", call.arguments)]


def test_arguments_first_blocks_are_sent_whole_when_closed():
    block = '<tool_call>{"arguments": {"a": [1, 2]}, "name": "late"}</tool_call>'
    text = "Hi " + block + ' <tool_call>{"name": "f"}</tool_call>'
    steps = feed_chars(text)
    calls = [(n, item) for n, got in steps for item in got if isinstance(item, dict)]
    (n0, first), (n1, second) = calls
    assert n0 == len("Hi " + block) and first["function"] == {"name": "late", "arguments": '{"a": [1, 2]}'}
    assert n1 == len(text) and second["index"] == 1 and second["function"] == {"name": "f", "arguments": "{}"}
    assert "".join(item for _, got in steps for item in got if isinstance(item, str)) == "Hi "


def test_an_open_last_block_and_a_call_cut_inside_its_arguments():
    done = '<tool_call>\n{"name": "f", "arguments": {"x": [1]}}\n'  # the model stopped after the JSON
    assert replay(done, [3] * len(done))[:2] == ("", [("f", '{"x": [1]}')])
    # Cut inside the arguments (max_tokens): the opened call stays with what was sent (whole parse: content).
    cut = 'Sure: <tool_call>{"name": "f", "arguments": {"x": "abc", "y": 12'
    content, calls, stream = replay(cut, [4] * len(cut))
    assert content == "Sure: " and calls == [("f", '{"x": "abc", "y": ')] and stream.kept[0].name == "f"
    assert parse_tool_calls(cut) == (cut, [])
    # Broken JSON after the head: the call stays, the parse goes on at the break.
    broken = '<tool_call>{"name": "f", "arguments": {"x" 1}}</tool_call> then <tool_call>{"name": "g"}</tool_call>'
    content, calls, _ = replay(broken, [5] * len(broken))
    assert calls == [("f", '{"x"'), ("g", "{}")] and content == "1}}</tool_call> then "
    # Not a head yet when cut: nothing was sent, the block is content as in the whole parse.
    early = 'Hm <tool_call>{"name": "f", "argu'
    assert replay(early, [2] * len(early))[:2] == (early, []) == parse_tool_calls(early)


def test_repeated_keys_stream_as_written():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, "b": {"c": 2, "c": 3}, "a": 4}}</tool_call>'
    (call,) = parse_tool_calls(text)[1]
    assert call.arguments == '{"a": 1, "b": {"c": 2, "c": 3}, "a": 4}'  # every copy kept, as streamed
    assert json.loads(call.arguments) == {"a": 4, "b": {"c": 3}}  # the dict json.loads gives of the block's
    assert replay(text, [1] * len(text))[1] == [("f", call.arguments)]


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_sends_the_first_call_only(parallel):
    one = '<tool_call>{"name": "a", "arguments": {"k": 1}}</tool_call>'
    text = "x " + one + "\n" + one.replace('"a"', '"b"') + " y"
    content, calls, stream = replay(text, [6] * len(text), parallel=parallel)
    assert content == parse_tool_calls(text)[0] == "x  y"
    assert [name for name, _ in calls] == (["a", "b"] if parallel else ["a"]) == [c.name for c in stream.kept]


def test_a_call_broken_after_opening_is_not_complete():
    """The documented difference: a call opened then broken stays (its fragments were sent), but it is not among
    the completed calls that make the stream's finish_reason "tool_calls"."""
    stream = ToolCallDeltas()
    items = stream.feed('<tool_call>{"name": "f", "arguments": {"a": 1}} junk') + stream.finish()
    opened = [i for i in items if isinstance(i, dict) and "id" in i]
    assert len(opened) == 1 and stream.broken == 1
    assert [c.name for c in stream.kept] == ["f"] and stream.complete == []
    whole = ToolCallDeltas()
    whole.feed('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    whole.finish()
    assert [c.arguments for c in whole.complete] == ['{"a": 1}']


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", "-2.5E+999"])
def test_numbers_json_lacks_make_no_call(value):
    """json.loads reads NaN, Infinity and 1e400 (as inf), json.dumps writes them back: not JSON, so a block holding
    one is no call (content); streamed, the call opened before them breaks there and no fragment holds them."""
    assert json.dumps(json.loads(value)) in ("NaN", "Infinity", "-Infinity")
    with pytest.raises(ValueError):
        DECODER.decode(value)
    text = '<tool_call>{"name": "f", "arguments": {"x": [1, VALUE]}}</tool_call>'.replace("VALUE", value)
    assert parse_tool_calls(text) == (text, [])
    scan = JsonScan()
    scan.advance(text[len("<tool_call>") :])
    assert scan.state == "bad" and scan.arguments() == '{"x": [1, '
    for size in (1, 4, len(text)):
        content, calls, stream = replay(text, [size] * len(text))
        assert calls == [("f", '{"x": [1, ')] and stream.broken == 1 and stream.complete == []
        assert content.endswith("]}}</tool_call>") and text.endswith(content)
    # Not a head (arguments first: nothing opened): content, streamed too; elsewhere in a head block: no call.
    first = '<tool_call>{"arguments": {"x": VALUE}, "name": "f"}</tool_call>'.replace("VALUE", value)
    assert parse_tool_calls(first) == (first, []) == replay(first, [3] * len(first))[:2]
    after = '<tool_call>{"name": "f", "arguments": {}, "n": VALUE}</tool_call> ok'.replace("VALUE", value)
    assert parse_tool_calls(after) == (after, [])
    # In a string it is text: a call.
    quoted = '<tool_call>{"name": "f", "arguments": {"x": "VALUE"}}</tool_call>'.replace("VALUE", value)
    assert json.loads(parse_tool_calls(quoted)[1][0].arguments) == {"x": value}
