"""A small Python client for meshserve.v1.Inference.

    from meshserve.serving.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("def fib(n):", max_new_tokens=32).text)
        for chunk in c.generate_stream("import os", max_new_tokens=16):
            print(chunk.text, end="", flush=True)
        for choice in c.generate("Once upon", n=3, temperature=0.8, seed=1).choices:  # 3 samples, seeds 1, 2, 3
            print(choice.index, choice.text)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        print(c.generate(messages=chat, max_new_tokens=64).text)  # rendered by the model's chat template
        schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
        print(json.loads(c.generate("Age of Bob as JSON:", response_format=fmt).text)["age"])  # guided decoding

A prompt is text, token ids, or (the `messages=` keyword instead of a prompt) a conversation of {"role", "content"}
dicts, roles system / user / assistant, which the server renders with the model's chat template and the assistant's
turn opened (GenerateRequest.messages). `response_format=` (OpenAI's: {"type": "json_object"} or {"type":
"json_schema", "json_schema": {"name", "schema"}}), `guided_choice=` (vLLM's: a list of strings, the output is
exactly one of them) or `guided_regex=` (vLLM's: a pattern the whole output matches, e.g. "[0-9]{3}-[0-9]{4}") and, in a
chat with `tools=`, `tool_choice=` ("auto", "none", "required" or {"type": "function", "function": {"name"}}) guide
the output (GenerateRequest.response_format, ChatMessages.tool_choice).

Results are plain dataclasses, except `model_info()` (the ModelInfo message: it is mostly nested metadata) and
`stream_call()` (the raw call, for `.cancel()`); gRPC errors are raised as `grpc.RpcError` (`.code()`, `.details()`).
A request value the server would refuse, or that its protobuf field cannot hold, raises a ValueError naming the field
(`InvalidRequest`, or the in-process `SamplingError`) before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from meshserve.errors import UserError
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc

__all__ = ["Client", "Generation", "Choice", "Chunk", "Score", "InvalidRequest", "INT32_MAX"]

INT32_MAX = 2**31 - 1  # GenerateRequest.max_new_tokens and TokenIds.ids are int32 fields


class InvalidRequest(UserError):
    """A request value refused before sending (a ValueError); the message names the field and the limit."""


_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_CANCELLED: "cancelled",
            pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}  # fmt: skip


def _calls(calls) -> list[dict]:
    """ToolCall messages -> OpenAI's tool_calls dicts."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _top(messages) -> list[list[tuple[int, str, float]]]:
    """TopLogprobs messages -> per token, its alternatives as (id, text, logprob), best first."""
    return [list(zip(m.tokens, m.texts, m.logprobs, strict=True)) for m in messages]


@dataclass(frozen=True)
class Choice:
    """One of the n samples of a Generate call with n > 1 (sample `index` used seed + index)."""

    index: int
    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # length | stop | cancelled | tool_calls
    top_logprobs: list[list[tuple[int, str, float]]] = field(default_factory=list)  # per token: (id, text, logprob)
    tool_calls: list[dict] = field(default_factory=list)  # see Generation.tool_calls
    reasoning: str = ""  # see Generation.reasoning


@dataclass(frozen=True)
class Generation:
    """A Generate answer. n = 1: the sample in the flat fields, `choices` empty. n > 1: the samples in `choices`
    (index order); tokens, text, logprobs and top_logprobs are empty and finish_reason is "" (as on the wire), and
    the counts and times are the whole request's (prompt_tokens once; generated and cached tokens summed)."""

    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # length | stop | cancelled
    prompt_tokens: int
    generated_tokens: int
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    top_logprobs: list[list[tuple[int, str, float]]] = field(default_factory=list)  # per token: (id, text, logprob)
    cached_prompt_tokens: int = 0  # prompt tokens the server's prefix cache supplied
    choices: list[Choice] = field(default_factory=list)  # the samples when n > 1
    # A chat with tools on a server with --tool-call-parser: OpenAI's tool_calls, [{"id", "type": "function",
    # "function": {"name", "arguments" (JSON text)}}], and `text` is the text outside the calls
    tool_calls: list[dict] = field(default_factory=list)
    reasoning: str = ""  # a chat on a server with --reasoning-parser: the <think> block's text (`text`: the answer)


@dataclass(frozen=True)
class Chunk:
    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk (of its sample, when n > 1)
    top_logprobs: list[list[tuple[int, str, float]]] = field(default_factory=list)  # per token in `tokens`
    index: int = 0  # which sample (n > 1); 0 when n = 1
    tool_calls: list[dict] = field(default_factory=list)  # on a sample's last chunk (see Generation.tool_calls)
    reasoning: str = ""  # reasoning completed since the previous chunk (see Generation.reasoning)


@dataclass(frozen=True)
class Score:
    logprob: float
    token_logprobs: list[float]
    greedy: bool
    continuation_tokens: list[int]


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _tool_call(call: Mapping) -> pb.ToolCall:
    """OpenAI's {"id", "type": "function", "function": {"name", "arguments"}} -> ToolCall (arguments as JSON text;
    check_messages has parsed a valid call's into a dict)."""
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    return pb.ToolCall(id=call.get("id") or "", name=function.get("name") or "",
                       arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))  # fmt: skip


def _messages(messages, validate: bool, tools: Sequence[Mapping] | None = None, kwargs=None) -> pb.ChatMessages:
    """OpenAI-style message dicts ({"role", "content"}, an assistant's "tool_calls", a tool message's
    "tool_call_id"), the tools and the template variables -> ChatMessages; validate=False sends any strings for the
    server to refuse."""
    if validate:
        from meshserve.model.chat import ChatError, check_messages, check_template_kwargs  # no JAX, no jinja2

        try:
            messages = check_messages(messages)
            check_template_kwargs(kwargs)
        except ChatError as e:
            raise InvalidRequest(str(e)) from None
    out = pb.ChatMessages(tools_json=json.dumps(list(tools)) if tools else "")
    if kwargs is not None:
        out.chat_template_kwargs_json = json.dumps(dict(kwargs))
    for m in messages:
        out.messages.append(pb.ChatMessage(
            role=m["role"], content=m.get("content") or "", tool_call_id=m.get("tool_call_id") or "",
            reasoning_content=m.get("reasoning_content") or "",
            tool_calls=[_tool_call(c) for c in m.get("tool_calls") or ()],
        ))  # fmt: skip
    return out


def _guide_fields(req: pb.GenerateRequest, response_format, guided_choice, tool_choice, parallel_tool_calls, tools,
                 validate, guided_regex=None) -> None:  # fmt: skip
    """Set the guided-decoding fields (serving/guided_requests.py client_fields); InvalidRequest naming the keyword."""
    from meshserve.serving.guided_requests import client_fields

    try:
        client_fields(req, response_format, guided_choice, tool_choice, parallel_tool_calls, tools, validate,
                      guided_regex)  # fmt: skip
    except UserError as e:
        raise InvalidRequest(str(e)) from None


def _input(
    prompt: str | Sequence[int] | None,
    validate: bool = True,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict:
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give a prompt (text or token ids) or messages=[...], exactly one")
    for name, value in (("tools", tools), ("chat_template_kwargs", chat_template_kwargs)):
        if value and messages is None:
            raise InvalidRequest(f"{name}: only a chat (messages=[...]) takes {name}")
    if messages is not None:
        return {"messages": _messages(messages, validate, tools, chat_template_kwargs)}
    if isinstance(prompt, str):
        return {"text": prompt}
    ids = list(prompt)
    low = 0 if validate else -INT32_MAX - 1  # unvalidated: anything the int32 field holds, for the server to refuse
    bad = next((t for t in ids if not _is_int(t) or not low <= t <= INT32_MAX), None)
    if bad is not None:  # the server checks the vocabulary; this is only what the int32 field can hold
        raise InvalidRequest(f"tokens.ids: token id {bad!r} is not an integer in [0, {INT32_MAX}]")
    return {"tokens": pb.TokenIds(ids=ids)}


class Client:
    """A channel to one server. target: HOST:PORT; token: bearer token; tls_ca: PEM root certificate(s) for TLS."""

    def __init__(
        self, target: str, *, token: str | None = None, tls_ca: str | Path | bytes | None = None, tls: bool = False
    ):
        """tls_ca: a PEM file's path, or its bytes (an unreadable path raises OSError)."""
        if tls or tls_ca:
            root = (tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()) if tls_ca else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    @staticmethod
    def request(
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        return_logprobs: bool = True,
        ignore_eos: bool = False,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        min_p: float = 0.0,
        top_logprobs: int = 0,
        stop_token_ids: Sequence[int] = (),
        n: int = 1,
        validate: bool = True,
        logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = (),
        min_tokens: int = 0,
        response_format: Mapping[str, Any] | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_regex: str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        include_stop_str_in_output: bool = False,
        truncate_prompt_tokens: int = 0,
    ) -> pb.GenerateRequest:
        """The GenerateRequest for these values; raises a ValueError naming the first field out of range, with the
        same checks as in-process generation (`validate_sampling`), before anything is sent. validate=False sends
        values as given (within the proto fields' ranges) for the server to refuse: its own checks' tests. seed: None
        (default) lets the server draw a random one (give one for reproducible samples). n: samples
        (sample i with seed + i), at most the server's GetModelInfo().limits.max_n. logit_bias {id: bias} and
        min_tokens: SamplingParams' (the server checks the ids against its vocabulary, and counts its end-of-sequence
        id among min_tokens' entries). messages: instead of a prompt, a conversation [{"role", "content"}, ...] (roles
        system, user, assistant, tool; an assistant's "tool_calls" and a tool message's "tool_call_id" as in OpenAI's
        API) for the model's chat template; give a prompt or messages, not both. tools: OpenAI-style function tools
        for the template (a chat only; a server with --tool-call-parser returns the calls in `.tool_calls`).
        response_format: OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
        "schema", "strict"?, "description"?}}: the output is guided to JSON (that the schema accepts) and ends when
        it is complete. guided_choice: vLLM's, a list of strings: the output is exactly one of them (not with a
        response_format). guided_regex: vLLM's, a Python regular expression the whole output matches (re.fullmatch;
        the subset in serving/guided/regex.py; one format at most). tool_choice: with tools, "auto" (default),
        "none" (the template is not given the tools), "required" or {"type": "function", "function": {"name": ...}}
        (guided into calls of the tools / of that one; the server needs --tool-call-parser);
        parallel_tool_calls=False: exactly one call. chat_template_kwargs: more variables for the chat template
        (vLLM's; e.g. {"enable_thinking": False} for Qwen3). include_stop_str_in_output: the text ends with the
        stop string that ended it (vLLM's), not just before it. truncate_prompt_tokens: keep the prompt's last k
        tokens (vLLM's; -1: the most that leave room for max_new_tokens; 0: all)."""
        from meshserve.model.sampling_params import validate_sampling  # numpy only: no JAX in the client

        if validate:
            # min_tokens' entries count against logit_bias's limit: the stop ids known here (the server adds its
            # end-of-sequence id and checks again).
            held = [t for t in stop_token_ids if _is_int(t) and t >= 0] if min_tokens else ()
            validate_sampling(temperature, top_k, top_p, seed or 0, repetition_penalty=repetition_penalty,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, min_p=min_p,
                              top_logprobs=top_logprobs, logit_bias=logit_bias, min_tokens=min_tokens,
                              stop_ids=held)  # fmt: skip
        if (
            validate
            and max_new_tokens is not None
            and (not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= INT32_MAX)
        ):
            raise InvalidRequest(f"max_new_tokens must be an integer in [1, {INT32_MAX}], got {max_new_tokens!r}")
        if validate and (not _is_int(n) or not 1 <= n <= INT32_MAX):
            raise InvalidRequest(f"n must be an integer in [1, {INT32_MAX}] (the server's limits.max_n), got {n!r}")
        if validate and seed is not None and seed + n - 1 >= 2**63:
            raise InvalidRequest(
                f"n: sample i uses seed + i, so seed + n - 1 must be below 2**63, got seed {seed}, n {n}"
            )
        # Whole floats (top_k=2.0) passed the checks above as the numbers they are; protobuf's int fields take ints.
        whole = (lambda x: int(x) if isinstance(x, float) and x.is_integer() else x) if validate else (lambda x: x)
        sampling = pb.SamplingParams(
            temperature=temperature,
            top_k=whole(top_k),
            top_p=top_p,
            seed=None if seed is None else whole(seed),  # unset: the server draws a random seed
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            min_p=min_p,
            logit_bias=dict(logit_bias),
            min_tokens=whole(min_tokens),
        )
        req = pb.GenerateRequest(
            sampling=sampling,
            stop=list(stop),
            return_logprobs=return_logprobs,
            ignore_eos=ignore_eos,
            include_stop_str_in_output=include_stop_str_in_output,
            truncate_prompt_tokens=truncate_prompt_tokens,
            top_logprobs=whole(top_logprobs),
            stop_token_ids=list(stop_token_ids),
            **_input(prompt, validate, messages, tools, chat_template_kwargs),
        )
        _guide_fields(req, response_format, guided_choice, tool_choice, parallel_tool_calls, tools, validate,
                      guided_regex)  # fmt: skip
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        if n != 1:  # 1 stays unset (0 on the wire): an n = 1 request is byte for byte what it was before n existed
            req.n = n
        return req

    def generate(
        self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None, **kwargs
    ) -> Generation:
        """One unary Generate call (kwargs: see `request`, `messages=` among them instead of a prompt; n > 1: the
        samples are in `.choices`)."""
        r = self.stub.Generate(self.request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)
        choices = [
            Choice(c.index, list(c.tokens), c.text, list(c.logprobs), _REASONS.get(c.finish_reason, "cancelled"),
                   _top(c.top_logprobs), _calls(c.tool_calls), c.reasoning)
            for c in r.choices
        ]  # fmt: skip
        return Generation(
            list(r.tokens),
            r.text,
            list(r.logprobs),
            "" if choices else _REASONS.get(r.finish_reason, "cancelled"),
            r.usage.prompt_tokens,
            r.usage.generated_tokens,
            r.timing.queue_ms,
            r.timing.time_to_first_token_ms,
            r.timing.total_ms,
            _top(r.top_logprobs),
            r.usage.cached_prompt_tokens,
            choices,
            _calls(r.tool_calls),
            r.reasoning,
        )

    def generate_stream(
        self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None, **kwargs
    ) -> Iterator[Chunk]:
        """GenerateStream; the iterator's `.cancel()` is on `stream_call(...)` when a caller needs it. With n > 1 the
        samples' chunks interleave: `.index` says whose, and each sample's last chunk has its finish_reason."""
        for c in self.stream_call(prompt, timeout=timeout, **kwargs):
            yield Chunk(list(c.tokens), c.text, list(c.logprobs), _REASONS.get(c.finish_reason), _top(c.top_logprobs),
                        c.index, _calls(c.tool_calls), c.reasoning)  # fmt: skip

    def stream_call(self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None, **kwargs):
        """The raw streaming call (iterate for GenerateChunk protos; `.cancel()` ends it)."""
        return self.stub.GenerateStream(self.request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)

    def score(
        self, items: Sequence[tuple[str | Sequence[int], str | Sequence[int]]], *, timeout: float | None = None
    ) -> list[Score]:
        """Log-probs of each continuation given its prompt; items of (prompt, continuation), text or ids."""
        pb_items = []
        for prompt, cont in items:
            item = pb.ScoreItem()
            if isinstance(prompt, str):
                item.prompt_text = prompt
            else:
                item.prompt_tokens.ids.extend(prompt)
            if isinstance(cont, str):
                item.continuation_text = cont
            else:
                item.continuation_tokens.ids.extend(cont)
            pb_items.append(item)
        r = self.stub.Score(pb.ScoreRequest(items=pb_items), timeout=timeout, metadata=self.metadata)
        return [Score(x.logprob, list(x.token_logprobs), x.greedy, list(x.continuation_tokens)) for x in r.results]

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)
