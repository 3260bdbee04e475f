"""Guided decoding's request fields, checked where they enter (no server here; tests/test_guided_protocol_server.py
runs them through real servers): gRPC's GenerateRequest.response_format and ChatMessages.tool_choice through
RequestParser (the GuideSpec a Request carries, every bad value named), OpenAI's response_format / tool_choice in
HTTP bodies (and vLLM's guided_choice / guided_json), the Python client's keywords, and `meshserve generate`'s
--json-object / --json-schema / --choice flags."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cli_helpers import run_cli
from meshserve.model.chat import ChatTemplate
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.client import Client, InvalidRequest
from meshserve.serving.guided.spec import GuideSpec
from meshserve.serving.guided_requests import format_proto, response_format
from meshserve.serving.openai_protocol import CHAT, COMPLETIONS, openai_error, parse_body
from meshserve.serving.openai_tools import tool_choice
from meshserve.serving.validation import Limits, RequestError, RequestParser
from test_openai_tools import TOOL_TEMPLATE, TOOLS

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
CHAT_MESSAGES = [{"role": "user", "content": "hi"}]
LABELS = ("yes", "no", "not sure")


def _choice(*values: str) -> pb.ResponseFormat:
    return pb.ResponseFormat(choice=pb.Choices(values=values))


LIMITS = Limits(max_context=4096, max_batch=1, max_new_tokens=8, max_queue=4, max_text_chars=2000)


@pytest.fixture(scope="module")
def model():
    from meshserve.model.loading import load_model

    return replace(load_model(preset="tiny"), chat=ChatTemplate(TOOL_TEMPLATE))  # byte tokenizer, tool template


@pytest.fixture(scope="module")
def parser(model):
    return RequestParser(model, LIMITS, tool_parser="hermes")


def _chat(tools=TOOLS, choice: str = "", function: str = "", parallel: bool | None = None) -> pb.GenerateRequest:
    chat = pb.ChatMessages(tools_json=json.dumps(tools) if tools else "", tool_choice=choice,
                           tool_choice_function=function)  # fmt: skip
    chat.messages.append(pb.ChatMessage(role="user", content="hi"))
    if parallel is not None:
        chat.parallel_tool_calls = parallel
    return pb.GenerateRequest(messages=chat, max_new_tokens=4)


# ----- gRPC: RequestParser -----


def test_a_response_format_becomes_the_requests_guide(parser):
    text = json.dumps(SCHEMA)
    req = pb.GenerateRequest(text="hi", max_new_tokens=4, n=3, response_format=pb.ResponseFormat(json_schema=text))
    requests, _ = parser.samples(req, None)
    assert [r.guide for r in requests] == [GuideSpec("json_schema", schema=text)] * 3  # every sample follows it
    req = pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6]), response_format=pb.ResponseFormat(json_object=True))
    assert parser.generate(req, None)[0].guide == GuideSpec("json_object")
    for free in (pb.GenerateRequest(text="hi"), pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat()),
                 pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat(json_object=False))):  # fmt: skip
        assert parser.generate(free, None)[0].guide is None


def test_a_choice_format_becomes_the_requests_guide(parser):
    requests, _ = parser.samples(pb.GenerateRequest(text="hi", n=2, response_format=_choice(*LABELS)), None)
    assert [r.guide for r in requests] == [GuideSpec("choice", choices=LABELS)] * 2
    got = parser.generate(pb.GenerateRequest(text="hi", response_format=_choice("x" * 1000, "y" * 1000)), None)[0]
    assert got.guide.choices == ("x" * 1000, "y" * 1000)  # 2000 characters: at the limit


def test_tool_choice_required_or_named_guides_into_calls(parser, model):
    tools_json = json.dumps(TOOLS)
    got = parser.generate(_chat(choice="required"), None)[0].guide
    assert got == GuideSpec("tool_calls", tools=tools_json, tool_name="", parallel=True, parser="hermes")
    got = parser.generate(_chat(function="local_time", parallel=False), None)[0].guide
    assert got == GuideSpec("tool_calls", tools=tools_json, tool_name="local_time", parallel=False, parser="hermes")
    assert parser.generate(_chat(choice="required", function="get_weather"), None)[0].guide.tool_name == "get_weather"
    assert parser.generate(_chat(choice="auto"), None)[0].guide is None
    assert parser.generate(_chat(), None)[0].guide is None
    # "none": no guide, and the template is not given the tools (the prompt is the chat's without them).
    none = parser.generate(_chat(choice="none"), None)[0]
    assert none.guide is None and none.prompt == parser.generate(_chat(tools=None), None)[0].prompt
    assert none.prompt != parser.generate(_chat(), None)[0].prompt


BAD_GRPC = [
    (pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat(json_schema="{oops")),
     r"^response_format\.json_schema: not JSON"),
    (pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat(json_schema="[1]")),
     r"^response_format\.json_schema: expected a JSON Schema object, got \[1\]"),
    (pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat(json_schema=json.dumps({"description": "x" * 2000}))),
     r"^response_format\.json_schema: \d+ characters exceed the limit of 2000"),
    (_chat(choice="sometimes"), r'^messages\.tool_choice must be one of "", "auto", "none", "required"'),
    (_chat(choice="none", function="get_weather"), r'^messages\.tool_choice_function: .* not "none"'),
    (_chat(tools=None, choice="required"), r'^messages\.tool_choice: "required" needs tools \(messages\.tools_json'),
    (_chat(tools=None, function="f"), r'^messages\.tool_choice_function: function "f" needs tools'),
    (_chat(function="get_wether"), r'^messages\.tool_choice_function: no tool named "get_wether" in messages\.tools_j'),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^([A-Z])\\1"}}}}}], choice="required"),
     r"^messages\.tools_json\[0\]\.function\.parameters\.properties\.city\.pattern: backreferences are not supported"),
    (pb.GenerateRequest(messages=_chat(choice="required").messages, response_format=pb.ResponseFormat(json_object=True)),
     r'^response_format: cannot be combined with messages\.tool_choice "required"'),
    (pb.GenerateRequest(text="hi", response_format=_choice("a", "")),
     r'^response_format\.choice\.values\[1\]: expected a non-empty string, got ""$'),
    (pb.GenerateRequest(text="hi", response_format=_choice()),
     r"^response_format\.choice\.values: expected at least one string$"),
    (pb.GenerateRequest(text="hi", response_format=_choice("x" * 1500, "y" * 501)),
     r"^response_format\.choice\.values: 2001 characters exceed the limit of 2000$"),
    (pb.GenerateRequest(messages=_chat(choice="required").messages, response_format=_choice("a")),
     r'^response_format: cannot be combined with messages\.tool_choice "required"'),
]  # fmt: skip


@pytest.mark.parametrize("req, message", BAD_GRPC, ids=[m[1:40] for _, m in BAD_GRPC])
def test_bad_grpc_guide_fields_are_named(parser, req, message):
    with pytest.raises(RequestError, match=message):
        parser.samples(req, None)


def test_a_required_tool_choice_needs_the_servers_tool_call_parser(model):
    off = RequestParser(model, LIMITS)  # serve without --tool-call-parser
    with pytest.raises(RequestError, match=r'^messages\.tool_choice: "required" needs a server started with --tool-'):
        off.generate(_chat(choice="required"), None)
    assert off.generate(_chat(), None)[0].guide is None  # tools alone are still rendered, as before


def test_a_schema_meshserve_cannot_follow_is_refused_naming_its_place(parser):
    schema = {"type": "object", "properties": {"age": {"type": "string", "pattern": "^([0-9])\\1$"}}}
    req = pb.GenerateRequest(text="hi", response_format=pb.ResponseFormat(json_schema=json.dumps(schema)))
    with pytest.raises(RequestError, match=r"^response_format\.json_schema: schema\.properties\.age\.pattern"):
        parser.generate(req, None)


# ----- OpenAI's shapes: response_format, tool_choice, bodies -----


BAD_FORMATS = [
    ("json", "response_format: expected an object"),
    ({"type": "xml"}, 'response_format.type: expected one of "text", "json_object", "json_schema", got "xml"'),
    ({}, "response_format.type: expected one of"),
    ({"type": "json_object", "schema": {}}, "response_format.schema: unknown field"),
    ({"type": "json_schema"}, "response_format.json_schema: expected an object"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name: expected 1 to 64"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}, "response_format.json_schema.name:"),
    ({"type": "json_schema", "json_schema": {"name": "a" * 65, "schema": SCHEMA}}, "response_format.json_schema.name:"),
    ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema: expected a JSON Sch"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}, "response_format.json_schema.schema:"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": 1}},
     "response_format.json_schema.strict: expected true or false"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "description": 2}},
     "response_format.json_schema.description: expected a string"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "format": "x"}},
     "response_format.json_schema.format: unknown field"),
]  # fmt: skip


@pytest.mark.parametrize("value, message", BAD_FORMATS, ids=[m for _, m in BAD_FORMATS])
def test_bad_response_formats_are_named(value, message):
    with pytest.raises(RequestError) as e:
        response_format(value)
    assert str(e.value).startswith(message)


def test_good_response_formats():
    assert response_format(None) is None and response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}) == GuideSpec("json_object")
    ordered = {"type": "object", "required": ["b", "a"], "properties": {"b": {}, "a": {}}}  # the client's key order
    got = response_format({"type": "json_schema", "json_schema": {"name": "x-Y_9", "schema": ordered}})
    assert got == GuideSpec("json_schema", schema=json.dumps(ordered)) and json.loads(got.schema) == ordered
    assert format_proto(got) == pb.ResponseFormat(json_schema=got.schema) and format_proto(None) is None


def test_tool_choice_values():
    assert tool_choice(None) == tool_choice("auto") == ("", "")
    assert tool_choice("none") == ("none", "") and tool_choice("required") == ("required", "")
    assert tool_choice({"type": "function", "function": {"name": "f"}}) == ("required", "f")
    for bad, message in [("sometimes", "tool_choice: expected"), ({"type": "tool", "function": {"name": "f"}},
                         'tool_choice.type: must be "function"'), ({"type": "function"}, "tool_choice.function:"),
                         ({"type": "function", "function": {"name": ""}}, "tool_choice.function.name:"),
                         ({"type": "function", "function": {"name": "f"}, "x": 1}, "tool_choice.x: unknown")]:  # fmt: skip
        with pytest.raises(RequestError) as e:
            tool_choice(bad)
        assert str(e.value).startswith(message)


def test_http_bodies_carry_the_fields_into_the_proto():
    body = {"messages": CHAT_MESSAGES, "response_format": JSON_SCHEMA}
    (req,) = parse_body(CHAT, body, "m", None).requests
    assert json.loads(req.response_format.json_schema) == SCHEMA
    (req,) = parse_body(COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, "m").requests
    assert req.response_format.json_object  # as vLLM, completions take it too
    (req,) = parse_body(CHAT, {"messages": CHAT_MESSAGES, "response_format": {"type": "text"}}, "m").requests
    assert not req.HasField("response_format")
    named = {"type": "function", "function": {"name": "local_time"}}
    parsed = parse_body(CHAT, {"messages": CHAT_MESSAGES, "tools": TOOLS, "tool_choice": named,
                               "parallel_tool_calls": False}, "m", "hermes")  # fmt: skip
    chat = parsed.requests[0].messages
    assert (chat.tool_choice, chat.tool_choice_function, chat.parallel_tool_calls) == ("required", "local_time", False)
    assert parsed.tools is not None and not parsed.tools.parallel  # the answer is still parsed for the calls
    auto = parse_body(CHAT, {"messages": CHAT_MESSAGES, "tools": TOOLS}, "m", "hermes").requests[0].messages
    assert auto.tool_choice == "" and not auto.HasField("parallel_tool_calls")  # as before: no guide


def test_http_guided_choice_and_guided_json_carry_into_the_proto():
    for kind, base in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": CHAT_MESSAGES})):
        parsed = parse_body(kind, {**base, "guided_choice": list(LABELS), "n": 2}, "m")
        assert parsed.requests[0].response_format == _choice(*LABELS) and parsed.guide_field == "guided_choice"
        for schema in (SCHEMA, json.dumps(SCHEMA)):  # an object or its JSON text
            parsed = parse_body(kind, {**base, "guided_json": schema, "response_format": {"type": "text"}}, "m")
            got = parsed.requests[0].response_format.json_schema
            assert json.loads(got) == SCHEMA and parsed.guide_field == "guided_json"
    plain = parse_body(CHAT, {"messages": CHAT_MESSAGES, "guided_choice": None, "guided_regex": None}, "m")
    assert not plain.requests[0].HasField("response_format") and plain.guide_field == "response_format"


BAD_HTTP_GUIDES = [
    ({"guided_choice": "yes"}, 'guided_choice: expected a list of strings, got "yes"', "guided_choice"),
    ({"guided_choice": ["yes", ""]}, 'guided_choice[1]: expected a non-empty string, got ""', "guided_choice"),
    ({"guided_choice": ["yes", 3]}, "guided_choice[1]: expected a non-empty string, got 3", "guided_choice"),
    ({"guided_choice": []}, "guided_choice: expected at least one string", "guided_choice"),
    ({"guided_choice": ["a"] * 4097}, "guided_choice: 4097 strings exceed the limit of 4096", "guided_choice"),
    ({"guided_json": 3}, "guided_json: expected a JSON Schema object or its JSON text, got 3", "guided_json"),
    ({"guided_json": "{oops"}, "guided_json: not JSON", "guided_json"),
    ({"guided_json": "[1]"}, "guided_json: expected a JSON Schema object, got [1]", "guided_json"),
    ({"guided_regex": "a(?=b)"}, "guided_regex: lookaheads/lookbehinds are not supported", "guided_regex"),
    ({"guided_grammar": "root ::= x"}, "guided_grammar: not supported: meshserve guides to JSON", "guided_grammar"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}},
     "response_format: cannot be combined with guided_choice", "response_format"),
    ({"guided_choice": ["a"], "guided_json": {}}, "guided_json: cannot be combined with guided_choice", "guided_json"),
    ({"guided_json": SCHEMA, "response_format": JSON_SCHEMA}, "response_format: cannot be combined with guided_json",
     "response_format"),
    ({"guided_choice": ["a"], "tools": TOOLS, "tool_choice": "required"},
     'guided_choice: cannot be combined with tool_choice "required" or a named function', "guided_choice"),
    ({"guided_json": SCHEMA, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "local_time"}}},
     'guided_json: cannot be combined with tool_choice "required"', "guided_json"),
]  # fmt: skip


@pytest.mark.parametrize("body, message, param", BAD_HTTP_GUIDES, ids=[m[:48] for _, m, _ in BAD_HTTP_GUIDES])
def test_bad_guided_choice_and_guided_json_name_the_field(body, message, param):
    with pytest.raises(RequestError) as e:
        parse_body(CHAT, {"messages": CHAT_MESSAGES, **body}, "m", "hermes")
    got, got_param = openai_error(CHAT, e.value)
    assert got.startswith(message) and got_param == param, got


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"tool_choice": "required"}, 'tool_choice: "required" needs tools', "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         'tool_choice.function.name: no tool named "nope" in tools', "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
         "response_format.json_schema.schema:", "response_format"),
    ],
)  # fmt: skip
def test_bad_http_bodies_name_the_openai_field(body, message, param):
    with pytest.raises(RequestError) as e:
        parse_body(CHAT, {"messages": CHAT_MESSAGES, **body}, "m", "hermes")
    got, got_param = openai_error(CHAT, e.value)
    assert got.startswith(message) and got_param == param


def test_grpc_names_become_openai_names_over_http():
    for grpc_message, want in [
        ('messages.tool_choice_function: no tool named "x"', 'tool_choice: no tool named "x"'),
        ('messages.tool_choice: "required" needs a server', 'tool_choice: "required" needs a server'),
        ("messages.tools_json[0].function.parameters.x: not supported", "tools[0].function.parameters.x: not"),
        ("response_format.json_schema: schema.pattern: not supported", "response_format.json_schema: schema.pat"),
        ("response_format.choice.values[2]: expected a non-empty", "guided_choice[2]: expected a non-empty"),
        ("response_format.choice.values: 9000 characters exceed", "guided_choice: 9000 characters exceed"),
    ]:
        message, param = openai_error(CHAT, RequestError(grpc_message))
        assert message.startswith(want) and param == want.split(".")[0].split(":")[0].split("[")[0]
    # A schema the body sent as guided_json is named guided_json (http_server passes parsed.guide_field).
    message = "response_format.json_schema: 9000 characters exceed the limit of 4096"
    got = openai_error(COMPLETIONS, RequestError(message), "max_tokens", None, "guided_json")
    assert got == ("guided_json: 9000 characters exceed the limit of 4096", "guided_json")


# ----- the Python client -----


def test_client_keywords_fill_the_proto():
    req = Client.request("hi", response_format=JSON_SCHEMA)
    assert json.loads(req.response_format.json_schema) == SCHEMA
    assert Client.request("hi", response_format={"type": "json_object"}).response_format.json_object
    assert not Client.request("hi", response_format={"type": "text"}).HasField("response_format")
    req = Client.request(messages=CHAT_MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, parallel_tool_calls=False)  # fmt: skip
    assert (req.messages.tool_choice, req.messages.tool_choice_function) == ("required", "get_weather")
    assert req.messages.parallel_tool_calls is False
    assert Client.request(messages=CHAT_MESSAGES, tools=TOOLS, tool_choice="none").messages.tool_choice == "none"
    # validate=False sends what the server must refuse itself.
    raw = Client.request("hi", validate=False, response_format={"type": "json_schema", "json_schema": {"schema": "{"}})
    assert raw.response_format.json_schema == "{"
    assert Client.request("hi", guided_choice=list(LABELS)).response_format == _choice(*LABELS)
    assert Client.request("hi", guided_choice=("a",), response_format={"type": "text"}).response_format == _choice("a")
    assert Client.request("hi", validate=False, guided_choice=["a", ""]).response_format == _choice("a", "")
    assert Client.request("hi", validate=False, guided_choice=[]).response_format.HasField("choice")  # empty Choices


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"response_format": {"type": "yaml"}}, "response_format.type: expected one of"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.sc"),
        ({"tool_choice": "required"}, "tool_choice: only a chat"),
        ({"messages": CHAT_MESSAGES, "tool_choice": "required"}, 'tool_choice: "required" needs tools=[...]'),
        ({"messages": CHAT_MESSAGES, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "z"}}},
         'tool_choice.function.name: no tool named "z"'),
        ({"messages": CHAT_MESSAGES, "tools": TOOLS, "tool_choice": "always"}, "tool_choice: expected"),
        ({"messages": CHAT_MESSAGES, "tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls: expected"),
        ({"guided_choice": "yes"}, 'guided_choice: expected a list of strings, got "yes"'),
        ({"guided_choice": ["yes", ""]}, 'guided_choice[1]: expected a non-empty string, got ""'),
        ({"guided_choice": ["a"] * 4097}, "guided_choice: 4097 strings exceed the limit of 4096"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}},
         "response_format: cannot be combined with guided_choice"),
        ({"messages": CHAT_MESSAGES, "tools": TOOLS, "tool_choice": "required", "guided_choice": ["a"]},
         'guided_choice: cannot be combined with tool_choice "required"'),
    ],
)  # fmt: skip
def test_client_refuses_bad_keywords_before_sending(kwargs, message):
    with pytest.raises(InvalidRequest) as e:
        Client.request(**({"prompt": "hi"} if "messages" not in kwargs else {}), **kwargs)
    assert str(e.value).startswith(message)


# ----- meshserve generate -----


def test_generate_json_flags(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "hi", "--model", "tiny", "--json-object", "--mesh", "2x2x2")
    assert code == 2 and "--json-object runs in process on one device" in err and "drop --mesh" in err
    with pytest.raises(SystemExit) as e:  # argparse: one or the other
        run_cli(capsys, "generate", "hi", "--json-object", "--json-schema", "s.json")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    server = ("--server", "127.0.0.1:1")  # nothing is asked: the file is checked first
    code, _, err = run_cli(capsys, "generate", "hi", *server, "--json-schema", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read --json-schema" in err and "missing.json" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run_cli(capsys, "generate", "hi", *server, "--json-schema", str(tmp_path / "bad.json"))
    assert code == 2 and "bad.json: not JSON" in err
    (tmp_path / "list.json").write_text("[]")
    code, _, err = run_cli(capsys, "generate", "hi", *server, "--json-schema", str(tmp_path / "list.json"))
    assert code == 2 and "expected a JSON Schema object, got list" in err


def test_generate_choice_flags(capsys):
    for other in (("--json-object",), ("--json-schema", "s.json")):  # argparse: one format
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, "generate", "hi", "--choice", "yes", *other)
        assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    server = ("--server", "127.0.0.1:1")  # nothing is asked: the flags are checked first
    code, out, err = run_cli(capsys, "generate", "hi", *server, "--choice", "yes", "--choice", "")
    want = 'meshserve generate: error: --choice[1]: expected a non-empty string, got ""\n'  # one line, exit 2
    assert code == 2 and not out and err == want
    code, _, err = run_cli(capsys, "generate", "hi", "--model", "tiny", "--choice", "a", "--mesh", "2x2x2")
    assert code == 2 and "--choice runs in process on one device" in err
    with pytest.raises(SystemExit):
        run_cli(capsys, "generate", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--choice TEXT" in out and "(guided decoding; default: none, free text)" in out


def test_generate_in_process_follows_the_format(capsys, tmp_path):
    """In process, guided prompts run through the serving engine: two prompts x 2 samples of a random tiny model
    (whitespace biased away, as a user may) come back as JSON the schema accepts, ended by the format (stop); with
    --choice (the same batch: the same compiled engine) as one of the strings."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, "three"]}},
              "required": ["ok", "n"]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(schema))
    bias = ",".join(f"{ord(c)}:-100" for c in " \t\n\r")
    code, out, err = run_cli(capsys, "generate", "hi", "there", "--model", "tiny", "--json-schema",
                             str(tmp_path / "s.json"), "--temperature", "1", "--n", "2", "--logit-bias", bias,
                             "--max-new-tokens", "100", "--json", "--compile-cache", "off")  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(len(line["choices"]) == 2 for line in lines)
    for choice in (c for line in lines for c in line["choices"]):
        value = json.loads(choice["text"])
        assert choice["finish_reason"] == "stop" and set(value) == {"ok", "n"}, choice
        assert isinstance(value["ok"], bool) and value["n"] in (1, 2, "three")
    code, out, err = run_cli(capsys, "generate", "hi", "there", "--model", "tiny", "--choice", "positive", "--choice",
                             "negative", "--temperature", "1", "--n", "2", "--max-new-tokens", "100", "--json",
                             "--compile-cache", "off")  # fmt: skip
    got = [c for line in out.splitlines() for c in json.loads(line)["choices"]]
    assert code == 0 and len(got) == 4, err
    assert all(c["text"] in ("positive", "negative") and c["finish_reason"] == "stop" for c in got), got
    (tmp_path / "bad.json").write_text(json.dumps({"type": "string", "pattern": "(a)\\1"}))
    code, _, err = run_cli(capsys, "generate", "hi", "--model", "tiny", "--json-schema", str(tmp_path / "bad.json"))
    assert code == 2 and "schema.pattern: backreferences are not supported" in err
