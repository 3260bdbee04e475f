"""Chat messages through the model's own chat template: convert keeps it, rendering + encoding equals transformers'
`apply_chat_template(..., add_generation_prompt=True)` ids, and gRPC's GenerateRequest.messages is exactly a token
prompt of those ids (a second turn reuses the first's cached prefix); refusals name the field or carry the template's
message; `meshserve generate --chat` works in process and with --server and refuses in one line.

The model is a tiny random Llama saved by transformers (test_hf_llama.make_model) with its word-level tokenizer
(_word_tokenizer), five of whose words are renamed to a ChatML vocabulary (<|im_start|>, <|im_end|>, and the roles).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from meshserve.errors import UserError
from meshserve.model.chat import ChatError, ChatTemplate, hf_chat_template, render_chat
from meshserve.model.checkpoint import read_checkpoint_info
from meshserve.serving.cli import main
from meshserve.serving.client import Client, InvalidRequest
from test_hf_llama import _word_tokenizer, make_model
from test_serving_support import ServerProcess, make_checkpoint

transformers = pytest.importorskip("transformers")

# ChatML with a Llama-style BOS written by the template, a namespace, and a refusal through raise_exception.
TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation must start with a system or user message') }}"
    "{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML = {"w91": "system", "w92": "user", "w93": "assistant", "w94": "<|im_start|>", "w95": "<|im_end|>"}
SYSTEM = "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "w20 w21 w22"},
    {"role": "assistant", "content": "w30 w31"},
    {"role": "user", "content": "w40 w41 w42 w43"},
]
NO_TEMPLATE = "the model has no chat template (convert it from a Hugging Face directory that has one)"


def _chatml_tokenizer(directory: Path) -> None:
    """_word_tokenizer (BOS prepended, as Llama's) with CHATML's words and <s>, </s> as special added tokens, and a
    tokenizer_config.json holding TEMPLATE and the bos/eos strings, as transformers saves an instruct model."""
    _word_tokenizer(directory, adds_bos=True)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for old, new in CHATML.items():
        vocab[new] = vocab.pop(old)
    have = {t["content"] for t in data.get("added_tokens") or []}
    data["added_tokens"] = (data.get("added_tokens") or []) + [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>") if t not in have
    ]  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(data))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "chat_template": TEMPLATE}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "llama-chat"
    make_model(directory, "llama")
    _chatml_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "llama-chat-ms"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    from meshserve.model.loading import load_model

    return load_model(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    # --warm-up all: messages and token prompts are compared bit for bit, so both must run in the same buckets.
    proc = ServerProcess(checkpoint, "--warm-up", "all")
    yield proc
    proc.close()


def test_render_and_encode_equal_transformers(hf_dir, model):
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    expected = list(getattr(expected, "input_ids", expected))  # a BatchEncoding in transformers 5, a list before
    text = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert render_chat(TEMPLATE, CONVERSATION, "<s>", "</s>") == text
    ids = model.encode_chat(CONVERSATION)
    assert ids == expected
    # The template wrote the one BOS (encode_prompt would add a second); every role word and marker is a real id.
    assert ids[:2] == [1, 94] and ids.count(1) == 1 and 0 not in ids and ids[-2:] == [94, 93]
    assert model.encode_prompt("w5")[0] == 1  # plain text prompts still get BOS from the config
    # Without the generation prompt the text ends on the last message (transformers agrees).
    assert render_chat(TEMPLATE, CONVERSATION, "<s>", "</s>", add_generation_prompt=False) == hf.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_convert_keeps_the_template_and_its_special_tokens(hf_dir, checkpoint, tmp_path):
    info = read_checkpoint_info(checkpoint)
    assert info.chat == ChatTemplate(TEMPLATE, "<s>", "</s>")
    assert (checkpoint / "chat_template.jinja").read_text() == TEMPLATE
    # Re-storing in another dtype keeps it; a checkpoint saved without one has none.
    again = tmp_path / "bf16"
    assert main(["convert", "--checkpoint", str(checkpoint), "--out", str(again), "--weights", "bf16"]) == 0
    assert read_checkpoint_info(again).chat == info.chat
    assert read_checkpoint_info(make_checkpoint(tmp_path / "tiny")).chat is None


def test_hf_template_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates gives "default"; special
    tokens as AddedToken dicts, or from special_tokens_map.json; no template: None."""
    assert hf_chat_template(tmp_path) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": named, "bos_token": {"content": "<B>", "special": True}})
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<E>"}))
    assert hf_chat_template(tmp_path) == ChatTemplate("D{{ eos_token }}", "<B>", "<E>")
    (tmp_path / "chat_template.jinja").write_text("J")
    assert hf_chat_template(tmp_path).template == "J"


def test_render_refusals_name_the_field_or_carry_the_template_message():
    cases = [
        ([], "messages: empty list"),
        (
            [{"role": "function", "content": "x"}],
            "messages[0].role must be one of system, user, assistant, tool, got 'function'",
        ),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id: a tool message names the call it answers"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string, got int"),
        ([{"role": "user", "content": "x", "name": "a"}], "messages[0]: unknown key 'name'"),
        ([{"role": "assistant", "content": "x"}], "chat template: Conversation must start with a system or user"),
    ]
    for messages, message in cases:
        with pytest.raises(ChatError, match=None) as e:
            render_chat(TEMPLATE, messages, "<s>", "</s>")
        assert message in str(e.value), (messages, str(e.value))
    with pytest.raises(ChatError, match="chat template: line 1: "):
        render_chat("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="underscore"):  # the sandbox's namespace guard, as transformers'
        render_chat("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])


def test_grpc_messages_equal_the_rendered_token_prompt(client, model):
    assert client.model_info().chat_template  # clients can tell that messages are accepted
    ids = model.encode_chat(CONVERSATION)
    kw = dict(max_new_tokens=8, ignore_eos=True, seed=0)
    by_messages = client.generate(messages=CONVERSATION, **kw)
    by_ids = client.generate(ids, **kw)
    assert by_messages.tokens == by_ids.tokens and len(by_messages.tokens) == 8
    assert by_messages.text == by_ids.text
    # The second call prefilled only what the first left uncached: the same tokens, log-probs up to float rounding.
    np.testing.assert_allclose(by_messages.logprobs, by_ids.logprobs, atol=1e-4)
    assert by_messages.prompt_tokens == len(ids)
    streamed = [t for chunk in client.generate_stream(messages=CONVERSATION, **kw) for t in chunk.tokens]
    assert streamed == by_ids.tokens


def test_a_second_turn_reuses_the_first_turns_prefix(client, model):
    """Turn 1 (21 tokens) fits the 32-token bucket; turn 2 (> 32 tokens) starts with it, so the prefix cache supplies
    it and only the rest is prefilled (serving/prefix_cache.py reuses when the rest needs a smaller bucket)."""
    first_turn = CONVERSATION[:2]
    kw = dict(max_new_tokens=4, ignore_eos=True, seed=0)
    first = client.generate(messages=first_turn, **kw)
    second_turn = [*first_turn, {"role": "assistant", "content": first.text}, {"role": "user", "content": "w50 w51"}]
    ids = model.encode_chat(second_turn)
    assert len(model.encode_chat(first_turn)) <= 32 < len(ids)
    assert ids[: first.prompt_tokens] == model.encode_chat(first_turn)  # the rendered history is a prefix
    second = client.generate(messages=second_turn, **kw)
    assert second.cached_prompt_tokens >= first.prompt_tokens
    assert second.tokens == client.generate(ids, **kw).tokens


def test_grpc_refusals(client):
    cases = [
        ([], "messages: empty list"),
        ([{"role": "robot", "content": "x"}], "messages[0].role must be one of system, user, assistant"),
        ([{"role": "assistant", "content": "x"}], "chat template: Conversation must start with a system or user"),
        ([{"role": "user", "content": "w5 " * 1000}], "characters of content exceed the limit of"),
    ]
    for messages, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(messages=messages, max_new_tokens=2, validate=False)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, messages
        assert message in e.value.details(), (messages, e.value.details())
    with pytest.raises(InvalidRequest, match="messages\\[0\\].role"):  # the client checks before sending
        client.generate(messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidRequest, match="exactly one"):
        client.generate("w5", messages=CONVERSATION)


def test_a_model_without_a_template_is_refused():
    from meshserve.model.loading import load_model
    from meshserve.protos import inference_pb2 as pb
    from meshserve.serving.validation import Limits, RequestError, RequestParser

    parser = RequestParser(load_model(preset="tiny"), Limits(max_context=128, max_batch=2, max_new_tokens=8,
                                                             max_queue=4))  # fmt: skip
    request = Client.request(messages=[{"role": "user", "content": "hi"}])
    assert request.WhichOneof("input") == "messages" and isinstance(request, pb.GenerateRequest)
    with pytest.raises(RequestError, match="messages: " + NO_TEMPLATE.replace("(", r"\(").replace(")", r"\)")):
        parser.generate(request, None)


def _one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshserve generate: error: ") and "\n" not in err, err
    return err


def test_cli_generate_chat(capsys, checkpoint, client, server, model):
    kw = ["--max-new-tokens", "5", "--ignore-eos", "--json"]
    capsys.readouterr()
    assert main(["generate", "--chat", "--system", SYSTEM, "--server", server.target, *kw, "w20 w21 w22"]) == 0
    remote = json.loads(capsys.readouterr().out.splitlines()[0])
    ids = model.encode_chat(CONVERSATION[:2])
    assert remote["tokens"] == client.generate(ids, max_new_tokens=5, ignore_eos=True, seed=0).tokens
    assert main(["generate", "--chat", "--system", SYSTEM, "--checkpoint", str(checkpoint), *kw, "w20 w21 w22"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] == remote["tokens"]  # in process: the same

    assert "--system applies with --chat only" in _one_line_error(capsys, "--model", "tiny", "--system", "s", "x")
    assert "--chat takes text PROMPTs" in _one_line_error(capsys, "--model", "tiny", "--chat", "--tokens", "1,2")
    assert NO_TEMPLATE in _one_line_error(capsys, "--model", "tiny", "--chat", "hello")
    err = _one_line_error(capsys, "--server", server.target, "--model", "tiny", "--chat", "hello")
    assert "--checkpoint, --model, --weights and --kv-cache-dtype choose a local model" in err


def test_batch_generate_lines_may_carry_messages(checkpoint, client, model, tmp_path):
    from test_serving_support import GRID  # the serving tests' small bucket grid

    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    rows = [
        {"id": 1, "messages": CONVERSATION, "max_new_tokens": 4, "ignore_eos": True},
        {"id": 2, "prompt": "w5", "messages": CONVERSATION},
        {"id": 3, "messages": [{"role": "robot", "content": "w5"}]},
        {"id": 4, "messages": [{"role": "assistant", "content": "w5"}]},
        {"id": 5, "messages": "w5"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["batch-generate", str(src), "-o", str(out), "--errors", str(err), "--checkpoint", str(checkpoint)]
    assert main([*args, *GRID]) == 0
    done = [json.loads(line) for line in out.read_text().splitlines()]
    ids = model.encode_chat(CONVERSATION)
    assert [d["id"] for d in done] == [1]
    assert done[0]["tokens"] == client.generate(ids, max_new_tokens=4, ignore_eos=True, seed=0).tokens
    errors = {e["id"]: e["error"] for e in map(json.loads, err.read_text().splitlines())}
    assert errors[2] == 'give "prompt" (text) or "messages" (a chat), not both'
    assert errors[3].startswith("messages[0].role must be one of system, user, assistant")
    assert errors[4] == "messages: chat template: Conversation must start with a system or user message"
    assert errors[5].startswith("messages must be a list")


def test_a_template_that_cannot_compile_is_refused_at_convert_and_load(hf_dir, checkpoint, tmp_path, capsys):
    """A syntax error in the template fails `convert` and loading in one line naming the file and the line, instead
    of answering every chat request with it; nothing is written."""
    import shutil

    broken_hf = tmp_path / "hf-broken"
    shutil.copytree(hf_dir, broken_hf)
    settings = json.loads((broken_hf / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m.content }\n{% endfor %}"
    (broken_hf / "tokenizer_config.json").write_text(json.dumps(settings))
    assert main(["convert", "--from-hf", str(broken_hf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer_config.json: chat template: line 1:" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    broken = tmp_path / "ckpt-broken"
    shutil.copytree(checkpoint, broken)
    (broken / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(UserError, match=r"chat_template.jinja: chat template: line 1: .*delete it to serve without"):
        read_checkpoint_info(broken)
    (broken / "chat_template.jinja").unlink()  # as the message says: the model loads, without chat
    assert read_checkpoint_info(broken).chat is None


@pytest.mark.parametrize("last", ["w30 w31", "w30 w31 ", ""])  # a plain end, trailing space kept, nothing yet
def test_continue_final_message_cuts_where_transformers_does(hf_dir, last):
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": last}]
    expected = hf.apply_chat_template(conversation, continue_final_message=True, tokenize=False)
    options = {"continue_final_message": True, "add_generation_prompt": False}
    got = render_chat(TEMPLATE, conversation, "<s>", "</s>", extra=options)
    assert got == expected and got.endswith("<|im_start|>assistant\n" + last)
    no_prompt = render_chat(TEMPLATE, CONVERSATION, "<s>", "</s>", extra={"add_generation_prompt": False})
    assert no_prompt == hf.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=False)
    for extra, message in (
        ({"continue_final_message": True}, "continue_final_message: needs add_generation_prompt false"),
        ({"add_generation_prompt": "no"}, "chat_template_kwargs.add_generation_prompt: expected true or false"),
    ):
        with pytest.raises(ChatError, match=message):
            render_chat(TEMPLATE, conversation, "<s>", "</s>", extra=extra)
    with pytest.raises(ChatError, match=r"messages\[3\].role: continue_final_message continues the assistant's"):
        render_chat(TEMPLATE, CONVERSATION, "<s>", "</s>", extra=options)
