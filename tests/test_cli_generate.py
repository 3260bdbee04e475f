"""`meshserve generate`: JSON output, batching of prompts, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import checkpoint_fixture, run_cli

checkpoint = checkpoint_fixture(seed=0)


def test_json_lines_in_input_order_and_padding_changes_nothing(capsys, checkpoint):
    base = ["generate", "--checkpoint", checkpoint, "--json", "--max-new-tokens", "6"]
    code, out, _ = run_cli(capsys, *base, "--tokens", "1,2,3,4,5,6,7", "--tokens", "9,8")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 6 == len(r["logprobs"]) for r in rows)
    assert all(r["finish_reason"] == "length" and isinstance(r["text"], str) for r in rows)
    _, alone, _ = run_cli(capsys, *base, "--tokens", "9,8")
    assert json.loads(alone)["tokens"] == rows[1]["tokens"]


def test_text_prompts_and_sampling_flags(capsys, checkpoint):
    base = ["generate", "--checkpoint", checkpoint, "--json", "--max-new-tokens", "8", "hello"]
    _, a, _ = run_cli(capsys, *base, "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    _, b, _ = run_cli(capsys, *base, "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    _, c, _ = run_cli(capsys, *base, "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "2")
    assert a == b and a != c


def test_stop_strings_cut_tokens_and_text_as_a_server_does(capsys, checkpoint):
    base = ["generate", "--checkpoint", checkpoint, "--json", "--max-new-tokens", "12", "--ignore-eos", "hello"]
    _, out, _ = run_cli(capsys, *base)
    full = json.loads(out)
    text = full["text"]
    k = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])  # a stop from the middle
    stop = text[k : k + 2]
    _, out, _ = run_cli(capsys, *base, "--stop", stop, "--stop", "never in it")
    cut = json.loads(out)
    assert (cut["text"], cut["finish_reason"]) == (text[: text.find(stop)], "stop")
    n = len(cut["tokens"])
    assert n < 12 and cut["tokens"] == full["tokens"][:n] and cut["logprobs"] == full["logprobs"][:n]
    _, out, _ = run_cli(capsys, *base, "--stop", stop, "--include-stop-str")
    kept = json.loads(out)
    assert (kept["text"], kept["tokens"]) == (cut["text"] + stop, cut["tokens"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1", "--tokens", "1"], "temperature must be >= 0"),
        (["--top-p", "0", "--tokens", "1"], r"top_p must be in (0, 1]"),
        (["--top-k", "-2", "--tokens", "1"], "top_k must be an integer in [0, "),
        (["--max-new-tokens", "0", "--tokens", "1"], "max_new_tokens must be >= 1"),
        (["--tokens", "1,999"], "token id 999 outside the vocabulary [0, 256)"),
        (["--tokens", ",".join(["1"] * 127), "--max-new-tokens", "2"], "exceed the context limit max_seq_len=128"),
        (["--model", "gpt-9", "--tokens", "1"], "unknown model preset 'gpt-9'"),
        ([], "give at least one PROMPT or --tokens"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, checkpoint, args, message):
    argv = ["generate", *([] if "--model" in args else ["--checkpoint", checkpoint]), *args]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_or_corrupt_checkpoint_from_a_real_process(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meshserve.json").write_text("{oops")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for path, message in [(tmp_path / "none", "checkpoint not found"), (tmp_path / "broken", "corrupt checkpoint")]:
        proc = subprocess.run(
            [sys.executable, "-m", "meshserve.serving.cli", "generate", "--checkpoint", str(path), "hi"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2
        assert message in proc.stderr and "Traceback" not in proc.stderr
