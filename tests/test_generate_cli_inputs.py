"""`meshserve generate` input checks found by a user audit: out-of-range values with --server are refused before any
request is sent (the same checks as in process), unreadable files and bad --timeout, flags that would be ignored
(--checkpoint with --model, layout flags without a mesh, --server-only flags in process), empty prompts, defaults in
--help, and the status line on a terminal's stderr."""

import json
import os
import pty
import socket
import subprocess
import sys

import pytest
from cli_helpers import checkpoint_fixture, run_cli
from meshserve.serving.client import Client

checkpoint = checkpoint_fixture(seed=0)


@pytest.fixture(scope="module")
def closed_target() -> str:
    """HOST:PORT where nothing listens: a request that reached the network would fail as UNAVAILABLE instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _one_line_error(capsys, *argv: str) -> str:
    code, out, err = run_cli(capsys, "generate", *argv)
    assert code == 2 and out == "", err
    assert err.startswith("meshserve generate: error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "-1"], "seed must be an integer in [0, 2**63), got -1"),
        (["--seed", str(2**64)], f"seed must be an integer in [0, 2**63), got {2**64}"),
        (["--top-k", str(2**32)], f"top_k must be an integer in [0, {2**31 - 1}] (0 = off), got {2**32}"),
        (["--max-new-tokens", str(2**32 + 1)], f"max_new_tokens must be an integer in [1, {2**31 - 1}]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer in [1, "),
        (["--min-tokens", "9", "--max-new-tokens", "4"], "--min-tokens must be <= --max-new-tokens (4), got 9"),
        (["--stop", ""], "--stop must be a non-empty string"),
        (["--include-stop-str"], "--include-stop-str applies with --stop only"),
        (["--tokens", f"1,{2**40}"], f"tokens.ids: token id {2**40} is not an integer in [0, "),
        (["--tls-ca", "/nonexistent/ca.pem"], "cannot read --tls-ca /nonexistent/ca.pem: No such file or directory"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0"),
        (["--timeout", "-1"], "--timeout must be a number of seconds > 0, got -1"),
        (["--timeout", "nan"], "--timeout must be a number of seconds > 0, got nan"),
        (["--attention", "heads"], "the server has its own (drop them)"),
    ],
)
def test_with_server_bad_values_are_refused_before_any_request(capsys, closed_target, flags, message):
    err = _one_line_error(capsys, "--server", closed_target, "hi", *flags)
    assert message in err and "UNAVAILABLE" not in err


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--top-k", str(2**32)], ["--top-p", "1.5"], ["--min-p", "2"]])
def test_server_and_in_process_refuse_sampling_values_with_the_same_message(capsys, closed_target, checkpoint, flags):
    remote = _one_line_error(capsys, "--server", closed_target, "hi", *flags)
    local = _one_line_error(capsys, "--checkpoint", checkpoint, "hi", *flags)
    assert remote == local


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        (dict(seed=2**64), r"seed must be"),
        (dict(top_k=2**32), r"top_k must be an integer"),
        (dict(temperature=-0.5), r"temperature must be >= 0"),
        (dict(max_new_tokens=2**32 + 1), r"max_new_tokens must be an integer in \[1, 2147483647\], got 4294967297"),
        (dict(max_new_tokens=True), r"max_new_tokens must be an integer"),
        (dict(prompt=[1, -3]), r"tokens.ids: token id -3 is not an integer"),
    ],
)
def test_client_request_raises_a_value_error_naming_the_field(kwargs, message):
    prompt = kwargs.pop("prompt", "hi")
    with pytest.raises(ValueError, match=message):
        Client.request(prompt, **kwargs)


def test_client_request_accepts_the_edges_of_each_range():
    req = Client.request([0, 2**31 - 1], max_new_tokens=2**31 - 1, seed=2**63 - 1, top_k=2**31 - 1)
    assert (req.max_new_tokens, req.sampling.seed, req.sampling.top_k) == (2**31 - 1, 2**63 - 1, 2**31 - 1)
    assert list(req.tokens.ids) == [0, 2**31 - 1] and not Client.request("hi").HasField("max_new_tokens")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model", "tiny", "hi"], "give --checkpoint or --model, not both: drop --model"),
        (["--max-new-tokens", "4", ""], "PROMPT 1 of 1 is empty"),
        (["a", "", "--tokens", "1"], "PROMPT 2 of 2 is empty"),
        (["--prefill-layout", "wg-x", "hi"], "--prefill-layout needs --mesh XxYxZ"),
        (["--attention", "heads", "hi"], "--attention needs --mesh XxYxZ"),
        (["--decode-layout", "ws1d", "hi"], "--decode-layout needs --mesh XxYxZ"),
        (["--collective-matmul", "--attention", "batch", "hi"], "--attention and --collective-matmul need --mesh"),
        (["--mesh", "1x1x1", "--prefill-layout", "ws2d", "hi"], "--prefill-layout means nothing on the one-device"),
        (["--mesh", "2x2x2", "--decode-layout", "ws1d", "hi"], "default prefill layout ws2d store weights differently"),
        (["--timeout", "5", "hi"], "--timeout only applies with --server"),
        (["--tls-ca", "ca.pem", "--auth-token-file", "t", "hi"], "--auth-token-file and --tls-ca only apply with"),
    ],
)
def test_in_process_flags_that_would_be_ignored_are_refused(capsys, checkpoint, flags, message):
    err = _one_line_error(capsys, "--checkpoint", checkpoint, *flags)
    assert message in err


def test_every_flag_states_its_default():
    import argparse

    from meshserve.serving.cli_generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 20
    missing = [a.option_strings[0] for a in options if "default" not in (a.help or "")]
    assert missing == []
    seed = next(a for a in options if a.dest == "seed")
    assert f"default {seed.default}" in seed.help


def test_success_writes_nothing_to_stderr_when_it_is_not_a_terminal(capsys, checkpoint):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", checkpoint, "--json", "--max-new-tokens", "2", "hi")
    assert code == 0 and err == "" and len(json.loads(out)["tokens"]) == 2


def test_status_line_goes_to_a_terminals_stderr_and_never_to_stdout():
    primary, secondary = pty.openpty()  # a real terminal for stderr; stdout stays a pipe, as `| jq` would have it
    cmd = [sys.executable, "-m", "meshserve.serving.cli", "generate", "--model", "tiny", "--tokens", "1,2,3",
           "--max-new-tokens", "2", "--json", "--compile-cache", "off"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=secondary, env=dict(os.environ), timeout=180)
    finally:
        os.close(secondary)
    seen = b""
    while True:  # the pty keeps what the child wrote until read; EOF (OSError on Linux) once drained
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert len(json.loads(proc.stdout)["tokens"]) == 2  # stdout: the JSON line alone
    text = seen.decode()
    assert "loading preset tiny" in text and "compiling" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared before the results


def test_stop_token_ids_end_in_process_generation_and_ids_outside_the_vocabulary_are_refused(capsys):
    from cli_helpers import run_cli

    base = ("generate", "--model", "tiny", "--tokens", "1,2,3", "--max-new-tokens", "10", "--ignore-eos", "--json")
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    plain = json.loads(out)["tokens"]
    stop_at = next(i for i, t in enumerate(plain) if i >= 2 and t not in plain[:i])
    code, out, err = run_cli(capsys, *base, "--stop-token-ids", str(plain[stop_at]))
    row = json.loads(out)
    assert code == 0 and row["tokens"] == plain[: stop_at + 1] and row["finish_reason"] == "stop"
    code, out, err = run_cli(capsys, *base, "--stop-token-ids", "256")
    assert (
        code == 2
        and err.strip() == "meshserve generate: error: --stop-token-ids: token id 256 outside the vocabulary [0, 256)"
    )


def test_client_request_takes_whole_floats_for_integer_fields():
    # The checks accept 2.0 as the integer it is; protobuf's int fields must get an int, not a TypeError.
    req = Client.request("hi", top_k=2.0, seed=3.0, top_logprobs=4.0)
    assert (req.sampling.top_k, req.sampling.seed, req.top_logprobs) == (2, 3, 4)


@pytest.mark.parametrize("flag", ["--tokens", "--stop-token-ids"])
def test_an_empty_item_in_a_token_list_is_refused_naming_the_flag(capsys, flag):
    """`--tokens 1,,2` ran as 1,2 and `--stop-token-ids ,` as none: a typo passed unseen."""
    from meshserve.serving.cli import main

    for value in ("1,,2", ","):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "hi", flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"meshserve generate: error: argument {flag}: expected comma-separated integers"), err
        assert "(an empty item)" in err


@pytest.mark.parametrize("command", ["serve", "score", "batch-generate"])
@pytest.mark.parametrize("flag", ["--length-buckets", "--decode-buckets"])
def test_an_empty_item_in_a_bucket_list_is_refused_naming_the_flag(capsys, command, flag):
    """`16,,32` was read as 16,32 and `,` as the default grid: a typo passed unseen."""
    from meshserve.serving.cli import main

    files = [] if command == "serve" else ["in.jsonl", "-o", "out.jsonl"]
    for value in ("16,,32", ","):
        with pytest.raises(SystemExit) as exit_:
            main([command, *files, flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}: " in err and "no empty item" in err, err
        assert err.count("\n") == 1, err  # one line (before: argparse's usage block first)
