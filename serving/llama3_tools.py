"""Llama 3.x tool calls (`serve --tool-call-parser llama3_json`, vLLM's): the model answers a call as a bare JSON
object {"name": <function>, "parameters": {...}} ("arguments" is read too), optionally after Llama's
<|python_tag|> (a special token, which decoding drops anyway). Unguided text may hold several calls, joined by ";"
with optional whitespace around it, as vLLM's llama3_json reads them (Llama 4 writes them so; Llama 3.1's template asks
for one); each gets its own id and index. (Guided by tool_choice "required" or a named function, the output is ONE
call: serving/guided/.) The whole output is then the calls: an output that does not start with "{" (after whitespace
and the tag) is content, and so is one whose JSON is not all calls (all or nothing, as vLLM's llama3_json was before
it went to a regex; current vLLM also takes calls out of surrounding text and drops the text, which we keep as
content).

Deliberate differences from vLLM's parser: whitespace before the call is accepted, and so are calls with only whitespace
(or nothing) between them, read as if joined by ";"; a call with neither key has arguments {}; arguments keep non-ASCII
characters (ensure_ascii off); an object starting {"name": ..., "parameters" or "arguments": {...}} (a head, what Llama
writes) has that first name and those arguments, written as its stream sends them (serving/json_scan.py's JsonScan,
json.dumps' form), while in any other object "parameters" wins over "arguments" when both are given. And the JSON is
strict: a call whose JSON holds NaN, Infinity, -Infinity or a number out of float range (which json.loads reads and vLLM
json.dumps back into its arguments: invalid JSON for an OpenAI client) is not a call, so the output is content
(streamed, a call that already opened breaks at the value, as at any invalid JSON: see below).

Streamed over HTTP (`Llama3Deltas`, the same delta shape as Hermes' serving/tool_call_stream.py, whose CallReader
reads each call): an output that does not start like a call streams as content at once; one that does is read call
by call: call k opens ({"index", "id", "type", "function": {"name", "arguments": ""}}) once its name and the "{" of its
arguments are read, then its arguments go out in fragments as they grow; a call that is not a head is sent whole when
its JSON closes. Content and calls join to `parse_llama3` of the whole text for every split of it, except where the
text turns out not to be all calls after a call went out (all of it is content to the whole-text parse): the calls
sent stay (one opened and then broken with the arguments sent so far, and not `complete`), and the text is content
from where it stopped being calls (after a call, its first character that is not whitespace, one ";" or a "{"; inside
an opened call's JSON, where it broke; an object that did not open, its "{"). gRPC's `Llama3Stream` holds an output
that starts like a call to its end, so its pieces always join to the whole-text parse.
"""

from __future__ import annotations

import json
import re
from typing import Any

from meshserve.serving.json_scan import DECODER
from meshserve.serving.tool_call_stream import CallDeltas, CallReader, ToolCall, block_call

__all__ = ["PYTHON_TAG", "parse_llama3", "Llama3Stream", "Llama3Deltas"]

PYTHON_TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")  # the keys a head's arguments may follow "name" under
_SPACE = re.compile(r"[ \t\n\r]*")


def _call(obj: Any) -> ToolCall | None:
    """An object naming a function (a non-empty string "name") with object "parameters" / "arguments" (or none)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _reader(start: int) -> CallReader:
    """A reader of one bare call's JSON from text[start] (its "{")."""
    return CallReader(start, ARGS_KEYS, object_args=True, fallback=_call)


def _body(text: str) -> int | None:
    """Where the calls' JSON starts (after whitespace and a <|python_tag|>), or None when the text is not calls."""
    at = _SPACE.match(text).end()
    if text.startswith(PYTHON_TAG, at):
        at = _SPACE.match(text, at + len(PYTHON_TAG)).end()
    return at if text.startswith("{", at) else None


def _after(text: str, end: int) -> int:
    """Past the separator after a call's JSON ending at `end`: whitespace, at most one ";", whitespace."""
    at = _SPACE.match(text, end).end()
    return _SPACE.match(text, at + 1).end() if text.startswith(";", at) else at


def parse_llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    """Generated text -> (content, calls): (None, calls) when the whole text is calls, else (text, [])."""
    at = _body(text)
    if at is None:
        return text, []
    calls = []
    while True:
        try:
            obj, end = DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            return text, []
        if (call := block_call(text[at:end], obj, _reader(0))) is None:
            return text, []
        calls.append(call)
        at = _after(text, end)
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


class Llama3Deltas(CallDeltas):
    """One streamed choice of bare calls (tool_call_stream.CallDeltas' interface: content strings and call deltas,
    see the module docstring). `differs`: the text turned out not to be all calls after a call went out (where this
    stream and parse_llama3 differ)."""

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel)
        self.at: int | None = None  # the first call's "{", then the end of the last call's JSON; None: not yet known
        self.reader: CallReader | None = None  # the call being read
        self.content_from: int | None = None  # the text is content from here on; None while it may be calls
        self.differs = False

    def _advance(self, final: bool) -> list:
        out: list = []
        if self.content_from is None:
            self._read(out, final)
        if self.content_from is not None:
            start = max(self.sent, self.content_from)
            if start < len(self.text):
                out.append(self.text[start:])
                self.sent = len(self.text)
        return out

    def _read(self, out: list, final: bool) -> None:
        """Read calls as far as the text goes; sets content_from where it turns out not to be calls."""
        text = self.text
        if self.at is None:
            self.at = _body(text)
            if self.at is None:
                if final or not _undecided(text):
                    self._stop(0)
                return
        while True:
            if self.reader is None:
                at = _after(text, self.at) if self.calls else self.at
                if at == len(text):
                    return  # all calls so far (the end, or more may come)
                if text[at] != "{":
                    self._stop(at)
                    return
                self.reader = _reader(at)
            reader, k = self.reader, len(self.calls)
            reader.scan.advance(text)
            deltas = reader.deltas(k)  # read even when not sent, so the text is read the same either way
            if self.parallel or k == 0:  # parallel_tool_calls false: the first call only
                out += deltas
            state = reader.scan.state
            if state == "open" and not final:
                return
            call = reader.decided(text) if state == "done" else None
            if call is None:  # broken, cut by the end, or JSON that is no call
                self._stop(reader.scan.pos if reader.id else reader.start)
                return
            self.calls.append(call)
            if not reader.id and (self.parallel or k == 0):  # not a head: the call whole, now that it closed
                out.append(reader.whole_delta(k, call))
            self.at, self.reader = reader.scan.pos, None

    def _stop(self, at: int) -> None:
        """The text is not all calls: content from `at` when a call went out (it stays; an opened one as sent),
        else all of it."""
        if (reader := self.reader) is not None and reader.id:
            self.calls.append(reader.streamed())
            self.broken += 1
            self._broken_ids.add(reader.id)
        self.reader = None
        self.differs = bool(self.calls)
        self.content_from = at if self.calls else 0
