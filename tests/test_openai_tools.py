"""Tool calling's pieces without a server (serving/openai_tools.py, model/chat.py): the Hermes parser on many texts,
the streaming holder equal to it over random split points, `tools` / `tool_choice` / tool messages refused naming
the field, and a Qwen2.5-style tool template rendered by meshserve (OpenAI's JSON -> proto -> RequestParser ->
template) equal to transformers' apply_chat_template(messages, tools=tools, add_generation_prompt=True).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
from meshserve.model.chat import ChatError, ChatTemplate, check_messages, render_chat
from meshserve.serving.openai_protocol import CHAT, parse_body
from meshserve.serving.openai_tools import (
    MAX_TOOLS,
    ToolCall,
    ToolCallStream,
    check_tools,
    parse_tool_calls,
    request_tools,
)
from meshserve.serving.tool_call_stream import ToolCallDeltas
from meshserve.serving.validation import RequestError

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


def replay(text: str, sizes: list[int], parallel: bool = True) -> tuple[str, list[tuple[str, str]], ToolCallDeltas]:
    """Stream `text` through ToolCallDeltas in pieces of `sizes` (random sizes when they run out) and reassemble what
    a client would: (content, [(name, arguments)] by index, the stream). Checks the deltas' shape on the way: call k
    opens (index, id, type, name, arguments "") before any fragment of it ({"index", "function": {"arguments"}}
    only), calls open in index order, and the ids are the stream's calls'."""
    rng, stream, items, i = random.Random(len(text)), ToolCallDeltas(parallel), [], 0
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
        for sizes in ([1] * len(text), [len(text)], *([] for _ in range(8))):
            got, names, stream = replay(text, sizes)
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


# ----- the request: tools, tool_choice, messages -----


def _refused(body: dict, parser: str | None = "hermes") -> str:
    with pytest.raises(RequestError) as e:
        parse_body(CHAT, {"messages": [{"role": "user", "content": "hi"}], **body}, "m", parser)
    return str(e.value)


def test_tools_need_the_flag_and_tool_choice_auto_or_none():
    assert _refused({"tools": TOOLS}, None).startswith("tools: tool calls are off")
    assert "--tool-call-parser hermes" in _refused({"tools": TOOLS}, None)
    # "required" and a named function are guided decoding (tests/test_guided_protocol.py); an unknown name is refused.
    message = _refused({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert message.startswith("tool_choice.function.name: no tool named 'nope'")
    assert _refused({"tools": TOOLS, "tool_choice": "sometimes"}).startswith("tool_choice: expected")
    assert _refused({"tools": TOOLS, "parallel_tool_calls": "yes"}).startswith("parallel_tool_calls: expected")
    parsed = parse_body(CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}, "m", "hermes")
    assert parsed.tools is not None and parsed.tools.parallel and parsed.tools.parser == "hermes"
    assert json.loads(parsed.requests[0].messages.tools_json) == TOOLS
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "parallel_tool_calls": False}
    assert not parse_body(CHAT, body, "m", "hermes").tools.parallel
    # tool_choice none: the template sees no tools and the text is not parsed.
    none = parse_body(CHAT, {**body, "tool_choice": "none"}, "m", "hermes")
    assert none.tools is None and none.requests[0].messages.tools_json == ""
    # No tools (or an empty list): nothing to do, with or without the flag.
    assert parse_body(CHAT, {**body, "tools": []}, "m", None).tools is None
    assert request_tools({"tool_choice": "auto"}, None) == (None, None)


@pytest.mark.parametrize(
    "tools, field",
    [
        ({"type": "function"}, "tools: expected a list"),
        ([TOOLS[0], "get_weather"], "tools[1]: expected an object"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type: must be 'function'"),
        ([{"type": "function"}], "tools[0].function: expected an object"),
        ([TOOLS[0], {"type": "function", "function": {"description": "x"}}], "tools[1].function.name: expected"),
        (
            [{"type": "function", "function": {"name": "x" * 65}}],
            "tools[0].function.name: expected a string of 1 to 64",
        ),
        ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "tools[0].function.parameters:"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description:"),
        ([{"type": "function", "function": {"name": "f", "returns": {}}}], "tools[0].function.returns: unknown"),
        ([{"type": "function", "function": {"name": "f"}, "extra": 1}], "tools[0].extra: unknown"),
        ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)], "tools: 129 tools"),
    ],
)
def test_bad_tools_are_named(tools, field):
    assert _refused({"tools": tools}).startswith(field)


def test_check_tools_keeps_what_was_sent():
    assert check_tools(TOOLS) is TOOLS and check_tools([], "x") == []


@pytest.mark.parametrize(
    "message, field",
    [
        ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages[1].tool_calls: expected a list"),
        ({"role": "assistant", "tool_calls": ["c"]}, "messages[1].tool_calls[0]: expected an object"),
        ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "messages[1].tool_calls[0].function:"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
         "messages[1].tool_calls[0].function.arguments: expected a string"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
         "messages[1].tool_calls[0].function.name: expected a string"),
        ({"role": "assistant", "tool_calls": [{"id": 7, "function": {"name": "f", "arguments": "{}"}}]},
         "messages[1].tool_calls[0].id: expected a string"),
        ({"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f", "arguments": "{}"}}]},
         "messages[1].tool_calls[0].type: must be 'function'"),
        ({"role": "tool", "tool_call_id": 5, "content": "x"}, "messages[1].tool_call_id: expected a string"),
        ({"role": "tool", "content": "x", "name": "f"}, "messages[1].name: not supported"),
    ],
)  # fmt: skip
def test_bad_tool_messages_are_named(message, field):
    assert _refused({"messages": [{"role": "user", "content": "hi"}, message]}).startswith(field)


def test_check_messages_tool_rules():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, {"b": null}]}'}}]
    got = check_messages([{"role": "assistant", "content": None, "tool_calls": calls},
                          {"role": "tool", "tool_call_id": "c1", "content": "ok"}])  # fmt: skip
    assert got[0] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": [1, {"b": None}]}}}]}  # fmt: skip
    assert got[1] == {"role": "tool", "content": "ok", "tool_call_id": "c1"}
    assert check_messages([{"role": "user", "content": "x", "tool_calls": []}]) == [{"role": "user", "content": "x"}]
    bad = [
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id: a tool message names"),
        ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id: only a tool message"),
        ([{"role": "user", "content": "x", "tool_calls": calls}], "messages[0].tool_calls: only an assistant"),
        ([{"role": "assistant", "content": None}], "messages[0].content must be a string"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{a: 1}"}}]}],
         "messages[0].tool_calls[0].function.arguments: not JSON"),
    ]  # fmt: skip
    for messages, field in bad:
        with pytest.raises(ChatError) as e:
            check_messages(messages)
        assert str(e.value).startswith(field)


# ----- rendering: meshserve equals transformers -----


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), chat_template=TOOL_TEMPLATE
    )


def test_tool_template_renders_as_transformers(hf_tokenizer):
    want = hf_tokenizer.apply_chat_template(
        hf_conversation(TOOL_CONVERSATION), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert '"name": "get_weather", "arguments": {"city": "Zürich"}}' in want and "<tool_response>\n14:05" in want
    assert render_chat(TOOL_TEMPLATE, TOOL_CONVERSATION, tools=TOOLS) == want  # arguments parsed from their JSON
    # Without tools the template takes its other branch, as transformers' (tools=None is defined, falsy).
    plain = [TOOL_CONVERSATION[0], TOOL_CONVERSATION[1]]
    assert render_chat(TOOL_TEMPLATE, plain) == hf_tokenizer.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=False
    )
    # A template testing `tools is not none` (Llama 3.1's style) sees None without tools, as under transformers.
    probe = "{{ 'none' if tools is none else tools | length }}|{{ documents is none }}"
    assert render_chat(probe, plain) == "none|True" and render_chat(probe, plain, tools=TOOLS) == "2|True"


def test_the_request_path_renders_as_transformers(hf_tokenizer):
    """OpenAI's JSON -> parse_body -> the proto -> RequestParser.chat (as gRPC's requests too) -> the template: the
    ids are the tokenizer's encoding of transformers' text."""
    from dataclasses import replace

    from meshserve.model.loading import load_model
    from meshserve.serving.validation import Limits, RequestParser

    want = hf_tokenizer.apply_chat_template(
        hf_conversation(TOOL_CONVERSATION), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    model = replace(load_model(preset="tiny"), chat=ChatTemplate(TOOL_TEMPLATE))  # byte tokenizer: ids = UTF-8
    body = {"messages": TOOL_CONVERSATION, "tools": TOOLS}
    (req,) = parse_body(CHAT, body, "m", "hermes").requests
    parser = RequestParser(model, Limits(max_context=128, max_batch=1, max_new_tokens=8, max_queue=1))
    assert parser.chat(req.messages.messages, req.messages.tools_json) == list(want.encode("utf-8"))
    # The gRPC form's own checks: bad tools JSON, and the size limit over contents, calls and tools together.
    with pytest.raises(RequestError, match=r"^messages\.tools_json: not JSON"):
        parser.chat(req.messages.messages, "[{")
    with pytest.raises(RequestError, match=r"^messages\.tools_json\[0\]\.type"):
        parser.chat(req.messages.messages, '[{"type": "f"}]')
    size = len(req.messages.tools_json) + sum(len(m.content) for m in req.messages.messages)
    small = RequestParser(model, Limits(max_context=128, max_batch=1, max_new_tokens=8, max_queue=1,
                                        max_text_chars=size))  # fmt: skip
    with pytest.raises(RequestError, match=r"^messages: \d+ characters of content, tool calls and tools exceed"):
        small.chat(req.messages.messages, req.messages.tools_json)
    bad = copy.deepcopy(TOOL_CONVERSATION)
    bad[2]["tool_calls"][1]["function"]["arguments"] = "{oops"
    (req,) = parse_body(CHAT, {"messages": bad, "tools": TOOLS}, "m", "hermes").requests
    with pytest.raises(RequestError, match=r"^messages\[2\]\.tool_calls\[1\]\.function\.arguments: not JSON"):
        parser.chat(req.messages.messages, req.messages.tools_json)


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
