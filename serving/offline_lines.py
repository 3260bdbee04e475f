"""A batch-generate line (serving/offline.py's input) -> its engine Requests: every field checked against the
model and the plan, LineError naming the field and its limit."""

from __future__ import annotations

import dataclasses

from meshserve.model.config import vocab_error
from meshserve.model.sampling_params import SamplingError, SamplingParams
from meshserve.serving.json_show import show
from meshserve.serving.jsonl_jobs import JobLine, LineError
from meshserve.serving.reasoning import ChatOptions, opens_reasoning
from meshserve.serving.requests import truncate_prompt

__all__ = ["N_MAX", "generation_requests"]

N_MAX = 64  # samples per prompt ("n"): the requests one input line may queue


def _samples(data: dict) -> int:
    """The line's "n" (samples per prompt), checked like the other fields: a JSON integer in [1, N_MAX]."""
    n = data.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= N_MAX:
        raise LineError(f"n must be an integer in [1, {N_MAX}], got {show(n)}")
    return n


def _logit_bias(model, value) -> dict[int, float]:
    """The line's "logit_bias": a JSON object {"token id": bias} (JSON keys are strings: digit strings only) ->
    {id: bias}, ids checked against the vocabulary; the bias range is SamplingParams' check."""
    if not isinstance(value, dict):
        raise LineError(
            f'logit_bias must be a JSON object of token ids to biases, e.g. {{"123": -100}}, got {show(value)}'
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise LineError(f'logit_bias: key {show(key)} is not a token id (a string of digits, e.g. "123")')
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise LineError(f"logit_bias[{key}] must be a number in [-100, 100], got {show(bias)}")
        if int(key) in out:  # "7" and "07"
            raise LineError(f"logit_bias: token id {int(key)} is given more than once")
        out[int(key)] = float(bias)
    if bad := vocab_error(model.config, out, "logit_bias"):
        raise LineError(bad)
    return out


def generation_requests(model, engine, job: JobLine, chat: ChatOptions | None = None):
    """The line's n requests (sample i samples with seed + i) and its stop strings; LineError for a bad field.
    chat: --reasoning-parser (a chat line's guided format then follows its reasoning block)."""
    from meshserve.serving.scheduler import Request

    d = job.data
    samples = _samples(d)
    thinking = opens = False
    if "messages" in d:  # read_jobs let it through instead of "prompt"
        from meshserve.model.chat import ChatError

        try:
            args = (d["messages"], None, d.get("chat_template_kwargs"))
            if thinking := chat is not None and chat.reasoning_parser is not None:
                prompt, opening = model.encode_chat_opening(*args)  # one render for both
                opens = opens_reasoning(opening)
            else:
                prompt = model.encode_chat(*args)
        except ChatError as e:
            named = str(e).startswith(("messages", "chat_template_kwargs"))
            raise LineError(str(e) if named else f"messages: {e}") from None
        if not prompt:
            raise LineError("messages: the chat template renders no tokens")
    elif "chat_template_kwargs" in d:
        raise LineError('chat_template_kwargs: only a chat ("messages") takes template variables')
    else:
        prompt = model.encode_prompt(d["prompt"])
    bad = vocab_error(model.config, prompt, "messages" if "messages" in d else "prompt")
    if bad:
        raise LineError(bad)
    at_least = d.get("min_tokens", 0)  # an unset max_new_tokens leaves room for min_tokens (checked below)
    default_new = max(64, at_least if isinstance(at_least, int) and not isinstance(at_least, bool) else 0)
    prompt = _truncated(d, prompt, engine.plan.max_context, default_new)
    room = engine.plan.max_context - len(prompt)
    if room < 1:  # else the max_new_tokens message below would name a range like [1, -2490]
        raise LineError(
            f"{'messages' if 'messages' in d else 'prompt'}: {len(prompt)} tokens leave no room to generate in the "
            f"context of {engine.plan.max_context} tokens (at most {engine.plan.max_context - 1} prompt tokens)"
        )
    n = d.get("max_new_tokens", min(default_new, room))
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= room:
        raise LineError(
            f"max_new_tokens must be an integer in [1, {room}] (context {engine.plan.max_context}), got {show(n)}"
        )
    # logit_bias is a JSON object (parsed below); stop_ids come from stop_token_ids and ignore_eos, not the line.
    fields = {f.name: f for f in dataclasses.fields(SamplingParams) if f.name not in ("logit_bias", "stop_ids")}
    values = {"logit_bias": _logit_bias(model, d.get("logit_bias", {}))}
    for name, field in fields.items():
        value = d.get(name, field.default)
        kind = int if field.type in (int, "int") else float
        # JSON numbers only: bool is an int in Python, and float("nan") from a string would slip through.
        if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
            raise LineError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {show(value)}")
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
    extra = d.get("stop_token_ids", [])
    if not isinstance(extra, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in extra):
        raise LineError(f"stop_token_ids must be a list of token ids, got {show(extra)}")
    bad = vocab_error(model.config, extra, "stop_token_ids")
    if bad:
        raise LineError(bad)
    stop_ids = frozenset(extra) | (frozenset() if _flag(d, "ignore_eos") else frozenset(model.stop_ids()))
    include_stop = _flag(d, "include_stop_str_in_output")
    guide = _guide(d)
    if thinking and guide is not None and guide.kind != "regex":  # the format after the reasoning block
        guide = dataclasses.replace(guide, think="open" if opens else "start")
    try:  # the Request gives min_tokens its stop ids (one bias entry each); sample i uses seed + i
        request = Request(
            prompt, n, sampling, stop_ids, guide=guide, think_open=thinking and opens, include_stop_str=include_stop
        )
        return request.samples(samples), stop
    except SamplingError as e:
        raise LineError(str(e)) from None


def _flag(d: dict, name: str) -> bool:
    """A line's boolean field (default false): JSON true or false only, since a string such as "false" is truthy
    and would turn the option on unseen."""
    value = d.get(name, False)
    if not isinstance(value, bool):
        raise LineError(f"{name} must be true or false, got {show(value)}")
    return value


def _truncated(d: dict, prompt: list[int], max_context: int, default_new: int) -> list[int]:
    """The line's truncate_prompt_tokens applied (-1: room for its max_new_tokens, else `default_new`)."""
    keep = d.get("truncate_prompt_tokens", 0)
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise LineError(f"truncate_prompt_tokens must be an integer, got {show(keep)}")
    new = d.get("max_new_tokens", default_new)
    try:
        return truncate_prompt(prompt, keep, max_context, new if isinstance(new, int) else default_new)
    except ValueError as e:
        raise LineError(str(e)) from None


def _guide(d: dict):
    """A line's response_format, guided_choice or guided_regex as the GuideSpec its requests follow (None: free
    text), compiled once to check it (serving/guided_requests.py); LineError naming the field (two fields: naming
    both)."""
    from meshserve.errors import UserError
    from meshserve.serving.guided_requests import compiled, read_format

    try:  # a line holds response_format, guided_choice or guided_regex (jsonl_jobs.GENERATE_KEYS)
        field, spec = read_format(d)
        if spec is None or field != "response_format":  # a choice or a pattern is compiled already
            return spec
        return compiled(spec, "response_format.json_schema" if spec.kind == "json_schema" else "response_format")
    except UserError as e:
        raise LineError(str(e)) from None
