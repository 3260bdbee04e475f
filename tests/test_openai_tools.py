"""Tool calling's answer side without a server (serving/openai_tools.py, serving/tool_call_stream.py): the Hermes
parser on many texts, the streaming holder and the streamed deltas equal to it over random split points, and the
answer's and stream's tool_calls and finish_reason. Also the shared tool fixtures (a Qwen2.5-style TOOL_TEMPLATE,
TOOLS, TOOL_CONVERSATION) that other tool tests import. The request side (tools / tool_choice / tool messages refused
naming the field, the template rendered equal to transformers') is in tests/test_openai_tools_request.py.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from meshserve.serving.openai_protocol import CHAT, parse_body
from meshserve.serving.openai_tools import ToolCall, ToolCallStream, parse_tool_calls
from meshserve.serving.tool_call_stream import ToolCallDeltas

# Qwen2.5's tool section, shortened (the same structure: tools as JSON lines inside <tools>, assistant calls as
# <tool_call> blocks with arguments | tojson, consecutive tool results in one user turn as <tool_response>).
TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}"
    "{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nFunction signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    '{{- \'\\n</tools>\\n\\nFor each call return <tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, now",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "local_time", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip
# System, user, an assistant that calls two tools (content null), their results, and the user again (OpenAI's form).
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather and time in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "local_time", "arguments": "{}"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "user", "content": "And tomorrow?"},
]  # fmt: skip


def hf_conversation(messages: list[dict]) -> list[dict]:
    """The conversation as transformers' tool-use templates take it: arguments as dicts (what vLLM passes)."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def calls_of(text: str) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(text)[1]]


# ----- the parser -----

ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = ONE + '\n<tool_call>\n{"name": "local_time", "arguments": {}}\n</tool_call>'


def test_one_call_has_no_content():
    content, calls = parse_tool_calls(ONE)
    assert content is None and calls_of(ONE) == [("get_weather", {"city": "Paris"})]
    assert calls[0].arguments == '{"city": "Paris"}' and calls[0].id.startswith("call_") and len(calls[0].id) > 10
    assert parse_tool_calls(ONE)[1][0].id != calls[0].id  # a fresh id each time


def test_several_calls_and_the_text_around_them():
    assert calls_of(TWO) == [("get_weather", {"city": "Paris"}), ("local_time", {})]
    assert parse_tool_calls(TWO)[0] is None  # the newline between blocks is no content
    content, calls = parse_tool_calls("Let me check.\n" + TWO + "\nDone.")
    assert content == "Let me check.\n\nDone." and len(calls) == 2  # the blank gap between the blocks dropped
    content, calls = parse_tool_calls("A" + ONE + " B " + ONE + " ")
    assert content == "A B " and len(calls) == 2
    # Without whitespace around, and with it inside the tags.
    assert calls_of('<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>') == [("f", {"a": 1})]
    assert calls_of('<tool_call>  \n\t{"name": "f", "arguments": {}}  \n</tool_call>') == [("f", {})]


def test_text_without_calls_is_the_content_unchanged():
    for text in ("", "  \n", "plain answer", "a <tool_call> tag in prose", "<tool_call", "</tool_call>"):
        assert parse_tool_calls(text) == (text, [])


def test_malformed_blocks_stay_content():
    bad_json = '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'  # one brace short
    no_name = '<tool_call>{"arguments": {"a": 1}}</tool_call>'
    empty_name = '<tool_call>{"name": "", "arguments": {}}</tool_call>'
    not_object = "<tool_call>[1, 2]</tool_call>"
    name_not_string = '<tool_call>{"name": 3}</tool_call>'
    for block in (bad_json, no_name, empty_name, not_object, name_not_string, "<tool_call></tool_call>"):
        assert parse_tool_calls(block) == (block, [])
        # Beside a good call, the bad block is part of the content and the good one is a call.
        content, calls = parse_tool_calls(block + "\n" + ONE)
        assert content == block + "\n" and [c.name for c in calls] == ["get_weather"]


def test_nested_braces_unicode_and_an_open_last_block():
    args = {"filter": {"and": [{"k": "}"}, {"k": "{"}]}, "text": '</tool_call>? no: "quoted"'}
    block = "<tool_call>" + json.dumps({"name": "search", "arguments": args}) + "</tool_call>"
    assert calls_of(block) == [("search", args)]
    uni = '<tool_call>{"name": "traduire", "arguments": {"mot": "Grüße 你好 🙂"}}</tool_call>'
    content, calls = parse_tool_calls("¿Qué? " + uni)
    assert content == "¿Qué? " and calls[0].arguments == '{"mot": "Grüße 你好 🙂"}'  # not \u-escaped, as vLLM
    # The model stopped right after the JSON (no closing tag): still a call, as vLLM's hermes parser reads it.
    assert calls_of('<tool_call>\n{"name": "f", "arguments": {"x": [1]}}\n') == [("f", {"x": [1]})]
    assert parse_tool_calls('<tool_call>\n{"name": "f", "argu') == ('<tool_call>\n{"name": "f", "argu', [])
    assert calls_of('<tool_call>{"name": "f"}</tool_call>') == [("f", {})]  # no arguments: {}


STREAM_TEXTS = [
    ONE,
    TWO,
    "Sure.\n" + TWO + "\nAnything else?",
    "  \n" + ONE,
    "no calls at all, just text with < and <tool and <tool_call",
    '<tool_call>{"name": "f", "arguments": {"a": "}"}</tool_call>',
    '<tool_call>{"bad json</tool_call> then text',
    "text <tool_call>[1]</tool_call> more " + ONE + " end",
    '<tool_call>\n{"name": "open", "arguments": {"u": "ü"}}\n',
    "",
    "   ",
    "Grüße 🙂 <tool_c",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_holder_equals_the_whole_parse_for_any_split(text):
    content, calls = parse_tool_calls(text)
    rng = random.Random(hash(text) % 1000)
    splits = [[1] * len(text), [len(text)]] + [None] * 60
    for sizes in splits:
        holder, sent, i = ToolCallStream(), [], 0
        while i < len(text):
            step = sizes.pop(0) if sizes else rng.randint(1, 12)
            sent.append(holder.feed(text[i : i + step]))
            if "<tool_call>" in text[: i + step]:  # from the tag on, nothing more goes out
                assert sent[-1] == "" or text.index("<tool_call>") >= i
            i += step
        rest, got = holder.finish()
        assert "".join(sent) + rest == (content or "")
        assert got == calls  # names and arguments (ids are random)
        assert "<tool_call>" not in "".join(sent)


def replay(
    text: str, sizes: list[int], parallel: bool = True, deltas: Any = ToolCallDeltas, seed: int = 0
) -> tuple[str, list[tuple[str, str]], Any]:
    """Stream `text` through `deltas(parallel)` (ToolCallDeltas, or llama3_tools.Llama3Deltas) in pieces of `sizes`
    (random sizes, from `seed`, when they run out) and reassemble what a client would: (content, [(name, arguments)]
    by index, the stream). Checks the deltas' shape on the way: call k opens (index, id, type, name, arguments "")
    before any fragment of it ({"index", "function": {"arguments"}} only), calls open in index order, and the ids are
    the stream's calls'."""
    rng, stream, items, i = random.Random(len(text) * 1000 + seed), deltas(parallel), [], 0
    while i < len(text):
        step = sizes[0] if sizes else rng.randint(1, 12)
        sizes = sizes[1:]
        items += stream.feed(text[i : i + step])
        i += step
    items += stream.finish()
    calls: dict[int, list] = {}
    for item in items:
        if isinstance(item, str):
            continue
        k, function = item["index"], item["function"]
        if "id" in item:
            assert k == len(calls) and item["type"] == "function" and item["id"].startswith("call_")
            calls[k] = [item["id"], function["name"], function["arguments"]]
        else:
            assert set(item) == {"index", "function"} and set(function) == {"arguments"} and k == len(calls) - 1
            calls[k][2] += function["arguments"]
    assert [c[0] for c in calls.values()] == [c.id for c in stream.kept]
    return "".join(x for x in items if isinstance(x, str)), [(n, a) for _, n, a in calls.values()], stream


DELTA_TEXTS = STREAM_TEXTS + [
    '<tool_call>{"arguments": {"a": 1}, "name": "args_first"}</tool_call> and <tool_call>{"name": "g"}</tool_call>',
    '\n<tool_call>{"name": "f", "arguments": {"q": "}{ \\" \\\\ \\u00e9\\ud83d\\ude42", "n": [1.0, -0, 2E3, true]}}'
    "</tool_call>\n\nWait.\n",
    '<tool_call> {"name": "f", "arguments": "as a string: {\\"a\\": 1}"} </tool_call>x<tool_call>{"name": ""}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": []}</tool_c',
    '<tool_call>{"name": "f", "arguments": {"a": 1}} x</tool_call> ' + ONE,  # junk after the JSON: not a block
    '<tool_call>{"name": "n", "arguments": {"t": "<tool_call>{\\"name\\": \\"inner\\"}</tool_call>"}}</tool_call>',
]


def random_call_text(rng: random.Random) -> str:
    """Text around blocks: name-first with random arguments written every way, arguments-first, malformed."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        parts.append(rng.choice(["", " ", "\n", "Let me look. ", "ok <tool", "a <b> c"]))
        args = rng.choice([{}, {"city": "Zürich"}, {"x": [1, {"y": None}], "s": 'q"}'}, [1.5, "é"], "plain", 7])
        dumped = json.dumps(
            args, **rng.choice([{}, {"ensure_ascii": False}, {"indent": 1}, {"separators": (",", ":")}])
        )
        bodies = ['{"name": "f%d", "arguments": %s}', '{"arguments": %s, "name": "g%d"}', '{"name": "h%d"}',
                  '{"name": "b%d", "arguments": %s', "[%s, %d]"]  # fmt: skip
        body = rng.choices(bodies, weights=[6, 2, 1, 1, 1])[0]
        body = body.replace("%d", str(len(parts))).replace("%s", dumped)
        parts.append("<tool_call>" + rng.choice(["", "\n", " "]) + body + rng.choice(["", "\n"]) + "</tool_call>")
    parts.append(rng.choice(["", "\n", " done", "<tool_call>"]))
    return "".join(parts)


def test_deltas_reassemble_to_the_whole_parse_for_any_split():
    """Content, names, arguments and order of the streamed deltas equal parse_tool_calls of the whole text, over
    character-by-character, one-piece and random splits, for the texts above and random ones."""
    rng = random.Random(7)
    texts = DELTA_TEXTS + [random_call_text(rng) for _ in range(60)]
    equal = 0
    for text in texts:
        content, calls = parse_tool_calls(text)
        want = ((content or ""), [(c.name, c.arguments) for c in calls])
        broken = replay(text, [len(text)])[2].broken
        for seed, sizes in enumerate(([1] * len(text), [len(text)], *([] for _ in range(8)))):
            got, names, stream = replay(text, sizes, seed=seed)
            assert stream.broken == broken  # whether a head block breaks does not depend on the split
            if not broken:  # (a call opened and then broken stays a call: tests/test_tool_call_stream.py)
                assert (got, names) == want, (text, sizes)
        if not broken:
            assert replay(text, [], parallel=False)[:2] == (want[0], want[1][:1]), text
            equal += 1
    assert equal >= 0.6 * len(texts)


def test_stream_sends_content_early_and_holds_a_possible_tag():
    holder = ToolCallStream()
    assert holder.feed("Hello") == "Hello"
    assert holder.feed(" <tool") == " "  # "<tool" may begin a tag: held
    assert holder.feed("box>") == "<toolbox>"  # it did not
    assert holder.feed(" <tool_call>{") == " "
    assert holder.feed('"name": "f"}</tool_call> bye') == ""
    assert holder.finish() == (" bye", [ToolCall("f", "{}")])
    blank = ToolCallStream()  # only whitespace so far: held (a bare call's leading newline is no content)
    assert blank.feed("\n") == "" and blank.feed(ONE) == "" and blank.finish() == ("", parse_tool_calls(ONE)[1])


# ----- the answer: what a client sees -----


def _answer(text: str, pieces: list[str], body: dict, reason: str = "stop") -> tuple[dict, list[dict]]:
    """The chat.completion and the stream's pieces (openai_responses.Choices) for a choice that generated `text`
    in `pieces`, one engine event each (the last ends it with `reason`)."""
    from meshserve.serving.openai_responses import Choices, Unsent, final_response
    from meshserve.serving.requests import Event, Request

    parsed = parse_body(CHAT, {"messages": [{"role": "user", "content": "hi"}], **body}, "m", "hermes")
    request = Request([1, 2, 3], 16)
    request.tokens = list(range(len(pieces)))
    out = Choices(None, parsed, [Unsent(request, text)])
    stream = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        got = out.add(0, Event((k,), (-0.5,), piece, reason if last else None))
        if got is not None:
            stream.append(got)
    return final_response(out, "m"), stream


def test_a_tool_call_answer_whole_and_streamed():
    text = "Checking.\n" + TWO
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    whole, stream = _answer(text, pieces, {"tools": TOOLS})
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking.\n"
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "local_time", {})]  # fmt: skip
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert whole["usage"]["prompt_tokens"] == 3 and whole["usage"]["completion_tokens"] == len(pieces)
    # The stream: the content before the tag at once, never a tag; each call opened once (id, name), then its
    # arguments in fragments, in order; finish_reason on the last piece.
    assert "".join(p["delta"].get("content", "") for p in stream) == "Checking.\n"
    assert all("<" not in p["delta"].get("content", "") for p in stream)
    deltas = [d for p in stream for d in p["delta"].get("tool_calls", [])]
    streamed: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in streamed:
            streamed[d["index"]] = {"id": d["id"], "type": d["type"], "function": dict(d["function"])}
        else:
            assert set(d) == {"index", "function"}
            streamed[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls]  # fmt: skip
    assert sum(1 for p in stream if p["delta"].get("tool_calls")) > 2  # spread over the pieces, not all at the end
    assert stream[-1]["finish_reason"] == "tool_calls"
    # parallel_tool_calls false: the first call only. Cut by length: the calls, but finish_reason stays length.
    whole, _ = _answer(text, [text], {"tools": TOOLS, "parallel_tool_calls": False})
    assert [c["function"]["name"] for c in whole["choices"][0]["message"]["tool_calls"]] == ["get_weather"]
    whole, stream = _answer(ONE, [ONE], {"tools": TOOLS}, reason="length")
    assert whole["choices"][0]["finish_reason"] == stream[-1]["finish_reason"] == "length"
    assert whole["choices"][0]["message"]["content"] is None
    # tool_choice none, or no tools: the text is the content, as is.
    for body in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        whole, stream = _answer(text, pieces, body)
        assert whole["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert "".join(p["delta"].get("content", "") for p in stream) == text
