"""Tool calling through a real `meshserve serve --http-port 0 --tool-call-parser hermes` and the official `openai`
client: the tools reach the chat template (the prompt's token count equals transformers' rendering with
tools=...), a conversation with assistant tool calls and tool results is answered, a stream with tools ends as the
whole answer does, and bad tool fields answer 400 naming the field; a server without the flag refuses `tools`.

The model is test_chat's tiny random Llama with its ChatML word tokenizer and test_openai_tools' Qwen2.5-style tool
template; it never writes a <tool_call> (its words are w3 ... w95), so what a call looks like is tested on the
parser and the response objects in tests/test_openai_tools.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshserve.serving.cli import main
from test_chat import _chatml_tokenizer
from test_hf_llama import make_model
from test_openai_tools import TOOL_CONVERSATION, TOOL_TEMPLATE, TOOLS, hf_conversation
from test_serving_http import _post_url
from test_serving_support import ServerProcess

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w20 w21 w22"}]


def save_tool_chat_model(directory: Path) -> Path:
    """test_chat's ChatML Llama with the tool template, 256 positions (the tools' text is ~100 words), saved as a
    Hugging Face directory."""
    make_model(directory, "llama", positions=256)
    _chatml_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_tool_chat_model(tmp_path_factory.mktemp("hf") / "llama-tools")


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "llama-tools-ms"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(out)]) == 0
    proc = ServerProcess(out, "--http-port", "0", "--tool-call-parser", "hermes", "--served-model-name", "tools")
    proc.checkpoint = out
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=60)


def hf_prompt_tokens(hf_tokenizer, messages, tools=None) -> int:
    ids = hf_tokenizer.apply_chat_template(
        hf_conversation(messages), tools=tools, add_generation_prompt=True, tokenize=True
    )
    return len(getattr(ids, "input_ids", ids))  # a BatchEncoding in transformers 5, a list before


def test_a_chat_with_tools_renders_them(server, oa, hf_tokenizer):
    got = oa.chat.completions.create(model="tools", messages=QUESTION, tools=TOOLS, max_tokens=6, temperature=0)
    (choice,) = got.choices
    # The random model writes words, never a <tool_call>: the text comes back as content, no calls.
    assert choice.message.content and choice.message.tool_calls is None and choice.finish_reason != "tool_calls"
    assert got.usage.prompt_tokens == hf_prompt_tokens(hf_tokenizer, QUESTION, TOOLS)
    without = hf_prompt_tokens(hf_tokenizer, QUESTION)
    assert got.usage.prompt_tokens > without + 30  # the tools' section was rendered
    # tool_choice none: the template is not told about the tools.
    none = oa.chat.completions.create(
        model="tools", messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0
    )
    assert none.usage.prompt_tokens == without
    assert oa.chat.completions.create(model="tools", messages=QUESTION, max_tokens=1).usage.prompt_tokens == without
    # POST /tokenize counts the same prompt (tools rendered); a text prompt takes no tools.
    status, body = _post_url(server.http, "/tokenize", {"messages": QUESTION, "tools": TOOLS}, token=None)
    assert status == 200 and body["count"] == got.usage.prompt_tokens, body
    status, body = _post_url(server.http, "/tokenize", {"prompt": "w5", "tools": TOOLS}, token=None)
    assert status == 400 and body["error"]["message"].startswith("tools: only messages take tools"), body


def test_tool_calls_and_tool_results_are_accepted(oa, hf_tokenizer):
    got = oa.chat.completions.create(
        model="tools", messages=TOOL_CONVERSATION, tools=TOOLS, parallel_tool_calls=False, max_tokens=4, n=2
    )
    assert len(got.choices) == 2 and all(c.message.content for c in got.choices)
    assert got.usage.prompt_tokens == hf_prompt_tokens(hf_tokenizer, TOOL_CONVERSATION, TOOLS)
    assert 2 <= got.usage.completion_tokens <= 8  # two samples of at most 4 tokens


def test_a_stream_with_tools_ends_as_the_whole_answer(oa):
    kw = dict(model="tools", messages=QUESTION, tools=TOOLS, max_tokens=6, temperature=0)
    whole = oa.chat.completions.create(**kw)
    chunks = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def _bad(server, body: dict) -> dict:
    status, data = _post_url(server.http, "/v1/chat/completions", {"model": "tools", "max_tokens": 2, **body}, None)
    assert status == 400, data
    return data["error"]


def test_bad_tool_fields_are_named(server):
    asked = {"messages": QUESTION, "tools": TOOLS}
    error = _bad(server, {**asked, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert error["param"] == "tool_choice" and 'no tool named "nope"' in error["message"]
    error = _bad(server, {**asked, "tools": [TOOLS[0], {"type": "function", "function": {"description": "?"}}]})
    assert error["param"] == "tools" and error["message"].startswith("tools[1].function.name:")
    bad_args = json.loads(json.dumps(TOOL_CONVERSATION))
    bad_args[2]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    error = _bad(server, {**asked, "messages": bad_args})
    assert error["param"] == "messages"
    assert error["message"].startswith("messages[2].tool_calls[0].function.arguments: not JSON")
    no_id = [*QUESTION, {"role": "tool", "content": "21"}]
    error = _bad(server, {**asked, "messages": no_id})
    assert error["param"] == "messages" and error["message"].startswith("messages[2].tool_call_id:")


def test_tools_without_the_flag_are_refused(server):
    plain = ServerProcess(server.checkpoint, "--http-port", "0", "--served-model-name", "tools")
    try:
        error = _bad(plain, {"messages": QUESTION, "tools": TOOLS})
        assert error["param"] == "tools" and "--tool-call-parser hermes" in error["message"]
        # Tool messages need no flag: a conversation that used tools elsewhere is still a conversation.
        status, _ = _post_url(plain.http, "/v1/chat/completions", {"messages": TOOL_CONVERSATION, "max_tokens": 1})
        assert status == 200
    finally:
        plain.close()


def test_grpc_takes_tools_and_tool_messages(server, hf_tokenizer):
    """The same conversation as GenerateRequest.messages (ToolCall protos, tools_json): the same prompt."""
    import grpc
    from meshserve.protos import inference_pb2 as pb
    from meshserve.protos import inference_pb2_grpc

    messages = []
    for m in TOOL_CONVERSATION:
        calls = [pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                 for c in m.get("tool_calls") or []]  # fmt: skip
        messages.append(pb.ChatMessage(role=m["role"], content=m["content"] or "", tool_calls=calls,
                                       tool_call_id=m.get("tool_call_id", "")))  # fmt: skip
    chat = pb.ChatMessages(messages=messages, tools_json=json.dumps(TOOLS))
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Generate(pb.GenerateRequest(messages=chat, max_new_tokens=2), timeout=60)
        assert reply.usage.prompt_tokens == hf_prompt_tokens(hf_tokenizer, TOOL_CONVERSATION, TOOLS)
        chat.messages[3].tool_call_id = ""
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(messages=chat, max_new_tokens=2), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("messages[3].tool_call_id:")


def test_the_python_client_sends_tools_and_tool_messages(server, hf_tokenizer):
    """meshserve.serving.client.Client(messages=..., tools=...): OpenAI-style dicts become the same protos."""
    from meshserve.serving.client import Client, InvalidRequest

    with Client(server.target) as client:
        reply = client.generate(messages=TOOL_CONVERSATION, tools=TOOLS, max_new_tokens=2)
        assert reply.prompt_tokens == hf_prompt_tokens(hf_tokenizer, TOOL_CONVERSATION, TOOLS)
        with pytest.raises(InvalidRequest, match="tools: only a chat"):
            client.generate("w5 w6", tools=TOOLS, max_new_tokens=2)


def test_continue_final_message_and_add_generation_prompt_render_as_transformers(server, oa, hf_tokenizer):
    started = [*QUESTION, {"role": "assistant", "content": "w30 w31"}]
    cases = [(started, {"continue_final_message": True, "add_generation_prompt": False}),
             (QUESTION, {"add_generation_prompt": False}), (QUESTION, {})]  # fmt: skip
    for messages, options in cases:  # before: 400 unknown field
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, **{"add_generation_prompt": True,
                                                                                **options})  # fmt: skip
        expected = list(getattr(expected, "input_ids", expected))
        status, got = _post_url(server.http, "/tokenize", {"messages": messages, **options}, token=None)
        assert (status, got["tokens"]) == (200, expected)
        answer = oa.chat.completions.create(model="tools", messages=messages, max_tokens=2, extra_body=options)
        assert answer.usage.prompt_tokens == len(expected)
    for body, param, message in [
        ({"messages": started, "continue_final_message": True}, "add_generation_prompt",
         "add_generation_prompt: must be false with continue_final_message: true"),
        ({"messages": QUESTION, "continue_final_message": True, "add_generation_prompt": False},
         "continue_final_message", "continue_final_message: continues the assistant's last message, and messages[1]"),
        ({"messages": QUESTION, "add_generation_prompt": 0}, "add_generation_prompt",
         "add_generation_prompt: expected true or false"),
        ({"messages": QUESTION, "chat_template_kwargs": {"continue_final_message": 1}}, "chat_template_kwargs",
         "chat_template_kwargs.continue_final_message: expected true or false"),
    ]:  # fmt: skip
        status, got = _post_url(server.http, "/v1/chat/completions", body, token=None)
        assert (status, got["error"]["param"]) == (400, param) and got["error"]["message"].startswith(message), got


def test_a_chat_stream_with_continuous_usage_stats(oa):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(oa.chat.completions.create(model="tools", messages=QUESTION, max_tokens=3, stream=True,
                                             stream_options=options, extra_body={"ignore_eos": True}))  # fmt: skip
    done = [c.usage.completion_tokens for c in chunks]  # the role's chunk first: 0
    assert done[0] == 0 and done == sorted(done) and done[-1] == 3 and chunks[-1].choices == []
    assert len({c.usage.prompt_tokens for c in chunks}) == 1 and chunks[-1].usage.prompt_tokens_details is not None
