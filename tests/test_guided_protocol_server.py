"""Guided decoding through real servers and the batch-generate CLI: bad response_format / guided_choice /
guided_json / guided_regex / tool_choice values answer 400 naming the field (`param`) or INVALID_ARGUMENT naming it
(a pattern past its preparation bound too, found at submit), and end to end (the engine's masks,
serving/engine_steps.py) a JSON schema request returns JSON that json.loads parses and that the schema accepts, a
guided_choice request exactly one of its strings and a guided_regex request a string the pattern fullmatches, over
HTTP, gRPC, batch-generate lines and `meshserve generate`, and tool_choice "required" / a named function returns
tool_calls with finish_reason "tool_calls" on the scripted Llama of tests/test_serving_http_tool_calls.py."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request

import pytest
from test_openai_tools import TOOLS
from test_serving_http_tool_calls import PIECES, QUESTION, checkpoint  # noqa: F401 (the scripted Llama fixture)
from test_serving_support import GRID, ServerProcess, env, make_checkpoint, meshserve

openai = pytest.importorskip("openai")

# Booleans and an enum only, so the output's length is bounded. A random tiny model likes JSON's optional whitespace
# (a space, or a newline and up to 24 indentation bytes, between two tokens), so the tests bias the whitespace bytes away (the byte tokenizer's
# ids are the bytes), as a user may: the JSON then completes well inside the 128-token context.
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
NO_SPACE = {ord(c): -100.0 for c in " \t\n\r"}
LABELS = ("red", "green", "blue")  # none a prefix of another: each answer ends with its string ("stop")
PATTERN = r"(\d{3}-\d{4}|[A-Z][a-z]{2,5}!)"  # every match ends the output: nothing may follow it ("stop")
TOO_BIG = r".{0,300}"  # a long bounded repeat: more positions than the 1024 whose masks are prepared at submit


def _matches(value) -> bool:
    return (
        isinstance(value, dict) and set(value) == {"ok", "color"} and isinstance(value["ok"], bool)
        and value["color"] in ("red", "green")
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(tiny):
    proc = ServerProcess(tiny, "--http-port", "0", "--served-model-name", "m")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def tool_server(checkpoint):  # noqa: F811 (the imported fixture)
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "hermes", "--served-model-name", "m")
    yield proc
    proc.close()


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}{path}", json.dumps({"model": "m", **body}).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string",
          "pattern": "(a)\\1"}}}}, "response_format", "response_format.json_schema: schema.pattern: backreferences are not supported"),
        ({"response_format": {"type": "json_object", "strict": True}}, "response_format",
         "response_format.strict: unknown field"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}},
         "response_format", "response_format.json_schema.name: expected 1 to 64 characters"),
        ({"guided_choice": ["yes", ""]}, "guided_choice", 'guided_choice[1]: expected a non-empty string, got ""'),
        ({"guided_choice": ["x" * 3000, "y" * 3000]}, "guided_choice",  # the server's limit (32 x 128 context)
         "guided_choice: 6000 characters exceed the limit of 4096"),
        ({"guided_json": {"type": "string", "pattern": "(a)\\1"}}, "guided_json",  # compiled by the server: renamed
         "guided_json: schema.pattern: backreferences are not supported"),
        ({"guided_json": "[]"}, "guided_json", "guided_json: expected a JSON Schema object, got []"),
        ({"guided_regex": r"(a)\1"}, "guided_regex", "guided_regex: backreferences are not supported"),
        ({"guided_regex": TOO_BIG}, "guided_regex", "guided_regex: more than 1024 positions"),  # found at submit
        ({"guided_grammar": "root ::= x"}, "guided_grammar", "guided_grammar: not supported: meshserve guides to"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format",
         "response_format: cannot be combined with guided_choice"),
    ],
)  # fmt: skip
def test_bad_formats_answer_400_naming_the_field(server, body, param, message):
    status, got = _post(server.http, "/completions", {"prompt": "hi", "max_tokens": 4, **body})
    assert status == 400, got
    assert got["error"]["param"] == param and got["error"]["message"].startswith(message), got


def test_bad_tool_choices_answer_400_naming_the_field(tool_server):
    asked = {"messages": QUESTION, "tools": TOOLS, "max_tokens": 4}
    status, got = _post(tool_server.http, "/chat/completions", {**asked, "tool_choice": "required",
                                                                 "response_format": {"type": "json_object"}})  # fmt: skip
    assert status == 400 and got["error"]["param"] == "response_format", got
    assert "cannot be combined with" in got["error"]["message"] and "tool_choice" in got["error"]["message"]
    named = {"type": "function", "function": {"name": "get_wether"}}
    status, got = _post(tool_server.http, "/chat/completions", {**asked, "tool_choice": named})
    assert status == 400 and got["error"]["param"] == "tool_choice" and 'no tool named "get_wether"' in str(got)


def test_grpc_tool_choice_none_neither_renders_nor_parses_the_tools(tool_server):
    """As the HTTP API: the template is not given the tools (the script starts from the same last token) and the
    text is not parsed, so the call's words come back as text."""
    from meshserve.serving.client import Client

    with Client(tool_server.target) as client:
        got = client.generate(messages=QUESTION, tools=TOOLS, tool_choice="none", max_new_tokens=16)
        assert got.tool_calls == [] and got.finish_reason == "stop" and got.text.split() == PIECES
        assert got.prompt_tokens == client.generate(messages=QUESTION, max_new_tokens=1).prompt_tokens


# ----- end to end: needs the engine's guided decoding -----


def test_json_schema_over_http_and_grpc_returns_json_the_schema_accepts(server):
    from meshserve.serving.client import Client

    oa = openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=120)
    got = oa.completions.create(model="m", prompt="Answer:", max_tokens=100, temperature=0, logit_bias=NO_SPACE,
                                extra_body={"response_format": JSON_SCHEMA})  # fmt: skip
    (choice,) = got.choices
    assert choice.finish_reason == "stop" and _matches(json.loads(choice.text)), choice.text
    with Client(server.target) as client:
        for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 3, "n": 2}):
            reply = client.generate(
                "Answer:", max_new_tokens=100, response_format=JSON_SCHEMA, logit_bias=NO_SPACE, **kwargs
            )
            for sample in reply.choices or [reply]:
                assert sample.finish_reason == "stop" and _matches(json.loads(sample.text)), sample.text
        # Any object: with '"' biased away too (no key can start) the only object left is {}.
        chunks = list(client.generate_stream("Answer:", max_new_tokens=100, response_format={"type": "json_object"},
                                             logit_bias={**NO_SPACE, ord('"'): -100.0}))  # fmt: skip
        text = "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop" and json.loads(text) == {}, text


def test_guided_choice_over_http_and_grpc_answers_one_of_the_strings(server):
    import grpc
    from meshserve.serving.client import Client

    oa = openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=120)
    got = oa.completions.create(model="m", prompt=["Color:", "Another:"], max_tokens=20, temperature=1.0, seed=5, n=2,
                                extra_body={"guided_choice": list(LABELS)})  # fmt: skip
    assert len(got.choices) == 4
    for choice in got.choices:
        assert choice.text in LABELS and choice.finish_reason == "stop", choice
    with Client(server.target) as client:
        reply = client.generate("Color:", max_new_tokens=20, temperature=1.0, seed=9, n=3, guided_choice=LABELS)
        for sample in reply.choices:
            assert sample.text in LABELS and sample.finish_reason == "stop", sample
        with pytest.raises(grpc.RpcError) as e:  # the server's own check (the client's is skipped)
            client.generate("Color:", validate=False, guided_choice=["red", ""])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith('response_format.choice.values[1]: expected a non-empty string, got ""')


def test_guided_regex_over_http_and_grpc_answers_a_match(server):
    """Samples of a random tiny model under a pattern fullmatch it and end with it; a pattern past the preparation
    bound is refused when queued (HTTP 400 naming guided_regex, gRPC INVALID_ARGUMENT), and the server goes on."""
    import grpc
    from meshserve.serving.client import Client

    oa = openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=120)
    got = oa.completions.create(model="m", prompt=["Phone:", "Name:"], max_tokens=20, temperature=1.0, seed=5, n=2,
                                extra_body={"guided_regex": PATTERN})  # fmt: skip
    assert len(got.choices) == 4
    for choice in got.choices:
        assert re.fullmatch(PATTERN, choice.text) and choice.finish_reason == "stop", choice
    with Client(server.target) as client:
        reply = client.generate("Phone:", max_new_tokens=20, temperature=1.0, seed=9, n=3, guided_regex=PATTERN)
        for sample in reply.choices:
            assert re.fullmatch(PATTERN, sample.text) and sample.finish_reason == "stop", sample
        with pytest.raises(grpc.RpcError) as e:  # prepared at submit: past the bound
            client.generate("Phone:", max_new_tokens=4, guided_regex=TOO_BIG)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(
            "response_format.regex: more than 1024 positions"
        )
        with pytest.raises(grpc.RpcError) as e:  # the server's own check (the client's is skipped)
            client.generate("Phone:", validate=False, guided_regex=r"(a)\1")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("response_format.regex: backreferences are not supported")
        assert re.fullmatch(PATTERN, client.generate("Name:", max_new_tokens=20, guided_regex=PATTERN).text)


def test_generate_choice_with_server(server, capsys):
    """`meshserve generate --choice ...` asking the server prints one of the strings (in process: tests/
    test_guided_protocol.py)."""
    from cli_helpers import run_cli

    flags = [f for label in LABELS for f in ("--choice", label)]
    code, out, err = run_cli(capsys, "generate", "one", "two", "--server", server.target, *flags, "--temperature", "1",
                             "--n", "2", "--max-new-tokens", "20", "--json")  # fmt: skip
    assert code == 0, err
    got = [c for line in out.splitlines() for c in json.loads(line)["choices"]]
    assert len(got) == 4 and all(c["text"] in LABELS and c["finish_reason"] == "stop" for c in got), got
    code, out, err = run_cli(capsys, "generate", "one", "--server", server.target, "--regex", PATTERN,
                             "--max-new-tokens", "20", "--json")  # fmt: skip
    assert code == 0 and re.fullmatch(PATTERN, json.loads(out)["text"]), (out, err)


def test_generate_json_schema_with_server(server, tmp_path, capsys):
    from cli_helpers import run_cli

    (tmp_path / "answer.json").write_text(json.dumps(SCHEMA))
    bias = ",".join(f"{k}:{v:g}" for k, v in NO_SPACE.items())
    code, out, err = run_cli(capsys, "generate", "Answer:", "--server", server.target, "--json-schema",
                             str(tmp_path / "answer.json"), "--logit-bias", bias, "--max-new-tokens", "100", "--json")  # fmt: skip
    assert code == 0, err
    row = json.loads(out)
    assert row["finish_reason"] == "stop" and _matches(json.loads(row["text"])), row


def test_tool_choice_required_and_named_return_calls(tool_server):
    from meshserve.serving.client import Client

    oa = openai.OpenAI(base_url=tool_server.http, api_key="none", max_retries=0, timeout=120)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        got = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice=choice,
                                         temperature=0, max_tokens=32)  # fmt: skip
        (answer,) = got.choices
        assert answer.finish_reason == "tool_calls", answer
        (call,) = answer.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    with Client(tool_server.target) as client:
        got = client.generate(messages=QUESTION, tools=TOOLS, tool_choice="required", max_new_tokens=32)
        assert got.finish_reason == "tool_calls" and [c["function"]["name"] for c in got.tool_calls] == ["get_weather"]


def test_batch_generate_lines_take_response_format(tiny, tmp_path):
    rows = [
        {"id": "bad", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
        {"id": "pattern", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
            "name": "a", "schema": {"type": "string", "pattern": "(x)\\1"}}}},
        {"id": "json", "prompt": "Answer:", "max_new_tokens": 100, "response_format": JSON_SCHEMA,
         "logit_bias": {str(k): v for k, v in NO_SPACE.items()}},
        {"id": "free", "prompt": "Answer:", "max_new_tokens": 4, "ignore_eos": True},
        {"id": "both", "prompt": "hi", "guided_choice": ["a"], "response_format": {"type": "json_object"}},
        {"id": "empty", "prompt": "hi", "guided_choice": ["a", ""]},
        {"id": "choice", "prompt": "Color:", "guided_choice": list(LABELS), "temperature": 1.0, "n": 2},
        {"id": "backref", "prompt": "hi", "guided_regex": r"(a)\1"},
        {"id": "too big", "prompt": "hi", "guided_regex": TOO_BIG, "n": 2},  # refused at submit: the job goes on
        {"id": "regex", "prompt": "Phone:", "guided_regex": PATTERN, "temperature": 1.0, "n": 2},
    ]  # fmt: skip
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = meshserve("batch-generate", str(src), "-o", str(out), "--checkpoint", str(tiny), *GRID, "--json")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)
    assert done.returncode == 0, done.stderr
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    # Lines refused while reading come first, in order; a pattern refused at submit after them.
    assert [(e["line"], e["id"]) for e in errors] == [(1, "bad"), (2, "pattern"), (5, "both"), (6, "empty"),
                                                      (8, "backref"), (9, "too big")]  # fmt: skip
    assert errors[0]["error"].startswith("response_format.json_schema.schema: expected a JSON Schema object")
    assert errors[1]["error"].startswith(
        "response_format.json_schema: schema.pattern: backreferences are not supported"
    )
    assert errors[2]["error"].startswith("response_format: cannot be combined with guided_choice")
    assert errors[3]["error"].startswith('guided_choice[1]: expected a non-empty string, got ""')
    assert errors[4]["error"].startswith("guided_regex: backreferences are not supported")
    assert errors[5]["error"].startswith("guided_regex: more than 1024 positions to prepare token masks")
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(results) == {"json", "free", "choice", "regex"} and len(results["free"]["tokens"]) == 4
    assert results["json"]["finish_reason"] == "stop" and _matches(json.loads(results["json"]["text"]))
    for sample in results["choice"]["choices"]:
        assert sample["text"] in LABELS and sample["finish_reason"] == "stop", sample
    for sample in results["regex"]["choices"]:
        assert re.fullmatch(PATTERN, sample["text"]) and sample["finish_reason"] == "stop", sample
