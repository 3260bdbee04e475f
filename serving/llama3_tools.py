"""Llama 3.x tool calls (`serve --tool-call-parser llama3_json`, vLLM's): the model answers a call as a bare JSON
object {"name": <function>, "parameters": {...}} ("arguments" is read too), optionally after Llama's
<|python_tag|> (a special token, which decoding drops anyway), several joined by ";" (Llama 4 writes them so; Llama
3.1's template asks for one). The whole output is then the calls: an output that does not start with "{" (after
whitespace) is content, and so is one whose JSON is not all calls (all or nothing, as vLLM's llama3_json was before
it went to a regex; current vLLM also takes calls out of surrounding text and drops the text, which we keep as
content). Deliberate differences from that older parser: whitespace before the call and ";" without a space or a
newline between calls are accepted, "parameters" wins over "arguments" when both are given, a call with neither has
arguments {}, and arguments keep non-ASCII characters (ensure_ascii off).

Streamed, an output that starts like a call ("{" or a prefix of <|python_tag|>) is held and decided at its end (its
calls sent whole, each one delta with its name and arguments), anything else streams as content at once, so the
streamed pieces always join to `parse_llama3` of the whole text. The Hermes parser (serving/openai_tools.py,
serving/tool_call_stream.py) streams arguments as they grow; this format is decided only when it is complete.
"""

from __future__ import annotations

import json
import re
from typing import Any

from meshserve.serving.tool_call_stream import ToolCall

__all__ = ["PYTHON_TAG", "parse_llama3", "Llama3Stream", "Llama3Deltas"]

PYTHON_TAG = "<|python_tag|>"
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _call(obj: Any) -> ToolCall | None:
    """An object naming a function (a non-empty string "name") with object "parameters" / "arguments" (or none)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _body(text: str) -> int | None:
    """Where the calls' JSON starts (after whitespace and a <|python_tag|>), or None when the text is not calls."""
    at = _SPACE.match(text).end()
    if text.startswith(PYTHON_TAG, at):
        at = _SPACE.match(text, at + len(PYTHON_TAG)).end()
    return at if text.startswith("{", at) else None


def parse_llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    """Generated text -> (content, calls): (None, calls) when the whole text is calls, else (text, [])."""
    at = _body(text)
    if at is None:
        return text, []
    calls = []
    while True:
        try:
            obj, end = _DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            return text, []
        if (call := _call(obj)) is None:
            return text, []
        calls.append(call)
        at = _SPACE.match(text, end).end()
        if at < len(text) and text[at] == ";":
            at = _SPACE.match(text, at + 1).end()
        if at == len(text):
            return None, calls
        if text[at] != "{":
            return text, []


def _undecided(text: str) -> bool:
    """Whether `text` may still become calls: blank, or starting (after whitespace) with "{" or part of the tag."""
    rest = text[_SPACE.match(text).end() :]
    if not rest or rest.startswith("{") or PYTHON_TAG.startswith(rest):
        return True
    if rest.startswith(PYTHON_TAG):
        after = rest[len(PYTHON_TAG) :]
        return after.startswith("{", _SPACE.match(after).end()) or not after.strip(" \t\n\r")
    return False


class Llama3Stream:
    """One streamed choice (gRPC's ToolCallStream interface): `feed` returns content to send now, `finish` the rest
    of the content and the calls."""

    def __init__(self) -> None:
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.sent == 0 and _undecided(self.text):
            return ""  # may be calls: held until the end
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_llama3(self.text)
        return (content or "")[self.sent :], calls


class Llama3Deltas:
    """One streamed choice (the HTTP stream's ToolCallDeltas interface): items are content strings or call deltas
    (each call whole: {"index", "id", "type", "function": {"name", "arguments"}}); `kept` / `complete` the calls
    (with parallel False only the first)."""

    def __init__(self, parallel: bool = True) -> None:
        self.stream, self.parallel, self.calls = Llama3Stream(), parallel, []

    @property
    def kept(self) -> list[ToolCall]:
        return self.calls if self.parallel else self.calls[:1]

    complete = kept

    def feed(self, piece: str) -> list:
        out = self.stream.feed(piece)
        return [out] if out else []

    def finish(self) -> list:
        rest, self.calls = self.stream.finish()
        deltas = [{"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for k, c in enumerate(self.kept)]  # fmt: skip
        return ([rest] if rest else []) + deltas
