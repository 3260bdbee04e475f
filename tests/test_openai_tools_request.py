"""Tool calling's request side without a server (serving/openai_tools.py, model/chat.py): `tools` / `tool_choice` /
tool messages refused naming the field, and a Qwen2.5-style tool template rendered by meshserve (OpenAI's JSON ->
proto -> RequestParser -> template) equal to transformers' apply_chat_template(messages, tools=tools,
add_generation_prompt=True). The parser and the answer are in tests/test_openai_tools.py (with the shared TOOLS).
"""

from __future__ import annotations

import copy
import json

import pytest
from meshserve.model.chat import ChatError, ChatTemplate, check_messages, render_chat
from meshserve.serving.openai_protocol import CHAT, parse_body
from meshserve.serving.openai_tools import MAX_TOOLS, check_tools, request_tools
from meshserve.serving.validation import RequestError
from test_openai_tools import TOOL_CONVERSATION, TOOL_TEMPLATE, TOOLS, hf_conversation

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
    assert message.startswith('tool_choice.function.name: no tool named "nope"')
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
        ([{"type": "retrieval", "function": {"name": "f"}}], 'tools[0].type: must be "function"'),
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
         'messages[1].tool_calls[0].type: must be "function"'),
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
