"""Offline jobs over JSONL files, in process: scoring and batch generation with the throughput plan.

  score           {"id", "prompt", "continuation"}            -> {"id", "logprob", "token_logprobs", "greedy"}
  batch-generate  {"id", "prompt" | "messages" (+ "chat_template_kwargs"?), "max_new_tokens"?, "n"?,
                   "temperature"?, "top_k"?, "top_p"?, "seed"?, "stop"?,
                   "ignore_eos"?, "repetition_penalty"?, "presence_penalty"?, "frequency_penalty"?, "min_p"?,
                   "top_logprobs"?, "stop_token_ids"?, "include_stop_str_in_output"?, "truncate_prompt_tokens"?,
                   "response_format"? | "guided_choice"? | "guided_regex"?}
                   n = 1 (default) -> {"id", "text", "tokens", "logprobs", "finish_reason", "top_logprobs"?}
                   n > 1           -> {"id", "choices": [{"index", "text", "tokens", "logprobs", "finish_reason",
                                                          "top_logprobs"?}, ...]}  (index order)

"messages" (instead of "prompt", exactly one of the two) is a chat, [{"role", "content"}, ...] with roles system, user,
assistant, rendered by the model's chat template with the assistant's turn opened (model/chat.py), as
GenerateRequest.messages; a model without a template, or a list the template refuses, is a bad line.
"chat_template_kwargs" (vLLM's, with "messages" only) gives the template more variables, e.g. {"enable_thinking":
false} for Qwen3. With --reasoning-parser a chat line's <think> block goes to "reasoning" and "text" is the answer.

"response_format" (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}},
checked as the HTTP API checks it) guides the line's output to JSON (that the schema accepts); it ends when the JSON
is complete (finish_reason "stop"). A schema meshserve cannot follow is a bad line. "guided_choice" (vLLM's: a list
of non-empty strings, at most 4096) instead makes the output exactly one of them, "guided_regex" (vLLM's: a Python
regular expression) a string the pattern matches whole; a line with two formats is a bad line, as is a pattern
whose token masks cannot all be prepared when it is queued (more than 1024 positions: the job goes on).

"n" (an integer in [1, N_MAX]) samples a prompt n times, as OpenAI's and vLLM's n: sample i is its own request with
seed + i (so greedy samples are identical, and sample i equals a line of its own with seed + i), and the line is
written once, when all n finished. A line's requests are queued together, so the prefix cache and the scheduler's
burst rule (serving/prefix_cache.py wait_for) prefill the shared prompt once where it is long enough for reuse to
save a bucket: n samples cost about one prompt prefill plus n decodes. Resume stays per id: a kill before the line
is written redoes all n samples. The summary's tokens, cached_prompt_tokens and samples count every sample; done,
skipped and errors count lines.

The files (paths, resume, line checks, writing) are serving/jsonl_jobs.py's; this module runs the jobs on the
engine. Both sort the work by length (less padding), write each result as soon as it is done (one flushed line), and
resume: ids already in OUT are skipped, and a last line cut short by a kill is truncated away first (blank lines
are skipped; a corrupt complete line stops the job with its line number, never a truncation), so after any
interruption (kill -9 included) rerunning the same command completes OUT with every id exactly once. Bad lines go
to the errors file ({"line", "id", "error"}, in input line order, whether refused on reading or once the model is
loaded) and the job goes on: a line with a key not listed above (a typo such as "max_tokens" would otherwise fall
back to a default unseen) or an empty prompt is one of them. The errors file is rewritten each run (bad lines are
never done, so every run reports them all); it is created only when there is an error, and an old one is emptied.
`prepare_job` reads IN and OUT without a model, so a job with nothing left to do (an empty input, a finished
resume) ends before anything is loaded.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from meshserve.model.config import vocab_error
from meshserve.serving.detok import alternatives_json, alternatives_with_text
from meshserve.serving.jsonl_jobs import (
    JobSummary,
    LineError,
    PreparedJob,
    prepare_job,
)
from meshserve.serving.offline_lines import N_MAX, generation_requests
from meshserve.serving.reasoning import ChatOptions

__all__ = ["N_MAX", "run_score", "run_generate"]


def _prepare(kind: str, in_path: Path, out_path: Path, errors_path: Path, prepared: PreparedJob | None):
    job = prepared if prepared is not None else prepare_job(kind, in_path, out_path, errors_path)
    return job.open(), job.todo


def run_score(
    model,
    engine,
    in_path: Path,
    out_path: Path,
    errors_path: Path,
    progress=None,
    prepared: PreparedJob | None = None,
    stop: threading.Event | None = None,
) -> JobSummary:
    """Score every (prompt, continuation) line not yet in OUT. `engine` is a warmed-up serving Engine; `prepared`
    is `prepare_job("score", ...)` when the caller already read the files. Once `stop` is set no further chunk
    starts (a Ctrl-C): the lines written so far stay, a rerun continues."""
    writer, todo = _prepare("score", in_path, out_path, errors_path, prepared)
    limit = engine.plan.max_context
    items = []
    for job in todo:
        prompt, cont = model.encode_prompt(job.data["prompt"]), model.tokenizer.encode(job.data["continuation"])
        bad = vocab_error(model.config, prompt, "prompt") or vocab_error(model.config, cont, "continuation")
        if not prompt or not cont:  # non-empty text (read_jobs) that the tokenizer turns into no tokens
            writer.error(job.line, job.id, f"{'prompt' if not prompt else 'continuation'} encodes to no tokens")
        elif bad:
            writer.error(job.line, job.id, bad)
        elif len(prompt) + len(cont) > limit:
            writer.error(job.line, job.id, f"prompt + continuation: {len(prompt)} + {len(cont)} tokens exceed the "
                         f"context of {limit} tokens")  # fmt: skip
        else:
            items.append((job, prompt, cont))
    writer.checked()  # every line checked: the errors file is written, in line order
    items.sort(key=lambda x: len(x[1]) + len(x[2]))  # similar lengths share a bucket: less padding
    chunk = max(engine.plan.score_batches)
    if progress is not None:
        progress.reset(total=sum(len(p) + len(c) for _, p, c in items))
    try:
        for start in range(0, len(items), chunk):
            if stop is not None and stop.is_set():
                break
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


def _next_finished(done: queue.SimpleQueue, stop: threading.Event | None):
    """The next finished request's handle (or the engine's exception), or None once `stop` is set."""
    while stop is None or not stop.is_set():
        try:
            return done.get(timeout=None if stop is None else 0.1)  # a timed wait, to see `stop` soon
        except queue.Empty:
            pass
    return None


def _submit_line(orch, requests, stop_strings, done) -> tuple[int, str | None]:
    """Queue a line's samples: (how many were queued, None), or (how many, why) when queueing one failed on its
    format (a pattern past its preparation bounds: all of a regex's masks are prepared at submit). Then the samples
    queued before it are cancelled (they still arrive on `done`: the count includes them) and the job goes on."""
    from meshserve.serving.guided import GuideError
    from meshserve.serving.guided_requests import submit_error

    handles = []
    for request in requests:
        try:
            handles.append(orch.submit(request, stop_strings, done=done))
        except GuideError as e:
            for h in handles:
                orch.cancel(h)
            field = "guided_regex" if request.guide is not None and request.guide.kind == "regex" else "response_format"
            return len(handles), submit_error(str(e), field)[0]
    return len(handles), None


def _choice(model, handle, chat: ChatOptions | None = None) -> dict:
    """One finished request as an output row's fields (without the id). chat: a chat line's --reasoning-parser
    (its <think> block goes to "reasoning", null without one, and "text" is the answer after it)."""
    r = handle.request
    row = {"text": handle.text, "tokens": r.tokens, "logprobs": r.logprobs, "finish_reason": r.finish_reason}
    if chat is not None and (split := chat.splitter(r)) is not None:
        reasoning, row["text"] = split.feed(handle.text, last=True)
        row = {"reasoning": reasoning if split.reasoned and reasoning else None, **row}
    if r.sampling.top_logprobs:
        row["top_logprobs"] = alternatives_json(alternatives_with_text(model.tokenizer, r.top_logprobs))
    return row


def run_generate(
    model,
    engine,
    in_path: Path,
    out_path: Path,
    errors_path: Path,
    progress=None,
    prepared: PreparedJob | None = None,
    stop: threading.Event | None = None,
    chat: ChatOptions | None = None,
) -> JobSummary:
    """Generate for every line not yet in OUT, continuously batched on the engine (an orchestrator thread);
    `prepared` is `prepare_job("batch-generate", ...)` when the caller already read the files. A line with "n": k
    submits k requests and is written once all k finished (one line, its samples under "choices"). Once `stop` is
    set (a Ctrl-C) no further line is written and what is in flight is cancelled; a rerun continues. chat:
    batch-generate --reasoning-parser (chat lines: "reasoning" beside "text", guided formats after the block)."""
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.scheduler import Scheduler

    writer, todo = _prepare("batch-generate", in_path, out_path, errors_path, prepared)
    work = []
    for job in todo:
        try:
            requests, stop_strings = generation_requests(model, engine, job, chat)
        except LineError as e:
            writer.error(job.line, job.id, str(e))
            continue
        work.append((job, requests, stop_strings))
    # Similar prompt lengths prefill together; a line's samples stay adjacent, so they share one prompt prefill
    # (the scheduler's burst rule, prefix_cache.wait_for) and the line is written soon after its first sample.
    work.sort(key=lambda x: len(x[1][0].prompt))
    total = sum(len(requests) for _, requests, _ in work)
    scheduler = Scheduler.for_plan(engine.plan, total + 1)
    from meshserve.serving.speculative import speculator_for

    speculator = speculator_for(engine.plan)
    orch = Orchestrator(engine, scheduler, model.tokenizer, speculator=speculator).start()
    done: queue.SimpleQueue = queue.SimpleQueue()
    owner = {}  # request id -> (job, sample index)
    pending = {}  # job line -> its finished choices so far (None once an error was reported for the line)
    try:
        queued = []
        for job, requests, stop_strings in work:
            pending[job.line] = [None] * len(requests)
            for i, request in enumerate(requests):
                owner[request.id] = (job, i)
            count, why = _submit_line(orch, requests, stop_strings, done)
            queued += requests[:count]
            if why is not None:  # its queued samples were cancelled: they arrive, and are skipped (None)
                writer.error(job.line, job.id, why)
                pending[job.line] = None
        writer.checked()  # every line checked and queued: the errors file is written, in line order
        total = len(queued)
        if progress is not None:
            progress.reset(total=sum(r.max_new_tokens for r in queued))
        for _ in range(total):
            handle = _next_finished(done, stop)
            if handle is None:
                break
            if isinstance(handle, BaseException):
                raise handle
            r = handle.request
            job, index = owner[r.id]
            if progress is not None:
                progress.update(r.max_new_tokens)  # the total counts max_new_tokens: an early stop fills its share
            choices = pending[job.line]
            if choices is None:  # another sample of the line failed: it is reported once and not written
                continue
            if handle.error is not None:  # the engine refused it (and its prefill batch); the job goes on
                writer.error(job.line, job.id, str(handle.error))
                pending[job.line] = None
                continue
            choices[index] = handle
            if any(c is None for c in choices):
                continue
            del pending[job.line]
            split = chat if "messages" in job.data else None  # completions keep their raw text
            if len(choices) == 1:  # n = 1: the flat row, exactly as before "n" existed
                writer.result({"id": job.id, **_choice(model, choices[0], split)})
            else:
                rows = [{"index": i, **_choice(model, c, split)} for i, c in enumerate(choices)]
                writer.result({"id": job.id, "choices": rows})
            writer.summary.samples += len(choices)
            for c in choices:
                writer.summary.tokens += len(c.request.tokens)
                writer.summary.cached_prompt_tokens += c.request.cached_tokens
    finally:
        if orch.error is None:
            orch.drain(0.0)  # finished: stops the thread; interrupted: cancels what is left first
        if speculator is not None:
            writer.summary.draft_tokens, writer.summary.accepted_draft_tokens = speculator.proposed, speculator.accepted
        writer.close()
    return writer.summary
