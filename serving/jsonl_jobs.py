"""The JSONL side of the offline jobs: checking paths (serving/job_paths.py), resuming OUT, reading and validating IN lines, and writing
results and errors line by line, with no model (serving/offline.py runs the jobs on the engine).

Resume: ids already in OUT are skipped, and a last line cut short by a kill is truncated away first (blank lines are
skipped; a corrupt complete line stops the job with its line number, never a truncation). Each result is one
flushed write. The errors file ({"line", "id", "error"}, in input line order) is rewritten each run and created
only when there is an error (an old one is emptied). OUT's settings record (OUT.settings.json: model, weights, KV
cache dtype, reasoning parser) is serving/job_settings.py's: prepare_job checks it, before any model is loaded, when
there are lines to do, and the run writes it with its first result (a run that writes none changes nothing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.errors import UserError
from meshserve.model.sampling_params import SamplingParams
from meshserve.serving.job_paths import OfflineError, check_paths  # re-exported: the jobs' API since before the split
from meshserve.serving.job_settings import JobSettings, plan_record, settings_path, write_record
from meshserve.serving.openai_fields import check_text, encodable
from meshserve.serving.validation import RequestError

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


class LineError(UserError):
    """One bad input line (reported to the errors file; the job goes on)."""


# The keys a line may have; any other key is refused (line by line), never ignored. SamplingParams.stop_ids is no
# key: it is filled from stop_token_ids and ignore_eos.
SCORE_KEYS = ("id", "prompt", "continuation")
GENERATE_KEYS = (
    "id", "prompt", "messages", "chat_template_kwargs", "max_new_tokens", "n",
    *(f.name for f in dataclasses.fields(SamplingParams) if f.name != "stop_ids"),
    "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "truncate_prompt_tokens",
    "response_format", "guided_choice",
    "guided_regex",
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


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # how errors="surrogateescape" reads a byte that is not UTF-8


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
    if not path.exists():
        raise OfflineError(f"input file not found: {path}")
    seen: set = set()
    # utf-8-sig: a byte order mark (Notepad, Excel) is skipped, not a bad first line. surrogateescape: a byte that is
    # not UTF-8 becomes one marker character, so its line is reported (a replacement character would change the
    # prompt unseen) and the other lines keep their numbers.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if (byte := _NOT_UTF8.search(raw)) is not None:
                errors(n, None, f"not UTF-8: byte 0x{ord(byte.group()) - 0xDC00:02x} at column {byte.start() + 1} "
                       "(save the file as UTF-8)")  # fmt: skip
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
            try:  # a JSON escape such as "\ud800" without its pair is no text: the tokenizer cannot take it
                check_text(data)  # the HTTP API's check, its wording
            except RequestError as e:
                errors(n, data["id"] if not isinstance(data["id"], str) or encodable(data["id"]) else None, str(e))
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
    """Appends result lines to OUT, flushed line by line, and keeps the errors file in input line order. That file
    is rewritten each run (same input, same errors): an existing one is emptied at once, a missing one is created at
    the first error only. Errors are held until every line is checked (`checked()`, or the first result), then
    written sorted by line, whether refused on reading or once the model is loaded; one found later (the engine
    refusing a prompt: rare) is appended at once, so a kill keeps it, and sorted into place at close(). `record`
    (path, settings record) is written, whole, just before the first result: a run that writes none changes none."""

    def __init__(self, out: Path, errors: Path, record: tuple[Path, dict] | None = None):
        self.out = open(out, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.errors_path = errors
        self.errors = open(errors, "w", encoding="utf-8") if errors.exists() else None  # noqa: SIM115
        self.summary = JobSummary()
        self._record = record
        self._found: list[tuple[int, Any, str]] = []  # (line, id, error): this run's, in the order found
        self._sorted: bool | None = None  # None: held (lines being checked); False: the file is out of line order

    def result(self, record: dict) -> None:
        self.checked()
        if self._record is not None:  # the first result made with these settings: record them now
            write_record(*self._record)
            self._record = None
        # One write of a complete line, then flush: a kill leaves at most one partial last line (resume cuts it).
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        self.summary.done += 1

    def error(self, line: int, id_: Any, message: str) -> None:
        if self._sorted is not None:  # found mid-run
            self._sorted = self._sorted and (not self._found or line >= self._found[-1][0])
            self._write([(line, id_, message)])
        self._found.append((line, id_, message))
        self.summary.errors += 1

    def checked(self) -> None:
        """Every line has been checked (run_score, run_generate): write the errors so far, in line order."""
        if self._sorted is None:
            self._rewrite()

    def _rewrite(self) -> None:
        if self._sorted is False:  # the file holds this run's errors out of order: start it again
            self.errors.close()
            self.errors = None
        self._found.sort(key=lambda e: e[0])  # stable: a line's own order is kept
        self._write(self._found)
        self._sorted = True

    def _write(self, found: list[tuple[int, Any, str]]) -> None:
        if not found:
            return
        if self.errors is None:
            self.errors = open(self.errors_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.errors.write("".join(json.dumps({"line": n, "id": i, "error": e}, ensure_ascii=False) + "\n"
                                  for n, i, e in found))  # fmt: skip
        self.errors.flush()

    def close(self) -> None:
        if not self._sorted:  # held (stopped before checked()), or out of order
            self._rewrite()
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
        """The writer for this run, holding the bad lines found so far; the settings record goes out with the first
        result (whole, just before OUT gets its line): a run stopped before any result leaves the old record."""
        record = None if self.record is None else (settings_path(self.out_path), self.record)
        writer = JobWriter(self.out_path, self.errors_path, record)
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
