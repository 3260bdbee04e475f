"""Hermes tool calls streamed as they are generated, as vLLM's hermes parser and OpenAI stream them: a delta opening
call k (index, id, type, function.name, arguments "") once its block's `<tool_call>{"name": "<name>", "arguments": `
is complete, then {"index": k, "function": {"arguments": <fragment>}} as the arguments' JSON value grows.

`JsonScan` (serving/json_scan.py) reads one JSON value a character at a time, as json_scan.DECODER does (Python's
decoder, strict: no NaN / Infinity), tracks strings, escapes and depth, and writes the value of the top-level object's
"arguments" key, when "name" (a non-empty string) and "arguments" are its first two keys (a "head" block), in
json.dumps(..., ensure_ascii=False)'s form while it reads it: whitespace dropped, ", " and ": " separators, strings
re-escaped (`\\u00e9` becomes é, `\\/` becomes /), each number written once complete as json.dumps writes its value. So
a fragment is only ever a piece that can no longer change, and the fragments join to exactly what
`openai_tools.parse_tool_calls` gives as that call's arguments: it reads head blocks with the same scanner. That equals
json.dumps(json.loads(value)) except for an object with a repeated key, which keeps every copy (json.loads of it still
gives the same dict: the last copy wins). Blocks whose JSON is not a head (arguments first, no arguments) are held and
sent whole once closed, as before. `CallReader` is one call's JSON read so (its deltas, and the call it decides once
done); Llama 3's stream (serving/llama3_tools.py) reads its bare calls with it too.

`ToolCallDeltas` is one streamed choice: `feed` each piece of text, `finish` at the end; each returns content strings
and call deltas in order. Their content joins to `parse_tool_calls(text)`'s content ("" for None) and their calls to
its calls (names, arguments, order; one id per call) for every text except one whose head block breaks after
opening (the generation cut inside its arguments, or invalid JSON there): that call was announced and stays, with
the fragments sent, its text is no content, and the parse goes on after the point where it broke (the whole-text
parse makes such a block content).

NaN, Infinity, -Infinity and numbers out of float range (1e400) are not JSON, though json.loads reads them and
json.dumps writes them back: vLLM's hermes parser passes them on, so a client's JSON parser fails on its arguments.
Here a block holding one is not a call: its text stays content (openai_tools.parse_tool_calls); streamed, a head
block whose arguments hold one breaks there, as any invalid JSON after opening.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshserve.serving.json_scan import ARGS, DECODER, JsonScan

__all__ = [
    "CallDeltas",
    "START",
    "END",
    "ToolCall",
    "JsonScan",
    "CallReader",
    "block_call",
    "ToolCallDeltas",
    "no_surrogates",
]  # JsonScan: json_scan.py

START, END = "<tool_call>", "</tool_call>"
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


@dataclass(frozen=True)
class ToolCall:
    """One call parsed out of the text: the function's name and its arguments as JSON text (lone surrogates, which a
    model can write as JSON escapes, written back as escapes: `no_surrogates`)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", no_surrogates(self.name))
        object.__setattr__(self, "arguments", no_surrogates(self.arguments))


_SURROGATE = re.compile("[\ud800-\udfff]")


def no_surrogates(text: str) -> str:
    """`text` with each lone surrogate (a JSON escape such as "\\ud800" decodes to one; UTF-8 cannot encode it, so
    gRPC and the HTTP stream could not send it) as its JSON escape: inside a JSON string the same value."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) if _SURROGATE.search(text) else text


def _call(obj: Any) -> ToolCall | None:
    """A block's JSON as a call: an object with a non-empty string `name`; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    return ToolCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


def block_call(raw: str, obj: Any, reader: CallReader | None = None) -> ToolCall | None:
    """The call of a block whose JSON text `raw` decoded to `obj` (by DECODER): a head block's first name and its
    arguments as JsonScan writes them (what a stream sends), else `reader.fallback(obj)` (Hermes: the object's name
    and json.dumps(arguments)); None when it names no function. `reader`: a fresh CallReader(0) of the format (None:
    Hermes')."""
    reader = reader or CallReader(0)
    reader.scan.advance(raw)
    if reader.scan.state == "done" and reader.scan.head == ARGS:
        return reader.streamed()
    return reader.fallback(obj)


@dataclass
class CallReader:
    """One call's JSON read as it grows, from `start` (its first character) by `scan`: `deltas(k)` gives, as call k,
    its opening delta once the head is read (JsonScan.opened) and then each fragment of its arguments; `decided`
    the call once the JSON is done. `id`: set when it opened; `sent`: argument pieces (scan.out) sent. `fallback`:
    the call of a decoded object that is not a head (sent whole once done). ToolCallDeltas reads each block's JSON
    with one (Hermes' defaults); llama3_tools.Llama3Deltas each bare call (its keys, "parameters" first)."""

    start: int
    args_keys: tuple[str, ...] = ("arguments",)
    object_args: bool = False
    fallback: Callable[[Any], ToolCall | None] = _call
    id: str = ""
    sent: int = 0
    scan: JsonScan = field(init=False)

    def __post_init__(self) -> None:
        self.scan = JsonScan(self.start, self.args_keys, self.object_args)

    def deltas(self, k: int) -> list[dict]:
        """Read text as far as `scan` has (call `scan.advance` first): what to send of it now, as call k."""
        scan, out = self.scan, []
        if not scan.opened:
            return out
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)
            out.append({"index": k, "id": self.id, "type": "function",
                        "function": {"name": no_surrogates(scan.name), "arguments": ""}})  # fmt: skip
        if self.sent < len(scan.out):
            fragment = no_surrogates("".join(scan.out[self.sent :]))
            self.sent = len(scan.out)
            out.append({"index": k, "function": {"arguments": fragment}})
        return out

    def streamed(self) -> ToolCall:
        """The call as streamed: the head's name and its arguments so far (all of them once the JSON is done)."""
        if self.id:
            return ToolCall(self.scan.name, self.scan.arguments(), self.id)
        return ToolCall(self.scan.name, self.scan.arguments())

    def decided(self, text: str) -> ToolCall | None:
        """The call of `text[start:scan.pos]` once scan is done, as the whole-text parse decides it (DECODER has the
        last word): the head's as streamed, else `fallback` of the decoded object; None when it is not a call."""
        try:
            obj, after = DECODER.raw_decode(text, self.start)
        except (ValueError, RecursionError):
            return None
        if after != self.scan.pos:
            return None
        return self.streamed() if self.id else self.fallback(obj)

    def whole_delta(self, k: int, call: ToolCall) -> dict:
        """A call that did not stream (not a head): sent whole as call k once done."""
        return {"index": k, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


@dataclass
class _Block:
    """The `<tool_call>` block being read: where its tag starts, and its JSON's reader (None until the JSON's first
    character)."""

    start: int
    reader: CallReader | None = None


class CallDeltas:
    """What a streamed choice's call parser shares (ToolCallDeltas here, llama3_tools.Llama3Deltas): `feed` each
    piece, `finish` at the end; each returns what to send, in order: str items are content, dict items a call's delta
    ({"index", "id", "type", "function": {"name", "arguments"}} opening call k, {"index", "function": {"arguments"}}
    for a fragment). `kept`: the calls made so far (with parallel False only the first, the only one sent; the text
    is still parsed the same); `complete`: the kept ones not broken after opening. Subclasses read `text` in
    `_advance(final)`."""

    def __init__(self, parallel: bool = True) -> None:
        self.text, self.parallel = "", parallel
        self.calls: list[ToolCall] = []  # every call made, kept or not
        self.sent = 0  # characters of content sent
        self.broken = 0  # opened calls that then broke (where the stream and the whole parse differ)
        self._broken_ids: set[str] = set()

    @property
    def kept(self) -> list[ToolCall]:
        return self.calls if self.parallel else self.calls[:1]

    @property
    def complete(self) -> list[ToolCall]:
        """The kept calls that closed as calls (not broken after opening): what finish_reason "tool_calls" promises
        a client (arguments that parse)."""
        return [c for c in self.kept if c.id not in self._broken_ids]

    def feed(self, piece: str) -> list:
        self.text += piece
        return self._advance(False)

    def finish(self) -> list:
        return self._advance(True)

    def _advance(self, final: bool) -> list:
        raise NotImplementedError


class ToolCallDeltas(CallDeltas):
    """Hermes' `<tool_call>` blocks in one streamed choice (CallDeltas' interface). See the module docstring."""

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel)
        self.pos = 0  # where the search for the next <tool_call> resumes
        self.searched = 0  # no <tool_call> starts before here (past pos)
        self.piece = 0  # where the text outside blocks that is being read began
        self.content = ""  # content settled so far: the text before the first call, then each non-blank piece
        self.block: _Block | None = None

    def _advance(self, final: bool) -> list:
        out: list = []
        text = self.text
        while True:
            if self.block is None:
                at = text.find(START, max(self.pos, self.searched))
                if at < 0:
                    self.searched = max(self.pos, len(text) - len(START) + 1)
                    self._content(len(text) if final else _held_from(text, self.pos), out, final)
                    return out
                self._content(at, out, False)
                self.block = _Block(at)
            if not self._read_block(out, final):
                return out

    def _content(self, upto: int, out: list, final: bool) -> None:
        """Send what is now certain of the content: the settled part, and the piece being read up to `upto` when
        it counts (before any call always, as it is not only whitespace after one); nothing while all of it is
        blank, unless the text ended without a call (then the text is the content, blank or not)."""
        part = self.text[self.piece : upto]
        if self.calls and not part.strip():
            part = ""
        known = len(self.content) + len(part)
        if known <= self.sent or not (self.content.strip() or part.strip() or (final and not self.calls)):
            return
        if self.sent < len(self.content):
            out.append(self.content[self.sent :] + part)
        else:
            out.append(part[self.sent - len(self.content) :])
        self.sent = known

    def _settle(self, upto: int, resume: int) -> None:
        """A call took the text from `upto` to `resume`: the piece before it ends (kept when it is the first piece
        or not blank) and the next one begins."""
        part = self.text[self.piece : upto]
        if not self.calls or part.strip():
            self.content += part
        self.piece = self.pos = resume

    def _read_block(self, out: list, final: bool) -> bool:
        """Read the pending block further; True when it is resolved (a call, or text after all)."""
        text, block = self.text, self.block
        assert block is not None
        if block.reader is None:
            at = _SPACE.match(text, block.start + len(START)).end()
            if at == len(text) and not final:
                return False
            block.reader = CallReader(at)
        reader, k = block.reader, len(self.calls)
        scan = reader.scan
        scan.advance(text)
        self._send(out, k, reader.deltas(k))
        end, broke = None, scan.pos  # the block's end when it closes; where it broke when it does not
        if scan.state == "open":
            if not final:
                return False
            broke = len(text)
        elif scan.state == "done":
            broke = _SPACE.match(text, scan.pos).end()
            if text.startswith(END, broke):
                end = broke = broke + len(END)
            elif broke == len(text) or END.startswith(text[broke:]):
                if not final:
                    return False
                end = broke if broke == len(text) else None
        call = None if end is None else reader.decided(text)
        self.block = None
        if call is not None:
            self._settle(block.start, end)
            self.calls.append(call)
            if not reader.id:  # not a head block: the call whole, now that it closed
                self._send(out, k, [reader.whole_delta(k, call)])
        elif reader.id:  # an opened call broke: it stays as sent; the parse goes on where it broke
            self._settle(block.start, broke)
            self.calls.append(reader.streamed())
            self.broken += 1
            self._broken_ids.add(reader.id)
        else:
            self.pos = block.start + len(START)  # not a block: its text is content, searched again from after the tag
        return True

    def _send(self, out: list, k: int, deltas: list[dict]) -> None:
        if self.parallel or k == 0:  # parallel_tool_calls false: the first call only
            out += deltas


def _held_from(text: str, pos: int) -> int:
    """Where text[pos:] (no <tool_call> in it) must start being held: a tail that could begin one."""
    for k in range(min(len(START) - 1, len(text) - pos), 0, -1):
        if START.startswith(text[-k:]):
            return len(text) - k
    return len(text)
