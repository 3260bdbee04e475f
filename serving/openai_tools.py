"""Tool calling in the chat API, as vLLM's `--enable-auto-tool-choice --tool-call-parser hermes`: the request's
`tools`, `tool_choice` and `parallel_tool_calls` checked, assistant `tool_calls` and tool messages read into the
proto, and the Hermes format's calls parsed out of the generated text, whole or while it streams.

Hermes-format models (Qwen2.5, Hermes 2 Pro / 3, ...) see the tools in their chat template's `tools` variable and answer
a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one block per call, JSON inside, whitespace
around). `parse_tool_calls` turns each block whose JSON is an object naming a function into a call, and the text outside
the blocks into the content (None when it is only whitespace; whitespace between and after blocks is dropped); a block
that does not parse stays content. As vLLM's hermes parser, a last block left open (`<tool_call>{...}` with no closing
tag, the model stopped right after the JSON) counts when its JSON parses. Unlike vLLM's regex, the JSON is read by the
JSON decoder, so a `</tool_call>` inside an argument's string does not cut the block; unlike vLLM, the decoder is strict
JSON (json_scan.DECODER): a block holding NaN, Infinity, -Infinity or a number out of float range, which vLLM passes on
as invalid JSON arguments, is not a call and stays content. A block whose JSON starts {"name": ..., "arguments": ...}
gets its arguments written by serving/tool_call_stream.py's JsonScan, as the HTTP stream sends them (json.dumps' form;
an object with a repeated key keeps every copy); other blocks json.dumps the decoded arguments. `ToolCallStream`
(gRPC's) is the same parse for a stream: text before the first `<tool_call>` goes out at once (unless it is only
whitespace so far: it may turn out to be the space between no content and a call), from the tag on everything is held,
and the end gives the rest of the content and the calls; its pieces always join to exactly what `parse_tool_calls` makes
of the whole text (tested over random splits). The HTTP chat stream sends calls as they are generated instead
(tool_call_stream.ToolCallDeltas). `parse_calls`, `call_stream` and `call_deltas` pick the server's parser: these, or
serving/llama3_tools.py's for llama3_json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from meshserve.protos import inference_pb2 as pb
from meshserve.serving.json_scan import DECODER
from meshserve.serving.json_show import show
from meshserve.serving.llama3_tools import Llama3Deltas, Llama3Stream, parse_llama3
from meshserve.serving.tool_call_stream import END, START, ToolCall, ToolCallDeltas, block_call
from meshserve.serving.validation import RequestError, refuse_unknown

__all__ = [
    "PARSERS",
    "MAX_TOOLS",
    "ToolUse",
    "ToolCall",
    "check_tools",
    "tools_json",
    "tool_choice",
    "request_tools",
    "message_tool_fields",
    "parse_tool_calls",
    "parse_calls",
    "call_stream",
    "call_deltas",
    "ToolCallStream",
    "openai_calls",
    "finish_reason",
]

PARSERS = ("hermes", "llama3_json")  # serve --tool-call-parser's choices (llama3_json: serving/llama3_tools.py)
MAX_TOOLS = 128  # OpenAI's API refuses more tools than this in one request
MAX_NAME = 64  # OpenAI's limit on a function name's length
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools as the output parser needs them: which parser, and whether to keep every call; and
    the tool_choice as ChatMessages carries it (guided decoding when `choice` is "required")."""

    parser: str
    parallel: bool = True  # parallel_tool_calls: false keeps only the first call (and guides to exactly one)
    choice: str = ""  # ChatMessages.tool_choice: "" (auto) or "required" (a named function too)
    function: str = ""  # ChatMessages.tool_choice_function: the function that must be called ("" = any)


def check_tools(tools: Any, name: str = "tools") -> list[dict]:
    """`tools`: a list of at most MAX_TOOLS {"type": "function", "function": {"name", "description"?,
    "parameters"? (a JSON schema object), "strict"?}}; returned as given (the template renders what the client sent).
    Raises RequestError naming the field (`tools[1].function.name: ...`)."""
    if not isinstance(tools, list):
        raise RequestError(f"{name}: expected a list of tools, got {show(tools)}")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"{name}: {len(tools)} tools exceed the limit of {MAX_TOOLS}")
    for i, tool in enumerate(tools):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f'{where}: expected an object {{"type": "function", "function": {{...}}}}, got '
                               f"{show(tool)}")  # fmt: skip
        refuse_unknown(tool, ("type", "function"), where, "a tool takes type and function")
        if tool.get("type") != "function":
            raise RequestError(f'{where}.type: must be "function", got {show(tool.get("type"))}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function: expected an object with name, description, parameters, got "
                               f"{show(function)}")  # fmt: skip
        refuse_unknown(function, _FUNCTION_KEYS, f"{where}.function", f"takes {', '.join(_FUNCTION_KEYS)}")
        fname = function.get("name")
        if not isinstance(fname, str) or not 1 <= len(fname) <= MAX_NAME:
            raise RequestError(f"{where}.function.name: expected a string of 1 to {MAX_NAME} characters, got "
                               f"{show(fname)}")  # fmt: skip
        checks = (("description", str, "a string"), ("parameters", dict, "a JSON schema object"),
                  ("strict", bool, "true or false"))  # fmt: skip
        for key, kind, what in checks:
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise RequestError(f"{where}.function.{key}: expected {what}, got {show(function[key])}")
    return tools


def tools_json(tools: list[dict] | None) -> str:
    """ChatMessages.tools_json for checked tools: the template's `tools` exactly as sent (its tojson keeps the
    client's key order); "" for none."""
    return json.dumps(tools, ensure_ascii=False) if tools else ""


def tool_choice(choice: Any) -> tuple[str, str]:
    """OpenAI's tool_choice -> (ChatMessages.tool_choice, tool_choice_function): "auto" / None -> ("", ""), "none",
    "required", and {"type": "function", "function": {"name": NAME}} -> ("required", NAME). Raises RequestError
    naming the field."""
    if choice is None or choice == "auto":
        return "", ""
    if choice in ("none", "required"):
        return choice, ""
    if not isinstance(choice, dict):
        raise RequestError(f'tool_choice: expected "auto", "none", "required" or {{"type": "function", "function": '
                           f'{{"name": ...}}}}, got {show(choice)}')  # fmt: skip
    refuse_unknown(choice, ("type", "function"), "tool_choice", "a named function takes type and function")
    if choice.get("type") != "function":
        raise RequestError(f'tool_choice.type: must be "function", got {show(choice.get("type"))}')
    function = choice.get("function")
    if not isinstance(function, dict) or set(function) != {"name"}:
        raise RequestError(f'tool_choice.function: expected {{"name": ...}}, got {show(function)}')
    name = function["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        raise RequestError(f"tool_choice.function.name: expected a string of 1 to {MAX_NAME} characters, got "
                           f"{show(name)}")  # fmt: skip
    return "required", name


def request_tools(body: dict, parser: str | None) -> tuple[list[dict] | None, ToolUse | None]:
    """A chat body's `tools`, `tool_choice` and `parallel_tool_calls` -> (the tools the template renders, how to
    parse the output); (None, None) when no tools are used. `parser`: the server's --tool-call-parser (None: off).
    tool_choice "auto" (the default with tools) renders and parses; "none" neither; "required" and a named function
    also guide the output into calls (of that function), which the server compiles (serving/guided_requests.py)."""
    tools = body.get("tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError(f"parallel_tool_calls: expected true or false, got {show(parallel)}")
    choice, function = tool_choice(body.get("tool_choice"))
    if tools is None or tools == []:
        if choice == "required":
            raise RequestError(f"tool_choice: {show(body['tool_choice'])} needs tools (the functions the model "
                               "must call)")  # fmt: skip
        return None, None
    if parser is None:
        raise RequestError("tools: tool calls are off on this server (start it with `meshserve serve "
                           "--tool-call-parser hermes`, or llama3_json for Llama 3.x)")  # fmt: skip
    tools = check_tools(tools)
    names = [t["function"]["name"] for t in tools]
    if function and function not in names:
        raise RequestError(f"tool_choice.function.name: no tool named {show(function)} in tools (they are "
                           f"{', '.join(map(show, names))})")  # fmt: skip
    if choice == "none":  # the model is not told about the tools, and its text is not parsed
        return None, None
    return tools, ToolUse(parser, parallel is not False, choice, function)


def message_tool_fields(message: dict, i: int) -> tuple[list[pb.ToolCall], str]:
    """messages[i]'s `tool_calls` ([{"id", "type": "function", "function": {"name", "arguments": JSON text}}]) and
    `tool_call_id` as the proto carries them; JSON types checked here, the rest (arguments' JSON, which roles may
    carry them) where every API's messages are checked (model/chat.py check_messages)."""
    calls = message.get("tool_calls")
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise RequestError(f"messages[{i}].tool_call_id: expected a string, got {show(call_id)}")
    if calls is None:
        return [], call_id or ""
    if not isinstance(calls, list):
        raise RequestError(f"messages[{i}].tool_calls: expected a list of calls, got {show(calls)}")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict):
            raise RequestError(f'{where}: expected an object {{"id", "type", "function"}}, got {show(call)}')
        refuse_unknown(call, ("id", "type", "function"), where, "a call takes id, type and function")
        if call.get("type", "function") != "function":
            raise RequestError(f'{where}.type: must be "function", got {show(call.get("type"))}')
        function = call.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function: expected an object with name and arguments, got {show(function)}")
        refuse_unknown(function, ("name", "arguments"), f"{where}.function", "takes name and arguments")
        values = {"id": call.get("id"), "function.name": function.get("name")}
        values["function.arguments"] = function.get("arguments")
        for key, value in values.items():
            if not isinstance(value, str) and not (key == "id" and value is None):
                raise RequestError(f"{where}.{key}: expected a string, got {show(value)}")
        out.append(pb.ToolCall(id=call.get("id") or "", name=function["name"], arguments=function["arguments"]))
    return out, call_id or ""


def _blocks(text: str):
    """(start, end, call) of each tool call block: `<tool_call>`, whitespace, one JSON value read by the JSON decoder
    itself (so braces and even `</tool_call>` inside its strings are its own), whitespace, then `</tool_call>` or
    the end of the text (a last block left open). A tag not followed by that is text, and the search goes on after
    it."""
    pos = 0
    while (start := text.find(START, pos)) >= 0:
        pos = start + len(START)
        at = _SPACE.match(text, pos).end()
        try:
            obj, end = DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            continue
        after = _SPACE.match(text, end).end()
        if text.startswith(END, after):
            after += len(END)
        elif after != len(text):
            continue
        if (call := block_call(text[at:end], obj)) is not None:
            yield start, after, call
            pos = after


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Generated text -> (content, calls). Without a call the content is the text, unchanged; with calls it is the
    text outside their blocks (all of it before the first; after it, the pieces that are not only whitespace, such
    as the newlines between blocks), None when that is only whitespace (a bare call has no content)."""
    calls, outside, end = [], [], 0
    for start, after, call in _blocks(text):
        calls.append(call)
        outside.append(text[end:start])
        end = after
    if not calls:
        return text, []
    outside.append(text[end:])
    content = outside[0] + "".join(piece for piece in outside[1:] if piece.strip())
    return (content if content.strip() else None), calls


def _held_from(text: str) -> int:
    """Where `text` must start being held: its first `<tool_call>`, else a tail that could begin one."""
    at = text.find(START)
    if at >= 0:
        return at
    for k in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class ToolCallStream:
    """One streamed choice's text: `feed` each piece and send what it returns as content; `finish` gives the rest of
    the content and the calls. The pieces join to `parse_tool_calls(whole text)`'s content ("" for None)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of text already sent as content (always before the first <tool_call>)

    def feed(self, piece: str) -> str:
        self.text += piece
        safe = _held_from(self.text)
        if safe <= self.sent or not self.text[:safe].strip():  # blank so far: maybe the space before a bare call
            return ""
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_tool_calls(self.text)
        return (content or "")[self.sent :], calls


def parse_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """`parse_tool_calls` (hermes) or llama3_tools.parse_llama3 (llama3_json): (content, calls)."""
    return parse_llama3(text) if parser == "llama3_json" else parse_tool_calls(text)


def call_stream(parser: str) -> ToolCallStream | Llama3Stream:
    """A gRPC stream's holder for the parser's format (`feed` -> content now, `finish` -> (rest, calls))."""
    return Llama3Stream() if parser == "llama3_json" else ToolCallStream()


def call_deltas(parser: str, parallel: bool) -> ToolCallDeltas | Llama3Deltas:
    """An HTTP stream's call deltas for the parser's format (tool_call_stream.ToolCallDeltas' interface)."""
    return Llama3Deltas(parallel) if parser == "llama3_json" else ToolCallDeltas(parallel)


def openai_calls(calls: list[ToolCall], streamed: bool = False) -> list[dict]:
    """Calls as OpenAI's message.tool_calls, or (streamed) as the delta's, each with its index."""
    out = []
    for k, call in enumerate(calls):
        entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        out.append({"index": k, **entry} if streamed else entry)
    return out


def finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI's "tool_calls" for a generation that ended by itself (stop) with at least one call, as vLLM."""
    return "tool_calls" if calls and reason == "stop" else reason
