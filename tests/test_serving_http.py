"""The OpenAI-compatible HTTP API (`meshserve serve --http-port`), end to end: a real server process, the official
`openai` Python client and raw HTTP. Its answers equal the gRPC API's on the same server (greedy text, usage, seeded
samples); streams concatenate to the whole answer; bad fields answer 400 naming the OpenAI field and the limit; a
client that goes away frees its slot; the request log has a line per request. One server for the whole module
(fixtures and helpers in tests/test_serving_http_support.py); drain, TLS and the connection cap, each on a server of
its own, are in tests/test_serving_http_connections.py.
"""

# ruff: noqa: F811  (the tests take test_serving_http_support's fixtures as arguments)

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from urllib.parse import urlsplit

import grpc
import numpy as np
import pytest
from test_chat import CONVERSATION
from test_serving_http_support import (  # noqa: F401 (the module's fixtures; _post_url for test_serving_http_tools)
    PROMPT,
    TOKEN,
    _cancelled,
    _metric,
    _post,
    _post_to,
    _post_url,
    _raw,
    _request_lines,
    _wait_for,
    checkpoint,
    grpc_client,
    oa,
    server,
)

openai = pytest.importorskip("openai")


def test_completions_equal_grpc(oa, grpc_client, checkpoint):
    want = grpc_client.generate(PROMPT, max_new_tokens=6)  # gRPC: greedy by default
    got = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert got.object == "text_completion" and got.model == "chat-tiny" and got.id.startswith("cmpl-")
    (choice,) = got.choices
    assert choice.text == want.text and choice.finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.generated_tokens)
    assert got.usage.total_tokens == want.prompt_tokens + 6
    # A token prompt is the same request; the model field may be left out.
    from meshserve.model.loading import load_model

    ids = load_model(checkpoint).encode_prompt(PROMPT)
    status, raw = _post_to(oa, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert status == 200 and raw["choices"][0]["text"] == want.text and raw["model"] == "chat-tiny"
    assert [m.id for m in oa.models.list().data] == ["chat-tiny"]


def test_chat_equal_grpc(oa, grpc_client):
    want = grpc_client.generate(messages=CONVERSATION, max_new_tokens=6)
    got = oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, max_tokens=6, temperature=0)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    (choice,) = got.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == 6
    # Content as a list of text parts; max_completion_tokens as OpenAI's newer name for max_tokens.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    again = oa.chat.completions.create(model="chat-tiny", messages=parts, max_completion_tokens=6, temperature=0)
    assert again.choices[0].message.content == want.text


def test_streams_concatenate_to_the_whole_answer(oa):
    whole = oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, max_tokens=8, temperature=0)
    chunks = list(oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    # The usage chunk counts as the whole answer did; only the prefix-cache hits differ (the stream's prompt can
    # reuse what the whole answer's prefill left in the cache), and they are within the prompt.
    usage, want = chunks[-1].usage, whole.usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        want.prompt_tokens, want.completion_tokens, want.total_tokens)  # fmt: skip
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    # n = 2 sampled with a seed: each streamed choice equals the unary answer's, sample i with seed + i.
    kw = dict(model="chat-tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    unary = oa.completions.create(n=2, **kw)
    streamed = {0: "", 1: ""}
    for c in oa.completions.create(n=2, stream=True, **kw):
        for choice in c.choices:
            streamed[choice.index] += choice.text
    assert streamed == {c.index: c.text for c in unary.choices}
    assert oa.completions.create(**{**kw, "seed": 8}).choices[0].text == streamed[1]


def test_logprobs(oa):
    got = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens == 5
    lengths = [len(t) for t in lp.tokens]
    assert lp.text_offset == [sum(lengths[:i]) for i in range(5)]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(chosen, abs=1e-5)  # greedy: the best one
        assert chosen == pytest.approx(max(top.values()), abs=1e-5) and chosen <= 0
    chat = oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, max_tokens=4, temperature=0,
                                      logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    plain = oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_several_prompts(oa):
    one = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    other = oa.completions.create(model="chat-tiny", prompt="w9 w10", max_tokens=4, temperature=0)
    both = oa.completions.create(model="chat-tiny", prompt=[PROMPT, "w9 w10"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt p's sample i is choice p * n + i
    assert [c.text for c in both.choices] == [one.choices[0].text] * 2 + [other.choices[0].text] * 2
    assert both.usage.prompt_tokens == one.usage.prompt_tokens + other.usage.prompt_tokens
    assert both.usage.completion_tokens == 16


def test_echo_scores_the_prompt_as_lm_eval_asks(oa, grpc_client, checkpoint):
    """lm-evaluation-harness's loglikelihood request (token prompt = context + continuation, echo, logprobs 1,
    max_tokens 1): the continuation's log-probs equal gRPC Score's, and its greedy flag is each token being the
    top alternative. max_tokens 0 scores without generating."""
    from meshserve.model.loading import load_model

    encode = load_model(checkpoint).encode_prompt
    context, continuation = encode("w5 w6 w7"), encode("w8 w9")[1:]  # [1:]: the continuation has no BOS
    (want,) = grpc_client.score([(context, continuation)])
    status, got = _post_to(oa, "/v1/completions", {"prompt": context + continuation, "max_tokens": 1, "echo": True,
                                                   "logprobs": 1, "temperature": 0})  # fmt: skip
    assert status == 200, got
    choice = got["choices"][0]
    lp = choice["logprobs"]
    n = len(context) + len(continuation)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n + 1  # the prompt, then the one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    span = slice(len(context), n)
    np.testing.assert_allclose(lp["token_logprobs"][span], want.token_logprobs, rtol=1e-5, atol=1e-5)
    greedy = all(
        max(top, key=top.get) == tok for tok, top in zip(lp["tokens"][span], lp["top_logprobs"][span], strict=True)
    )
    assert greedy == want.greedy
    for top, chosen in zip(lp["top_logprobs"][1:n], lp["token_logprobs"][1:n], strict=True):
        assert len(top) == 1 and next(iter(top.values())) >= chosen - 1e-5  # the most likely token
    assert choice["text"].startswith(load_model(checkpoint).tokenizer.decode(context + continuation))
    assert got["usage"]["completion_tokens"] == 1
    # max_tokens 0: the prompt only; a text prompt is echoed as sent.
    status, got = _post_to(oa, "/v1/completions", {"prompt": "w5 w6 w7", "max_tokens": 0, "echo": True})
    assert status == 200 and got["choices"][0]["text"] == "w5 w6 w7" and got["choices"][0]["logprobs"] is None
    assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == 0


def test_tokenize_and_detokenize(server, oa, grpc_client, checkpoint):
    """vLLM's /tokenize: a prompt's ids as a completion sees them (usage.prompt_tokens agrees), a conversation's
    through the chat template (as gRPC's messages); /detokenize inverts it; bad fields are named."""
    from meshserve.model.loading import load_model

    model = load_model(checkpoint)
    status, got = _post(server, "/tokenize", {"prompt": PROMPT, "model": "chat-tiny"})
    assert status == 200 and got["tokens"] == model.encode_prompt(PROMPT) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == grpc_client.model_info().limits.max_context
    completion = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=1)
    assert completion.usage.prompt_tokens == got["count"]
    status, chat = _post(server, "/tokenize", {"messages": CONVERSATION})
    assert status == 200 and chat["tokens"] == model.encode_chat(CONVERSATION)
    status, back = _post(server, "/detokenize", {"tokens": got["tokens"]})
    assert status == 200 and back["prompt"] == model.tokenizer.decode(got["tokens"])
    for path, body, message in [
        ("/tokenize", {}, "prompt: give a prompt (text) or messages, one of them"),
        ("/tokenize", {"prompt": "w5", "messages": CONVERSATION}, "prompt: give a prompt (text) or messages"),
        ("/tokenize", {"prompt": 5}, "prompt: expected a string, got 5"),
        ("/tokenize", {"text": "w5"}, "text: unknown field (/tokenize takes add_generation_prompt, "),
        ("/detokenize", {"tokens": [5, -1]}, "tokens[1]: expected a token id"),
        ("/detokenize", {"tokens": [99999]}, "tokens: token id 99999 outside the vocabulary"),
        ("/detokenize", {}, "tokens: missing"),
    ]:
        status, got = _post(server, path, body)
        assert status == 400 and message in got["error"]["message"], (path, body, got)
    assert _post(server, "/tokenize", {"prompt": "w5"}, token=None)[0] == 401


BAD = [
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature: expected a number, got \"hot\""),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens must be in [1, "),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60}, 400, "max_tokens: 5 prompt tokens + max_tokens 60"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n must be >= 1"),
    ("/v1/completions", {"prompt": PROMPT, "n": 99}, 400, "n must be in [1, 16]"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, 400, "logprobs must be in [0, 20]"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 7}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"w5": 1}}, 400, 'logit_bias: key "w5" is not a token id'),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"99999": 1}}, 400, "logit_bias: token id 99999 outside"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "stream": True}, 400, "echo: not supported with stream"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 2}, 400, "logprobs: at most 1 with echo"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens must be in [1, "),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens must be <= max_tokens (2), got 3"),
    ("/v1/completions", {"prompt": PROMPT, "best_of": 3}, 400, "best_of: only best_of = n (1)"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["x", 3]}, 400, "stop[1]: expected a string, got 3"),
    ("/v1/completions", {"prompt": PROMPT, "frobnicate": 1}, 400, "frobnicate: unknown field (/v1/completions takes"),
    ("/v1/completions", {"messages": CONVERSATION}, 400, "messages: not a field of /v1/completions"),
    ("/v1/completions", {"prompt": [PROMPT, "w1 " * 3000]}, 400, "prompt[1]: 9000 characters exceed the limit"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt: token id 99999"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options: only"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4o"}, 404, "model: 'gpt-4o' is not served here"),
    ("/v1/completions", [PROMPT], 400, "request body: expected a JSON object, got list"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 10**400}, 400, "temperature: 1000000"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": -(10**400)}}, 400, "logit_bias[5]: -1000000"),
    ("/v1/completions", {"prompt": "w5 \ud800"}, 400, "prompt: not valid text (a lone surrogate"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["\udfff"]}, 400, "stop: not valid text"),
    ("/v1/completions", {"prompt": PROMPT, "\ud800": 1}, 400, '"\\ud800": a field name that is not valid text'),
    ("/v1/completions", {"prompt": PROMPT, "n": 2**31 - 1}, 400, "n must be in [1, 16]"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt: empty prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: missing or empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 3}, 400, None),  # content may be absent
    ("/v1/chat/completions", {"messages": [{"content": "w5"}]}, 400, "messages[0].role: missing"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5", "name": "x"}]}, 400,
     "messages[0].name: not supported (a message takes role and content)"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "w5"}]}, 400,
     "Conversation must start with a system or user message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0]: only text parts"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "tools": [{"type": "function"}]}, 400, "tools: tool calls"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "top_logprobs": 2}, 400, "top_logprobs: needs logprobs"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "max_tokens": 2, "max_completion_tokens": 2}, 400,
     "max_completion_tokens: give it or max_tokens, not both"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "max_completion_tokens": 0}, 400,
     "max_completion_tokens must be in [1, "),
    ("/v1/chat/completions", {"messages": CONVERSATION, "max_completion_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens must be <= max_completion_tokens (2), got 3"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "response_format": {"type": "xml"}}, 400,
     'response_format.type: expected one of "text", "json_object", "json_schema"'),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{p[4:]}-{m}" for p, _, _, m in BAD])
def test_bad_requests_name_their_field(server, path, body, status, message):
    got_status, got = _post(server, path, body)
    if message is None:  # a valid request: answered
        assert got_status == 200 and got["choices"][0]["message"]["role"] == "assistant", got
        return
    assert got_status == status, got
    assert message in got["error"]["message"], got
    assert got["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert got["error"]["param"] == (None if message.startswith("request body") else got["error"]["param"])
    assert "(set text, tokens.ids or messages)" not in got["error"]["message"]  # no gRPC names over HTTP


def test_malformed_http_is_answered_not_dropped(server, oa):
    """What http.server or the parser could trip on gets an OpenAI error object, never a dropped connection or a
    traceback; a connection the server will close says so; keep-alive serves request after request, streams too."""
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    deep = b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    status, _, body = _raw(server, b"POST /v1/completions HTTP/1.1\r\n" + auth + b"Content-Length: %d\r\n\r\n" %
                           len(deep) + deep)  # fmt: skip
    assert status == 400 and b"JSON nested too deeply" in body
    status, headers, body = _raw(server, b"POST /v1/completions HTTP/1.1\r\n" + auth + "Content-Length: ²\r\n\r\n"
                                 .encode())  # fmt: skip
    assert status == 411 and headers.get("Connection") == "close"
    status, headers, body = _raw(server, b"OPTIONS /v1/completions HTTP/1.1\r\n\r\n")
    assert status == 405 and json.loads(body)["error"]["message"].startswith("OPTIONS /v1/completions: method not")
    assert headers["Server"] == "meshserve"  # no Python version (before: "meshserve " with a trailing space)
    # The model card; the scheme of the bearer token in any case.
    url = urlsplit(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    for path, want in (("/v1/models/chat-tiny", 200), ("/v1/models/gpt-4o", 404)):
        conn.request("GET", path, headers={"Authorization": f"bearer {TOKEN}"})
        reply = conn.getresponse()
        data = json.loads(reply.read())
        assert reply.status == want and (data.get("id") == "chat-tiny" or "not served here" in data["error"]["message"])
    # One connection: a 404 that closes it says so; then a fresh one carries a stream, a plain request and another
    # stream in turn (streams are chunked, not ended by closing).
    conn.request("POST", "/v1/nothing", body=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 404 and reply.getheader("Connection") == "close"
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    for stream in (True, False, True):
        body = json.dumps({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": stream})
        conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        data = reply.read()
        assert reply.status == 200 and (data.endswith(b"data: [DONE]\n\n") if stream else json.loads(data)["choices"])
    conn.close()
    assert "Traceback" not in server.output()


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(oa, grpc_client):
    """As OpenAI and vLLM: an unset max_tokens in a chat is the room left in the context (a completion keeps gRPC's
    default of 64 at most)."""
    got = oa.chat.completions.create(model="chat-tiny", messages=CONVERSATION, temperature=0, logit_bias={2: -100})
    room = grpc_client.model_info().limits.max_context - got.usage.prompt_tokens
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == room


def test_protocol_errors_and_auth(server, oa):
    url = urlsplit(server.http)
    assert _post(server, "/v1/completions", None, raw=b"{not json")[1]["error"]["message"].startswith(
        "request body: invalid JSON"
    )
    status, got = _post(server, "/v1/completions", {"prompt": PROMPT}, token=None)
    assert status == 401 and "bearer token" in got["error"]["message"]
    assert _post(server, "/v1/completions", {"prompt": PROMPT}, token="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        oa.completions.create(model="chat-tiny", prompt=PROMPT, temperature=-1)
    # Health and metrics need no token (as vLLM's); an unknown path is a 404; an over-long body is refused unread (413).
    health = urllib.request.urlopen(f"http://{url.hostname}:{url.port}/health", timeout=10)
    assert health.status == 200 and json.loads(health.read()) == {"status": "ok"}
    # Counted once the 401 is written: the client can scrape a moment before the count lands.
    unauthenticated = {"method": "POST /v1/completions", "code": "UNAUTHENTICATED"}
    assert _wait_for(lambda: _metric(server, "meshserve_requests_total", **unauthenticated) >= 2)
    assert _post(server, "/v2/complete", {})[0] == 404
    status, got = _post(server, "/v1/completions", None, raw=b" " * 200_000)
    assert status == 413 and "request body: 200000 bytes exceed the limit of" in got["error"]["message"]
    # The server still answers, and counted what it refused.
    assert oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert "Traceback" not in server.output()


def test_a_client_that_goes_away_frees_its_slot(server, oa):
    before = _cancelled(server)
    # A stream left after two chunks (50 tokens would take >= 2.5 s).
    stream = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=50, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})  # fmt: skip
    for _, _chunk in zip(range(2), stream, strict=False):
        pass
    stream.close()
    assert _wait_for(lambda: _cancelled(server) >= before + 1, timeout=60), "the stream's request was not cancelled"
    # A plain request whose client closes the connection while it waits.
    url = urlsplit(server.http)
    # ignore_eos: a sampled answer that stopped early (EOS after 8 tokens, seen on CI) ended before the client left.
    body = json.dumps({"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True}).encode()
    live = lambda: _metric(server, "meshserve_live_slots")  # noqa: E731
    assert _wait_for(lambda: live() == 0, timeout=30), "the stream's slot was not freed"
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        # Closed once the request holds a slot (a fixed wait could close it before a loaded server queued it).
        assert _wait_for(lambda: live() >= 1, timeout=30), "the plain request never started"
    gone = _wait_for(lambda: _cancelled(server) >= before + 2, timeout=60)  # generous: CI machines run loaded
    assert gone, f"the plain request was not cancelled:\n{server.output()[-3000:]}"
    cancelled = {"method": "POST /v1/completions", "code": "CANCELLED"}  # counted after the engine's cancel
    assert _wait_for(lambda: _metric(server, "meshserve_requests_total", **cancelled) >= 2)
    assert oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"


def test_a_grpc_deadline_cancels_and_frees_the_slot(server, grpc_client):
    """A gRPC request whose deadline passes mid-generation is ended by the server (counted DEADLINE_EXCEEDED) and by
    the engine (finished "cancelled"). Here, on this module's slowed server, 60 tokens take >= 3 s, so a 1 s
    deadline passes mid-generation on any machine and long after the server has taken the call (on a fast server a
    deadline short enough to pass mid-generation could pass before the call reached the handler: CI saw that)."""
    assert _wait_for(lambda: _metric(server, "meshserve_live_slots") == 0, timeout=60)
    before = _metric(server, "meshserve_requests_total", method="Generate", code="DEADLINE_EXCEEDED")
    before_cancelled = _cancelled(server)
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.generate([1, 2], max_new_tokens=60, ignore_eos=True, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # set by the client library either way

    # The server ended it at its deadline (not the client giving up on a request that ran on), and so did the engine
    # (a request left running would finish with reason length, some 2 s later).
    def deadlines() -> float:
        return _metric(server, "meshserve_requests_total", method="Generate", code="DEADLINE_EXCEEDED")

    ended = _wait_for(lambda: deadlines() > before and _cancelled(server) > before_cancelled, timeout=4)
    assert ended, f"deadline counted {deadlines() - before}, engine cancels {_cancelled(server) - before_cancelled}"
    assert deadlines() == before + 1
    assert _cancelled(server) == before_cancelled + 1
    assert _wait_for(lambda: _metric(server, "meshserve_live_slots") == 0, timeout=10), "its slot was not freed"


def test_the_request_log_has_a_line_per_request_and_no_text(server, oa, grpc_client):
    before = len(_request_lines(server))
    got = oa.completions.create(model="chat-tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    reply = grpc_client.generate(PROMPT, max_new_tokens=2, n=2, temperature=0.5, seed=1)
    status, _ = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": -1})
    assert status == 400
    assert _wait_for(lambda: len(_request_lines(server)) >= before + 3, timeout=10), server.output()[-2000:]
    http, grpc_line, bad = _request_lines(server)[before : before + 3]
    assert (http["method"], http["code"], http["samples"], http["finish"]) == ("POST /v1/completions", "OK", "1",
                                                                               "length")  # fmt: skip
    assert (int(http["prompt_tokens"]), int(http["generated_tokens"])) == (got.usage.prompt_tokens, 3)
    assert 0 <= float(http["queue_ms"]) <= float(http["ttft_ms"]) <= float(http["total_ms"])
    assert (grpc_line["method"], grpc_line["code"], grpc_line["samples"]) == ("Generate", "OK", "2")
    assert int(grpc_line["generated_tokens"]) == reply.generated_tokens == 4
    assert (bad["method"], bad["code"]) == ("POST /v1/completions", "INVALID_ARGUMENT") and "samples" not in bad
    log = "\n".join(line for line in server.output().splitlines() if line.startswith("meshserve request"))
    assert "w5" not in log and "w6" not in log  # counts and times only: no prompt text
