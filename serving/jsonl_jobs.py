"""The JSONL side of the offline jobs: checking paths, resuming OUT, reading and validating IN lines, and writing
results and errors line by line, with no model (serving/offline.py runs the jobs on the engine).

Resume: ids already in OUT are skipped, and a last line cut short by a kill is truncated away first (blank lines are
skipped; a corrupt complete line stops the job with its line number, never a truncation). Each result is one
flushed write. The errors file ({"line", "id", "error"}) is rewritten each run and created only when there is an
error (an old one is emptied). OUT's settings record (OUT.settings.json: model, weights, KV cache dtype, reasoning
parser) is serving/job_settings.py's: prepare_job checks it, before any model is loaded, when there are lines to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.analytics.output import write_probe
from meshserve.errors import UserError
from meshserve.model.sampling_params import SamplingParams
from meshserve.serving.job_settings import JobSettings, plan_record, settings_path, write_record

__all__ = [
    "SCORE_KEYS",
    "GENERATE_KEYS",
    "job_keys",
    "check_paths",
    "prepare_job",
    "finish_job",
    "PreparedJob",
    "read_jobs",
    "resume_output",
    "OfflineError",
    "LineError",
    "JobLine",
    "JobSummary",
    "JobWriter",
]


class OfflineError(UserError):
    """A job that cannot start (missing input, output is a directory, ...)."""


class LineError(UserError):
    """One bad input line (reported to the errors file; the job goes on)."""


# The keys a line may have; any other key is refused (line by line), never ignored. SamplingParams.stop_ids is no
# key: it is filled from stop_token_ids and ignore_eos.
SCORE_KEYS = ("id", "prompt", "continuation")
GENERATE_KEYS = (
    "id", "prompt", "messages", "chat_template_kwargs", "max_new_tokens", "n",
    *(f.name for f in dataclasses.fields(SamplingParams) if f.name != "stop_ids"),
    "stop", "stop_token_ids", "ignore_eos", "response_format", "guided_choice", "guided_regex"
)  # fmt: skip
_REQUIRED = {"score": ("prompt", "continuation"), "batch-generate": ("prompt",)}


def job_keys(kind: str) -> tuple[str, ...]:
    """The keys an input line of `kind` ("score" or "batch-generate") may have."""
    if kind not in _REQUIRED:
        raise OfflineError(f"job kind must be 'score' or 'batch-generate', got {kind!r}")
    return SCORE_KEYS if kind == "score" else GENERATE_KEYS


@dataclass(frozen=True)
class JobLine:
    line: int  # 1-based line number in IN
    id: Any
    data: dict


@dataclass
class JobSummary:
    done: int = 0  # results written this run
    skipped: int = 0  # ids already in OUT
    errors: int = 0  # bad lines reported
    tokens: int = 0  # tokens scored or generated this run, over every sample
    cached_prompt_tokens: int = 0  # batch-generate: prompt tokens the prefix cache supplied (not prefilled again)
    samples: int = 0  # batch-generate: generations in the lines written (an id with "n": k counts k); score: 0
    # batch-generate --speculative-tokens: draft tokens verified, and of those the ones the model agreed with
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def resume_output(path: Path) -> set:
    """Ids already written to OUT. Blank lines are skipped; an unterminated last line (a kill mid-write) is
    truncated away. A complete line that is not a result is never cut (that would drop every result after it):
    it raises OfflineError naming the line."""
    done, good_end = _scan_output(path)
    _cut(path, good_end)
    return done


def _scan_output(path: Path) -> tuple[set, int]:
    """resume_output's reading, nothing written: (the ids in OUT, the bytes up to the end of its last complete
    line)."""
    if not path.exists():
        return set(), 0
    if path.is_dir():
        raise OfflineError(f"output {path} is a directory")
    done: set = set()
    good_end = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # only the last line can lack its newline: the one a kill cut short
            good_end += len(raw)
            if not raw.strip():
                continue
            try:
                done.add(_key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                raise OfflineError(
                    f'output {path} line {n} is not a result line (JSON object with an "id"); fix or remove '
                    "it, then rerun"
                ) from None
    return done, good_end


def _cut(path: Path, good_end: int) -> None:
    """Truncate OUT's unterminated last line, if any (`good_end` from _scan_output)."""
    if path.exists() and good_end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)


def _check_writable(path: Path, what: str) -> None:
    """A file we will create or append to: its folder must exist and be writable (checked before any loading, so
    a typo in a path never costs a model load and compile, and never leaves the other file created)."""
    if path.is_dir():
        raise OfflineError(f"{what} {path} is a directory")
    folder = path.parent
    if not folder.exists():
        raise OfflineError(f"{what} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OfflineError(f"{what} {path}: {folder} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OfflineError(f"{what} {path} is not writable")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OfflineError(f"{what} {path}: folder {folder} is not writable")
    why = write_probe(path)  # os.access says yes to root everywhere: only trying tells
    if why is not None:
        raise OfflineError(f"{what} {path} cannot be written: {why}")


def check_paths(in_path: Path, out_path: Path, errors_path: Path) -> None:
    """Refuse paths that cannot work or would destroy data, before anything is loaded or written: a missing or
    unreadable IN, OUT or the errors file in a missing or read-only folder, OUT or the errors file (rewritten each
    run) on top of IN, the errors file on top of OUT, or IN or the errors file on top of OUT's settings record
    (serving/job_settings.py). Compared after resolving, so `./in.jsonl` and
    `d/../in.jsonl` count as IN."""
    if in_path.is_dir():
        raise OfflineError(f"input {in_path} is a directory, not a JSONL file")
    if not in_path.is_file():
        raise OfflineError(f"input file not found: {in_path}")
    if not os.access(in_path, os.R_OK):
        raise OfflineError(f"input {in_path} is not readable")
    _check_writable(out_path, "output")
    _check_writable(errors_path, "--errors")
    src, out, err, record = (p.resolve() for p in (in_path, out_path, errors_path, settings_path(out_path)))
    if out == src:
        raise OfflineError("output must be a different file from the input")
    if err == src:
        raise OfflineError(f"--errors must be a different file from the input ({in_path})")
    if err == out:
        raise OfflineError(f"--errors must be a different file from the output ({out_path})")
    if record in (src, err):  # the record is replaced whole on a fresh job
        what = "the input" if record == src else "--errors"
        raise OfflineError(f"{what} must not be the output's settings record {settings_path(out_path)}")


def _key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different and any JSON scalar works."""
    return json.dumps(value, sort_keys=True)


def read_jobs(
    path: Path,
    required: tuple[str, ...],
    errors: Callable[[int, Any, str], None],
    known: tuple[str, ...] | None = None,
) -> Iterator[JobLine]:
    """Valid lines of IN (objects with an id and the required non-empty string fields, and, when `known` is given,
    no other keys); the rest are reported."""
    if path.is_dir():
        raise OfflineError(f"input {path} is a directory, not a JSONL file")
    if not path.is_file():
        raise OfflineError(f"input file not found: {path}")
    seen: set = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                errors(n, None, f"not JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(data, dict) or "id" not in data:
                errors(n, None, 'each line must be a JSON object with an "id"')
                continue
            if not isinstance(data["id"], str | int) or isinstance(data["id"], bool):
                errors(n, data["id"], "id must be a string or an integer")
                continue
            unknown = [k for k in data if known is not None and k not in known]
            if unknown:
                listed = ", ".join(repr(k) for k in unknown)
                errors(
                    n, data["id"], f"unknown key{'s' if len(unknown) > 1 else ''} {listed} (known: {', '.join(known)})"
                )
                continue
            need = required
            if known is not None and "messages" in known and "messages" in data:
                # A chat instead of a prompt (batch-generate): exactly one of the two; offline.py checks the list.
                if "prompt" in data:
                    errors(n, data["id"], 'give "prompt" (text) or "messages" (a chat), not both')
                    continue
                need = tuple(k for k in required if k != "prompt")
            missing = [k for k in need if not isinstance(data.get(k), str)]
            if missing:
                errors(n, data["id"], f"missing or non-string field(s): {', '.join(missing)}")
                continue
            empty = [k for k in need if not data[k]]
            if empty:  # the gRPC server refuses an empty prompt too; BOS alone is no input
                errors(n, data["id"], f"{' and '.join(empty)} must not be empty")
                continue
            if _key(data["id"]) in seen:
                errors(n, data["id"], "duplicate id (its first line is used)")
                continue
            seen.add(_key(data["id"]))
            yield JobLine(n, data["id"], data)


class JobWriter:
    """Appends result lines to OUT and error lines to the errors file, flushed line by line. The errors file is
    rewritten each run (same input, same errors): an existing one is emptied at once (its errors were an earlier
    run's), a missing one is created at the first error only."""

    def __init__(self, out: Path, errors: Path):
        self.out = open(out, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.errors_path = errors
        self.errors = open(errors, "w", encoding="utf-8") if errors.exists() else None  # noqa: SIM115
        self.summary = JobSummary()

    def result(self, record: dict) -> None:
        # One write of a complete line, then flush: a kill leaves at most one partial last line (resume cuts it).
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        self.summary.done += 1

    def error(self, line: int, id_: Any, message: str) -> None:
        if self.errors is None:
            self.errors = open(self.errors_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.errors.write(json.dumps({"line": line, "id": id_, "error": message}, ensure_ascii=False) + "\n")
        self.errors.flush()
        self.summary.errors += 1

    def close(self) -> None:
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        if self.errors is not None:
            self.errors.close()


@dataclass
class PreparedJob:
    """IN read against OUT, before any model is loaded: the lines still to do, the bad ones, the ids done, and the
    settings record to write when the run first writes to OUT (serving/job_settings.py; None: keep the one there)."""

    kind: str
    out_path: Path
    errors_path: Path
    todo: list[JobLine]
    bad: list[tuple[int, Any, str]]  # (line, id, error) for the errors file
    skipped: int
    record: dict | None = None
    note: str | None = None  # for stderr: OUT had no record, or its settings changed (--allow-changed-settings)

    def open(self) -> JobWriter:
        """The writer for this run, with the bad lines found so far already reported; the settings record written
        first (whole, before OUT gets a line)."""
        if self.record is not None:
            write_record(settings_path(self.out_path), self.record)
        writer = JobWriter(self.out_path, self.errors_path)
        writer.summary.skipped = self.skipped
        for line, id_, message in self.bad:
            writer.error(line, id_, message)
        return writer


def prepare_job(
    kind: str,
    in_path: Path,
    out_path: Path,
    errors_path: Path,
    settings: Callable[[], JobSettings] | None = None,
    allow_changed: bool = False,
) -> PreparedJob:
    """Check the paths, resume OUT (cutting a partial last line) and read IN: no model, nothing written besides
    that cut. `kind` is "score" or "batch-generate". `settings` (called only when there are lines to do: a job
    that appends nothing needs no model named) gives this run's settings, checked against OUT's record
    (job_settings.plan_record: a changed setting raises SettingsChanged unless `allow_changed`) before the cut,
    so a refused resume leaves OUT as it was; None: no record is read or written."""
    known = job_keys(kind)
    check_paths(in_path, out_path, errors_path)  # before anything is opened for writing
    done, good_end = _scan_output(out_path)
    bad: list[tuple[int, Any, str]] = []
    todo, skipped = [], 0
    for job in read_jobs(in_path, _REQUIRED[kind], lambda *e: bad.append(e), known):
        if _key(job.id) in done:
            skipped += 1
        else:
            todo.append(job)
    record, note = None, None
    if todo and settings is not None:
        record, note = plan_record(out_path, settings(), len(done), allow_changed, kind)
    _cut(out_path, good_end)
    return PreparedJob(kind, out_path, errors_path, todo, bad, skipped, record, note)


def finish_job(job: PreparedJob) -> JobSummary:
    """A job with nothing left to do (`job.todo` empty): report its bad lines and return the summary, no model."""
    if job.todo:
        raise OfflineError(f"{len(job.todo)} lines are still to do: run the job with a model")
    writer = job.open()
    writer.close()
    return writer.summary
