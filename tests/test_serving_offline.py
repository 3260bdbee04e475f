"""The offline job's file handling without a model: resuming OUT never loses a complete result line, and the
errors file can never be the input or the output."""

import json

import pytest
from meshserve.serving.jsonl_jobs import OfflineError, resume_output


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def test_resume_skips_blank_lines_and_keeps_every_result(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [json.dumps({"id": f"r{i}", "text": "x"}) + "\n" for i in range(1000)]
    _write(out, [rows[0], "\n", *rows[1:500], "   \n", *rows[500:]])
    before = out.read_bytes()
    done = resume_output(out)
    assert len(done) == 1000  # every id, across the blank lines
    assert out.read_bytes() == before  # nothing truncated


def test_resume_truncates_only_an_unterminated_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [json.dumps({"id": i}) + "\n" for i in range(5)]
    _write(out, [*rows, '{"id": 5, "text": "tru'])
    assert resume_output(out) == {json.dumps(i) for i in range(5)}
    assert out.read_text() == "".join(rows)


def test_resume_refuses_a_corrupt_complete_line_and_changes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [json.dumps({"id": i}) + "\n" for i in range(5)]
    _write(out, [*rows[:2], "{not json\n", *rows[2:]])
    before = out.read_bytes()
    with pytest.raises(OfflineError, match="line 3"):
        resume_output(out)
    assert out.read_bytes() == before
    _write(out, [*rows[:2], '{"no_id": 1}\n', *rows[2:]])
    with pytest.raises(OfflineError, match="line 3"):
        resume_output(out)


@pytest.mark.parametrize("which", ["input", "output"])
def test_errors_path_equal_to_input_or_output_is_refused_before_anything_is_written(tmp_path, which, monkeypatch):
    import subprocess

    from test_serving_support import env, meshserve

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "a", "continuation": "b"}) + "\n")
    out.write_text(json.dumps({"id": 0, "logprob": -1.0}) + "\n")
    before = {p: p.read_bytes() for p in (src, out)}
    monkeypatch.chdir(tmp_path)
    errors = "./in.jsonl" if which == "input" else "sub/../out.jsonl"  # the same file under another spelling
    (tmp_path / "sub").mkdir()
    done = subprocess.run(
        meshserve("score", "in.jsonl", "-o", "out.jsonl", "--errors", errors),
        capture_output=True, text=True, env=env(), timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--errors must be a different file from the {which}" in done.stderr and "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in (src, out)} == before
