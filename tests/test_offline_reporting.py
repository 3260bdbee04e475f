"""What score / batch-generate report, without a model: the errors file in input line order (lines refused on
reading and those refused once the model is loaded together, one found mid-run put in its place at the end), the
summary line's counts in the singular when they are one, and the progress on a stderr that is not a terminal as
plain lines at most every 10 s (not a carriage-return redraw per update)."""

import argparse
import io
import json
from pathlib import Path

from meshserve.progress import LogProgress
from meshserve.serving.cli_offline import COMMANDS, _report
from meshserve.serving.jsonl_jobs import JobSummary, prepare_job


def _lines(path) -> list[int]:
    return [json.loads(x)["line"] for x in path.read_text().splitlines()]


def test_the_errors_file_is_in_input_line_order(tmp_path):
    """Before: the lines refused on reading came first, then those refused once the model was loaded."""
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    rows = [{"id": 1, "prompt": "a", "continuation": "b"}, "{broken", {"id": 3, "prompt": "a", "continuation": "b"},
            {"id": 4, "prompt": "a", "continuation": "b"}, {"id": 5, "prompt": "a", "continuation": "b", "x": 1},
            {"id": 6, "prompt": "a", "continuation": "b"}]  # fmt: skip
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    err.write_text('{"line": 99, "id": null, "error": "an earlier run\'s"}\n')
    job = prepare_job("score", src, out, err)
    writer = job.open()
    assert err.read_text() == ""  # an earlier run's errors are gone at once
    writer.error(3, 3, "prompt + continuation: too long")  # found once the model is loaded
    writer.error(6, 6, "prompt + continuation: too long")
    assert err.read_text() == ""  # held while the lines are checked
    writer.checked()
    assert _lines(err) == [2, 3, 5, 6]
    writer.result({"id": 1, "logprob": -1.0})
    writer.error(4, 4, "refused with its prefill batch")  # the engine refused it mid-run
    assert _lines(err) == [2, 3, 5, 6, 4]  # on disk at once: a kill keeps it
    writer.close()
    assert _lines(err) == [2, 3, 4, 5, 6]
    assert writer.summary.errors == 5 and writer.summary.done == 1


def test_errors_are_written_in_order_when_the_job_stops_before_its_first_result(tmp_path):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "a", "continuation": "b"}) + "\n{broken\n")
    writer = prepare_job("score", src, out, err).open()
    writer.error(1, 1, "prompt + continuation: too long")
    writer.close()  # a Ctrl-C before any chunk: checked() never called
    assert _lines(err) == [1, 2]


def _summary_line(capsys, kind: str, **counts) -> str:
    parser = argparse.ArgumentParser()
    COMMANDS[kind][0](parser)
    args = parser.parse_args(["in.jsonl", "-o", "out.jsonl"])
    _report(args, kind, JobSummary(**counts), 1.0, Path("o"), Path("e"))
    return capsys.readouterr().err


def test_the_summary_says_one_bad_line_in_the_singular(capsys):
    assert ", 1 bad line (see e), " in _summary_line(capsys, "score", done=2, errors=1)  # before: "1 bad lines"
    assert ", 2 bad lines (see e), " in _summary_line(capsys, "score", done=2, errors=2)
    assert ", 0 bad lines, " in _summary_line(capsys, "batch-generate", done=1, samples=1)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_a_plain_line_at_most_every_10_s():
    """Before: tqdm wrote its bar to a log file with a carriage return up to ten times a second."""
    clock, log = _Clock(), io.StringIO()
    with LogProgress("score", "tok", file=log, clock=clock) as bar:
        bar.reset(total=3000)
        for _ in range(120):  # 30 s of updates, one every 250 ms
            clock.now += 0.25
            bar.update(25)
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(x.endswith("\n") for x in lines)
    assert len(lines) == 4  # the start, at 10 s and 20 s, then the end (at 30 s: the last line already said it)
    assert lines[0] == "score: 0 tok, 0 s\n"
    assert lines[1] == "score: 1000/3000 tok (33%), 10 s, 100.0 tok/s\n"
    assert lines[-1] == "score: 3000/3000 tok (100%), 30 s, 100.0 tok/s\n"
    short = LogProgress("compiling", "step", total=4, file=io.StringIO(), clock=_Clock())
    short.update(4)
    short.close()
    assert short.file.getvalue() == "compiling: 4/4 step (100%), 0 s\n"  # a job under 10 s: its end only
