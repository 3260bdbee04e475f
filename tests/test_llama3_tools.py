"""Llama 3.x tool calls (`--tool-call-parser llama3_json`, serving/llama3_tools.py): the parse (bare call objects,
<|python_tag|>, several calls joined by ";", all or nothing, NaN / Infinity / 1e400 no call), the HTTP stream's deltas
(each call opened once its name and arguments' "{" are read, its arguments in fragments as they grow) joined equal to
the whole parse over random splits but for the documented difference (a call went out before the text stopped being
calls), gRPC's holder equal to it always, the guided grammar for tool_choice "required" (one bare {"name",
"parameters"} object following the tool's schema), and end to end: a tiny Llama scripted to answer with `{"name":
"get_weather", "parameters": {"city": "Paris"}}` through a real `meshserve serve --tool-call-parser llama3_json`, read
with the openai client, whole and streamed, with tool_choice auto and required, and over gRPC (two streamed calls end
to end: tests/test_serving_http_tool_calls.py).
"""

from __future__ import annotations

import json
import random

import pytest
from meshserve.serving.guided import GuideSpec, compile_spec
from meshserve.serving.guided.spec import GuideError
from meshserve.serving.llama3_tools import Llama3Deltas, Llama3Stream, parse_llama3
from test_openai_tools import TOOLS, replay
from test_serving_http_tool_calls import QUESTION, scripted_checkpoint
from test_serving_support import ServerProcess
from test_tool_call_stream import FORMATS, random_value

CALLS = [
    ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
    (' <|python_tag|>{"name": "f", "arguments": {}}', [("f", {})]),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "é"}}', [("f", {}), ("g", {"x": "é"})]),
    ('{"name": "f", "parameters": {}};\n', [("f", {})]),
    ('\n{"name": "f"}', [("f", {})]),
    ('<|python_tag|>{"name": "a", "parameters": {"n": [1, 2.5]}};{"name": "b", "parameters": {}} ;\n {"name": "c"}',
     [("a", {"n": [1, 2.5]}), ("b", {}), ("c", {})]),
    ('{"name": "f", "parameters": {}}\n{"name": "g", "parameters": {}}', [("f", {}), ("g", {})]),  # no ";"
    ('{"name": "f", "parameters": {"s": "a; b}{"}}; {"parameters": {"k": null}, "name": "g"}',
     [("f", {"s": "a; b}{"}), ("g", {"k": None})]),
]  # fmt: skip
NOT_CALLS = ['Hello {"name": "f"}', '{"name": "f", "parameters": {}} and more', '{"name": 3}',
             '{"name": "f", "parameters": [1]}', "", "   ", "<|python_tag|>", '{"name": "f", "param', "{}",
             '{"name": "f", "parameters": {}};; {"name": "g"}', '{"name": "f", "parameters": {}}; {"x": 1}',
             '{"name": "f", "parameters": {}}; [1]', '{"name": "f", "parameters": {"a": 1}', "<|python_tag|> hi",
             '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"a": NaN}}',
             '{"name": "f", "parameters": {"a": Infinity}}', '{"name": "f", "parameters": {"a": [-Infinity]}}',
             '{"name": "f", "parameters": {"a": 1e400}}', '{"parameters": {"a": NaN}, "name": "f"}']  # fmt: skip


@pytest.mark.parametrize("text,calls", CALLS)
def test_calls(text, calls):
    content, got = parse_llama3(text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("text", NOT_CALLS)
def test_text_that_is_not_all_calls_is_content(text):
    assert parse_llama3(text) == (text, [])


def test_which_arguments_a_call_has():
    """A head ({"name", then "parameters" or "arguments"}) has the value of the key after its name, written as it
    streams (every copy of a repeated key); another object "parameters" over "arguments"; strings stay strings."""
    assert parse_llama3('{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}')[1][0].arguments == '{"a": 1}'
    assert parse_llama3('{"parameters": {"b": 2}, "name": "f", "arguments": {"a": 1}}')[1][0].arguments == '{"b": 2}'
    (call,) = parse_llama3('{"name": "f", "parameters": {"a": 1, "a": 2, "s": "NaN \\u00e9"}}')[1]
    assert call.arguments == '{"a": 1, "a": 2, "s": "NaN é"}' and json.loads(call.arguments) == {"a": 2, "s": "NaN é"}


def llama_replay(text: str, sizes: list[int], parallel: bool = True, seed: int = 0) -> tuple[str, list, Llama3Deltas]:
    """test_openai_tools.replay through Llama3Deltas: (content, [(name, arguments)] by index, the stream)."""
    return replay(text, sizes, parallel, Llama3Deltas, seed)


def random_llama_text(rng: random.Random) -> str:
    """Calls with random arguments written every way json.dumps writes them, joined every way, now and then one
    that is no call (arguments not an object, NaN, cut short) or text that is not a separator."""
    parts = [rng.choice(["", " ", "\n", "<|python_tag|>", "<|python_tag|> \n"])]
    for k in range(rng.randint(1, 3)):
        if k:
            parts.append(rng.choices(["; ", ";", "\n", " ;\n", "", ";;", " and "], weights=[5, 3, 2, 2, 1, 1, 1])[0])
        args = json.dumps({"k": random_value(rng), "é": random_value(rng)}, **rng.choice(FORMATS))
        bodies = ['{"name": "f%d", "parameters": %s}', '{"name": "g%d", "arguments": %s}', '{"name": "n%d"}',
                  '{"parameters": %s, "name": "h%d"}', '{"name": "b%d", "parameters": %s', '{"name": "x%d", '
                  '"parameters": {"v": NaN}}', '{"name": "l%d", "parameters": [%s]}']  # fmt: skip
        body = rng.choices(bodies, weights=[8, 3, 1, 2, 1, 1, 1])[0]
        parts.append(body.replace("%d", str(k)).replace("%s", args))
    parts.append(rng.choices(["", "\n", ";", " done"], weights=[4, 2, 2, 1])[0])
    return "".join(parts)


def test_streams_join_to_the_whole_parse_for_any_split():
    """The HTTP deltas (content, names, arguments, order) equal parse_llama3 of the whole text over one-piece,
    character-by-character and random splits, wherever no call went out before the text stopped being calls; where
    one did (`differs`) the stream gives the same for every split, a call or more and the text's tail as content.
    gRPC's holder always equals the whole parse."""
    rng = random.Random(3)
    extra = ["plain answer", "  {", "<|python", "<|python_tag|>  "]
    texts = [t for t, _ in CALLS] + NOT_CALLS + extra + [random_llama_text(rng) for _ in range(80)]
    same = 0
    for text in texts:
        content, calls = parse_llama3(text)
        want = (content or "", [(c.name, c.arguments) for c in calls])
        first = llama_replay(text, [len(text)])
        for seed, sizes in enumerate(([1] * len(text), *([] for _ in range(6)))):
            got = llama_replay(text, sizes, seed=seed)
            assert got[:2] == first[:2] and got[2].differs == first[2].differs, (text, sizes)
        if first[2].differs:
            assert want == (text, []) and first[1] and text.endswith(first[0]), text
        else:
            assert first[:2] == want, text
            assert llama_replay(text, [], parallel=False)[:2] == (want[0], want[1][:1]), text
            same += 1
        for _ in range(4):
            stream, sent, at = Llama3Stream(), [], 0
            while at < len(text):
                step = rng.randint(1, 6)
                sent.append(stream.feed(text[at : at + step]))
                at += step
            rest, got_calls = stream.finish()
            assert ("".join(sent) + rest, [(c.name, c.arguments) for c in got_calls]) == want
    assert same >= 0.6 * len(texts)


def test_arguments_stream_as_they_grow():
    """Call 0 opens once its name and the "{" of its arguments are read, its arguments follow in fragments, each
    out before the call's JSON closes; call 1 opens after the ";" with its own id."""
    head = '<|python_tag|>{"name": "get_weather", "parameters": '
    args = '{"city": "Zürich", "days": [1, 2.50]}'
    text = head + args + '}; {"name": "local_time", "parameters": {}}'
    stream = Llama3Deltas()
    steps = [(i + 1, stream.feed(ch)) for i, ch in enumerate(text)] + [(len(text), stream.finish())]
    items = [(n, item) for n, got in steps for item in got]
    assert all(isinstance(item, dict) for _, item in items)  # no content
    opened = [(n, d) for n, d in items if "id" in d]
    assert [n for n, _ in opened] == [len(head) + 1, text.rindex("{") + 1]
    assert [(d["index"], d["type"], d["function"]) for _, d in opened] == [
        (0, "function", {"name": "get_weather", "arguments": ""}), (1, "function", {"name": "local_time",
                                                                                   "arguments": ""})]  # fmt: skip
    assert [d["id"] for _, d in opened] == [c.id for c in stream.complete] and opened[0][1]["id"] != opened[1][1]["id"]
    fragments = [(n, d) for n, d in items if "id" not in d and d["index"] == 0]
    assert len(fragments) > 8 and fragments[-1][0] <= len(head) + len(args)
    assert "".join(d["function"]["arguments"] for _, d in fragments) == '{"city": "Zürich", "days": [1, 2.5]}'
    # What went out after 9 characters of the arguments: those characters, and nothing more.
    assert "".join(d["function"]["arguments"] for n, d in fragments if n <= len(head) + 9) == '{"city": '
    # An object that is not a head is sent whole when it closes.
    late = '{"parameters": {"a": 1}, "name": "f"}; {"name": "g"}'
    stream = Llama3Deltas()
    steps = [(i + 1, stream.feed(ch)) for i, ch in enumerate(late)] + [(len(late), stream.finish())]
    assert [(n, d["function"]) for n, got in steps for d in got] == [
        (late.index(";"), {"name": "f", "arguments": '{"a": 1}'}),
        (len(late), {"name": "g", "arguments": "{}"}),
    ]


def test_text_that_stops_being_calls_after_a_call_went_out():
    """The documented difference: the calls sent stay (one broken after opening is not complete), the text from
    where it stopped being calls is content; the whole-text parse makes all of it content."""
    cases = [
        ('{"name": "f", "parameters": {"a": 1}} and more', "and more", [("f", '{"a": 1}')], 0),
        ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"a": NaN}}', "NaN}}",
         [("f", "{}"), ("g", '{"a": ')], 1),
        ('{"name": "f", "parameters": {"a": -Infinity}}', "Infinity}}", [("f", '{"a": ')], 1),
        ('{"name": "f", "parameters": {}}; {"x": 1}', '{"x": 1}', [("f", "{}")], 0),
        ('{"name": "f", "parameters": {"a": "b', "", [("f", '{"a": "b')], 1),  # cut by the end (max_tokens)
    ]  # fmt: skip
    for text, content, calls, broken in cases:
        assert parse_llama3(text) == (text, [])
        for size in (1, 3, len(text)):
            got, names, stream = llama_replay(text, [size] * len(text))
            assert (got, names, stream.broken, stream.differs) == (content, calls, broken, True)
            assert [c.name for c in stream.complete] == [name for name, _ in calls[: len(calls) - broken]]


def test_parallel_tool_calls_false_sends_the_first_call_only():
    text = '{"name": "a", "parameters": {"k": 1}}; {"name": "b", "parameters": {}}'
    for parallel in (True, False):
        content, calls, stream = llama_replay(text, [5] * len(text), parallel=parallel)
        assert content == "" and [n for n, _ in calls] == (["a", "b"] if parallel else ["a"])
        assert [c.name for c in stream.kept] == [n for n, _ in calls] and len(stream.calls) == 2


def test_the_guided_grammar_writes_one_bare_call():
    grammar = compile_spec(GuideSpec("tool_calls", tools=json.dumps(TOOLS), parser="llama3_json"))

    def whole(text: bytes) -> bool:
        state = grammar.advance(grammar.start(), text)
        return state is not None and grammar.accepts(state)

    assert whole(b'{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert whole(b'{"name": "local_time", "parameters": {}}')
    assert not whole(b'{"name": "get_weather", "arguments": {"city": "Paris"}}')  # hermes' key
    assert not whole(b'<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>')
    assert not whole(b'{"name": "get_weather", "parameters": {}}')  # city is required
    with pytest.raises(GuideError, match="parser: 'pythonic' is not supported"):
        compile_spec(GuideSpec("tool_calls", tools=json.dumps(TOOLS), parser="pythonic"))


# ----- end to end -----

PIECES = ['{"name":', '"get_weather",', '"parameters":', '{"city":', '"Paris"}}']


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("transformers")
    checkpoint = scripted_checkpoint(tmp_path_factory, PIECES, "llama3-calls")
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "llama3_json", "--served-model-name",
                         "m")  # fmt: skip
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_scripted_llama_calls_a_tool(oa, choice):
    r = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=16)
    message = r.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert not message.content and r.choices[0].finish_reason == "tool_calls"


def test_streamed_call_and_no_tools(oa, server):
    stream = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, max_tokens=16, stream=True)
    calls, content, finish = {}, "", None  # index -> [name, arguments so far]: arguments arrive in fragments
    for chunk in stream:
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, [d.function.name, ""])
            call[1] += d.function.arguments or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert [(name, json.loads(args)) for name, args in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert content == "" and finish == "tool_calls"
    plain = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=16)  # no tools: the words are text
    assert plain.choices[0].message.content.split() == PIECES and not plain.choices[0].message.tool_calls
    from meshserve.serving.client import Client

    with Client(server.target) as client:
        reply = client.generate(messages=QUESTION, tools=TOOLS, max_new_tokens=16)
        assert reply.text == "" and reply.finish_reason == "tool_calls"
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]


def test_a_llama_tool_template_renders_as_transformers():
    """Llama 4's template (transformers ships it in processing_llama4; Llama 3.1's has the same tool structure):
    tools in the first user message, an assistant's bare-JSON call with "parameters", an ipython tool result, and a
    date_string template variable render exactly as transformers' apply_chat_template."""
    import copy

    from meshserve.model.chat import render_chat

    llama4 = pytest.importorskip("transformers.models.llama4.processing_llama4")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        chat_template=llama4.chat_template, bos_token="<|begin_of_text|>")  # fmt: skip
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "thanks"}]  # fmt: skip
    reference = copy.deepcopy(messages)
    reference[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # as vLLM passes them
    for tools in (TOOLS, None):
        want = tokenizer.apply_chat_template(reference, tools=tools, add_generation_prompt=True, tokenize=False,
                                             date_string="26 Jul 2024")  # fmt: skip
        got = render_chat(llama4.chat_template, messages, bos_token="<|begin_of_text|>", tools=tools,
                          extra={"date_string": "26 Jul 2024"})  # fmt: skip
        assert got == want
    assert '"parameters": {"city": "Paris"}' in got


def test_a_lone_surrogate_escape_stays_an_escape():
    """A model can write "\\ud800" inside the JSON: decoded it is a lone surrogate, which UTF-8 (gRPC, the HTTP
    stream) cannot carry; the call's arguments keep it as its escape, the same JSON value."""
    text = '{"name": "get_weather", "parameters": {"city": "\\ud800x"}}'
    (call,) = parse_llama3(text)[1]
    assert call.arguments == '{"city": "\\ud800x"}' and json.loads(call.arguments) == {"city": "\ud800x"}
    call.arguments.encode("utf-8")
