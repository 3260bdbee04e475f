"""Offline jobs over JSONL files, in process: scoring and batch generation with the throughput plan.

  score           {"id", "prompt", "continuation"}            -> {"id", "logprob", "token_logprobs", "greedy"}
  batch-generate  {"id", "prompt", "max_new_tokens"?, "temperature"?, "top_k"?, "top_p"?, "seed"?, "stop"?,
                   "ignore_eos"?, "repetition_penalty"?, "presence_penalty"?, "frequency_penalty"?, "min_p"?,
                   "top_logprobs"?}               -> {"id", "text", "tokens", "logprobs", "finish_reason", "top_logprobs"?}

Both sort the work by length (less padding), write each result as soon as it is done (one flushed line), and
resume: ids already in OUT are skipped, and a last line cut short by a kill is truncated away first (blank lines
are skipped; a corrupt complete line stops the job with its line number, never a truncation), so after any
interruption (kill -9 included) rerunning the same command completes OUT with every id exactly once. Bad lines go
to the errors file ({"line", "id", "error"}) and the job goes on: a line with a key not listed above (a typo such
as "max_tokens" would otherwise fall back to a default unseen) or an empty prompt is one of them. The errors file is
rewritten each run (bad lines are never done, so every run reports them all); it is created only when there is an
error, and an old one is emptied. `prepare_job` reads IN and OUT without a model, so a job with nothing left to do
(an empty input, a finished resume) ends before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.errors import UserError
from meshserve.model.sampling import SamplingError, SamplingParams

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
    "run_score",
    "run_generate",
    "OfflineError",
    "JobLine",
    "JobSummary",
]


class OfflineError(UserError):
    """A job that cannot start (missing input, output is a directory, ...)."""


class LineError(UserError):
    """One bad input line (reported to the errors file; the job goes on)."""


# The keys a line may have; any other key is refused (line by line), never ignored.
SCORE_KEYS = ("id", "prompt", "continuation")
GENERATE_KEYS = (
    "id", "prompt", "max_new_tokens", *(f.name for f in dataclasses.fields(SamplingParams)), "stop", "ignore_eos"
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
    tokens: int = 0  # tokens scored or generated this run

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def resume_output(path: Path) -> set:
    """Ids already written to OUT. Blank lines are skipped; an unterminated last line (a kill mid-write) is
    truncated away. A complete line that is not a result is never cut (that would drop every result after it):
    it raises OfflineError naming the line."""
    if not path.exists():
        return set()
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
    if good_end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


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


def check_paths(in_path: Path, out_path: Path, errors_path: Path) -> None:
    """Refuse paths that cannot work or would destroy data, before anything is loaded or written: a missing or
    unreadable IN, OUT or the errors file in a missing or read-only folder, OUT or the errors file (rewritten each
    run) on top of IN, or the errors file on top of OUT. Compared after resolving, so `./in.jsonl` and
    `d/../in.jsonl` count as IN."""
    if in_path.is_dir():
        raise OfflineError(f"input {in_path} is a directory, not a JSONL file")
    if not in_path.is_file():
        raise OfflineError(f"input file not found: {in_path}")
    if not os.access(in_path, os.R_OK):
        raise OfflineError(f"input {in_path} is not readable")
    _check_writable(out_path, "output")
    _check_writable(errors_path, "--errors")
    src, out, err = (p.resolve() for p in (in_path, out_path, errors_path))
    if out == src:
        raise OfflineError("output must be a different file from the input")
    if err == src:
        raise OfflineError(f"--errors must be a different file from the input ({in_path})")
    if err == out:
        raise OfflineError(f"--errors must be a different file from the output ({out_path})")


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
            missing = [k for k in required if not isinstance(data.get(k), str)]
            if missing:
                errors(n, data["id"], f"missing or non-string field(s): {', '.join(missing)}")
                continue
            empty = [k for k in required if not data[k]]
            if empty:  # the gRPC server refuses an empty prompt too; BOS alone is no input
                errors(n, data["id"], f"{' and '.join(empty)} must not be empty")
                continue
            if _key(data["id"]) in seen:
                errors(n, data["id"], "duplicate id (its first line is used)")
                continue
            seen.add(_key(data["id"]))
            yield JobLine(n, data["id"], data)


class _Writer:
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
    """IN read against OUT, before any model is loaded: the lines still to do, the bad ones, the ids done."""

    kind: str
    out_path: Path
    errors_path: Path
    todo: list[JobLine]
    bad: list[tuple[int, Any, str]]  # (line, id, error) for the errors file
    skipped: int

    def open(self) -> _Writer:
        """The writer for this run, with the bad lines found so far already reported."""
        writer = _Writer(self.out_path, self.errors_path)
        writer.summary.skipped = self.skipped
        for line, id_, message in self.bad:
            writer.error(line, id_, message)
        return writer


def prepare_job(kind: str, in_path: Path, out_path: Path, errors_path: Path) -> PreparedJob:
    """Check the paths, resume OUT (cutting a partial last line) and read IN: no model, nothing written besides
    that cut. `kind` is "score" or "batch-generate"."""
    known = job_keys(kind)
    check_paths(in_path, out_path, errors_path)  # before anything is opened for writing
    done = resume_output(out_path)
    bad: list[tuple[int, Any, str]] = []
    todo, skipped = [], 0
    for job in read_jobs(in_path, _REQUIRED[kind], lambda *e: bad.append(e), known):
        if _key(job.id) in done:
            skipped += 1
        else:
            todo.append(job)
    return PreparedJob(kind, out_path, errors_path, todo, bad, skipped)


def finish_job(job: PreparedJob) -> JobSummary:
    """A job with nothing left to do (`job.todo` empty): report its bad lines and return the summary, no model."""
    if job.todo:
        raise OfflineError(f"{len(job.todo)} lines are still to do: run the job with a model")
    writer = job.open()
    writer.close()
    return writer.summary


def _prepare(kind: str, in_path: Path, out_path: Path, errors_path: Path, prepared: PreparedJob | None):
    job = prepared if prepared is not None else prepare_job(kind, in_path, out_path, errors_path)
    return job.open(), job.todo


def run_score(
    model, engine, in_path: Path, out_path: Path, errors_path: Path, progress=None, prepared: PreparedJob | None = None
) -> JobSummary:
    """Score every (prompt, continuation) line not yet in OUT. `engine` is a warmed-up serving Engine; `prepared`
    is `prepare_job("score", ...)` when the caller already read the files."""
    writer, todo = _prepare("score", in_path, out_path, errors_path, prepared)
    limit = engine.plan.max_context
    items = []
    for job in todo:
        prompt, cont = model.encode_prompt(job.data["prompt"]), model.tokenizer.encode(job.data["continuation"])
        bad = _out_of_vocab(model.config, prompt, "prompt") or _out_of_vocab(model.config, cont, "continuation")
        if not prompt or not cont:  # non-empty text (read_jobs) that the tokenizer turns into no tokens
            writer.error(job.line, job.id, f"{'prompt' if not prompt else 'continuation'} encodes to no tokens")
        elif bad:
            writer.error(job.line, job.id, bad)
        elif len(prompt) + len(cont) > limit:
            writer.error(job.line, job.id, f"{len(prompt)} + {len(cont)} tokens exceed the context limit {limit}")
        else:
            items.append((job, prompt, cont))
    items.sort(key=lambda x: len(x[1]) + len(x[2]))  # similar lengths share a bucket: less padding
    chunk = max(engine.plan.score_batches)
    if progress is not None:
        progress.reset(total=sum(len(p) + len(c) for _, p, c in items))
    try:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            out = engine.score([(p, c) for _, p, c in part])
            for (job, p, c), lp, greedy in zip(part, out.token_logprobs, out.greedy, strict=True):
                writer.result(
                    {"id": job.id, "logprob": float(lp.astype("float64").sum()), "token_logprobs": lp.tolist(),
                     "greedy": bool(greedy.all())}
                )  # fmt: skip
                writer.summary.tokens += len(p) + len(c)
                if progress is not None:
                    progress.update(len(p) + len(c))
    finally:
        writer.close()
    return writer.summary


def _out_of_vocab(config, ids: list[int], field: str) -> str | None:
    """The error for the first id outside the model's vocabulary (a tokenizer may know more ids than the model)."""
    bad = next((t for t in ids if not 0 <= t < config.vocab_size), None)
    return None if bad is None else f"{field}: token id {bad} outside the vocabulary [0, {config.vocab_size})"


def _generation_request(model, engine, job: JobLine):
    from meshserve.serving.scheduler import Request

    d = job.data
    prompt = model.encode_prompt(d["prompt"])
    bad = _out_of_vocab(model.config, prompt, "prompt")
    if bad:
        raise LineError(bad)
    room = engine.plan.max_context - len(prompt)
    n = d.get("max_new_tokens", min(64, room))
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= room:
        raise LineError(
            f"max_new_tokens must be an integer in [1, {room}] (context {engine.plan.max_context}), got {n!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    values = {}
    for name, field in fields.items():
        value = d.get(name, field.default)
        kind = int if field.type in (int, "int") else float
        # JSON numbers only: bool is an int in Python, and float("nan") from a string would slip through.
        if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
            raise LineError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        values[name] = kind(value)
    try:
        sampling = SamplingParams(**values)
    except SamplingError as e:
        raise LineError(str(e)) from None
    stop = d.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise LineError("stop must be a non-empty string or a list of them")
    stop_ids = frozenset() if d.get("ignore_eos") else frozenset(model.stop_ids())
    return Request(prompt, n, sampling, stop_ids), stop


def run_generate(
    model, engine, in_path: Path, out_path: Path, errors_path: Path, progress=None, prepared: PreparedJob | None = None
) -> JobSummary:
    """Generate for every line not yet in OUT, continuously batched on the engine (an orchestrator thread);
    `prepared` is `prepare_job("batch-generate", ...)` when the caller already read the files."""
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.scheduler import Scheduler

    writer, todo = _prepare("batch-generate", in_path, out_path, errors_path, prepared)
    work = []
    for job in todo:
        try:
            work.append((job, *_generation_request(model, engine, job)))
        except LineError as e:
            writer.error(job.line, job.id, str(e))
    work.sort(key=lambda x: len(x[1].prompt))  # similar prompt lengths prefill together
    plan = engine.plan
    scheduler = Scheduler(
        plan.max_batch,
        len(work) + 1,
        plan.prefill_batches,
        plan.length_bucket,
        plan.decode_batches,
        plan.prefill_token_budget,
    )
    orch = Orchestrator(engine, scheduler, model.tokenizer).start()
    done: queue.SimpleQueue = queue.SimpleQueue()
    jobs = {}
    if progress is not None:
        progress.reset(total=sum(r.max_new_tokens for _, r, _ in work))
    try:
        for job, request, stop in work:
            jobs[request.id] = job
            orch.submit(request, stop, done=done)
        for _ in range(len(work)):
            handle = done.get()
            if isinstance(handle, BaseException):
                raise handle
            r = handle.request
            if handle.error is not None:  # the engine refused it (and its prefill batch); the job goes on
                writer.error(jobs[r.id].line, jobs[r.id].id, str(handle.error))
                if progress is not None:
                    progress.update(r.max_new_tokens)
                continue
            row = {"id": jobs[r.id].id, "text": handle.text, "tokens": r.tokens, "logprobs": r.logprobs,
                   "finish_reason": r.finish_reason}  # fmt: skip
            if r.sampling.top_logprobs:
                decode = model.tokenizer.decode
                row["top_logprobs"] = [
                    [{"token": t, "text": decode([t]), "logprob": lp} for t, lp in zip(ids, lps, strict=True)]
                    for ids, lps in r.top_logprobs
                ]
            writer.result(row)
            writer.summary.tokens += len(r.tokens)
            if progress is not None:
                progress.update(r.max_new_tokens)  # the total counts max_new_tokens: an early stop fills its share
    finally:
        if orch.error is None:
            orch.drain(0.0)  # finished: stops the thread; interrupted: cancels what is left first
        writer.close()
    return writer.summary
