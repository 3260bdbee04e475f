"""`meshserve generate --json-object / --json-schema FILE / --choice TEXT ... / --regex PATTERN`: the flags
(`add_guided_arguments`), what they ask a server for (`guided_kwargs`: Client.request's keywords) and, in process,
their GuideSpec (`guided_spec`) and `generate_guided`: guided decoding needs the host between decode steps (each
guided row's next token mask follows its last token), which model.generate's on-device loop never visits, so these
prompts run through the serving engine instead: an Engine compiled for exactly this batch (one prefill bucket, one
decode bucket, one context) under an Orchestrator, as `meshserve serve` would run them.

Imports stay light at module level (argparse, json): `meshserve generate --help` imports this module.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshserve.errors import UserError

if TYPE_CHECKING:
    from meshserve.model.sampling_params import SamplingParams
    from meshserve.serving.guided import GuideSpec

__all__ = ["add_guided_arguments", "guided_flag", "guided_kwargs", "guided_spec", "generate_guided"]


def add_guided_arguments(parser: argparse.ArgumentParser) -> None:
    """--json-object, --json-schema FILE, --choice TEXT (repeatable) and --regex PATTERN, one of them."""
    guided = parser.add_mutually_exclusive_group()
    guided.add_argument(
        "--json-object",
        action="store_true",
        help="the output is a JSON object (guided decoding; it ends when the object is complete; default: off)",
    )
    guided.add_argument(
        "--json-schema",
        metavar="FILE",
        help="the output is JSON that this JSON Schema file accepts (guided decoding; default: none)",
    )
    guided.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the output is exactly one of these strings, as written (vLLM's guided_choice); repeat for each, e.g. "
        "--choice yes --choice no (guided decoding; default: none, free text)",
    )
    guided.add_argument(
        "--regex",
        metavar="PATTERN",
        help="the output is a string this Python regular expression matches whole (vLLM's guided_regex), e.g. "
        "--regex '[0-9]{3}-[0-9]{4}'; literals, ., classes, \\d \\w \\s, |, groups and repeats (no "
        "backreferences, lookarounds or flags), at most 4096 characters and 1024 positions to prepare (guided "
        "decoding; default: none, free text)",
    )


def guided_flag(args: argparse.Namespace) -> str | None:
    """The guided-decoding flag given (None: free text)."""
    if args.json_object:
        return "--json-object"
    if args.json_schema is not None:
        return "--json-schema"
    return "--choice" if args.choice is not None else "--regex" if args.regex is not None else None


def _flag_of(spec: GuideSpec) -> str:
    """The flag that asks for a spec of this kind ("--regex" for a regex)."""
    flags = {"json_object": "--json-object", "json_schema": "--json-schema", "choice": "--choice"}
    return flags.get(spec.kind, "--regex")


def _read_schema(path: str) -> dict:
    """--json-schema's file as a JSON object, or a one-line UserError naming the flag and the reason."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read --json-schema {path}: {e.strerror}") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise UserError(f"--json-schema {path}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema {path}: expected a JSON Schema object, got {type(schema).__name__}")
    return schema


def guided_kwargs(args: argparse.Namespace) -> dict:
    """The flags as Client.request's keywords: response_format (OpenAI's), guided_choice or guided_regex; {} for
    free text. A missing or bad file, or a bad --choice or --regex, is a one-line UserError naming the flag."""
    if args.json_object:
        return {"response_format": {"type": "json_object"}}
    if args.json_schema is not None:
        schema = _read_schema(args.json_schema)
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(args.json_schema).stem)[:64] or "schema"
        return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}
    if args.choice is not None:
        from meshserve.serving.guided_requests import choice_spec

        choice_spec(args.choice, "--choice")  # "--choice[1]: expected a non-empty string, got ''"
        return {"guided_choice": list(args.choice)}
    if args.regex is not None:
        from meshserve.serving.guided_requests import regex_spec

        regex_spec(args.regex, "--regex")  # "--regex: backreferences are not supported"
        return {"guided_regex": args.regex}
    return {}


def guided_spec(args: argparse.Namespace) -> GuideSpec | None:
    """The flags' GuideSpec for in-process generation (None: free text), checked as a server checks it."""
    from meshserve.serving.guided_requests import choice_spec, regex_spec, response_format

    kwargs = guided_kwargs(args)
    if "guided_choice" in kwargs:
        return choice_spec(kwargs["guided_choice"], "--choice")
    if "guided_regex" in kwargs:
        return regex_spec(kwargs["guided_regex"], "--regex")
    if "response_format" in kwargs:
        return response_format(kwargs["response_format"], guided_flag(args))
    return None


def generate_guided(
    model,
    prompts: Sequence[list[int]],
    sampling: Sequence[SamplingParams],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    spec: GuideSpec,
    status: Callable[[str], None],
    kv_cache_dtype: str = "auto",
) -> list[tuple[list[int], list[float], str, list]]:
    """Generate for every prompt (row i with sampling[i]) under the format `spec`: per row (tokens, log-probs,
    finish reason, top log-probs as (ids, log-probs) per token). UserError for a prompt the model cannot take."""
    from meshserve.model.generate import bucket, prompt_error
    from meshserve.serving.engine import Engine
    from meshserve.serving.guided import GuideError, compile_spec
    from meshserve.serving.guided_requests import submit_error
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.plan import make_plan
    from meshserve.serving.scheduler import Request, Scheduler

    compile_spec(spec)  # a schema it cannot follow is refused before anything compiles
    config = model.config
    for i, p in enumerate(prompts):
        if error := prompt_error(config, p, max_new_tokens, f"prompt {i}"):
            raise UserError(error)
    rows, longest = len(prompts), max(map(len, prompts))
    context = min(config.max_seq_len, bucket(longest + max_new_tokens))
    length = min(bucket(longest), context)
    plan = make_plan(config, max_batch=rows, max_context=context, length_buckets=(length,), decode_buckets=(rows,),
                     context_buckets=(context,), kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    engine = Engine(model.params, config, plan)
    status(f"compiling the serving engine for {rows} guided row{'s' * (rows > 1)} ...")
    engine.warm_up(phases=("generate",))
    status("generating ...")
    orch = Orchestrator(engine, Scheduler.for_plan(plan, rows), model.tokenizer).start()
    try:
        requests = [Request(list(p), max_new_tokens, s, frozenset(stop_ids), guide=spec)
                    for p, s in zip(prompts, sampling, strict=True)]  # fmt: skip
        try:
            handles = [orch.submit(r) for r in requests]
        except GuideError as e:  # a regex past its preparation bounds (all its masks are prepared at submit)
            raise UserError(submit_error(str(e), _flag_of(spec))[0]) from None
        out = []
        for h in handles:
            while (event := h.events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    break
            r = h.request
            out.append((list(r.tokens), list(r.logprobs), event.finish_reason, list(r.top_logprobs)))
        return out
    finally:
        orch.stop()
