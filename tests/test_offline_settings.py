"""The settings record of score / batch-generate (serving/job_settings.py): what is compared on resume (model config
and checkpoint files, weights, KV cache dtype, reasoning parser) and what is not (mesh, layouts, objective,
speculation, warm-up, context), a changed setting refused before the model loads with OUT left as it was,
--allow-changed-settings recording the change, an older meshserve's OUT (no record) resumed with a warning, a stale
record replaced, a corrupt one named. All without a model but one CLI run on the tiny checkpoint."""

import argparse
import json
import os
import shutil
import subprocess

import pytest
from cli_helpers import checkpoint_fixture
from meshserve.errors import UserError
from meshserve.serving.cli_offline import COMMANDS
from meshserve.serving.job_settings import (
    SettingsChanged,
    SettingsError,
    checkpoint_files,
    differences,
    settings_from_args,
    settings_path,
    write_record,
)
from meshserve.serving.jsonl_jobs import OfflineError, check_paths, prepare_job
from test_serving_support import GRID, env, meshserve

checkpoint = checkpoint_fixture()  # tiny, f32


def _parser(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    COMMANDS[kind][0](parser)
    return parser


def _settings(kind: str, *flags: str):
    return settings_from_args(_parser(kind).parse_args(["in.jsonl", "-o", "out.jsonl", *flags]), kind)


def _diff(kind: str, base: tuple, *flags: str) -> list[str]:
    was, now = _settings(kind, *base), _settings(kind, *base, *flags)
    return differences(was.compared, now.compared, (was.info["model"], now.info["model"]))


def _files(tmp_path) -> tuple[dict, list[str]]:
    """Every file's bytes, and the names in the folder (a temporary file left behind would show)."""
    return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}, sorted(os.listdir(tmp_path))


def test_what_changes_outputs_is_compared_and_nothing_else(checkpoint, monkeypatch):
    ck = ("--checkpoint", checkpoint)
    # The checkpoint's own dtype named, or layout / speed flags changed: the same results, no difference.
    assert _diff("batch-generate", ck, "--weights", "f32") == []
    same = ["--mesh", "2x2x2", "--objective", "latency", "--speculative-tokens", "4", "--warm-up", "all",
            "--max-context", "64", "--layers", "scan", "--max-batch", "4", "--no-prefix-caching", "--prefill-chunk",
            "16", "--length-buckets", "16,32", "--decode-buckets", "1,4"]  # fmt: skip
    assert _diff("batch-generate", ck, *same) == [] and _diff("score", ck, *same) == []
    assert _settings("batch-generate", *ck, *same).info["mesh"] == "2x2x2"  # recorded all the same

    assert _diff("batch-generate", ck, "--weights", "bf16") == ["--weights: recorded f32, now bf16"]
    assert _diff("batch-generate", ck, "--kv-cache-dtype", "int8") == ["--kv-cache-dtype: recorded auto, now int8"]
    assert _diff("batch-generate", ck, "--reasoning-parser", "qwen3") == [
        "--reasoning-parser: recorded none, now qwen3"
    ]
    # score reads no KV cache: int8's is recorded, not compared.
    assert _diff("score", ck, "--kv-cache-dtype", "int8") == []
    assert _settings("score", *ck, "--kv-cache-dtype", "int8").info["kv_cache_dtype"] == "int8"

    # int8 activations (w8a8) change int8 weights' logits; the other int8 matmul paths only their rounding.
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")
    was = _settings("batch-generate", *ck, "--weights", "int8")
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "rowsum")
    assert differences(was.compared, _settings("batch-generate", *ck, "--weights", "int8").compared) == []
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "w8a8")
    now = _settings("score", *ck, "--weights", "int8")
    assert differences(was.compared | {"command": "score"}, now.compared) == [
        "int8 activations (MESHSERVE_INT8_MATMUL=w8a8): recorded false, now true"
    ]
    assert now.info["int8_matmul"] == "w8a8" and _diff("batch-generate", ck) == []  # f32 weights: no int8 matmul
    monkeypatch.delenv("MESHSERVE_INT8_MATMUL")

    # The same tiny config as a preset: random weights, not the checkpoint's files.
    diff = _diff("batch-generate", ck, "--model", "tiny")  # --model wins over --checkpoint, as in load_model
    assert diff == [
        f"model (--checkpoint / --model): recorded checkpoint {os.path.realpath(checkpoint)}, now preset tiny (random "
        "weights)",
        f"checkpoint files: recorded {_show_files(checkpoint)}, now none",
    ]
    score, generate = _settings("score", *ck).compared, _settings("batch-generate", *ck).compared
    assert differences(score, generate) == ["command: recorded score, now batch-generate"]


def _show_files(path) -> str:
    f = checkpoint_files(path)
    return f"{f['files']} files, {f['bytes']} bytes, newest {f['newest']}, digest {f['digest']}"


def test_checkpoint_fingerprint_follows_the_files_not_the_path(checkpoint, tmp_path, monkeypatch):
    from meshserve.model.loading import load_model
    from meshserve.serving import job_settings

    original = checkpoint_files(checkpoint)
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved, copy_function=shutil.copy2)  # as a move: same files, sizes and times
    assert checkpoint_files(moved) == original
    load_model(moved)
    assert checkpoint_files(moved) == original  # loading writes nothing there
    copied = tmp_path / "copied"
    shutil.copytree(checkpoint, copied, copy_function=shutil.copy)  # new mtimes
    assert checkpoint_files(copied)["digest"] == original["digest"]  # small files: by content
    with monkeypatch.context() as m:  # large files (every one, here) go by size and mtime: a fresh copy differs
        m.setattr(job_settings, "HASHED_BYTES", 0)
        assert checkpoint_files(copied)["digest"] != checkpoint_files(checkpoint)["digest"]
    edited = max((p for p in copied.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(edited.read_bytes())
    data[-1] ^= 1  # one bit of the largest file, same size
    stat = edited.stat()
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: the content still shows
    assert checkpoint_files(copied)["digest"] != original["digest"]

    # Another config in the checkpoint's meshserve.json: named field by field (and the file changed).
    meta = json.loads((moved / "meshserve.json").read_text())
    meta["model"]["n_layers"] = 3
    (moved / "meshserve.json").write_text(json.dumps(meta))
    diff = _diff("score", ("--checkpoint", checkpoint), "--checkpoint", str(moved))
    assert diff[:2] == [
        f"model (--checkpoint / --model): recorded checkpoint {os.path.realpath(checkpoint)}, now checkpoint "
        f"{os.path.realpath(moved)}",
        "model config n_layers: recorded 2, now 3",
    ]
    assert diff[2].startswith("checkpoint files: recorded ") and len(diff) == 3


def _job_files(tmp_path, results: int) -> tuple:
    """IN with ids 0-3 (score lines) and OUT with the first `results` of them done."""
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": "a", "continuation": "b"}) + "\n" for i in range(4)))
    if results:
        out.write_text("".join(json.dumps({"id": i, "logprob": -1.0}) + "\n" for i in range(results)))
    return src, out, err


F32, BF16 = _settings("score", "--model", "tiny"), _settings("score", "--model", "tiny", "--weights", "bf16")


def _run(kind, src, out, err, settings, allow=False, results=1):
    """A run as run_score makes it: open, write `results` results (the first ids to do), close."""
    job = prepare_job(kind, src, out, err, lambda: settings, allow)
    writer = job.open()
    for line in job.todo[:results]:
        writer.result({"id": line.id, "logprob": -1.0})
    writer.close()
    return job


def test_a_fresh_job_records_its_settings_when_it_first_writes(tmp_path):
    src, out, err = _job_files(tmp_path, 0)
    job = prepare_job("score", src, out, err, lambda: F32)
    assert job.note is None and not settings_path(out).exists() and not out.exists()  # nothing written yet
    writer = job.open()
    assert not settings_path(out).exists()  # opened, no result yet: no record
    writer.result({"id": 0, "logprob": -1.0})
    assert settings_path(out).exists()  # on disk before OUT's first line, not at close
    writer.close()
    assert _files(tmp_path)[1] == ["in.jsonl", "out.jsonl", "out.jsonl.settings.json"]  # no temporary file left
    record = json.loads(settings_path(out).read_text())
    assert settings_path(out).name == "out.jsonl.settings.json"
    assert record["format"] == 1 and record["settings"] == F32.compared and record["changes"] == []
    assert record["settings"]["weights"] == "f32" and record["info"]["model"] == "preset tiny (random weights)"
    assert "unrecorded_lines" not in record


def test_a_changed_setting_is_refused_leaving_out_as_it_was_until_allowed(tmp_path):
    src, out, err = _job_files(tmp_path, 0)
    _run("score", src, out, err, F32)
    out.write_text("".join(json.dumps({"id": i, "logprob": -1.0}) + "\n" for i in range(2)) + '{"id": 2, "lo')
    assert prepare_job("score", src, out, err, lambda: F32).record is None  # same settings: the record stays
    out.write_text(out.read_text() + '{"id": 2, "lo')  # the resume above cut the partial line: put it back
    before = _files(tmp_path)
    with pytest.raises(SettingsChanged) as e:
        prepare_job("score", src, out, err, lambda: BF16)
    message = str(e.value)
    assert f"recorded in {settings_path(out)}" in message and "--weights: recorded f32, now bf16" in message
    assert "new -o" in message and "--allow-changed-settings" in message and isinstance(e.value, UserError)
    assert _files(tmp_path) == before  # not even the partial last line was cut

    job = _run("score", src, out, err, BF16, allow=True)
    assert job.note == (f"meshserve score: appending with changed settings (--weights: recorded f32, now bf16); "
                        f"recorded in {settings_path(out)} with the first result")  # fmt: skip
    record = json.loads(settings_path(out).read_text())
    assert record["settings"]["weights"] == "bf16"
    [change] = record["changes"]
    assert (change["from"], change["to"], change["results_before"]) == ({"weights": "f32"}, {"weights": "bf16"}, 2)
    assert prepare_job("score", src, out, err, lambda: BF16).record is None  # the change is the new baseline
    with pytest.raises(SettingsChanged, match="--weights: recorded bf16, now f32"):
        prepare_job("score", src, out, err, lambda: F32)


def test_an_allowed_change_stopped_before_its_first_result_leaves_the_record_as_it_was(tmp_path):
    """Before: the record was rewritten when the job opened OUT, so a run with --allow-changed-settings stopped
    after its compile (Ctrl-C, kill) left a record naming bf16 over lines all made with f32, and the plain rerun with
    f32 was refused."""
    src, out, err = _job_files(tmp_path, 0)
    _run("score", src, out, err, F32, results=2)
    before = _files(tmp_path)
    _run("score", src, out, err, BF16, allow=True, results=0)
    assert _files(tmp_path) == before  # a run that writes nothing changes nothing
    assert prepare_job("score", src, out, err, lambda: F32).record is None  # the plain rerun goes on
    with pytest.raises(SettingsChanged, match="--weights: recorded f32, now bf16"):
        prepare_job("score", src, out, err, lambda: BF16)


def test_an_older_out_without_a_record_resumes_with_a_warning_and_gets_one(tmp_path):
    src, out, err = _job_files(tmp_path, 3)
    job = _run("score", src, out, err, F32, results=0)  # stopped before its first result: nothing recorded
    assert not settings_path(out).exists()
    job = _run("score", src, out, err, F32)
    assert job.note == (
        f"meshserve score: warning: {out} has 3 results but no settings record (an older meshserve?); their settings "
        f"are unknown, this run's are recorded in {settings_path(out)} with its first result"
    )
    record = json.loads(settings_path(out).read_text())
    assert record["unrecorded_lines"] == 3 and record["settings"] == F32.compared


@pytest.mark.parametrize("out_text", [None, "", "\n \n"])
def test_a_record_whose_out_is_missing_or_empty_is_replaced(tmp_path, out_text):
    src, out, err = _job_files(tmp_path, 0)
    settings_path(out).write_text("{ a record of an earlier, deleted OUT")
    if out_text is not None:
        out.write_text(out_text)
    job = _run("score", src, out, err, BF16)
    assert job.note is None and json.loads(settings_path(out).read_text())["settings"] == BF16.compared


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "not JSON"),
        ("[]", "not a format 1 settings record"),
        ('{"format": 2, "settings": {}}', "not a format 1 settings record"),
        ('{"format": 1}', 'no "settings" object with a "command"'),
        (
            '{"format": 1, "settings": {"command": "score", "weights": "f32"}}',
            "settings model_config, checkpoint_files missing",
        ),
    ],
)
def test_a_corrupt_record_is_named_not_a_traceback(tmp_path, text, why):
    src, out, err = _job_files(tmp_path, 2)
    settings_path(out).write_text(text)
    with pytest.raises(SettingsError) as e:
        prepare_job("score", src, out, err, lambda: F32)
    assert str(e.value).startswith(f"settings record {settings_path(out)} cannot be read: {why}")
    assert "remove it" in str(e.value) and isinstance(e.value, UserError)


def test_a_job_with_nothing_to_append_reads_no_settings(tmp_path):
    src, out, err = _job_files(tmp_path, 4)

    def no_model():
        raise AssertionError("settings read for a job that appends nothing")

    job = prepare_job("score", src, out, err, no_model)
    assert job.todo == [] and job.record is None


def test_a_record_from_before_int8_activations_were_compared_still_resumes(tmp_path):
    """Records written before the setting existed lack it: their job resumes (nothing to compare it with)."""
    src, out, err = _job_files(tmp_path, 0)
    _run("score", src, out, err, F32)
    record = json.loads(settings_path(out).read_text())
    assert record["settings"].pop("int8_activations") is False
    settings_path(out).write_text(json.dumps(record))
    job = prepare_job("score", src, out, err, lambda: F32)  # no SettingsError, no SettingsChanged
    assert job.note is None and len(job.todo) == 3  # the 3 lines left after the one result


def test_a_config_field_added_since_the_record_is_no_change(tmp_path):
    src, out, err = _job_files(tmp_path, 0)
    _run("score", src, out, err, F32)
    record = json.loads(settings_path(out).read_text())
    del record["settings"]["model_config"]["qk_norm"]  # as a record from before the field existed (default False)
    settings_path(out).write_text(json.dumps(record))
    _job_files(tmp_path, 2)
    assert prepare_job("score", src, out, err, lambda: F32).record is None
    record["settings"]["model_config"]["n_layers"] = 3
    settings_path(out).write_text(json.dumps(record))
    with pytest.raises(SettingsChanged, match="model config n_layers: recorded 3, now 2"):
        prepare_job("score", src, out, err, lambda: F32)


def test_errors_file_or_input_on_the_record_is_refused(tmp_path):
    src, out, _ = _job_files(tmp_path, 0)
    with pytest.raises(OfflineError, match="--errors must not be the output's settings record"):
        check_paths(src, out, settings_path(out))
    shutil.copy(src, settings_path(out))  # an input named like OUT's record: a fresh job would replace it
    with pytest.raises(OfflineError, match="the input must not be the output's settings record"):
        check_paths(settings_path(out), out, tmp_path / "e.jsonl")


def test_a_failed_write_leaves_the_old_record_whole(tmp_path):
    path = tmp_path / "out.jsonl.settings.json"
    path.write_text('{"old": 1}\n')
    with pytest.raises(TypeError):
        write_record(path, {"format": 1, "x": object()})  # not JSON: fails mid-way
    assert os.listdir(tmp_path) == [path.name] and path.read_text() == '{"old": 1}\n'


def test_help_names_the_record_and_the_flag():
    for kind in COMMANDS:
        text = " ".join(_parser(kind).format_help().split())
        assert "OUT.settings.json" in text and "--allow-changed-settings" in text


def test_cli_refuses_a_resume_with_other_weights_before_loading(checkpoint, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "ab", "max_new_tokens": 2}) + "\n")
    argv = [str(src), "-o", str(out), "--checkpoint", checkpoint, *GRID]
    first = subprocess.run(meshserve("batch-generate", *argv, "--json"), capture_output=True, text=True, env=env(),
                           timeout=240)  # fmt: skip
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["done"] == 1 and summary["settings_file"] == str(settings_path(out))
    assert json.loads(settings_path(out).read_text())["settings"]["weights"] == "f32"
    # After a real run the same flags find nothing changed (loading left the checkpoint's files as they were).
    args = _parser("batch-generate").parse_args(argv)
    same = prepare_job(
        "batch-generate", src, out, out.with_name("e"), lambda: settings_from_args(args, "batch-generate")
    )
    assert same.record is None and same.note is None

    src.write_text(src.read_text() + json.dumps({"id": 2, "prompt": "cd", "max_new_tokens": 2}) + "\n")
    before = _files(tmp_path)
    second = subprocess.run(meshserve("batch-generate", *argv, "--weights", "bf16"), capture_output=True, text=True,
                            env=env(), timeout=120)  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith(f"meshserve batch-generate: error: {out} was made with other settings")
    assert "--weights: recorded f32, now bf16" in second.stderr and "--allow-changed-settings" in second.stderr
    assert "compiling" not in second.stderr and "Traceback" not in second.stderr
    assert _files(tmp_path) == before
