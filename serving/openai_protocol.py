"""OpenAI's completions and chat-completions JSON <-> meshserve.v1 GenerateRequest protos and back. No HTTP here.

The HTTP front (serving/http_server.py) parses a body with `parse_body`, which checks every field's JSON type and
builds one GenerateRequest per prompt; serving/validation.py's RequestParser then checks limits exactly as for gRPC,
and `openai_error` renames the gRPC field its message names to the OpenAI field the client sent (max_new_tokens ->
max_tokens, sampling.temperature -> temperature, text -> prompt ...), so a bad field is reported under its own name.

Where the two APIs differ, OpenAI's rule wins: temperature defaults to 1 (gRPC: 0, greedy); JSON null means unset;
choice i of prompt p has index p * n + i; an unset max_tokens in a chat runs to the end of the context (the
server's max_new_tokens at most). Left as the gRPC default: an unset max_tokens in a completion generates
min(64, room left in the context, the server's max_new_tokens) tokens. vLLM's sampling extras (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output, truncate_prompt_tokens) are
accepted, and a chat's chat_template_kwargs (more template variables, e.g. Qwen3's enable_thinking). `tools` need `serve --tool-call-parser`
(serving/openai_tools.py). A chat's add_generation_prompt (default true) and continue_final_message (default false;
true: the prompt ends inside the last message, the assistant's, for the model to continue; add_generation_prompt must
then be false), as vLLM's, reach the template as variables (model/chat.py). stream_options.continuous_usage_stats
(vLLM's, with include_usage) puts the usage so far on every chunk. response_format json_object / json_schema (chat
and, as vLLM, completions), vLLM's guided_json / guided_choice / guided_regex (not guided_grammar) and tool_choice
"required" or a named function are guided decoding (serving/guided_requests.py), at most one of them. What meshserve
cannot do (suffix, best_of != n, images, echo with stream or with logprobs > 1) is refused by name rather than
ignored, as is any unknown field. echo (with max_tokens 0: score only) gives the prompt's log-probs, and for
logprobs = 1 each prompt token's most likely alternative, as lm-evaluation-harness's loglikelihood requests need.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from meshserve.model.sampling_params import TOP_LOGPROBS_MAX
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.guided_requests import HTTP_FORMATS, http_format, http_renames
from meshserve.serving.openai_fields import INT32, Body, as_float, check_text, ints, show
from meshserve.serving.openai_tools import ToolUse, message_tool_fields, request_tools, tools_json
from meshserve.serving.validation import RequestError, template_kwargs_json

__all__ = [
    "OpenAIRequest",
    "Body",
    "HttpError",
    "check_text",
    "ints",
    "chat_messages",
    "chat_template_json",
    "show",
    "ModelNotFound",
    "parse_body",
    "openai_error",
    "param_of",
    "COMPLETIONS",
    "CHAT",
]

COMPLETIONS = "completions"
CHAT = "chat"
_IGNORED = frozenset({"user", "metadata", "service_tier", "store"})  # no effect on the output
_COMMON = frozenset({
    "model", "n", "stream", "stream_options", "temperature", "top_p", "seed", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "max_tokens", "logprobs", "response_format",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",  # vLLM's extras
    "include_stop_str_in_output", "truncate_prompt_tokens",
    *HTTP_FORMATS,
})  # fmt: skip
_FIELDS = {
    COMPLETIONS: _COMMON | {"prompt", "echo", "suffix", "best_of"},
    CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                     "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt", "continue_final_message"},
}  # fmt: skip
# gRPC field names in RequestParser's messages -> the OpenAI field, per endpoint (longest prefix first).
_RENAMES = {
    COMPLETIONS: (("max_new_tokens", "max_tokens"), ("tokens.ids", "prompt"), ("top_logprobs", "logprobs"),
                  ("sampling.", ""), ("input", "prompt"), ("text", "prompt")),
    CHAT: (("messages.tool_choice_function", "tool_choice"), ("messages.tool_choice", "tool_choice"),
           ("messages.tools_json", "tools"), ("messages.chat_template_kwargs_json", "chat_template_kwargs"),
           ("max_new_tokens", "max_tokens"), ("sampling.", ""), ("input", "messages")),
}  # fmt: skip


class HttpError(Exception):
    """An answer other than 200: status, message (naming the field and its limit) and the OpenAI `param`."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        """headers: more headers of the answer (a 405's Allow)."""
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


@dataclass
class OpenAIRequest:
    """A checked OpenAI body: one GenerateRequest per prompt (chat: one), each asking for n samples."""

    kind: str  # COMPLETIONS or CHAT
    requests: list[pb.GenerateRequest]
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool  # return the chosen tokens' log-probs
    top_logprobs: int  # alternatives per token
    max_tokens_field: str  # what the client called max_new_tokens (chat: max_tokens or max_completion_tokens)
    echo: bool = False  # completions: the prompt comes back before the completion (with its log-probs)
    score_only: bool = False  # echo with max_tokens 0: the prompt's log-probs, nothing generated
    tools: ToolUse | None = None  # chat with tools (tool_choice auto): parse tool calls out of the text
    guide_field: str = "response_format"  # where the format came from (guided_json: the server's errors renamed)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): every chunk has the usage so far


def parse_body(kind: str, body, served_model: str, tool_parser: str | None = None,
               max_new_tokens: int = INT32 - 1) -> OpenAIRequest:  # fmt: skip
    """A decoded JSON body of POST /v1/completions (kind COMPLETIONS) or /v1/chat/completions (CHAT) -> the
    GenerateRequests to validate. tool_parser: the server's --tool-call-parser (None: a body with tools is refused);
    max_new_tokens: the server's limit on max_tokens (a larger one, past int32 too, is refused naming it).
    Raises RequestError naming the OpenAI field; ModelNotFound for another model."""
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {type(body).__name__}")
    check_text(body)
    for key in body:
        if key in _ELSEWHERE[kind]:
            raise RequestError(f"{key}: not a field of {_PATHS[kind]} ({_ELSEWHERE[kind][key]})")
        if key not in _FIELDS[kind] and key not in _IGNORED:
            raise RequestError(f"{key}: unknown field ({_PATHS[kind]} takes {', '.join(sorted(_FIELDS[kind]))})")
    b = Body(body)
    model = b.string("model")
    if model and model != served_model:
        raise ModelNotFound(f"model: {model!r} is not served here (this server serves {served_model!r})")
    template = pb.GenerateRequest()
    _sampling(b, template)
    guide_field = http_format(body, template)  # compiled (and its size checked) by RequestParser
    n = b.integer("n")
    if n is not None and n < 1:
        raise RequestError(f"n must be >= 1 (samples per prompt), got {n}")
    template.n = n or 1  # the limit (the server's max_n) is RequestParser's
    stream = bool(b.boolean("stream"))
    options = Body(b.object("stream_options") or {}, "stream_options.")
    for key in options.body:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise RequestError(f"stream_options.{key}: unknown field (takes include_usage, continuous_usage_stats)")
    include_usage = bool(options.boolean("include_usage"))
    continuous_usage = bool(options.boolean("continuous_usage_stats"))
    if (include_usage or continuous_usage) and not stream:
        raise RequestError("stream_options: only allowed with stream: true")
    if continuous_usage and not include_usage:  # vLLM ignores it then; refused here rather than ignored
        raise RequestError("stream_options.continuous_usage_stats: needs include_usage: true")
    max_field = "max_tokens"
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise RequestError("max_completion_tokens: give it or max_tokens, not both")
        max_field = "max_completion_tokens"
    echo = kind == COMPLETIONS and bool(b.boolean("echo"))
    max_tokens = b.integer(max_field, 0 if echo else 1, max_new_tokens + 1)  # RequestParser's range (echo: 0 too)
    score_only = echo and max_tokens == 0  # OpenAI's legacy scoring call: echo the prompt, generate nothing
    if max_tokens is not None and not score_only:
        template.max_new_tokens = max_tokens
    if kind == COMPLETIONS:
        logprobs = b.integer("logprobs", 0, TOP_LOGPROBS_MAX + 1)
        want_logprobs, top = logprobs is not None, logprobs or 0
        _refuse_completion_extras(b, template.n, stream, top)
        prompts = _prompts(b)
    else:
        want_logprobs = bool(b.boolean("logprobs"))
        top = b.integer("top_logprobs", 0, TOP_LOGPROBS_MAX + 1) or 0
        if top and not want_logprobs:
            raise RequestError("top_logprobs: needs logprobs: true")
        tools, tool_use = request_tools(body, tool_parser)
        prompts = [chat_messages(b)]
        template.messages.chat_template_kwargs_json = chat_template_json(b, prompts[0])
    template.return_logprobs = want_logprobs
    template.top_logprobs = top
    requests = []
    for prompt in prompts:
        req = pb.GenerateRequest()
        req.CopyFrom(template)
        if isinstance(prompt, str):
            req.text = prompt
        elif kind == COMPLETIONS:
            req.tokens.ids.extend(prompt)
        else:
            req.messages.messages.extend(prompt)
            req.messages.tools_json = tools_json(tools)
            if tool_use is not None and tool_use.choice:  # "required" / a named function: guided into calls
                req.messages.tool_choice, req.messages.tool_choice_function = tool_use.choice, tool_use.function
                req.messages.parallel_tool_calls = tool_use.parallel
        requests.append(req)
    return OpenAIRequest(
        kind, requests, template.n, stream, include_usage, want_logprobs, top, max_field, echo, score_only,
        tool_use if kind == CHAT else None, guide_field, continuous_usage,
    )  # fmt: skip


_PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
_ELSEWHERE = {
    COMPLETIONS: {"messages": "a conversation goes to POST /v1/chat/completions"},
    CHAT: {"prompt": "a plain prompt goes to POST /v1/completions"},
}


class ModelNotFound(RequestError):
    """The body names a model this server does not serve (404, as OpenAI's API and vLLM answer)."""


def _sampling(b: Body, req: pb.GenerateRequest) -> None:
    """The sampling fields (values are range-checked by SamplingParams, via RequestParser)."""
    s = req.sampling
    temperature = b.number("temperature")
    s.temperature = 1.0 if temperature is None else temperature  # OpenAI's default; 0 is greedy
    for key in ("top_p", "repetition_penalty"):
        if (value := b.number(key)) is not None:
            setattr(s, key, value)
    for key in ("presence_penalty", "frequency_penalty", "min_p"):
        setattr(s, key, b.number(key) or 0.0)
    top_k = b.integer("top_k", -1)
    s.top_k = 0 if top_k in (None, -1) else top_k  # vLLM's -1 = off, as meshserve's 0
    s.min_tokens = b.integer("min_tokens", 0) or 0
    if (seed := b.integer("seed", 0, 2**63)) is not None:
        s.seed = seed
    bias = b.object("logit_bias") or {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias: key {show(key)} is not a token id") from None
        if not 0 <= token < INT32 or isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"logit_bias[{key}]: expected a token id in [0, 2**31) and a number, got {show(value)}")
        s.logit_bias[token] = as_float(value, f"logit_bias[{key}]")
    stop = b._get("stop", (str, list), "a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else stop or []
    for i, st in enumerate(stops):
        if not isinstance(st, str):
            raise RequestError(f"stop[{i}]: expected a string, got {show(st)}")
    req.stop.extend(stops)
    req.stop_token_ids.extend(ints(b.array("stop_token_ids") or [], "stop_token_ids"))
    req.ignore_eos = bool(b.boolean("ignore_eos"))
    req.include_stop_str_in_output = bool(b.boolean("include_stop_str_in_output"))
    req.truncate_prompt_tokens = b.integer("truncate_prompt_tokens", -1) or 0


def _refuse_completion_extras(b: Body, n: int, stream: bool, top: int) -> None:
    if b.boolean("echo") and stream:
        raise RequestError("echo: not supported with stream: true")
    if b.boolean("echo") and top > 1:
        raise RequestError(f"logprobs: at most 1 with echo (a prompt token's alternative is its most likely token), "
                           f"got {top}")  # fmt: skip
    if b.string("suffix"):
        raise RequestError("suffix: not supported (no fill-in-the-middle)")
    best_of = b.integer("best_of", 1)
    if best_of is not None and best_of != n:
        raise RequestError(f"best_of: only best_of = n ({n}) is supported, got {best_of}")


def _prompts(b: Body) -> list:
    """`prompt`: a string, a list of token ids, or a list of either (several prompts)."""
    prompt = b._get("prompt", (str, list), "a string, a list of token ids, or a list of those")
    if prompt is None:
        raise RequestError("prompt: missing (a string, a list of token ids, or a list of those)")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt: empty list")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [ints(prompt, "prompt")]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p:
            out.append(ints(p, f"prompt[{i}]"))
        else:
            raise RequestError(f"prompt[{i}]: expected a string or a non-empty list of token ids, got {show(p)}")
    return out


def chat_messages(b: Body) -> list[pb.ChatMessage]:
    """`messages`: [{"role", "content"}], content a string or a list of {"type": "text", "text"} parts (joined by
    newlines, as vLLM does), null as ""; an assistant message's `tool_calls` and a tool message's `tool_call_id`
    (serving/openai_tools.py). The chat template decides which roles it accepts."""
    messages = b.array("messages")
    if not messages:
        raise RequestError("messages: missing or empty (give at least one message)")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: expected an object with role and content, got {show(m)}")
        mb = Body(m, f"messages[{i}].")
        for key in m:
            if key not in _MESSAGE_KEYS:
                raise RequestError(f"messages[{i}].{key}: not supported (a message takes role and content); an "
                                   "assistant's may add tool_calls and reasoning_content, a tool's "
                                   "tool_call_id")  # fmt: skip
        role = mb.string("role")
        if not role:
            raise RequestError(f"messages[{i}].role: missing")
        content = mb._get("content", (str, list), "a string or a list of text parts")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                        f"supported, got {show(kind if kind is not None else part)}"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        calls, call_id = message_tool_fields(m, i)
        reasoning = mb.string("reasoning_content") or ""  # a --reasoning-parser answer sent back in the history
        out.append(pb.ChatMessage(role=role, content=content or "", tool_calls=calls, tool_call_id=call_id,
                                  reasoning_content=reasoning))  # fmt: skip
    return out


def chat_template_json(b: Body, messages: list[pb.ChatMessage]) -> str:
    """A chat body's template variables as ChatMessages.chat_template_kwargs_json ("" = none): its
    chat_template_kwargs, over add_generation_prompt and continue_final_message where not at their defaults (vLLM's
    order: the kwargs win). RequestError naming the field for a combination the template could not render."""
    add = b.boolean("add_generation_prompt")
    options: dict[str, bool] = {} if add is None or add else {"add_generation_prompt": False}
    if b.boolean("continue_final_message"):
        if add is not False:
            raise RequestError("add_generation_prompt: must be false with continue_final_message: true (default true; "
                               "a new assistant turn, or the last message continued: not both)")  # fmt: skip
        if messages[-1].role != "assistant":
            raise RequestError(f"continue_final_message: continues the assistant's last message, and messages"
                               f"[{len(messages) - 1}] is a {messages[-1].role!r} message")  # fmt: skip
        options["continue_final_message"] = True
    given = template_kwargs_json(b.body)
    merged = {**options, **(json.loads(given) if given else {})}
    return json.dumps(merged) if merged else ""


_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "reasoning_content")


def openai_error(kind: str, error: RequestError, max_tokens_field: str = "max_tokens", prompt_index: int | None = None,
                 guide_field: str = "response_format") -> tuple[str, str | None]:  # fmt: skip
    """RequestParser's message with the gRPC field it names renamed to the OpenAI one: (message, param).
    prompt_index: which of several completion prompts the message is about (named prompt[i]); guide_field: the
    body's format field (OpenAIRequest.guide_field: a guided_json schema's errors are named guided_json)."""
    message = str(error)
    for grpc_name, name in (*http_renames(guide_field), *_RENAMES[kind]):
        if message.startswith(grpc_name):
            name = max_tokens_field if name == "max_tokens" else name
            if name == "prompt" and prompt_index is not None:
                name = f"prompt[{prompt_index}]"
            rest = message[len(grpc_name) :]
            if "_" in grpc_name:  # an identifier the message may repeat ("... + max_new_tokens 60 exceed ...")
                rest = re.sub(rf"\b{grpc_name}\b", name, rest)
            message = name + rest.replace(" (set text, tokens.ids or messages)", "")  # gRPC's field names
            break
    # max_new_tokens named in another field's message too; n = 0 is gRPC's unset, refused over HTTP.
    message = re.sub(r"\bmax_new_tokens\b", max_tokens_field, message).replace("] (0 = 1), got", "], got")
    return message, param_of(message)


def param_of(message: str) -> str | None:
    """The top-level field an error message starts with (OpenAI's `param`): "messages[2].role: ..." -> messages;
    None for the body as a whole."""
    if message.startswith("request body"):
        return None
    return message.split(":")[0].split(" ")[0].split("[")[0].split(".")[0] or None
