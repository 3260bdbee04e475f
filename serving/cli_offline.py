"""`meshserve score` and `meshserve batch-generate`: offline JSONL jobs in process (no server), throughput plan.

Rerunning a command after an interruption (Ctrl-C, kill -9, a crash) continues where it stopped: ids already in
OUT are skipped, once the settings recorded in OUT.settings.json (serving/job_settings.py) are found unchanged. Bad
input lines go to the errors file (default OUT.errors.jsonl) with their line numbers. The input and output fields
are in each command's --help (the epilogs below; serving/offline.py checks them).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import socket
import sys
import time
from pathlib import Path

from meshserve.progress import progress
from meshserve.serving.cli_model import add_model_arguments, add_warm_up_argument, load_for_serving
from meshserve.serving.job_settings import settings_path
from meshserve.serving.signals import SignalLatch, run_interruptibly

__all__ = ["COMMANDS", "SCORE_EPILOG", "GENERATE_EPILOG"]

_COMMON = """
Each input line is a JSON object in UTF-8 (a byte order mark and CRLF line ends are fine); blank lines are
skipped. A line that is not UTF-8 or not JSON, with any other key, a missing or empty field, a duplicate id, a bad
value or a prompt too long for the context goes to the errors file as {"line", "id", "error"} and the job goes on
with the other lines. Results are appended to OUT as they finish (one flushed line each; shorter inputs tend to
finish first, so OUT is not in input order: match results to inputs by id); rerunning the same command skips the
ids already in OUT, so it completes an interrupted job. One job at a time writes an OUT: a second one started on
it is refused. An empty input, or one whose ids are all in OUT, finishes without loading the model. The errors
file is rewritten each run and only created when there is a bad line; it lists the bad lines in input line order,
whether refused on reading or once the model is loaded (e.g. too long for the context). When stderr is not a
terminal (a log file), progress is a plain line every 10 seconds and at the end instead of a bar.

How OUT was made is recorded beside it in OUT.settings.json (e.g. out.jsonl.settings.json), written whole just
before the first result made with those settings (a run stopped before its first result leaves it as it was): the
command, the model (its config and, for a checkpoint, its files: small ones by content, large ones by size and
date), the weights dtype, whether int8 weights run with int8 activations (MESHSERVE_INT8_MATMUL=w8a8: other logits;
its other values are recorded only), the KV cache dtype and the reasoning parser (batch-generate's; score reads no
KV cache), with meshserve's version, the date and the layout flags for information. A rerun that would append with
one of those changed is refused before the model loads, naming each change: write to a new -o, or pass
--allow-changed-settings to append anyway (the change is recorded). Mesh, layout, bucket, --objective,
--max-context, --speculative-tokens and --warm-up changes are allowed (the same answers up to float rounding). An
OUT from an older meshserve, with results and no record, resumes with a warning and gets one.
"""

SCORE_EPILOG = (
    """input fields (IN.jsonl, one object per line):
  id            string or integer (required, unique)
  prompt        text that conditions the continuation (required, non-empty)
  continuation  text whose tokens are scored (required, non-empty)

output fields (OUT.jsonl, one object per id):
  id              the input's id
  logprob         sum of the continuation's token log-probabilities
  token_logprobs  log-probability of each continuation token, in order
  greedy          true if every continuation token is the model's most likely one
"""
    + _COMMON
)

GENERATE_EPILOG = (
    """input fields (IN.jsonl, one object per line; all but id and prompt optional):
  id                 string or integer (required, unique)
  prompt             text to continue (required, non-empty, unless "messages" is given)
  messages           instead of prompt: a chat, [{"role": "system"|"user"|"assistant", "content": TEXT}, ...],
                     rendered by the model's chat template with the assistant's turn opened
  chat_template_kwargs  with messages: more template variables, e.g. {"enable_thinking": false} (Qwen3)
  max_new_tokens     tokens to generate, >= 1 (default: 64, or min_tokens if more, or what is left of the
                     context if less)
  n                  samples of this prompt, 1 to 64 (default 1); sample i uses seed + i, so with temperature 0
                     all n are the same; the line is written once all n finished, its samples under "choices"
  temperature        0 = greedy (default 0)
  top_k              keep the k most likely tokens, 0 = off (default 0)
  top_p              nucleus sampling in (0, 1] (default 1)
  min_p              drop tokens below min_p x the top probability, 0 = off (default 0)
  seed               integer seed for sampling (default 0)
  repetition_penalty in (0, 10000], 1 = off (default 1)
  presence_penalty   in [-2, 2] (default 0)
  frequency_penalty  in [-2, 2] (default 0)
  top_logprobs       alternatives per generated token, 0 = off, at most 20 (default 0)
  logit_bias         {"token id": bias} added to those logits before sampling, e.g. {"123": -100, "7": 5}: keys
                     digit strings, biases in [-100, 100], at most 64 entries with min_tokens' (default none)
  min_tokens         end-of-sequence, stop_token_ids and stop strings cannot end the text before this many
                     tokens; each stop id takes one of logit_bias's 64 entries; at most max_new_tokens (default 0)
  stop               a string or a list of strings that end the text, cut off before it (default none)
  stop_token_ids     a list of token ids that end generation like end-of-sequence (default none)
  ignore_eos         true: do not stop at the model's end-of-sequence token (default false)
  include_stop_str_in_output  true: the text ends with the stop string that ended it (vLLM's; default false)
  truncate_prompt_tokens  keep only the prompt's last k tokens (vLLM's; after a chat's template); -1: the most
                     that leave room for max_new_tokens (default 0: the whole prompt)
  response_format    guided decoding, as OpenAI's: {"type": "json_object"} (any JSON object) or {"type":
                     "json_schema", "json_schema": {"name": NAME, "schema": {...}}} (JSON the schema accepts);
                     the text then ends as soon as the JSON is complete (default: free text)
  guided_choice      instead of response_format, vLLM's: a list of non-empty strings (at most 4096), e.g.
                     ["positive", "negative"]; the text is exactly one of them (default: none)
  guided_regex       instead of those, vLLM's: a Python regular expression, e.g. "[0-9]{3}-[0-9]{4}"; the text is
                     a string it matches whole (literals, ., classes, \\d \\w \\s, |, groups, repeats; at most 4096
                     characters and 1024 positions to prepare; default: none)
Each value must be a JSON number of the field's type (integers for max_new_tokens, n, top_k, seed, top_logprobs,
min_tokens).

output fields (OUT.jsonl, one object per id):
  id             the input's id
  text           the generated text
  tokens         the generated token ids
  logprobs       log-probability of each generated token
  finish_reason  "stop" (end-of-sequence or a stop string) or "length" (max_new_tokens reached)
  top_logprobs   only when asked: per token, a list of {"token", "text", "logprob"}, most likely first
  choices        only when n > 1, instead of the five fields above: a list of n objects in sample order, each
                 {"index", "text", "tokens", "logprobs", "finish_reason", "top_logprobs" (when asked)}
The summary (--json) counts tokens and cached_prompt_tokens over every sample, and samples: the generations in the
lines written; done, skipped and errors count lines; draft_tokens and accepted_draft_tokens the speculative drafts
verified and kept (--speculative-tokens). The shared prompt of a line's n samples is prefilled once
when the prefix cache is on (--prefix-caching, the default) and the prompt is long enough for reuse to save a
prompt bucket.
"""
    + _COMMON
)


def _add_arguments(parser: argparse.ArgumentParser, epilog: str) -> None:
    # The dispatcher builds the parser; the field lists need their line breaks kept.
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", metavar="IN.jsonl", help="input lines (fields below): a file, or a pipe such as "
                        "/dev/stdin (read once, at the start)")  # fmt: skip
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.jsonl",
        help="results, one line per id (appended; a regular file, read back to resume: not /dev/stdout); the "
        "settings that made them go to OUT.settings.json",
    )
    parser.add_argument("--errors", metavar="PATH", help="bad lines with line numbers (default: OUT.errors.jsonl)")
    parser.add_argument(
        "--objective",
        choices=["latency", "throughput"],
        default="throughput",
        help="plan objective (default throughput: large batches)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    parser.add_argument(
        "--allow-changed-settings",
        action="store_true",
        help="resume OUT even when the model, weights, int8 activations (MESHSERVE_INT8_MATMUL=w8a8), KV cache dtype "
        "or reasoning parser differ from those recorded in OUT.settings.json (default: refused, naming each change); "
        "the change is added to the record with the first result written",
    )
    add_warm_up_argument(parser, "the job", "starting")
    add_model_arguments(parser)


def _report(
    args: argparse.Namespace,
    kind: str,
    summary,
    seconds: float,
    out_path: Path,
    errors_path: Path,
    stopped_by: str | None = None,
) -> None:
    """The --json summary on stdout and one line on stderr. stopped_by: "interrupted" or "terminated" when a signal
    stopped the job (the summary counts what was written; a rerun continues)."""
    counts = summary.to_dict()
    if kind == "score":
        for key in ("samples", "draft_tokens", "accepted_draft_tokens"):  # one score per line; no decoding
            counts.pop(key, None)
    record = settings_path(out_path)
    report = {**counts, "seconds": round(seconds, 3), "tokens_per_s": round(summary.tokens / max(seconds, 1e-9), 1),
              "output": str(out_path), "errors_file": str(errors_path), "interrupted": stopped_by is not None,
              "settings_file": str(record) if record.exists() else None}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    if stopped_by is not None:
        lines = f"{summary.done} line{'s' * (summary.done != 1)}"
        print(f"meshserve {kind}: {stopped_by} after {lines}; rerun the same command to continue", file=sys.stderr)
        return
    where = f" (see {errors_path})" if summary.errors else ""
    cached = f", {summary.cached_prompt_tokens} prompt tokens from the prefix cache" if kind == "batch-generate" else ""
    samples = f" ({summary.samples} samples)" if kind == "batch-generate" and summary.samples != summary.done else ""
    if summary.draft_tokens:
        share = summary.accepted_draft_tokens / summary.draft_tokens
        cached += f", {summary.accepted_draft_tokens} of {summary.draft_tokens} draft tokens accepted ({share:.0%})"
    bad = f"{summary.errors} bad line{'s' * (summary.errors != 1)}"
    print(f"meshserve {kind}: {summary.done} written{samples}, {summary.skipped} already done, {bad}{where}, "
          f"{report['tokens_per_s']} tokens/s{cached}", file=sys.stderr)  # fmt: skip


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser, GENERATE_EPILOG)
    parser.add_argument(
        "--reasoning-parser",
        choices=("qwen3", "deepseek_r1"),  # serving/reasoning.py PARSERS
        help="thinking models, as `serve --reasoning-parser`: a chat line's <think> block goes to its output's "
        '"reasoning" (null without one) and "text" is the answer after it; response_format / guided_choice are '
        "enforced after the block (default: off, the text as generated)",
    )


def _claim_output(out_path: Path) -> socket.socket | None:
    """Hold OUT for this process until it ends: two jobs appending to one OUT (the same command started twice) would
    each write every line, so a second one is refused. The claim is a Linux abstract socket named after OUT's
    resolved path: no file is created, and the kernel drops it when the process ends, however it ends (kill -9 too).
    None where abstract sockets do not exist (no guard there)."""
    from meshserve.serving.jsonl_jobs import OfflineError

    key = hashlib.sha256(str(out_path.resolve()).encode()).hexdigest()[:32]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0meshserve-offline-{key}")
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OfflineError(f"output {out_path} is being written by another meshserve job; wait for it to end (a "
                               "rerun then resumes it) or write to another -o") from None  # fmt: skip
        return None
    return sock


def _run(args: argparse.Namespace, kind: str) -> int:
    # Claimed before OUT is read: a job that read OUT while another appended to it would redo the other's lines.
    claim = _claim_output(Path(args.output))
    try:
        return _run_job(args, kind)
    finally:
        if claim is not None:
            claim.close()


def _run_job(args: argparse.Namespace, kind: str) -> int:
    from meshserve.serving.job_settings import settings_from_args
    from meshserve.serving.jsonl_jobs import finish_job, prepare_job
    from meshserve.serving.offline import run_generate, run_score
    from meshserve.serving.reasoning import ChatOptions

    in_path, out_path = Path(args.input), Path(args.output)
    errors_path = Path(args.errors) if args.errors else out_path.with_name(out_path.name + ".errors.jsonl")
    # Before loading and compiling (minutes on a large model): bad paths and a corrupt OUT fail fast, and a job with
    # nothing left to do ends here.
    # The settings are read (the preset, or the checkpoint's config and files: no large weights) only when there are
    # lines to append; a changed one is refused here, before the model loads.
    job = prepare_job(
        kind, in_path, out_path, errors_path, lambda: settings_from_args(args, kind), args.allow_changed_settings
    )
    if job.note is not None:
        print(job.note, file=sys.stderr)
    start = time.monotonic()
    if not job.todo:
        summary = finish_job(job)
        _report(args, kind, summary, time.monotonic() - start, out_path, errors_path)
        return 0
    from meshserve.serving.engine import Engine, ModelSteps
    from meshserve.serving.warm_up import BackgroundCompile, upfront_steps

    phases = ("score",) if kind == "score" else ("generate",)
    defer = args.warm_up == "background"

    def load_and_warm_up():
        model, plan, steps, _ = load_for_serving(args, args.objective)
        engine = Engine(model.params, model.config, plan, steps or ModelSteps())
        with progress("compiling", "step", upfront_steps(plan, phases, defer), leave=False) as bar:
            engine.warm_up(lambda j: bar.update(j.units), phases, defer=defer)
        return model, engine

    # Signals only record themselves (serving/signals.py). Until the job starts writing, one ends the process at
    # once (run_interruptibly); during the job it stops it in order: no new lines, the compile thread and the engine
    # stopped, the lines written so far kept (a rerun continues), exit 130 (Ctrl-C) or 143 (SIGTERM). A second
    # signal ends the process at once.
    with SignalLatch(kind) as latch:  # to the end: a signal as the job finishes is not a traceback at exit
        model, engine = run_interruptibly(load_and_warm_up, latch, "terminated")

        def failed(job, error: Exception) -> None:
            print(f"meshserve {kind}: {job.label} failed to compile ({type(error).__name__}: {error}); its shapes "
                  "run padded in a larger bucket", file=sys.stderr, flush=True)  # fmt: skip

        start = time.monotonic()
        run = run_score if kind == "score" else run_generate
        chat = {} if kind == "score" else {"chat": ChatOptions(args.reasoning_parser)}
        # The other buckets compile beside the job; leaving the block waits for the step in flight.
        with BackgroundCompile(engine, failed), progress(kind, "tok", unit_scale=True, dynamic_ncols=True) as bar:
            summary = run(model, engine, in_path, out_path, errors_path, progress=bar, prepared=job, stop=latch.event,
                          **chat)  # fmt: skip
            stopped = latch.event.is_set()
        stopped_by = ("interrupted" if latch.interrupted else "terminated") if stopped else None
        _report(args, kind, summary, time.monotonic() - start, out_path, errors_path, stopped_by)
    return latch.code if stopped else 0


COMMANDS = {
    "score": (lambda parser: _add_arguments(parser, SCORE_EPILOG), lambda args: _run(args, "score")),
    "batch-generate": (
        lambda parser: _add_generate_arguments(parser),
        lambda args: _run(args, "batch-generate"),
    ),
}
