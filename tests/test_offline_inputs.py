"""score / batch-generate inputs that must be refused or finished without a model: output and errors paths in a
missing folder (one line, exit 2, no file created), a directory as input, unknown keys and empty prompts (per line,
in the errors file), an empty input or a finished resume (no model loaded), --max-batch / --max-context 0, and the
fields listed in each command's --help."""

import json
import subprocess

import pytest
from meshserve.serving.jsonl_jobs import GENERATE_KEYS, SCORE_KEYS, prepare_job
from test_serving_support import env, meshserve

KINDS = ["score", "batch-generate"]
LINE = {"score": {"prompt": "ab", "continuation": "c"}, "batch-generate": {"prompt": "ab"}}
# A checkpoint that cannot load: a run that reaches model loading fails with this, so exit 0 proves it never did.
NO_MODEL = ["--checkpoint", "/nonexistent/meshserve-ckpt"]


def _run(tmp_path, *args, timeout=120):
    return subprocess.run(meshserve(*args), capture_output=True, text=True, env=env(), timeout=timeout, cwd=tmp_path)


def _files(tmp_path) -> dict:
    return {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["output", "errors"])
def test_a_path_in_a_missing_folder_is_refused_before_loading_and_creates_nothing(tmp_path, kind, which):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, **LINE[kind]}) + "\n")
    before = _files(tmp_path)
    paths = ["-o", "nodir/x.jsonl"] if which == "output" else ["-o", "x.jsonl", "--errors", "nodir/e.jsonl"]
    done = _run(tmp_path, kind, "in.jsonl", *paths, "--model", "tiny")
    assert done.returncode == 2, done.stderr
    assert "folder nodir does not exist" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "compiling" not in done.stderr
    assert _files(tmp_path) == before  # no empty x.jsonl left behind


@pytest.mark.parametrize("which", ["output", "errors"])
def test_a_path_no_file_can_be_created_in_is_refused_before_loading(tmp_path, which):
    """/proc passes os.access for root (CI runs as root): only creating the file shows it cannot be written."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, **LINE["score"]}) + "\n")
    before = _files(tmp_path)
    paths = ["-o", "/proc/x.jsonl"] if which == "output" else ["-o", "x.jsonl", "--errors", "/proc/e.jsonl"]
    done = _run(tmp_path, "score", "in.jsonl", *paths, "--model", "tiny")
    assert done.returncode == 2, done.stderr
    what = "output /proc/x.jsonl" if which == "output" else "--errors /proc/e.jsonl"
    assert done.stderr.strip().splitlines() == [f"meshserve score: error: {what} cannot be written: No such file or "
                                                "directory"]  # fmt: skip
    assert _files(tmp_path) == before  # the probe for --errors left no x.jsonl either


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_as_input_is_named_a_directory(tmp_path, kind):
    (tmp_path / "d").mkdir()
    done = _run(tmp_path, kind, "d", "-o", "x.jsonl", *NO_MODEL)
    assert done.returncode == 2 and "input d is a directory" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag", ["--max-batch", "--max-context"])
def test_zero_batch_or_context_is_refused_not_replaced_by_the_default(tmp_path, kind, flag):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, **LINE[kind]}) + "\n")
    done = _run(tmp_path, kind, "in.jsonl", "-o", "x.jsonl", "--model", "tiny", flag, "0")
    assert done.returncode == 2, done.stderr
    field = flag[2:].replace("-", "_")
    assert f"{field} must be in [" in done.stderr and "got 0" in done.stderr and "Traceback" not in done.stderr


def test_unknown_keys_and_empty_fields_are_refused_per_line_naming_them(tmp_path):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    rows = [
        {"id": 1, "prompt": "a", "max_tokens": 3},  # the typo that used to fall back to 64 tokens unseen
        {"id": 2, "prompt": ""},
        {"id": 3, "prompt": "a", "max_new_tokens": 3, "top_logprobs": 2, "stop": ["x"], "ignore_eos": True},
        {"id": 4, "prompt": "a", "tempreature": 0.5, "topk": 3},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = prepare_job("batch-generate", src, out, err)
    assert [j.id for j in job.todo] == [3]  # every known key is accepted
    bad = {line: message for line, _, message in job.bad}
    assert set(bad) == {1, 2, 4}
    assert bad[1].startswith("unknown key 'max_tokens' (known: ") and "max_new_tokens" in bad[1]
    assert all(k in bad[1] for k in GENERATE_KEYS)
    assert bad[2] == "prompt must not be empty"
    assert "'tempreature', 'topk'" in bad[4]
    assert not out.exists() and not err.exists()  # reading writes nothing

    src.write_text(
        "".join(json.dumps(r) + "\n" for r in [{"id": 1, "prompt": "", "continuation": "b"},
        {"id": 2, "prompt": "a", "continuation": ""}, {"id": 3, "prompt": "a", "continuation": "b", "max_new_tokens": 2},
        {"id": 4, "prompt": "a", "continuation": "b"}])
    )  # fmt: skip
    job = prepare_job("score", src, out, err)
    assert [j.id for j in job.todo] == [4]
    bad = {line: message for line, _, message in job.bad}
    assert bad[1] == "prompt must not be empty" and bad[2] == "continuation must not be empty"
    assert bad[3] == f"unknown key 'max_new_tokens' (known: {', '.join(SCORE_KEYS)})"


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_to_do_finishes_without_loading_the_model(tmp_path, kind):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "x.jsonl", tmp_path / "x.jsonl.errors.jsonl"
    src.write_text("")
    done = _run(tmp_path, kind, "in.jsonl", "-o", "x.jsonl", "--json", *NO_MODEL)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done"] == 0 and "compiling" not in done.stderr
    assert not err.exists()  # no errors, no errors file

    # A finished resume: every id is in OUT; the only other line is bad (reported, no model needed for that).
    src.write_text(json.dumps({"id": 1, **LINE[kind]}) + "\n" + json.dumps({"id": 2, "prompt": "", "x": 1}) + "\n")
    out.write_text(json.dumps({"id": 1}) + "\n")
    done = _run(tmp_path, kind, "in.jsonl", "-o", "x.jsonl", "--json", *NO_MODEL)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["done"], summary["skipped"], summary["errors"]) == (0, 1, 1)
    assert [json.loads(x)["line"] for x in err.read_text().splitlines()] == [2]
    assert "unknown key 'x'" in err.read_text()

    # Same input with the bad line fixed: the old errors file is emptied (it described an earlier input).
    src.write_text(json.dumps({"id": 1, **LINE[kind]}) + "\n")
    done = _run(tmp_path, kind, "in.jsonl", "-o", "x.jsonl", "--json", *NO_MODEL)
    assert done.returncode == 0 and json.loads(done.stdout)["errors"] == 0 and err.read_text() == ""
    assert out.read_text() == json.dumps({"id": 1}) + "\n"


@pytest.mark.parametrize("kind", KINDS)
def test_help_lists_the_input_and_output_fields(tmp_path, kind):
    done = _run(tmp_path, kind, "--help")
    assert done.returncode == 0
    text = done.stdout
    assert "COMMAND" not in text
    keys = SCORE_KEYS if kind == "score" else GENERATE_KEYS
    outputs = ("logprob", "token_logprobs", "greedy") if kind == "score" else ("text", "tokens", "finish_reason")
    for key in (*keys, *outputs):
        assert f"\n  {key} " in text, key  # one line per field, in the epilog
    if kind == "batch-generate":
        assert "default: 64" in text and "default 0" in text  # defaults are stated
