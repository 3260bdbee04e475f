"""POST /v1/responses (OpenAI's Responses API, serving/openai_responses_api.py) end to end: test_reasoning_server's
scripted thinking Qwen3 ("<think> w30 w31 </think>" then a Hermes call) served with `--reasoning-parser qwen3
--tool-call-parser hermes`, driven by the official `openai` client (`client.responses.create`, whole and streamed:
the client parses each event into its typed class, and each raw body is validated strictly against
openai.types.responses here). Checked: the reasoning item and the function_call item, usage (reasoning tokens
counted), a function call's round trip (function_call_output in the next input renders as the chat route's tool
message), json_schema output, max_output_tokens -> incomplete, sampled text equal to /v1/chat/completions' with the
same seed, output_text log-probs, and refusals with 400 naming the field. The request mapping and error renaming are
also checked without a server.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from urllib.parse import urlsplit

import pytest
from cli_helpers import free_port
from meshserve.serving.openai_protocol import HttpError
from meshserve.serving.openai_responses_api import responses_request
from test_openai_tools import TOOLS
from test_reasoning_server import CALL, checkpoint  # noqa: F401 (the scripted thinking model's fixture)
from test_serving_http_support import _cancelled, _metric, _wait_for
from test_serving_support import ServerProcess, slow_decode, slowed

openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import BaseModel, TypeAdapter  # noqa: E402

TOOLS_FLAT = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses' tool shape
ASK = "w20 w21"
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """Decode steps are slowed (by 0.2 s) only while the flag file exists (a client leaving mid-answer)."""
    flag, metrics_port = tmp_path_factory.mktemp("flag") / "slow", free_port()
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                         "--served-model-name", "m", "--metrics-port", str(metrics_port),
                         python_code=slow_decode(0.2, while_exists=flag))  # fmt: skip
    proc.metrics_port, proc.flag = metrics_port, flag
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=60)


def _no_extras(obj) -> None:
    """No field the openai package's type lacks, at any depth (pydantic keeps unknown keys in model_extra)."""
    if isinstance(obj, list):
        for item in obj:
            _no_extras(item)
    elif isinstance(obj, BaseModel):
        assert not obj.model_extra, f"{type(obj).__name__} has no fields {sorted(obj.model_extra)}"
        for name in type(obj).model_fields:
            _no_extras(getattr(obj, name))


def _create(oa, **kwargs) -> Response:
    """client.responses.create, its raw body validated strictly (every required field, every type, no extras)."""
    raw = oa.responses.with_raw_response.create(model="m", **kwargs)
    response = Response.model_validate(raw.http_response.json())
    _no_extras(response)
    return response


def _raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """A streamed request's (event line, data) pairs, read off the wire."""
    request = urllib.request.Request(server.http + "/responses", json.dumps({"model": "m", **body}).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as answer:
        text = answer.read().decode()
    out = []
    for block in text.strip().split("\n\n"):
        event, data = block.split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_reasoning_then_a_function_call(oa):
    r = _create(oa, input=ASK, tools=TOOLS_FLAT, temperature=0, metadata={"k": "v"})
    assert r.status == "completed" and r.id.startswith("resp_") and r.object == "response"
    assert [item.type for item in r.output] == ["reasoning", "function_call"]
    reasoning, call = r.output
    assert reasoning.id.startswith("rs_") and [c.text.split() for c in reasoning.content] == [["w30", "w31"]]
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    u = r.usage  # "<think> w30 w31 </think>", the call's 7 words, </s>
    assert (u.output_tokens, u.output_tokens_details.reasoning_tokens) == (4 + len(CALL) + 1, 4)
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.input_tokens_details.cached_tokens >= 0
    assert r.tools[0].name == "get_weather" and r.tool_choice == "auto" and r.parallel_tool_calls is True
    assert (r.temperature, r.top_p, r.metadata, r.output_text) == (0.0, 1.0, {"k": "v"}, "")


def test_streamed_events_build_the_same_response(oa, server):
    """The events in order with increasing sequence numbers, each `event:` line its data's type, each valid as
    its typed class; the deltas join to the final Response's items, which equal the whole answer's."""
    body = {"input": ASK, "tools": TOOLS_FLAT, "temperature": 0, "stream": True}
    events = _raw_events(server, body)
    assert all(line == data["type"] for line, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    typed = [EVENT.validate_python(data) for _, data in events]
    _no_extras(typed)
    kinds = [e.type for e in typed]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-1] == "response.completed" and typed[0].response.status == "in_progress"
    reasoning = "".join(e.delta for e in typed if e.type == "response.reasoning_text.delta")
    arguments = "".join(e.delta for e in typed if e.type == "response.function_call_arguments.delta")
    assert reasoning.split() == ["w30", "w31"] and kinds.count("response.function_call_arguments.delta") >= 2
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.function_call_arguments.delta")
    final = typed[-1].response
    done = [e.item for e in typed if e.type == "response.output_item.done"]
    assert [item.model_dump() for item in final.output] == [item.model_dump() for item in done]
    assert final.output[1].arguments == arguments and json.loads(arguments) == {"city": "Paris"}
    whole = _create(oa, input=ASK, tools=TOOLS_FLAT, temperature=0)
    strip = {"id", "call_id"}
    assert [i.model_dump(exclude=strip) for i in final.output] == [i.model_dump(exclude=strip) for i in whole.output]
    assert final.usage == whole.usage
    with oa.responses.create(model="m", input=ASK, tools=TOOLS_FLAT, stream=True) as stream:  # the client's types
        names = [type(e).__name__ for e in stream]
    assert {"ResponseReasoningTextDeltaEvent", "ResponseFunctionCallArgumentsDoneEvent"} <= set(names)


def test_a_function_call_round_trip(oa, server):
    """The call's output sent back with the conversation: the items render as the chat route's messages (the same
    prompt length as that chat's), and the model answers again."""
    first = _create(oa, input=ASK, tools=TOOLS_FLAT, temperature=0)
    reasoning, call = first.output
    history = [{"role": "user", "content": ASK}, reasoning.model_dump(exclude_none=True),
               call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "w40"}]  # fmt: skip
    again = _create(oa, input=history, tools=TOOLS_FLAT, temperature=0, instructions="w41")
    chat = oa.chat.completions.create(model="m", temperature=0, tools=TOOLS, messages=[
        {"role": "system", "content": "w41"}, {"role": "user", "content": ASK},
        {"role": "assistant", "content": "", "reasoning_content": reasoning.content[0].text, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "w40"}])  # fmt: skip
    assert again.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens
    assert again.instructions == "w41" and [i.type for i in again.output] == ["reasoning", "function_call"]


def test_structured_output_parses(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "name": "call", "schema": schema, "strict": True}
    r = _create(oa, input=ASK, temperature=0, text={"format": fmt})
    assert r.status == "completed" and [i.type for i in r.output] == ["reasoning", "message"]
    assert json.loads(r.output_text) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert r.text.format.type == "json_schema" and r.text.format.schema_ == schema


def test_max_output_tokens_makes_it_incomplete(oa, server):
    r = _create(oa, input=ASK, temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(i.type, i.status) for i in r.output] == [("reasoning", "incomplete")] and r.max_output_tokens == 3
    assert (r.usage.output_tokens, r.usage.output_tokens_details.reasoning_tokens) == (3, 3)  # cut inside the block
    events = _raw_events(server, {"input": ASK, "max_output_tokens": 3, "stream": True})
    assert events[-1][0] == "response.incomplete" and events[-1][1]["response"]["status"] == "incomplete"


def _token(server, word: str) -> int:
    body = json.dumps({"prompt": word}).encode()  # this tokenizer adds no BOS
    with urllib.request.urlopen(urllib.request.Request(server.http.removesuffix("/v1") + "/tokenize", body)) as r:
        (token,) = json.loads(r.read())["tokens"]
    return token


def test_sampled_text_equals_the_chat_routes(oa, server):
    """With the script's first word biased away the model samples words at random: the same seed gives the same
    text through both routes, and the same usage."""
    bias = {str(_token(server, "<think>")): -100}
    extra = {"seed": 11, "logit_bias": bias}
    r = _create(oa, input=ASK, temperature=1.0, max_output_tokens=12, extra_body=extra)
    chat = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": ASK}], temperature=1.0,
                                      max_tokens=12, seed=11, logit_bias=bias)  # fmt: skip
    assert r.output_text == chat.choices[0].message.content and len(r.output_text.split()) >= 6
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    other = _create(oa, input=ASK, temperature=1.0, max_output_tokens=12, extra_body={**extra, "seed": 12})
    assert other.output_text != r.output_text


def test_a_client_that_goes_away_is_cancelled(oa, server):
    """A stream left after its first events, and a plain request whose connection closes while it runs: both are
    cancelled (their slots freed), as the chat route's."""
    before = _cancelled(server)
    long = {"max_output_tokens": 200, "extra_body": {"ignore_eos": True, "logit_bias": {str(_token(server, "<think>")):
                                                                                      -100}}}  # fmt: skip
    with slowed(server.flag):
        stream = oa.responses.create(model="m", input=ASK, stream=True, **long)
        for _, _event in zip(range(4), stream, strict=False):
            pass
        stream.close()
        assert _wait_for(lambda: _cancelled(server) >= before + 1, timeout=60), "the stream was not cancelled"
        url = urlsplit(server.http)
        body = json.dumps({"model": "m", "input": ASK, "max_output_tokens": 200, **long["extra_body"]}).encode()
        live = lambda: _metric(server, "meshserve_live_slots")  # noqa: E731
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)  # fmt: skip
            assert _wait_for(lambda: live() >= 1, timeout=30), "the plain request never started"
        assert _wait_for(lambda: _cancelled(server) >= before + 2, timeout=60), "the plain request was not cancelled"
    cancelled = {"method": "POST /v1/responses", "code": "CANCELLED"}  # counted after the engine's cancel
    assert _wait_for(lambda: _metric(server, "meshserve_requests_total", **cancelled) == 2)


def test_output_text_log_probs(oa):
    r = _create(oa, input=ASK, temperature=0, include=["message.output_text.logprobs"], top_logprobs=2)
    (text,) = r.output[1].content
    assert [lp.token for lp in text.logprobs] == CALL  # the message's tokens (not the reasoning's)
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token for lp in text.logprobs)
    assert r.top_logprobs == 2


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
        ({"store": True}, "store", "store: true is not supported"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown field"),
        ({"tools": [{"type": "web_search"}]}, "tools", "tools[0].type: only function tools"),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens must be in [1,"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
         "input[0].content[0]: input_image is not supported"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS_FLAT}, "tool_choice",
         'tool_choice.name: no tool named "nope"'),
    ],
)  # fmt: skip
def test_refusals_name_the_field(oa, kwargs, param, words):
    kwargs.setdefault("input", ASK)
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="m", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param and words in e.value.body["message"]


# ----- without a server -----


def test_input_items_become_chat_messages():
    body = {"instructions": "be brief", "input": [
        {"role": "developer", "content": "d"}, {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                              {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"}],
        "max_output_tokens": 5, "text": {"format": {"type": "json_object"}},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}  # fmt: skip
    r = responses_request(body, "m")
    assert [m["role"] for m in r.chat["messages"]] == ["system", "system", "user", "assistant", "tool"]
    assert r.chat["messages"][2]["content"] == "a\nb"
    assistant = r.chat["messages"][3]
    assert (assistant["content"], assistant["reasoning_content"]) == ("x", "hm")
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert r.chat["messages"][4] == {"role": "tool", "tool_call_id": "c1", "content": "1"}
    assert r.chat["max_tokens"] == 5 and r.chat["response_format"] == {"type": "json_object"}
    assert r.chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert r.call_sources[3] == ["input[4]", "input[5]"] and r.sources[4] == "input[6]"
    # The chat route's errors, as this body named the fields:
    for chat, ours in [("messages[3].tool_calls[1].function.arguments: not JSON", "input[5].arguments: not JSON"),
                       ("messages[4].tool_call_id: unknown", "input[6].call_id: unknown"),
                       ("messages[4].content: too long", "input[6].output: too long"),
                       ("messages[2].content: too long", "input[1].content: too long"),
                       ("messages[0].content: bad", "instructions.content: bad"),
                       ("max_tokens must be in [1, 8]", "max_output_tokens must be in [1, 8]"),
                       ("response_format.json_schema.schema: bad", "text.format.schema: bad"),
                       ("tools[0].function.name: bad", "tools[0].name: bad")]:  # fmt: skip
        renamed = r.renamed(HttpError(400, chat, "x"))
        assert str(renamed) == ours and renamed.param == ours.split(".")[0].split("[")[0].split(" ")[0]


@pytest.mark.parametrize(
    "body,field",
    [({"input": []}, "input"), ({"input": "a", "background": True}, "background"),
     ({"input": "a", "conversation": "c"}, "conversation"), ({"input": [{"type": "item_reference", "id": "x"}]},
     "input[0].type"), ({"input": "a", "include": ["reasoning.encrypted_content"]}, "include[0]"),
     ({"input": "a", "top_logprobs": 2}, "top_logprobs"), ({"input": "a", "truncation": "auto"}, "truncation"),
     ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role")],
)  # fmt: skip
def test_bad_bodies_are_refused_by_name(body, field):
    with pytest.raises(HttpError) as e:
        responses_request(body, "m")
    assert e.value.status == 400 and str(e.value).startswith(field + ":")
