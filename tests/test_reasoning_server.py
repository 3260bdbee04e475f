"""A thinking model end to end: a tiny Qwen3 whose weights script its answer -- "<think> w30 w31 </think>" then a
Hermes tool call -- served by a real `meshserve serve --reasoning-parser qwen3 --tool-call-parser hermes`, read with
the official `openai` client and the gRPC client. The reasoning comes back as message.reasoning_content (streamed:
delta.reasoning_content), the call after it as tool_calls; `chat_template_kwargs` {"enable_thinking": false} makes the
template close the block itself, and the same model then answers without reasoning; a template that opens the block
in the prompt (DeepSeek-R1's way) starts the output inside it. Completions (not chats) keep the raw text. Bad
template variables are refused naming the field, over HTTP, gRPC, the CLI and batch-generate lines.

The script works as test_serving_http_tool_calls.py's: output projections zero, so each position's residual is its
token's embedding, a unit direction the unembedding maps to the script's next token (greedy follows it). The word
tokenizer decodes with spaces between words.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from meshserve.serving.cli import main
from test_hf_llama import _word_tokenizer, make_model
from test_openai_tools import TOOLS
from test_serving_http_tool_calls import script_weights
from test_serving_support import ServerProcess

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

# Qwen3's switch as its template has it; `open_think` stands for a template that opens the block (DeepSeek-R1).
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} "
    "{% if m.reasoning_content %}<think> {{ m.reasoning_content }} </think> {% endif %}{{ m.content }} <|im_end|> "
    "{% endfor %}"
    "{% if tools %}w50 {% endif %}"
    "{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> "
    "{% elif open_think is defined and open_think %}<think> {% endif %}{% endif %}"
)
WORDS = {"w91": "system", "w92": "user", "w93": "assistant", "w94": "<|im_start|>", "w95": "<|im_end|>",
         "w89": "<think>", "w90": "</think>"}  # fmt: skip
CALL = ["<tool_call>", '{"name":', '"get_weather",', '"arguments":', '{"city":', '"Paris"}}', "</tool_call>"]
SCRIPT = ["assistant", "<think>", "w30", "w31", "</think>", *CALL, "</s>"]
QUESTION = [{"role": "user", "content": "w20 w21"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "qwen3-thinks"
    model = make_model(directory, "qwen3", head_dim=8, positions=256)
    _word_tokenizer(directory, adds_bos=False)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for old, new in [*WORDS.items(), *((f"w{60 + i}", piece) for i, piece in enumerate(CALL))]:
        vocab[new] = vocab.pop(old)
    data["added_tokens"] = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t in ("</s>", "<|im_start|>", "<|im_end|>")
    ]  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(data))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    script_weights(model, [vocab[w] for w in SCRIPT])
    model.save_pretrained(directory)
    out = tmp_path_factory.mktemp("ckpt") / "qwen3-thinks-ms"
    assert main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess(checkpoint, "--http-port", "0", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                         "--served-model-name", "m")  # fmt: skip
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.http, api_key="none", max_retries=0, timeout=60)


def _words(text: str | None) -> list[str] | None:
    return None if text is None else text.split()


def _tokens(server, messages, **extra) -> int:
    """POST /tokenize's count for a conversation."""
    import urllib.request

    body = json.dumps({"messages": messages, **extra}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.http.removesuffix("/v1") + "/tokenize", body)) as r:
        return json.loads(r.read())["count"]


def test_reasoning_then_a_call(oa):
    r = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, max_tokens=32)
    message = r.choices[0].message
    assert _words(message.reasoning_content) == ["w30", "w31"]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert not message.content and r.choices[0].finish_reason == "tool_calls"


def test_an_answer_sent_back_keeps_its_reasoning(oa, server):
    """The openai client's usual loop appends the returned message to the history: its reasoning_content is
    accepted and reaches the template (as Qwen3's writes it back into a <think> block)."""
    first = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=32)
    history = [*QUESTION, first.choices[0].message, {"role": "user", "content": "w22"}]
    again = oa.chat.completions.create(model="m", messages=history, max_tokens=32)
    assert _words(again.choices[0].message.reasoning_content) == ["w30", "w31"]
    with_reasoning = first.choices[0].message.model_dump(exclude_unset=True)
    plain = {k: v for k, v in with_reasoning.items() if k != "reasoning_content"}
    assert (
        _tokens(server, [*QUESTION, with_reasoning]) == _tokens(server, [*QUESTION, plain]) + 4
    )  # <think> w30 w31 </think>


def test_streamed_reasoning_joins_to_the_whole(oa):
    stream = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, max_tokens=32, stream=True)
    reasoning, content, calls, finish = [], [], [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert _words("".join(reasoning)) == ["w30", "w31"] and "".join(content).strip() == ""
    assert {c.function.name for c in calls if c.function.name} == {"get_weather"}
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_template_variables_switch_thinking(oa, server):
    off = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, max_tokens=32,
                                     extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    message = off.choices[0].message
    assert message.reasoning_content is None and message.tool_calls[0].function.name == "get_weather"
    # The prompt holds the template's own empty block: /tokenize counts it.
    assert _tokens(server, QUESTION, chat_template_kwargs={"enable_thinking": False}) == _tokens(server, QUESTION) + 2
    # A template that opened the block: the output starts inside it.
    opened = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=4,
                                        extra_body={"chat_template_kwargs": {"open_think": True}})  # fmt: skip
    assert _words(opened.choices[0].message.reasoning_content) == ["w30", "w31"]
    assert opened.choices[0].message.content.split() == ["<tool_call>"] and opened.choices[0].finish_reason == "length"


def test_a_completion_keeps_the_raw_text(oa):
    r = oa.completions.create(model="m", prompt="w20 assistant", max_tokens=4)
    assert r.choices[0].text.split() == ["<think>", "w30", "w31", "</think>"]


def test_grpc_reasoning_whole_and_streamed(server):
    from meshserve.serving.client import Client

    with Client(server.target) as client:
        whole = client.generate(messages=QUESTION, tools=TOOLS, max_new_tokens=32)
        assert _words(whole.reasoning) == ["w30", "w31"] and whole.tool_calls[0]["function"]["name"] == "get_weather"
        chunks = list(client.generate_stream(messages=QUESTION, max_new_tokens=32))  # no tools: the call is text
        assert _words("".join(c.reasoning for c in chunks)) == ["w30", "w31"]
        assert "".join(c.text for c in chunks).split() == CALL
        off = client.generate(messages=QUESTION, max_new_tokens=32, chat_template_kwargs={"enable_thinking": False})
        assert off.reasoning == "" and off.text.split() == CALL


@pytest.mark.parametrize(
    "kwargs,field",
    [("yes", "chat_template_kwargs"), ({"messages": []}, "chat_template_kwargs.messages"),
     ({"not a name": 1}, "chat_template_kwargs")],
)  # fmt: skip
def test_bad_template_variables_are_named(oa, server, kwargs, field):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=2,
                                   extra_body={"chat_template_kwargs": kwargs})  # fmt: skip
    assert e.value.body["param"] == "chat_template_kwargs" and field in e.value.body["message"]
    from meshserve.protos import inference_pb2 as pb
    from meshserve.serving.client import Client

    with Client(server.target) as client:
        request = Client.request(messages=QUESTION, max_new_tokens=2)
        request.messages.chat_template_kwargs_json = "{not json"
        with pytest.raises(grpc.RpcError) as g:
            client.stub.Generate(request)
        assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert g.value.details().startswith("messages.chat_template_kwargs_json: not JSON")
        assert isinstance(request, pb.GenerateRequest)


def test_cli_flags_refuse_bad_json(checkpoint, capsys):
    assert main(["serve", "--checkpoint", str(checkpoint), "--default-chat-template-kwargs", "[1]"]) == 2
    assert "--default-chat-template-kwargs: expected an object" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(checkpoint), "--chat", "--chat-template-kwargs", "{bad", "w20"])
    assert e.value.code == 2 and "--chat-template-kwargs: not JSON" in capsys.readouterr().err


def test_batch_generate_lines_take_template_variables(checkpoint, tmp_path):
    lines = [{"id": "off", "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": False},
              "max_new_tokens": 3},
             {"id": "on", "messages": QUESTION, "max_new_tokens": 3},
             {"id": "bad", "messages": QUESTION, "chat_template_kwargs": {"tools": []}},
             {"id": "plain", "prompt": "w20", "chat_template_kwargs": {"enable_thinking": False}}]  # fmt: skip
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
    texts = {row["id"]: row["text"].split() for row in map(json.loads, out.read_text().splitlines())}
    assert texts == {"off": CALL[:3], "on": ["<think>", "w30", "w31"]}
    errors = {
        row["id"]: row["error"]
        for row in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())
    }
    assert errors["bad"].startswith("chat_template_kwargs.tools: set by the server")
    assert errors["plain"].startswith("chat_template_kwargs: only a chat")


def test_tokenize_names_bad_template_variables(server):
    import urllib.error
    import urllib.request

    body = json.dumps({"messages": QUESTION, "chat_template_kwargs": {"eos_token": "x"}}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(server.http.removesuffix("/v1") + "/tokenize", body))
    error = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and error["param"] == "chat_template_kwargs"
    assert error["message"].startswith("chat_template_kwargs.eos_token: set by the server")


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "template-opens"])
def test_a_guided_answer_follows_the_reasoning(oa, opened):
    """tool_choice "required" on a thinking model: the block is written freely, the call format is enforced after
    </think> (vLLM's structured outputs with a reasoning parser), whether the model or the template opens it."""
    extra = {"chat_template_kwargs": {"open_think": True}} if opened else {}
    r = oa.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=32,
                                   extra_body=extra)  # fmt: skip
    message = r.choices[0].message
    assert _words(message.reasoning_content) == ["w30", "w31"]
    assert [c.function.name for c in message.tool_calls] == ["get_weather"] and r.choices[
        0
    ].finish_reason == "tool_calls"


def test_a_regex_answer_is_matched_from_the_first_token(oa):
    """guided_regex is not composed with the block: on a template that opened one, the output is still the match
    and content, not reasoning."""
    extra = {"chat_template_kwargs": {"open_think": True}, "guided_regex": "w30w31"}
    r = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, extra_body=extra)
    message = r.choices[0].message
    assert message.reasoning_content is None and message.content.split() == ["w30", "w31"]


def test_a_users_think_tag_does_not_open_the_block(oa):
    """Only the template's generation prompt decides where the output starts: a user message ending in "<think>"
    leaves the model outside (the model's own <think> then opens the block)."""
    r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "w20 <think>"}], max_tokens=32)
    assert _words(r.choices[0].message.reasoning_content) == ["w30", "w31"]


def test_an_empty_block_is_no_reasoning_whole_and_streamed(oa):
    whole = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=1)
    assert whole.choices[0].message.reasoning_content is None and not whole.choices[0].message.content
    stream = oa.chat.completions.create(model="m", messages=QUESTION, max_tokens=1, stream=True)
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in stream if c.choices)


def test_batch_generate_splits_chat_lines_and_guides_after_the_block(checkpoint, tmp_path):
    """batch-generate --reasoning-parser: a chat line's block goes to "reasoning", its answer to "text"; a guided
    chat line thinks first; a completion line keeps its raw text. (Choices no shorter word token begins: "w4" is a
    token, "w40" would lead into it and a dead end in this word vocabulary.)"""
    lines = [{"id": "chat", "messages": QUESTION, "max_new_tokens": 4},
             {"id": "off", "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": False},
              "max_new_tokens": 2},
             {"id": "guided", "messages": QUESTION, "max_new_tokens": 6, "guided_choice": ["w28", "w29"]},
             {"id": "plain", "prompt": "w20 assistant", "max_new_tokens": 4}]  # fmt: skip
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint), "--reasoning-parser", "qwen3"]
    assert main(args) == 0
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert _words(rows["chat"]["reasoning"]) == ["w30", "w31"] and rows["chat"]["text"] == ""
    assert rows["off"]["reasoning"] is None and rows["off"]["text"].split() == CALL[:2]
    assert _words(rows["guided"]["reasoning"]) == ["w30", "w31"] and rows["guided"]["text"].strip() in ("w28", "w29")
    assert "reasoning" not in rows["plain"] and rows["plain"]["text"].split() == ["<think>", "w30", "w31", "</think>"]


def test_cli_generate_shows_the_reasoning(server, capsys):
    """`meshserve generate --server --chat` prints what the server returned: --json rows carry "reasoning", and the
    text output shows it before the answer."""
    base = ["generate", "--server", server.target, "--chat", "--max-new-tokens", "6", "w20 w21"]
    capsys.readouterr()
    assert main([*base, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert _words(row["reasoning"]) == ["w30", "w31"] and row["text"].split() == CALL[:2]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[reasoning] w30 w31" and lines[1].split() == CALL[:2]
