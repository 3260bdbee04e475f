"""logit_bias and min_tokens through every entry point a user runs, on a tiny checkpoint whose end-of-sequence id is
EOS: a real `meshserve serve` over gRPC (unary and streaming, bad entries answer INVALID_ARGUMENT naming the field),
the client's own checks, `meshserve generate --server` with --logit-bias/--min-tokens, and `meshserve batch-generate`
lines (a bad logit_bias goes to the errors file)."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from meshserve.model.sampling import L_MAX, SamplingError
from meshserve.serving.client import Client
from test_serving_support import GRID, ServerProcess, env, meshserve

EOS = 2  # the checkpoint's end-of-sequence id (the tiny preset has none of its own)
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset with random f32 weights and eos_id EOS (ByteTokenizer), so min_tokens has an eos to hold."""
    import jax
    from meshserve.model.checkpoint import save_checkpoint
    from meshserve.model.config import get_config
    from meshserve.model.params import init_params

    config = get_config("tiny", eos_id=EOS)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-eos", config, init_params(config, jax.random.key(0)),
                           "f32")  # fmt: skip


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess(checkpoint)
    yield proc
    proc.close()


def _stream(client, prompt, **kw) -> tuple[list[int], str]:
    chunks = list(client.generate_stream(prompt, **kw))
    return [t for c in chunks for t in c.tokens], chunks[-1].finish_reason


def test_logit_bias_plus_100_gives_that_token_every_step(client):
    for token in (3, 77, 200, 255):
        r = client.generate(PROMPT, max_new_tokens=5, logit_bias={token: 100})
        assert r.tokens == [token] * 5 and r.finish_reason == "length", (token, r.tokens)
    assert _stream(client, PROMPT, max_new_tokens=5, logit_bias={90: 100.0}) == ([90] * 5, "length")
    # -100 on the greedy pick moves every step away from it.
    plain = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True).tokens
    banned = client.generate(PROMPT, max_new_tokens=5, ignore_eos=True, logit_bias={plain[0]: -100}).tokens
    assert plain[0] not in banned


def test_min_tokens_holds_eos_and_stop_token_ids_back(client):
    for temperature in (0.0, 1.0):
        r = client.generate(PROMPT, max_new_tokens=10, logit_bias={EOS: 100}, min_tokens=3, temperature=temperature,
                            seed=7)  # fmt: skip
        assert r.tokens[-1] == EOS and len(r.tokens) == 4 and r.finish_reason == "stop", r.tokens
    assert _stream(client, PROMPT, max_new_tokens=10, logit_bias={EOS: 100}, min_tokens=6)[1] == "stop"
    assert len(_stream(client, PROMPT, max_new_tokens=10, logit_bias={EOS: 100}, min_tokens=6)[0]) == 7
    # A stop_token_id is held back too (and eos with it, though unbiased).
    r = client.generate(PROMPT, max_new_tokens=10, logit_bias={9: 100}, min_tokens=2, stop_token_ids=[9])
    assert r.tokens[2:] == [9] and 9 not in r.tokens[:2] and r.finish_reason == "stop"
    # ignore_eos: eos ends nothing, so min_tokens holds nothing back and the biased eos comes at once, to the end.
    r = client.generate(PROMPT, max_new_tokens=4, logit_bias={EOS: 100}, min_tokens=3, ignore_eos=True)
    assert r.tokens == [EOS] * 4 and r.finish_reason == "length"
    # A stop string is held back too (as vLLM): 'M' (id 77, forced) ends the text at the 5th token, not the 1st.
    forced = dict(max_new_tokens=10, logit_bias={77: 100}, ignore_eos=True, stop=["M"])
    assert [
        (len(r.tokens), r.text)
        for r in (client.generate(PROMPT, **forced), client.generate(PROMPT, min_tokens=5, **forced))
    ] == [(1, ""), (5, "MMMM")]
    # Without max_new_tokens, the default length stretches to min_tokens (a shorter default could never meet it).
    r = client.generate(PROMPT, logit_bias={EOS: 100}, min_tokens=80)  # the default is 64
    assert len(r.tokens) == 80 and EOS not in r.tokens and r.finish_reason == "length", r.tokens


def test_bad_entries_answer_invalid_argument_naming_the_field(client):
    cases = [
        (dict(logit_bias={5: 101.0}), "sampling.logit_bias[5] must be a number in [-100, 100]"),
        (dict(logit_bias={5: float("nan")}), "sampling.logit_bias[5] must be a number in [-100, 100]"),
        (dict(logit_bias={-1: 1.0}), "sampling.logit_bias: token id -1 is not an integer"),
        (dict(logit_bias={256: 1.0}), "sampling.logit_bias: token id 256 outside the vocabulary [0, 256)"),
        (dict(logit_bias={i: 1.0 for i in range(L_MAX + 1)}), f"sampling.logit_bias: {L_MAX + 1} entries exceed"),
        # 64 entries fit, but min_tokens needs one more for the server's eos (the client cannot know it).
        (dict(logit_bias={i: 1.0 for i in range(10, 10 + L_MAX)}, min_tokens=2),
         f"sampling.logit_bias: {L_MAX} entries + 1 for min_tokens"),
        (dict(min_tokens=-3), "sampling.min_tokens must be an integer in [0, "),
        (dict(min_tokens=3), "sampling.min_tokens must be <= max_new_tokens (2), got 3"),  # vLLM refuses it too
        (dict(truncate_prompt_tokens=500), "truncate_prompt_tokens must be -1 or in [1, 127] (0 = off), got 500"),
    ]  # fmt: skip
    for kw, message in cases:
        for call in (client.generate, lambda p, **k: list(client.generate_stream(p, **k))):
            with pytest.raises(grpc.RpcError) as err:
                call(PROMPT, validate=False, max_new_tokens=2, **kw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kw, err.value.details())
            assert message in err.value.details(), (message, err.value.details())
    # The client refuses what it can check itself before sending.
    for kw in (dict(logit_bias={5: 101}), dict(logit_bias={i: 1 for i in range(L_MAX + 1)}), dict(min_tokens=-1)):
        with pytest.raises(SamplingError):
            Client.request(PROMPT, **kw)
    assert len(client.generate(PROMPT, max_new_tokens=3, ignore_eos=True).tokens) == 3  # still serving


def test_generate_cli_sends_both_flags_and_refuses_bad_ones(server):
    cmd = meshserve("generate", "--server", server.target, "--tokens", "5,6,7,8", "--max-new-tokens", "8",
                    "--logit-bias", f"{EOS}:100,40:-100", "--min-tokens", "2", "--json")  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.splitlines()[-1])
    assert len(row["tokens"]) == 3 and row["tokens"][-1] == EOS and row["finish_reason"] == "stop", row
    # --stop and --include-stop-str reach the server: token 77 forced every step, stopped at its second copy.
    forced = ["--tokens", "5,6,7,8", "--max-new-tokens", "6", "--logit-bias", "77:100", "--ignore-eos", "--json"]
    rows = []
    for extra in ([], ["--stop", "MM"], ["--stop", "MM", "--include-stop-str"]):
        done = subprocess.run(meshserve("generate", "--server", server.target, *forced, *extra), capture_output=True,
                              text=True, env=env(), timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows.append(json.loads(done.stdout.splitlines()[-1]))
    assert rows[0]["text"] == "M" * 6, rows[0]  # the byte tokenizer's id 77
    assert [(r["text"], len(r["tokens"]), r["finish_reason"]) for r in rows[1:]] == [("", 2, "stop"), ("MM", 2, "stop")]
    for flags, message in [(["--logit-bias", "7"], "TOKEN_ID:BIAS pairs"),
                           (["--logit-bias", "7:300"], "logit_bias[7] must be a number in [-100, 100]"),
                           (["--min-tokens", "-2"], "min_tokens must be an integer in [0, ")]:  # fmt: skip
        bad = subprocess.run(meshserve("generate", "--server", server.target, "hi", *flags), capture_output=True,
                             text=True, env=env(), timeout=120)  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_batch_generate_lines_take_both_fields_and_report_bad_ones(checkpoint, tmp_path):
    rows = [
        {"id": "forced", "prompt": "hi", "max_new_tokens": 4, "logit_bias": {"77": 100}, "ignore_eos": True},
        {"id": "min", "prompt": "hi", "max_new_tokens": 9, "logit_bias": {str(EOS): 100}, "min_tokens": 5},
        {"id": "key", "prompt": "hi", "logit_bias": {"abc": 1}},
        {"id": "range", "prompt": "hi", "logit_bias": {"7": 101}},
        {"id": "vocab", "prompt": "hi", "logit_bias": {"256": 1}},
        {"id": "list", "prompt": "hi", "logit_bias": [[7, 1]]},
        {"id": "negative", "prompt": "hi", "min_tokens": -1},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = meshserve("batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint), *GRID, "--json")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)
    assert done.returncode == 0, done.stderr
    by_id = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(by_id) == {"forced", "min"}
    assert by_id["forced"]["tokens"] == [77] * 4
    assert by_id["min"]["tokens"][-1] == EOS and len(by_id["min"]["tokens"]) == 6
    assert by_id["min"]["finish_reason"] == "stop"
    errors = {e["id"]: e for e in map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    expected = {
        "key": 'logit_bias: key "abc" is not a token id',
        "range": "logit_bias[7] must be a number in [-100, 100]",
        "vocab": "logit_bias: token id 256 outside the vocabulary [0, 256)",
        "list": "logit_bias must be a JSON object",
        "negative": "min_tokens must be an integer in [0, ",
    }
    assert set(errors) == set(expected)
    for key, message in expected.items():
        assert message in errors[key]["error"] and errors[key]["line"] == 1 + [r["id"] for r in rows].index(key)
