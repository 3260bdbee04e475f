"""vLLM's guided_regex where it enters (no server here; tests/test_guided_protocol_server.py runs it through real
servers and batch-generate): gRPC's ResponseFormat.regex through RequestParser (the GuideSpec every sample carries,
bad patterns named response_format.regex), HTTP bodies' guided_regex on chat and completions (named guided_regex,
at most one format), the Python client's guided_regex= keyword, and `meshserve generate --regex` (flags, one-line
errors, and in process on the tiny model: the output fullmatches the pattern)."""

from __future__ import annotations

import json
import re

import pytest
from cli_helpers import run_cli
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.client import Client, InvalidRequest
from meshserve.serving.guided.spec import GuideSpec
from meshserve.serving.guided_requests import format_proto, submit_error
from meshserve.serving.openai_protocol import CHAT, COMPLETIONS, openai_error, parse_body
from meshserve.serving.validation import Limits, RequestError, RequestParser
from test_openai_tools import TOOLS

PATTERN = r"(\d{3}-\d{4}|[A-Z][a-z]{2,5}!)"
CHAT_MESSAGES = [{"role": "user", "content": "hi"}]
LIMITS = Limits(max_context=4096, max_batch=1, max_new_tokens=8, max_queue=4, max_text_chars=10_000)


@pytest.fixture(scope="module")
def parser():
    from meshserve.model.loading import load_model

    return RequestParser(load_model(preset="tiny"), LIMITS)


def _regex(pattern: str, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="hi", max_new_tokens=4, response_format=pb.ResponseFormat(regex=pattern), **fields)


# ----- gRPC: RequestParser -----


def test_a_regex_format_becomes_the_requests_guide(parser):
    requests, _ = parser.samples(_regex(PATTERN, n=3), None)
    assert [r.guide for r in requests] == [GuideSpec("regex", pattern=PATTERN)] * 3  # every sample follows it
    assert format_proto(requests[0].guide) == pb.ResponseFormat(regex=PATTERN)  # and back: what a client sends


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a)\1", "response_format.regex: backreferences are not supported"),
        (r"a(?=b)", "response_format.regex: lookaheads/lookbehinds are not supported"),
        (r"(?i)abc", "response_format.regex: flags are not supported"),
        ("", "response_format.regex: expected a non-empty pattern"),  # set to "" is set (a oneof member)
        ("[a-", "response_format.regex: not a valid regular expression"),
        ("a" * 5000, "response_format.regex: 5000 characters exceed the limit of 4096"),
        (
            "a" * 10_001,
            "response_format.regex: 10001 characters exceed the limit of 4096",
        ),  # 4096 before max_text_chars
    ],
    ids=lambda x: x[:30] if isinstance(x, str) else None,
)
def test_bad_grpc_patterns_are_named(parser, pattern, message):
    with pytest.raises(RequestError) as e:
        parser.generate(_regex(pattern), None)
    assert str(e.value).startswith(message), str(e.value)


# ----- HTTP bodies -----


def test_http_guided_regex_carries_into_the_proto():
    for kind, base in ((COMPLETIONS, {"prompt": ["x", "y"]}), (CHAT, {"messages": CHAT_MESSAGES})):
        parsed = parse_body(kind, {**base, "guided_regex": PATTERN, "response_format": {"type": "text"}, "n": 2}, "m")
        assert parsed.guide_field == "guided_regex"
        assert all(r.response_format == pb.ResponseFormat(regex=PATTERN) for r in parsed.requests)


BAD_HTTP = [
    ({"guided_regex": 5}, "guided_regex: expected a regular expression (a string), got 5", "guided_regex"),
    ({"guided_regex": ""}, "guided_regex: expected a non-empty pattern", "guided_regex"),
    ({"guided_regex": r"(a)\1"}, "guided_regex: backreferences are not supported", "guided_regex"),
    ({"guided_regex": r"a\bb"}, "guided_regex: the anchor \\b is supported only as ^ at the start", "guided_regex"),
    ({"guided_regex": "a" * 4097}, "guided_regex: 4097 characters exceed the limit of 4096", "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice: cannot be combined with guided_regex",
     "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}},
     "response_format: cannot be combined with guided_regex", "response_format"),
    ({"guided_regex": "a", "tools": TOOLS, "tool_choice": "required"},
     'guided_regex: cannot be combined with tool_choice "required"', "guided_regex"),
    ({"guided_grammar": "root ::= x"}, "guided_grammar: not supported: meshserve guides to JSON, JSON Schema, choices "
     "and regular expressions (response_format, guided_json, guided_choice, guided_regex)", "guided_grammar"),
]  # fmt: skip


@pytest.mark.parametrize("body, message, param", BAD_HTTP, ids=[m[:40] for _, m, _ in BAD_HTTP])
def test_bad_guided_regex_bodies_name_the_field(body, message, param):
    for kind, base in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": CHAT_MESSAGES})):
        if kind == COMPLETIONS and "tools" in body:
            continue  # tools are a chat's
        with pytest.raises(RequestError) as e:
            parse_body(kind, {**base, **body}, "m", "hermes")
        got, got_param = openai_error(kind, e.value)
        assert got.startswith(message) and got_param == param, got


def test_server_side_regex_errors_are_named_guided_regex_over_http():
    """RequestParser's gRPC names (a body's pattern checked again by the server) and a pattern refused at submit
    (the orchestrator preparing its masks: http_server passes parsed.guide_field) come back named guided_regex."""
    got = openai_error(COMPLETIONS, RequestError("response_format.regex: 9000 characters exceed the limit of 4096"))
    assert got == ("guided_regex: 9000 characters exceed the limit of 4096", "guided_regex")
    why = "pattern: more than 1024 positions to prepare token masks for (use * or + ...)"
    assert submit_error(why, "guided_regex") == (
        "guided_regex: more than 1024 positions to prepare token masks for (use * or + ...)", "guided_regex")  # fmt: skip
    assert submit_error("schema: too many open alternatives", "guided_json")[1] == "guided_json"


# ----- the Python client -----


def test_client_guided_regex_keyword():
    assert Client.request("hi", guided_regex=PATTERN).response_format == pb.ResponseFormat(regex=PATTERN)
    raw = Client.request("hi", validate=False, guided_regex=r"(a)\1")  # sent as given, for the server to refuse
    assert raw.response_format.regex == r"(a)\1"
    assert Client.request("hi", validate=False, guided_regex="").response_format.WhichOneof("format") == "regex"
    for kwargs, message in [
        ({"guided_regex": 3}, "guided_regex: expected a regular expression (a string), got 3"),
        ({"guided_regex": r"(a)\1"}, "guided_regex: backreferences are not supported"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice: cannot be combined with guided_regex"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format: cannot be combined"),
        ({"guided_regex": 3, "validate": False}, "guided_regex: the proto field holds a string, got 3"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            Client.request("hi", **kwargs)
        assert str(e.value).startswith(message), str(e.value)


# ----- meshserve generate --regex -----


def test_generate_regex_flags(capsys):
    for other in (("--json-object",), ("--choice", "a")):  # argparse: one format
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, "generate", "hi", "--regex", "a", *other)
        assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    server = ("--server", "127.0.0.1:1")  # nothing is asked: the flag is checked first
    code, out, err = run_cli(capsys, "generate", "hi", *server, "--regex", r"(a)\1")
    assert code == 2 and not out and err == "meshserve generate: error: --regex: backreferences are not supported\n"
    code, _, err = run_cli(capsys, "generate", "hi", "--model", "tiny", "--regex", "a", "--mesh", "2x2x2")
    assert code == 2 and "--regex runs in process on one device" in err
    with pytest.raises(SystemExit):
        run_cli(capsys, "generate", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--regex PATTERN" in out and "vLLM's guided_regex" in out and "default: none, free text)" in out


def test_generate_regex_in_process_follows_the_pattern(capsys):
    """Two prompts x 2 samples of a random tiny model through the serving engine: each fullmatches the pattern and
    ends with it (stop); a pattern past the preparation bound is one line naming --regex, exit 2."""
    common = ("--model", "tiny", "--max-new-tokens", "20", "--json", "--compile-cache", "off")
    code, out, err = run_cli(capsys, "generate", "hi", "there", "--regex", PATTERN, "--temperature", "1", "--n", "2",
                             *common)  # fmt: skip
    assert code == 0, err
    got = [c for line in out.splitlines() for c in json.loads(line)["choices"]]
    assert len(got) == 4 and all(re.fullmatch(PATTERN, c["text"]) and c["finish_reason"] == "stop" for c in got), got
    code, out, err = run_cli(capsys, "generate", "hi", "--regex", ".{0,300}", *common)
    assert code == 2 and not out and "error: --regex: more than 1024 positions to prepare" in err, err
