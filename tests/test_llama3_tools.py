"""Llama 3.x tool calls (`--tool-call-parser llama3_json`, serving/llama3_tools.py): the parse (bare call objects,
<|python_tag|>, ";"-joined calls, all or nothing), streamed holders that join to the whole parse over random splits,
the guided grammar for tool_choice "required" (one bare {"name", "parameters"} object following the tool's schema),
and end to end: a tiny Llama scripted to answer with `{"name": "get_weather", "parameters": {"city": "Paris"}}`
through a real `meshserve serve --tool-call-parser llama3_json`, read with the openai client, whole and streamed,
with tool_choice auto and required, and over gRPC.
"""

from __future__ import annotations

import json
import random

import pytest
from meshserve.serving.guided import GuideSpec, compile_spec
from meshserve.serving.guided.spec import GuideError
from meshserve.serving.llama3_tools import Llama3Deltas, Llama3Stream, parse_llama3
from test_openai_tools import TOOLS
from test_serving_http_tool_calls import QUESTION, scripted_checkpoint
from test_serving_support import ServerProcess

CALLS = [
    ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
    (' <|python_tag|>{"name": "f", "arguments": {}}', [("f", {})]),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "é"}}', [("f", {}), ("g", {"x": "é"})]),
    ('{"name": "f", "parameters": {}};\n', [("f", {})]),
    ('\n{"name": "f"}', [("f", {})]),
]
NOT_CALLS = ["Hello {\"name\": \"f\"}", '{"name": "f", "parameters": {}} and more', '{"name": 3}',
             '{"name": "f", "parameters": [1]}', "", "   ", "<|python_tag|>", '{"name": "f", "param', "{}"]  # fmt: skip


@pytest.mark.parametrize("text,calls", CALLS)
def test_calls(text, calls):
    content, got = parse_llama3(text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("text", NOT_CALLS)
def test_text_that_is_not_all_calls_is_content(text):
    assert parse_llama3(text) == (text, [])


def test_streams_join_to_the_whole_parse():
    rng = random.Random(0)
    for text in [t for t, _ in CALLS] + NOT_CALLS + ["plain answer", "  {", "<|python", "<|python_tag|> hi"]:
        for _ in range(30):
            stream, deltas, sent, items, at = Llama3Stream(), Llama3Deltas(), [], [], 0
            while at < len(text):
                step = rng.randint(1, 6)
                sent.append(stream.feed(text[at : at + step]))
                items += deltas.feed(text[at : at + step])
                at += step
            rest, calls = stream.finish()
            items += deltas.finish()
            content, want = parse_llama3(text)
            assert "".join(sent) + rest == (content or "") == "".join(i for i in items if isinstance(i, str))
            named = [(c.name, c.arguments) for c in want]
            assert [(c.name, c.arguments) for c in calls] == named
            assert [(d["function"]["name"], d["function"]["arguments"]) for d in items if isinstance(d, dict)] == named


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
    calls, content, finish = [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        calls += delta.tool_calls or []
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
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
