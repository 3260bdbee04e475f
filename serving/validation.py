"""Request validation for the gRPC servicer: meshserve.v1 request protos -> engine requests, every field checked.

Split from serving/servicer.py. Every bad field raises RequestError (INVALID_ARGUMENT) with a message naming the
field and its limit, before anything is queued, so no input reaches the engine thread unchecked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import time
from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.model.config import vocab_error
from meshserve.model.sampling_params import TOP_LOGPROBS_MAX, SamplingError, SamplingParams
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.reasoning import ChatOptions, opens_reasoning
from meshserve.serving.requests import Request, truncate_prompt  # plain data: `serve --help` imports this

__all__ = [
    "refuse_unknown",
    "RequestParser",
    "RequestError",
    "Limits",
    "score_reply_bytes",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_SCORE_TOKENS",
    "DEFAULT_MAX_N",
    "max_n_flag",
]

DEFAULT_MAX_NEW_TOKENS = 64
# Prompt + continuation tokens over one Score's items: 256 items x 1024 tokens. Its largest reply,
# score_reply_bytes(256, 262144) ~ 2.4 MB, fits gRPC's 4 MiB send limit (serving/server.py MAX_MESSAGE_BYTES).
DEFAULT_MAX_SCORE_TOKENS = 262144
# Samples per Generate request (GenerateRequest.n): OpenAI's best-of / self-consistency use stays well below it, and
# each sample takes a queue place and later a decode slot, so one request cannot fill a default queue (256).
DEFAULT_MAX_N = 16


def _message(m: pb.ChatMessage) -> dict:
    """A ChatMessage as model/chat.py's messages: OpenAI's JSON shape, the tool fields only where set."""
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                **({"id": c.id} if c.id else {}),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    return out


def _tools(tools_json: str) -> list:
    """ChatMessages.tools_json -> the tools, checked as the HTTP API checks `tools` (serving/openai_tools.py)."""
    from meshserve.serving.openai_tools import check_tools  # it imports RequestError from here

    try:
        tools = json.loads(tools_json)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"messages.tools_json: not JSON ({e})") from None
    return check_tools(tools, "messages.tools_json")


def template_kwargs_json(body: dict) -> str:
    """An HTTP chat body's `chat_template_kwargs` (vLLM's: an object of template variables) as
    ChatMessages.chat_template_kwargs_json; "" when absent. RequestError naming chat_template_kwargs[.key]."""
    from meshserve.model.chat import ChatError, check_template_kwargs

    value = body.get("chat_template_kwargs")
    if value is None:
        return ""
    try:
        return json.dumps(check_template_kwargs(value))
    except ChatError as e:
        raise RequestError(str(e)) from None


def score_reply_bytes(max_items: int, max_tokens: int) -> int:
    """An upper bound on the serialized ScoreResponse for `max_items` items of `max_tokens` tokens in all.

    Per continuation token: a packed float (4 bytes) and an int32 id as a varint (at most 5 bytes for ids < 2**31).
    Per item: the ScoreResult's tag and length (<= 6), logprob double (9), greedy (2), two packed fields' tags and
    lengths (<= 12): 32 bytes with room to spare.
    """
    return 9 * max_tokens + 32 * max_items


class RequestError(UserError):
    """An invalid request; the message names the field and its limit (INVALID_ARGUMENT)."""


def refuse_unknown(obj: dict, allowed: tuple[str, ...], where: str, takes: str) -> None:
    """RequestError "`where`.`key`: unknown field (`takes`)" for obj's first key not in `allowed` (a typo in a JSON
    body must not be silently ignored)."""
    for key in obj:
        if key not in allowed:
            raise RequestError(f"{where}.{key}: unknown field ({takes})")


def max_n_flag(text: str) -> int:
    """argparse type of `meshserve serve --max-n`: an integer >= 1 (argparse reports anything else, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (samples per Generate request), got {text!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (GetModelInfo.limits; `meshserve serve` flags)."""

    max_context: int
    max_batch: int
    max_new_tokens: int
    max_queue: int
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_score_items: int = 256
    max_text_chars: int = 0  # 0: 32 characters per context token (no tokenizer packs more into one token)
    max_score_tokens: int = DEFAULT_MAX_SCORE_TOKENS  # prompt + continuation tokens over one Score's items
    max_n: int = DEFAULT_MAX_N  # samples per Generate request (GenerateRequest.n)

    @property
    def text_chars(self) -> int:
        return self.max_text_chars or 32 * self.max_context


class RequestParser:
    """Checks requests against the model (vocabulary, context, tokenizer) and the server's limits."""

    def __init__(self, model, limits: Limits, tool_parser: str | None = None, chat: ChatOptions | None = None):
        """tool_parser: the server's --tool-call-parser (None: off): tool_choice "required" or a named function
        guides the output into calls in its format, and is refused without one. chat: the server's
        --default-chat-template-kwargs (a request's chat_template_kwargs_json replaces them key by key) and
        --reasoning-parser (a chat's guided output then follows its reasoning block: serving/reasoning.py)."""
        self.model = model
        self.config = model.config
        self.limits = limits
        self.tool_parser = tool_parser
        self.chat_options = chat or ChatOptions()

    def ids(self, field: str, ids) -> list[int]:
        """`ids` when every one is in the model's vocabulary. Also checks what the tokenizer made of a text field:
        a tokenizer may know more ids than the model embeds, and such an id must not reach the engine thread."""
        ids = list(ids)
        if error := vocab_error(self.config, ids, field):
            raise RequestError(error)
        return ids

    def text(self, field: str, text: str) -> str:
        if len(text) > self.limits.text_chars:
            raise RequestError(f"{field}: {len(text)} characters exceed the limit of {self.limits.text_chars}")
        return text

    def chat(
        self, messages, tools_json: str = "", render_tools: bool = True, template_kwargs_json: str = ""
    ) -> list[int]:
        """`chat_prompt`'s ids."""
        return self.chat_prompt(messages, tools_json, render_tools, template_kwargs_json)[0]

    def chat_prompt(
        self, messages, tools_json: str = "", render_tools: bool = True, template_kwargs_json: str = ""
    ) -> tuple[list[int], bool]:
        """ChatMessage protos (and ChatMessages.tools_json, "" = no tools) -> prompt ids through the model's chat
        template (model/chat.py, which also checks roles, tool calls and their arguments' JSON); render_tools=False
        (tool_choice "none") checks the tools but does not give them to the template; template_kwargs_json:
        ChatMessages.chat_template_kwargs_json (more template variables, over the server's defaults). The limits are
        `text`'s over all contents, tool calls, the tools' JSON and the template variables' together, and at most
        max_context messages (a template writes at least a role header per message, so more could never fit).
        Also whether the template's generation prompt leaves the model inside a reasoning block (asked only with a
        reasoning parser: the prompt's tail alone could be a user's "<think>"). Raises RequestError naming the
        field."""
        from meshserve.model.chat import ChatError, read_template_kwargs

        if getattr(self.model, "chat", None) is None:
            raise RequestError(
                "messages: the model has no chat template (convert it from a Hugging Face directory that has one)"
            )
        if not messages:
            raise RequestError("messages: empty list (give at least one message)")
        if len(messages) > self.limits.max_context:
            raise RequestError(
                f"messages: {len(messages)} messages exceed the limit of {self.limits.max_context} (max_context)"
            )
        chars = (
            len(tools_json)
            + len(template_kwargs_json)
            + sum(
                len(m.content)
                + len(m.tool_call_id)
                + len(m.reasoning_content)
                + sum(len(c.id) + len(c.name) + len(c.arguments) for c in m.tool_calls)
                for m in messages
            )
        )
        if chars > self.limits.text_chars:
            parts = [("content", True), ("tool calls and tools", tools_json or any(m.tool_calls for m in messages)),
                     ("reasoning", any(m.reasoning_content for m in messages)),
                     ("template variables", template_kwargs_json)]  # fmt: skip
            what = ", ".join(name for name, present in parts if present)
            raise RequestError(f"messages: {chars} characters of {what} exceed the limit of {self.limits.text_chars}")
        tools = _tools(tools_json) if tools_json else None
        try:
            extra = read_template_kwargs(template_kwargs_json, "messages.chat_template_kwargs_json")
            args = ([_message(m) for m in messages], tools if render_tools else None,
                    {**self.chat_options.template_kwargs, **extra})  # fmt: skip
            if self.chat_options.reasoning_parser is None:
                ids, opens = self.model.encode_chat(*args), False
            else:  # one render for both
                ids, opening = self.model.encode_chat_opening(*args)
                opens = opens_reasoning(opening)
        except ChatError as e:
            raise RequestError(str(e) if str(e).startswith("messages") else f"messages: {e}") from None
        return self.ids("messages", ids), opens

    def generate(
        self, req: pb.GenerateRequest, time_remaining: float | None, default_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> tuple[Request, list[str]]:
        """A GenerateRequest -> (engine Request, stop strings); time_remaining: the client's deadline in s (None:
        none); default_new_tokens: max_new_tokens when unset (capped by the room in the context and the server's
        limit). Raises RequestError naming the first bad field."""
        which = req.WhichOneof("input")
        opens = False  # a chat's template left the model inside a reasoning block (with a reasoning parser)
        if which == "text":
            prompt = self.ids("text", self.model.encode_prompt(self.text("text", req.text))) if req.text else []
        elif which == "tokens":
            prompt = self.ids("tokens.ids", req.tokens.ids)
        elif which == "messages":
            chat = req.messages
            prompt, opens = self.chat_prompt(
                chat.messages, chat.tools_json, chat.tool_choice != "none", chat.chat_template_kwargs_json
            )
        else:
            prompt = []
        if not prompt:
            raise RequestError("input: empty prompt (set text, tokens.ids or messages)")
        lim = self.limits
        if req.truncate_prompt_tokens:  # -1: room for max_new_tokens, or for the default 64 (and min_tokens)
            want = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
            try:
                prompt = truncate_prompt(prompt, req.truncate_prompt_tokens, lim.max_context,
                                         max(want, req.sampling.min_tokens))  # fmt: skip
            except ValueError as e:
                raise RequestError(str(e)) from None
        room = lim.max_context - len(prompt)
        if room < 1:
            raise RequestError(
                f"input: {len(prompt)} prompt tokens leave no room in the context (max_context={lim.max_context})"
            )
        if req.HasField("max_new_tokens"):
            n = req.max_new_tokens
            if not 1 <= n <= lim.max_new_tokens:
                raise RequestError(f"max_new_tokens must be in [1, {lim.max_new_tokens}], got {n}")
            if n > room:
                raise RequestError(
                    f"max_new_tokens: {len(prompt)} prompt tokens + max_new_tokens {n} exceed the context limit "
                    f"max_context={lim.max_context}"
                )
        else:  # long enough for the request's own min_tokens (a smaller default would refuse it)
            n = min(max(default_new_tokens, req.sampling.min_tokens), room, lim.max_new_tokens)
        if not 0 <= req.top_logprobs <= TOP_LOGPROBS_MAX:  # a request field, checked before sampling's own fields
            raise RequestError(f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}] (0 = none), got {req.top_logprobs}")
        s = req.sampling
        top_p = s.top_p if s.HasField("top_p") else 1.0
        repetition = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
        try:
            sampling = SamplingParams(
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=top_p,
                # Unset: a random seed, as OpenAI's API and vLLM's server; 62 bits leave room for seed + n - 1.
                seed=s.seed if s.HasField("seed") else secrets.randbits(62),
                repetition_penalty=repetition,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                min_p=s.min_p,
                top_logprobs=req.top_logprobs,
                logit_bias=dict(s.logit_bias),
                min_tokens=s.min_tokens,
            )
        except SamplingError as e:
            raise RequestError(f"sampling.{e}") from None
        self.ids("sampling.logit_bias", sorted(s.logit_bias))
        if len(req.stop) > lim.max_stop_strings:
            raise RequestError(f"stop: {len(req.stop)} stop strings exceed the limit of {lim.max_stop_strings}")
        for i, st in enumerate(req.stop):
            if not 1 <= len(st) <= lim.max_stop_length:
                raise RequestError(f"stop[{i}]: length must be in [1, {lim.max_stop_length}], got {len(st)}")
        if len(req.stop_token_ids) > lim.max_stop_strings:
            raise RequestError(
                f"stop_token_ids: {len(req.stop_token_ids)} ids exceed the limit of {lim.max_stop_strings}"
            )
        extra = self.ids("stop_token_ids", req.stop_token_ids)
        guide = self.guide(req)
        thinking = which == "messages" and self.chat_options.reasoning_parser is not None
        if thinking and guide is not None and guide.kind != "regex":  # the format after the reasoning block
            guide = dataclasses.replace(guide, think="open" if opens else "start")
        deadline = time.monotonic() + time_remaining if time_remaining is not None else None
        stop_ids = frozenset(extra) | (frozenset() if req.ignore_eos else frozenset(self.model.stop_ids()))
        try:  # the Request gives min_tokens its stop ids, one bias entry each: the table's limit applies
            request = Request(
                prompt,
                n,
                sampling,
                stop_ids,
                deadline=deadline,
                guide=guide,
                include_stop_str=req.include_stop_str_in_output,
            )
            request.think_open = thinking and opens
            return request, list(req.stop)
        except SamplingError as e:
            raise RequestError(f"sampling.{e}") from None

    def guide(self, req: pb.GenerateRequest):
        """The output format the request asks for (response_format, or a chat's tool_choice "required" / a named
        function) as a checked, compiled GuideSpec (serving/guided_requests.py); None for free text."""
        from meshserve.serving.guided_requests import request_guide  # it imports RequestError from here

        tools = None
        if req.WhichOneof("input") == "messages" and req.messages.tools_json:
            tools = _tools(req.messages.tools_json)  # checked already by `chat`: this only parses
        return request_guide(req, tools, self.tool_parser, self.limits.text_chars)

    def samples(
        self, req: pb.GenerateRequest, time_remaining: float | None, default_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> tuple[list[Request], list[str]]:
        """A GenerateRequest -> its n engine Requests (sample i with seed + i, as batch-generate's "n") and the stop
        strings. n = 1 (or unset) is exactly `generate`'s one request. Raises RequestError naming the first bad
        field; n is checked first, so a bad n is reported whatever else is wrong."""
        n = req.n or 1  # proto3: unset reads 0
        if not 1 <= n <= self.limits.max_n:
            raise RequestError(f"n must be in [1, {self.limits.max_n}] (0 = 1), got {req.n}")
        first, stop = self.generate(req, time_remaining, default_new_tokens)
        try:
            return first.samples(n), stop
        except SamplingError as e:
            raise RequestError(f"n: {e}") from None

    def score_item(self, i: int, item: pb.ScoreItem) -> tuple[list[int], list[int]]:
        """Item i of a ScoreRequest -> (prompt ids, continuation ids), each checked against the vocabulary."""
        if item.WhichOneof("prompt") == "prompt_text":
            field = f"items[{i}].prompt_text"
            prompt = self.ids(field, self.model.encode_prompt(self.text(field, item.prompt_text)))
        else:
            prompt = self.ids(f"items[{i}].prompt_tokens.ids", item.prompt_tokens.ids)
        if item.WhichOneof("continuation") == "continuation_text":
            field = f"items[{i}].continuation_text"
            cont = self.ids(field, self.model.tokenizer.encode(self.text(field, item.continuation_text)))
        else:
            cont = self.ids(f"items[{i}].continuation_tokens.ids", item.continuation_tokens.ids)
        if not prompt:
            raise RequestError(f"items[{i}]: empty prompt")
        if not cont:
            raise RequestError(f"items[{i}]: empty continuation")
        if len(prompt) + len(cont) > self.limits.max_context:
            raise RequestError(
                f"items[{i}]: {len(prompt)} prompt + {len(cont)} continuation tokens exceed the context limit "
                f"max_context={self.limits.max_context}"
            )
        return prompt, cont
