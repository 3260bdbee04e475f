"""POST /v1/responses, OpenAI's Responses API, served on the chat path: a Responses body becomes the chat body it
means (`ResponsesRequest`), which the chat route's own parsing, limits, queueing, sampling, tools, structured outputs
and reasoning parser serve, and the chat's pieces become the Response's output items and stream events
(serving/openai_responses_items.py). No state is kept: the whole conversation comes in `input` every time.

The mapping: `instructions` is a first system message; `input` a string (one user message) or a list of items:
messages (role user, system, developer (as system) or assistant; content a string or input_text / output_text parts,
joined by newlines as the chat route joins text parts), function_call items (an assistant message's tool_calls; calls
right after an assistant message join it) and function_call_output items (tool messages), and reasoning items (the
next assistant message's reasoning_content); `max_output_tokens` is max_tokens, `text.format` response_format,
function `tools` ({type, name, description, parameters, strict}) the chat's nested tools, `tool_choice` {type:
function, name} the chat's named function, and include ["message.output_text.logprobs"] logprobs (with
`top_logprobs`). The chat route's sampling extras pass through (seed, top_k, min_p, stop, penalties ...:
vLLM's), as does chat_template_kwargs. Errors come back under the Responses' names (input[3].content,
max_output_tokens, text.format.schema, tools[0].name). Refused by name: previous_response_id, store true (nothing is
stored), background, conversation, prompt, reasoning settings, truncation auto, tools other than functions, image /
file / audio inputs and any unknown field; metadata, user and a few no-effect fields are accepted (metadata and user
echoed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from meshserve.serving.openai_protocol import CHAT, HttpError, param_of, show
from meshserve.serving.openai_responses import Choices, error_body
from meshserve.serving.openai_responses_items import Items, ResponseSettings, reasoning_tokens, response_object, usage
from meshserve.serving.validation import RequestError, refuse_unknown

__all__ = ["PATH", "ResponsesRequest", "responses_request", "respond"]

PATH = "/v1/responses"
LOGPROBS = "message.output_text.logprobs"  # the one `include` value meshserve serves
_PASSED = ("model", "temperature", "top_p", "stream", "parallel_tool_calls", "seed", "top_k", "min_p", "stop",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
           "stop_token_ids", "logit_bias", "chat_template_kwargs")  # fmt: skip
_OWN = ("input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "include", "top_logprobs",
        "metadata", "user", "store", "truncation", "stream_options")  # fmt: skip
_IGNORED = ("service_tier", "safety_identifier", "prompt_cache_key", "max_tool_calls")  # no effect here
_REFUSED = {
    "previous_response_id": "meshserve stores no responses: send the whole conversation in input",
    "conversation": "meshserve stores no conversations: send the whole conversation in input",
    "background": "responses run in the foreground only",
    "prompt": "no stored prompt templates: send instructions and input",
    "reasoning": "reasoning settings are the model's own (serve --reasoning-parser returns its <think> block)",
    "context_management": "not supported",
}
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")


@dataclass
class ResponsesRequest:
    """A checked Responses body: the chat body it means, what the Response echoes, and where each chat message came
    from (for renaming errors): sources[i] names message i's origin ("instructions", "input", "input[3]") and
    call_sources[i] its tool calls' input items."""

    chat: dict
    settings: ResponseSettings
    sources: list[str] = field(default_factory=list)
    call_sources: list[list[str]] = field(default_factory=list)

    def renamed(self, error: HttpError) -> HttpError:
        """An HttpError of the chat route with its field named as this request named it."""
        message = _rename(str(error), self)
        return HttpError(error.status, message, param_of(message) if error.param is not None else None)


def responses_request(body: Any, model_name: str) -> ResponsesRequest:
    """A decoded POST /v1/responses body -> the chat body to serve it. Raises HttpError 400 naming the field."""
    try:
        return _request(body, model_name)
    except RequestError as e:
        raise HttpError(400, str(e), param_of(str(e))) from None


def _request(body: Any, model_name: str) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in _REFUSED and value not in (None, False):
            raise RequestError(f"{key}: not supported ({_REFUSED[key]})")
        if key not in (*_PASSED, *_OWN, *_IGNORED, *_REFUSED):
            raise RequestError(f"{key}: unknown field ({PATH} takes {', '.join(sorted((*_PASSED, *_OWN)))})")
    if body.get("store") is True:
        raise RequestError("store: true is not supported (meshserve stores no responses; send store: false or leave "
                           "it out, and the whole conversation in input)")  # fmt: skip
    if body.get("truncation") not in (None, "disabled"):
        raise RequestError(f"truncation: only 'disabled' is supported (a too-long input is refused), got "
                           f"{show(body['truncation'])}")  # fmt: skip
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError(f"stream_options: expected an object, got {show(options)}")
        refuse_unknown(options, ("include_obfuscation",), "stream_options", "takes include_obfuscation")
    chat = {key: body[key] for key in _PASSED if key in body}
    request = ResponsesRequest(chat, ResponseSettings(model=model_name))
    _messages(body, request)
    s = request.settings
    if (limit := body.get("max_output_tokens")) is not None:
        chat["max_tokens"] = s.max_output_tokens = limit
    if (tools := body.get("tools")) is not None:
        chat["tools"] = _tools(tools)
        s.tools = tools
    if (choice := body.get("tool_choice")) is not None:
        chat["tool_choice"] = _tool_choice(choice)
        s.tool_choice = choice
    if body.get("text") is not None:
        chat["response_format"], s.text = _text(body["text"])
    _logprobs(body, chat, s)
    for key, kind in (("metadata", dict), ("user", str)):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise RequestError(f"{key}: expected {'an object' if kind is dict else 'a string'}, got {show(body[key])}")
    s.metadata, s.user = body.get("metadata"), body.get("user")
    for key in ("temperature", "top_p"):  # echoed as the sampler uses them (the chat route checks their types)
        if isinstance(body.get(key), int | float) and not isinstance(body[key], bool):
            setattr(s, key, float(body[key]))
    if isinstance(body.get("parallel_tool_calls"), bool):
        s.parallel_tool_calls = body["parallel_tool_calls"]
    return request


def _messages(body: dict, request: ResponsesRequest) -> None:
    """`instructions` and `input` -> the chat's messages (request.chat["messages"], sources, call_sources)."""
    messages, sources, calls = [], request.sources, request.call_sources

    def add(message: dict, source: str) -> None:
        messages.append(message)
        sources.append(source)
        calls.append([])

    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError(f"instructions: expected a string, got {show(instructions)}")
        add({"role": "system", "content": instructions}, "instructions")
        request.settings.instructions = instructions
    given = body.get("input")
    if isinstance(given, str):
        add({"role": "user", "content": given}, "input")
    elif isinstance(given, list) and given:
        reasoning = ""  # a reasoning item's text, for the assistant message after it
        for i, item in enumerate(given):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise RequestError(f"{where}: expected an input item (an object), got {show(item)}")
            kind = item.get("type", "message")
            if kind == "message":
                refuse_unknown(item, ("type", "role", "content", "id", "status"), where, "a message takes role and "
                               "content")  # fmt: skip
                role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
                if role is None:
                    raise RequestError(f"{where}.role: expected one of {', '.join(_ROLES)}, got "
                                       f"{show(item.get('role'))}")  # fmt: skip
                message = {"role": role, "content": _content(item.get("content"), f"{where}.content")}
                if role == "assistant" and reasoning:
                    message["reasoning_content"], reasoning = reasoning, ""
                add(message, where)
            elif kind == "function_call":
                refuse_unknown(item, ("type", "call_id", "name", "arguments", "id", "status"), where, "a "
                               "function_call takes call_id, name and arguments")  # fmt: skip
                for key in ("call_id", "name", "arguments"):
                    if not isinstance(item.get(key), str):
                        raise RequestError(f"{where}.{key}: expected a string, got {show(item.get(key))}")
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
                if not messages or messages[-1]["role"] != "assistant":  # else the calls join that message
                    add({"role": "assistant", "content": "", "tool_calls": []}, where)
                    if reasoning:
                        messages[-1]["reasoning_content"], reasoning = reasoning, ""
                messages[-1].setdefault("tool_calls", []).append(call)
                calls[-1].append(where)
            elif kind == "function_call_output":
                refuse_unknown(item, ("type", "call_id", "output", "id", "status"), where, "a function_call_output "
                               "takes call_id and output")  # fmt: skip
                if not isinstance(item.get("call_id"), str):
                    raise RequestError(f"{where}.call_id: expected a string, got {show(item.get('call_id'))}")
                output = _content(item.get("output"), f"{where}.output")
                add({"role": "tool", "tool_call_id": item["call_id"], "content": output}, where)
            elif kind == "reasoning":
                refuse_unknown(item, ("type", "id", "summary", "content", "encrypted_content", "status"), where,
                               "a reasoning item takes summary and content")  # fmt: skip
                if item.get("encrypted_content") is not None:
                    raise RequestError(f"{where}.encrypted_content: not supported (send the reasoning's content)")
                reasoning = _content(item.get("content") or [], f"{where}.content", ("reasoning_text",))
            else:
                raise RequestError(f"{where}.type: {show(kind)} items are not supported (message, function_call, "
                                   "function_call_output and reasoning are)")  # fmt: skip
    else:
        raise RequestError(f"input: expected a string or a non-empty list of input items, got {show(given)}")
    request.chat["messages"] = messages


def _content(content: Any, where: str, kinds: tuple[str, ...] = _TEXT_PARTS) -> str:
    """A string, or a list of text parts ({type: input_text | output_text, text}) joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: expected a string or a list of text parts, got {show(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise RequestError(f"{where}[{j}]: {kind} is not supported (text inputs only)")
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{j}]: expected a text part {{'type': {kinds[0]!r}, 'text': ...}}, got "
                               f"{show(part)}")  # fmt: skip
        texts.append(part["text"])
    return "\n".join(texts)


def _tools(tools: Any) -> list[dict]:
    """Function tools in the Responses' flat shape -> the chat's ({type, function: {...}})."""
    if not isinstance(tools, list):
        raise RequestError(f"tools: expected a list of tools, got {show(tools)}")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise RequestError(f"tools[{i}].type: only function tools are supported, got {show(kind)} (no built-in "
                               "tools such as web_search or file_search)")  # fmt: skip
        refuse_unknown(tool, ("type", "name", "description", "parameters", "strict"), f"tools[{i}]", "a function "
                       "tool takes type, name, description, parameters and strict")  # fmt: skip
        function = {k: v for k, v in tool.items() if k != "type" and v is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise RequestError(f"tool_choice.type: only 'function' (or 'auto', 'none', 'required') is supported, got "
                               f"{show(choice.get('type'))}")  # fmt: skip
        refuse_unknown(choice, ("type", "name"), "tool_choice", "a named function takes type and name")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text(text: Any) -> tuple[dict, dict]:
    """`text` ({format, verbosity?}) -> (the chat's response_format, the Response's text)."""
    if not isinstance(text, dict):
        raise RequestError(f"text: expected an object {{'format': {{...}}}}, got {show(text)}")
    refuse_unknown(text, ("format", "verbosity"), "text", "takes format")
    if text.get("verbosity") is not None:
        raise RequestError("text.verbosity: not supported (the model decides its length; see max_output_tokens)")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise RequestError(f"text.format: expected an object with type, got {show(fmt)}")
    if fmt.get("type") != "json_schema":
        return dict(fmt), {"format": fmt}
    refuse_unknown(fmt, ("type", "name", "schema", "strict", "description"), "text.format", "a json_schema format "
                   "takes name, schema, strict and description")  # fmt: skip
    inner = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": inner}, {"format": fmt}


def _logprobs(body: dict, chat: dict, s: ResponseSettings) -> None:
    include = body.get("include") or []
    if not isinstance(include, list):
        raise RequestError(f"include: expected a list, got {show(include)}")
    for i, value in enumerate(include):
        if value != LOGPROBS:
            raise RequestError(f"include[{i}]: only {LOGPROBS!r} is supported, got {show(value)}")
    top = body.get("top_logprobs")
    if include:
        chat["logprobs"] = True
    if top is not None:
        if not include and top:
            raise RequestError(f"top_logprobs: needs include: [{LOGPROBS!r}] (where the log-probs are returned)")
        chat["top_logprobs"] = top
        s.top_logprobs = top if isinstance(top, int) else 0


# Chat field names in the chat route's messages -> the Responses' (after messages[i] is renamed).
_FIELDS = (("max_tokens", "max_output_tokens"), ("response_format.json_schema.", "text.format."),
           ("response_format", "text.format"), ("tool_choice.function.", "tool_choice."))  # fmt: skip
_MESSAGE = re.compile(r"messages\[(\d+)\](?:\.tool_calls\[(\d+)\](?:\.function)?|\.tool_call_id|\.content)?")
_TOOL = re.compile(r"tools\[(\d+)\]\.function")


def _rename(message: str, request: ResponsesRequest) -> str:
    """The chat route's field names in `message` as the Responses body named them."""
    m = _MESSAGE.match(message)
    if m is not None and int(m.group(1)) < len(request.sources):
        i = int(m.group(1))
        name, calls = request.sources[i], request.call_sources[i]
        if m.group(2) is not None and int(m.group(2)) < len(calls):
            name = calls[int(m.group(2))]
        elif m.group(0).endswith(".tool_call_id"):
            name += ".call_id"
        elif m.group(0).endswith(".content"):  # a tool message's content was its item's output
            name += ".output" if request.chat["messages"][i]["role"] == "tool" else ".content"
        message = name + message[m.end() :]
    elif message.startswith("messages"):
        message = "input" + message[len("messages") :]
    message = _TOOL.sub(r"tools[\1]", message)
    for chat, ours in _FIELDS:
        if message.startswith(chat):
            message = ours + message[len(chat) :]
    return re.sub(r"\bmax_tokens\b", "max_output_tokens", message)


class _Events:
    """A stream's events, numbered, as server-sent events with their type (`event: <type>`)."""

    def __init__(self, handler) -> None:
        self.handler, self.sequence = handler, 0

    def send(self, events: list[dict]) -> None:
        for event in events:
            data = {**event, "sequence_number": self.sequence}
            self.sequence += 1
            self.handler.sse(json.dumps(data, ensure_ascii=False), event["type"])

    def error(self, error: HttpError) -> None:
        """An error after the stream began: OpenAI's error event, last."""
        body = error_body(error)["error"]
        self.send([{"type": "error", "code": body["type"], "message": body["message"], "param": body["param"]}])


def respond(handler, body: Any) -> int:
    """Serve one POST /v1/responses on the HTTP handler (serving/http_server.py's: `front`, `handles`, `send_json`,
    `start_stream`, `sse`, `end_stream`, `client_gone`); returns the status. HttpError before any output is the
    caller's to answer."""
    front = handler.front
    request = responses_request(body, front.model_name)
    try:
        parsed, handles, events, _ = front.submit(CHAT, request.chat)
    except HttpError as e:
        raise request.renamed(e) from None
    handler.handles = handles
    out = Choices(front.model.tokenizer, parsed, handles, chat=front.chat)
    items, settings = Items(), request.settings
    stream = _Events(handler) if parsed.stream else None
    if stream is not None:
        handler.start_stream(stream.error)
        first = response_object(settings, "in_progress", [], None)
        stream.send([{"type": "response.created", "response": first}, {"type": "response.in_progress",
                                                                        "response": first}])  # fmt: skip
    try:
        for index, event in front.events(handles, events, handler.client_gone):
            piece = out.add(index, event)
            if piece is not None and (new := items.feed(piece)) and stream is not None:
                stream.send(new)
        if error := front.shut_down_error(out.reasons):
            raise error
    except HttpError as e:
        if stream is None:
            raise
        front.cancel(handles)
        stream.error(e)
        handler.end_stream()
        return e.status
    incomplete = out.reasons[0] == "length"
    last = items.finish(incomplete)
    (handle,) = handles
    split = None if front.chat.reasoning_parser is None else (lambda: front.chat.splitter(handle.request))
    used = usage(out.usage(), reasoning_tokens(front.model.tokenizer, list(handle.request.tokens), split))
    status = "incomplete" if incomplete else "completed"
    response = response_object(settings, status, items.output, used)
    if stream is None:
        handler.send_json(200, response)
        return 200
    stream.send([*last, {"type": f"response.{status}", "response": response}])
    handler.end_stream()
    return 200
