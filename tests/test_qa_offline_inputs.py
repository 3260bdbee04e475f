"""score / batch-generate input files as they come from other tools: a UTF-8 byte order mark and CRLF line ends
are read, a byte that is not UTF-8 and a lone surrogate escape are bad lines naming line and field (never a
replacement character in the prompt, never a traceback that stops the job), a prompt longer than the context names
the prompt, a hard link or a pipe is told apart from a file, and one OUT takes one job at a time."""

import json
import subprocess
from pathlib import Path

import pytest
from meshserve.serving.jsonl_jobs import OfflineError, prepare_job
from test_serving_support import env, meshserve

LINE = {"score": {"prompt": "ab", "continuation": "c"}, "batch-generate": {"prompt": "ab"}}


@pytest.mark.parametrize("kind", ["score", "batch-generate"])
def test_bom_crlf_bad_bytes_and_lone_surrogates(tmp_path, kind):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    good = [json.dumps({"id": i, **LINE[kind]}).encode() for i in range(3)]
    latin1 = json.dumps({"id": "latin1", **LINE[kind]}).encode().replace(b'"ab"', b'"caf\xe9"')  # Windows-1252 é
    surrogate = json.dumps({"id": "half", **LINE[kind]}).replace('"ab"', '"x \\ud800"').encode()
    # A lone surrogate in a key, and in the id itself: before, the key's message carried the surrogate and writing the
    # errors file crashed the job (UnicodeEncodeError).
    in_key = json.dumps({"id": "key", **LINE[kind], "\ud800": 1}).encode()
    in_id = json.dumps({"id": "\udc81", **LINE[kind]}).encode()
    lines = [good[0], latin1, good[1], surrogate, good[2], in_key, in_id]
    src.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    job = prepare_job(kind, src, out, err)
    assert [j.id for j in job.todo] == [0, 1, 2]  # the BOM line and the CRLF lines are read
    assert [(line, id_) for line, id_, _ in job.bad] == [(2, None), (4, "half"), (6, "key"), (7, None)]
    assert job.bad[0][2] == "not UTF-8: byte 0xe9 at column 32 (save the file as UTF-8)"
    assert job.bad[1][2] == "prompt: not valid text (a lone surrogate such as \\ud800)"
    assert job.bad[2][2] == '"\\ud800": a field name that is not valid text (a lone surrogate)'
    assert job.bad[3][2] == "id: not valid text (a lone surrogate such as \\ud800)"
    for line, id_, message in job.bad:  # what the errors file writes: UTF-8 text
        json.dumps({"line": line, "id": id_, "error": message}, ensure_ascii=False).encode("utf-8")


def test_a_prompt_longer_than_the_context_names_the_prompt_and_ignore_eos_takes_booleans_only(tmp_path):
    """tiny's context is 128 tokens. Before: "max_new_tokens must be an integer in [1, -x]" for a line that set no
    max_new_tokens. It is found once the model is loaded; the errors file lists it in input line order among the
    lines refused on reading (before: after them all)."""
    rows = [{"id": "long", "prompt": "word " * 400}, {"id": "typo", "prompt": "a", "max_tokens": 2},
            {"id": "ok", "prompt": "a", "max_new_tokens": 2},
            {"id": "eos", "prompt": "a", "ignore_eos": "false"},
            {"id": "min", "prompt": "a", "max_new_tokens": 2, "min_tokens": 3}]  # fmt: skip
    lines = [json.dumps(r) for r in rows] + ['{"id": "half", "prompt": "\\udc80"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run(meshserve("batch-generate", "in.jsonl", "-o", "out.jsonl", "--model", "tiny", "--json"),
                          capture_output=True, text=True, env=env(), timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["done"], summary["errors"]) == (1, 5)
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [1, 2, 4, 5, 6]
    assert (
        errors[0]["error"].startswith("prompt: ")
        and "leave no room to generate in the context of 128" in (errors[0]["error"])
    )
    assert errors[2]["error"] == 'ignore_eos must be true or false, got "false"'  # before: taken as true
    assert errors[3]["error"] == "min_tokens must be <= max_new_tokens (2), got 3"  # before: accepted
    # stderr is a pipe here, as a log file would be: plain progress lines, no carriage-return redraws.
    assert "\r" not in done.stderr and "batch-generate: 2/2 tok (100%)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("meshserve batch-generate: 1 written, 0 already done, 5 bad lines")
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["ok"]


def test_a_hard_link_to_the_input_is_refused_as_output(tmp_path):
    """Before: OUT read IN's own lines as results ("0 written, 50 already done") and a run would append to IN."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, **LINE["score"]}) + "\n")
    (tmp_path / "link.jsonl").hardlink_to(src)
    with pytest.raises(OfflineError, match="output must be a different file from the input"):
        prepare_job("score", src, tmp_path / "link.jsonl", tmp_path / "err.jsonl")
    with pytest.raises(OfflineError, match="--errors must be a different file from the input"):
        prepare_job("score", src, tmp_path / "out.jsonl", tmp_path / "link.jsonl")
    assert src.read_text() == json.dumps({"id": 1, **LINE["score"]}) + "\n"


def test_input_from_a_pipe_is_read_and_output_must_be_a_regular_file(tmp_path):
    """Before: /dev/stdin was "input file not found", and -o /dev/stdout hung forever reading the pipe back (and the
    settings record would have gone to /dev/stdout.settings.json)."""
    line = json.dumps({"id": 1, **LINE["score"]}) + "\n"
    (tmp_path / "x.jsonl").write_text(json.dumps({"id": 1, "logprob": -1.0}) + "\n")  # id 1 done: no model loads
    done = subprocess.run(meshserve("score", "/dev/stdin", "-o", "x.jsonl", "--json", "--checkpoint", "/nonexistent"),
                          input=line, capture_output=True, text=True, env=env(), timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped"] == 1
    src = tmp_path / "in.jsonl"
    src.write_text(line)
    with pytest.raises(OfflineError, match="output /dev/null is not a regular file"):
        prepare_job("score", src, Path("/dev/null"), tmp_path / "err.jsonl")


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Before: the same command started twice wrote every line twice (600 lines for 300 ids). The claim on OUT is
    held here the way a running job holds it; a second job fails in one line before reading OUT."""
    from meshserve.serving.cli_offline import _claim_output

    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, **LINE["score"]}) + "\n")
    claim = _claim_output(tmp_path / "out.jsonl")
    assert claim is not None
    try:
        with pytest.raises(OfflineError, match="is being written by another meshserve job"):
            _claim_output(tmp_path / "sub" / ".." / "out.jsonl")  # the same OUT under another spelling
        done = subprocess.run(meshserve("score", "in.jsonl", "-o", "out.jsonl", "--checkpoint", "/nonexistent"),
                              capture_output=True, text=True, env=env(), timeout=120, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [
            "meshserve score: error: output out.jsonl is being written by another meshserve job; wait for it to end "
            "(a rerun then resumes it) or write to another -o"
        ]
        assert not (tmp_path / "out.jsonl").exists()
    finally:
        claim.close()
    again = _claim_output(tmp_path / "out.jsonl")  # released with the job: the next run may go
    assert again is not None
    again.close()
