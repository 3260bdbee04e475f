"""A model that calls a tool, end to end: a tiny Llama whose weights are set by hand so that, greedy, it answers
the chat's generation prompt with one Hermes tool call and its end-of-sequence token, served by a real
`meshserve serve --tool-call-parser hermes` and read with the official `openai` client. The call comes back as
message.tool_calls with finish_reason "tool_calls", whole and streamed; without the parser the same text comes back
as content. A second script answers with two ";"-joined Llama 3 calls on `--tool-call-parser llama3_json`: streamed,
each call opens and its arguments follow as they are generated.

How the weights script it: every layer's output projections (attention's o_proj, the MLP's down_proj) are zero,
so the residual stream at each position is that token's embedding. The embedding gives each token of the script
its own unit direction, the final norm is 1, and the unembedding maps each direction to the next token of the
script: greedy decoding then follows the script token by token, from the prompt's last token to </s>. The word
tokenizer (test_hf_llama's, with test_chat's ChatML words) gets the call's pieces as words; it decodes with
spaces between words, which JSON and the parser allow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshserve.serving.cli import main
from test_openai_tools import TOOLS
from test_serving_http_tools import save_tool_chat_model
from test_serving_support import ServerProcess

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

QUESTION = [{"role": "user", "content": "w20 w21"}]
# The call as words of the tokenizer (no spaces inside one): `<tool_call> {"name": "get_weather", "arguments":
# {"city": "Paris"}} </tool_call>` once decoded.
PIECES = ["<tool_call>", '{"name":', '"get_weather",', '"arguments":', '{"city":', '"Paris"}}', "</tool_call>"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return scripted_checkpoint(tmp_path_factory, PIECES, "llama-calls")


def scripted_checkpoint(tmp_path_factory, pieces: list[str], name: str) -> Path:
    """A converted tiny Llama (test_chat's ChatML words, the tool template) whose greedy answer to QUESTION with
    TOOLS is `pieces` (words w60 ... of the tokenizer renamed), then </s>."""
    directory = save_tool_chat_model(tmp_path_factory.mktemp("hf") / name)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i, piece in enumerate(pieces):  # words w60 ... become the call's pieces
        vocab[piece] = vocab.pop(f"w{60 + i}")
    (directory / "tokenizer.json").write_text(json.dumps(data))

    hf = transformers.AutoTokenizer.from_pretrained(directory)
    last = hf.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    last = list(getattr(last, "input_ids", last))[-1]  # the generation prompt's last token
    script = [last, *(vocab[p] for p in pieces), hf.eos_token_id]
    assert len(set(script)) == len(script)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    script_weights(model, script)
    model.save_pretrained(directory)
    out = tmp_path_factory.mktemp("ckpt") / f"{name}-ms"
    assert main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 0
    return out


def script_weights(model, script: list[int]) -> None:
    """Set a transformers Llama-family model's weights so greedy decoding follows `script` token by token (see the
    module docstring): zero output projections, unit embeddings, an unembedding to each next token."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight  # [V, E] each
        embed.zero_()
        head.zero_()
        for j, (token, following) in enumerate(zip(script[:-1], script[1:], strict=True)):
            embed[token, j] = 1.0
            head[following, j] = 10.0


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "hermes", "--served-model-name", "m")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=60)


def test_the_scripted_model_calls_a_tool(oa):
    got = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0)
    (choice,) = got.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert got.usage.completion_tokens == len(PIECES) + 1  # the call's words and </s>


def test_a_streamed_call_arrives_as_it_is_generated(oa):
    """Streamed: a chunk opens call 0 (id, type, name, arguments "") once `"arguments":` is generated, the
    arguments follow in fragments over the next tokens' chunks, and finish_reason is tool_calls; the openai client's
    stream helper (`chat.completions.stream`, which needs strict tools) accumulates them into the call."""
    chunks = list(oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with_calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert content == "" and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    (opening,), *fragments = with_calls
    assert opening.index == 0 and opening.id.startswith("call_") and opening.type == "function"
    assert (opening.function.name, opening.function.arguments) == ("get_weather", "")
    assert len(fragments) >= 2 and all(len(f) == 1 and f[0].index == 0 and f[0].id is None for f in fragments)
    assert "".join(f[0].function.arguments for f in fragments) == '{"city": "Paris"}'
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    with oa.chat.completions.stream(model="m", messages=QUESTION, tools=strict, temperature=0) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
    assert call.function.parsed_arguments == {"city": "Paris"} and [e.name for e in done] == ["get_weather"]
    assert final.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")


def test_without_tools_the_same_words_are_content(oa):
    # tool_choice "none": nothing about tools is rendered or parsed; the script starts from the same last token.
    got = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice="none", temperature=0)
    (choice,) = got.choices
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content.split() == PIECES


def test_grpc_returns_the_call_too(server):
    """The same chat over gRPC (Client(messages=..., tools=...)): GenerateResponse.tool_calls and finish_reason
    tool_calls, text outside the blocks empty, every generated token still in tokens; streamed, the last chunk
    brings the call and no chunk's text shows the block; without tools the words are the text."""
    from meshserve.serving.client import Client

    with Client(server.target) as client:
        got = client.generate(messages=QUESTION, tools=TOOLS, max_new_tokens=16)
        assert (got.finish_reason, got.text, len(got.tokens)) == ("tool_calls", "", len(PIECES) + 1)
        (call,) = got.tool_calls
        assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        chunks = list(client.generate_stream(messages=QUESTION, tools=TOOLS, max_new_tokens=16))
        assert "".join(c.text for c in chunks) == "" and chunks[-1].finish_reason == "tool_calls"
        assert [c["function"]["name"] for c in chunks[-1].tool_calls] == ["get_weather"]
        assert sum(len(c.tokens) for c in chunks) == len(PIECES) + 1
        plain = client.generate(messages=QUESTION, max_new_tokens=16)
        assert plain.tool_calls == [] and plain.finish_reason == "stop" and plain.text.split() == PIECES


# Two bare Llama 3 calls joined by ";" (`--tool-call-parser llama3_json`), as words: `{"name": "get_weather",
# "parameters": {"city": "Paris"}}; {"name":"local_time", "parameters":{}}` once decoded.
LLAMA_PIECES = ['{"name":', '"get_weather",', '"parameters":', '{"city":', '"Paris"}};', '{"name":"local_time",',
                '"parameters":{}}']  # fmt: skip


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    checkpoint = scripted_checkpoint(tmp_path_factory, LLAMA_PIECES, "llama3-two-calls")
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "llama3_json", "--served-model-name",
                         "m")  # fmt: skip
    yield proc
    proc.close()


def test_two_llama3_calls_stream_as_they_are_generated(llama_server):
    """Streamed: call 0 opens (id, name) once its arguments' "{" is generated and its arguments follow over the next
    tokens' chunks, then call 1 opens with index 1 and its own id; no content, finish_reason tool_calls, and the
    same two calls as the whole answer."""
    oa = openai.OpenAI(base_url=llama_server.http, api_key="none", max_retries=0, timeout=60)
    chunks = list(oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "" and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    opened = [d for d in deltas if d.id]
    assert [(d.index, d.type, d.function.name) for d in opened] == [(0, "function", "get_weather"),
                                                                    (1, "function", "local_time")]  # fmt: skip
    assert opened[0].id.startswith("call_") and opened[0].id != opened[1].id
    assert deltas.index(opened[1]) > max(i for i, d in enumerate(deltas) if d.index == 0)  # call 0 first, whole
    assert sum(1 for d in deltas if d.index == 0) >= 2  # its arguments over more than one chunk
    joined = ["".join(d.function.arguments or "" for d in deltas if d.index == k) for k in (0, 1)]
    assert joined == ['{"city": "Paris"}', "{}"]
    whole = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0)
    calls = whole.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", joined[0]),
                                                                        ("local_time", "{}")]  # fmt: skip
    assert whole.choices[0].finish_reason == "tool_calls" and not whole.choices[0].message.content
