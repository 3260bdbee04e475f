"""`JsonScan`: one JSON value read a character at a time, as `DECODER` reads it (the same grammar: strict strings, no
trailing commas), tracking strings, escapes and depth, and writing the value of the top-level object's arguments key,
when "name" (a non-empty string) and an arguments key are its first two keys (a "head" block), in json.dumps(...,
ensure_ascii=False)'s form while it reads it. serving/tool_call_stream.py streams Hermes tool calls' arguments with it
(its docstring says how), serving/llama3_tools.py Llama's; both formats' whole-text parses read head blocks with it
too, so streamed and whole answers agree.

`DECODER` is Python's JSON decoder made strict: NaN, Infinity and -Infinity (which json.loads accepts) and a number
too large for a float (1e400, which it reads as inf) are refused with ValueError, because json.dumps would write them
back as NaN / Infinity, which is not JSON: a call's arguments go to OpenAI clients as JSON text. vLLM's parsers
json.loads and json.dumps them, sending that invalid JSON on; here a call whose JSON holds one is not a call (see the
parsers' docstrings). JsonScan refuses them at the same character ("bad").
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["DECODER", "JsonScan", "WAIT", "NO", "NAME_KEY", "NAME", "ARGS_KEY", "OPEN", "ARGS"]


def _finite(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {raw[:20]}")
    return value


def _no_constant(raw: str) -> None:
    raise ValueError(f"{raw} is not JSON")


DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")  # the JSON decoder's number
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}  # no NaN / Infinity: DECODER refuses them
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
# What JsonScan expects next outside a token.
_VALUE, _FIRST_VALUE, _KEY, _FIRST_KEY, _COLON, _NEXT = range(6)
# JsonScan.head: how far the top-level object matches {"name": <non-empty string>, "arguments": <value> ...}.
WAIT, NO, NAME_KEY, NAME, ARGS_KEY, OPEN, ARGS = range(7)


class JsonScan:
    """One JSON value read from `text[start:]` a character at a time (`advance(text)` as text grows). `state`:
    "open" (a valid prefix so far), "done" (`pos` = the index after the value) or "bad" (`pos` = where it broke).
    `head` and `name` say whether it is a head block; `out` holds the arguments' normalized text so far.
    `args_keys`: the keys that may follow "name" as the arguments (Hermes: "arguments"; Llama also "parameters");
    `object_args`: a head's arguments must be an object (Llama's format; otherwise `head` becomes NO)."""

    def __init__(self, start: int = 0, args_keys: tuple[str, ...] = ("arguments",), object_args: bool = False) -> None:
        self.args_keys, self.object_args = args_keys, object_args
        self.pos, self.state = start, "open"
        self.stack: list[str] = []  # open containers, "{" or "["
        self.expect = _VALUE
        self.token = ""  # in progress: "" none, '"' a string, "0" a number, "l" a literal
        self.raw = ""  # the number or literal so far; a string's escape so far
        self.literal = ""  # the literal being read
        self.high: int | None = None  # a string's \uD8xx escape waiting for its low surrogate
        self.chars: list[str] = []  # decoded text of a top-level key or of the name
        self.head, self.name = WAIT, ""
        self.out: list[str] = []

    def arguments(self) -> str:
        return "".join(self.out)

    @property
    def opened(self) -> bool:
        """Whether the head is read: its name, the arguments' key and (with object_args) the arguments' "{"."""
        return self.head == ARGS or (self.head == OPEN and (bool(self.out) or not self.object_args))

    def advance(self, text: str) -> None:
        """Read text[pos:] (stopping at the value's end or where it breaks)."""
        while self.state == "open" and self.pos < len(text):
            if self._char(text[self.pos]):
                self.pos += 1

    def _bad(self) -> bool:
        self.state = "bad"
        return False

    def _put(self, piece: str) -> None:
        if self.head == OPEN:
            self.out.append(piece)

    def _char(self, ch: str) -> bool:
        """Read one character; False when it must be read again (it ended a number) or the value broke."""
        if self.token == '"':
            return self._string_char(ch)
        if self.token == "0":
            if ch in _NUMBER_CHARS:
                self.raw += ch
                return True
            if not _NUMBER.fullmatch(self.raw):  # "-Infinity" breaks here, at its "I"
                return self._bad()
            self._scalar(self.raw)
            return False  # ch ended the number: read it again (unless the number was refused)
        if self.token == "l":
            self.raw += ch
            if not self.literal.startswith(self.raw):
                return self._bad()
            return self._scalar(self.raw) if self.raw == self.literal else True
        if ch in " \t\n\r":
            return True
        expect = self.expect
        if expect in (_VALUE, _FIRST_VALUE):
            if expect == _FIRST_VALUE and ch == "]":
                return self._close(ch)
            return self._value_start(ch)
        if expect in (_KEY, _FIRST_KEY):
            if expect == _FIRST_KEY and ch == "}":
                return self._close(ch)
            if ch != '"':
                return self._bad()
            self.token, self.chars = '"', []
            self._put('"')
            return True
        if expect == _COLON:
            if ch != ":":
                return self._bad()
            self.expect = _VALUE
            self._put(": ")
            if len(self.stack) == 1 and self.head == ARGS_KEY:
                self.head = OPEN
            return True
        # _NEXT: a comma or the container's end
        if ch == ",":
            self._put(", ")
            self.expect = _KEY if self.stack[-1] == "{" else _VALUE
            return True
        if ch in "}]":
            return self._close(ch)
        return self._bad()

    def _value_start(self, ch: str) -> bool:
        if not self.stack and ch != "{":
            self.head = NO  # not an object
        elif len(self.stack) == 1 and self.head == NAME and ch != '"':
            self.head = NO  # a name that is not a string
        elif len(self.stack) == 1 and self.head == OPEN and self.object_args and ch != "{":
            self.head = NO  # arguments that must be an object and are not
        if ch in "{[":
            self._put(ch)
            self.stack.append(ch)
            self.expect = _FIRST_KEY if ch == "{" else _FIRST_VALUE
            if len(self.stack) == 1 and self.head == WAIT:
                self.head = NAME_KEY
        elif ch == '"':
            self.token, self.chars = '"', []
            self._put('"')
        elif ch == "-" or ch.isascii() and ch.isdigit():
            self.token, self.raw = "0", ch
        elif ch in _LITERALS:
            self.token, self.literal, self.raw = "l", _LITERALS[ch], ch
        else:
            return self._bad()
        return True

    def _close(self, ch: str) -> bool:
        if not self.stack or (self.stack[-1] == "{") != (ch == "}"):
            return self._bad()
        self._put(ch)
        self.stack.pop()
        if not self.stack and self.head not in (ARGS, NO):  # the object ended before its arguments
            self.head = NO
        self._value_done()
        return True

    def _value_done(self) -> None:
        """A value ended at the current depth."""
        self.expect = _NEXT
        if len(self.stack) == 1 and self.head == OPEN:
            self.head = ARGS
        elif not self.stack:
            self.state = "done"

    def _scalar(self, raw: str) -> bool:
        """A number or literal ended: written as json.dumps writes its value. False (bad) where DECODER refuses it:
        a float out of range, an integer past Python's digit limit."""
        self.token, self.raw = "", ""
        try:
            text = json.dumps(DECODER.decode(raw))
        except ValueError:
            return self._bad()
        self._put(text)
        self._value_done()
        return True

    def _string_char(self, ch: str) -> bool:
        raw = self.raw
        if raw:  # inside an escape
            raw = self.raw = raw + ch
            if len(raw) == 2:
                if ch == "u":
                    return True
                if ch not in _ESCAPES:
                    return self._bad()
                self.raw = ""
                self._flush_high()
                self._decoded(_ESCAPES[ch])
                return True
            if ch not in _HEX:
                return self._bad()
            if len(raw) == 6:
                self.raw = ""
                self._code(int(raw[2:], 16))
            return True
        if ch == "\\":
            self.raw = ch
            return True
        self._flush_high()
        if ch == '"':
            self._string_done()
            return True
        if ch < " ":  # strict: control characters must be escaped
            return self._bad()
        self._decoded(ch)
        return True

    def _flush_high(self) -> None:
        """A high surrogate not followed by a \\u escape stands alone (as the decoder leaves it)."""
        if self.high is not None:
            self._decoded(chr(self.high))
            self.high = None

    def _code(self, code: int) -> None:
        """A \\uXXXX escape: surrogate pairs join, as the decoder joins them."""
        if self.high is not None:
            high, self.high = self.high, None
            if 0xDC00 <= code <= 0xDFFF:
                self._decoded(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
                return
            self._decoded(chr(high))
        if 0xD800 <= code <= 0xDBFF:
            self.high = code
        else:
            self._decoded(chr(code))

    def _decoded(self, ch: str) -> None:
        if len(self.stack) == 1 and self.head in (NAME_KEY, NAME, ARGS_KEY):
            self.chars.append(ch)
        if self.head == OPEN:
            self.out.append(ch if ch >= " " and ch not in '"\\' else json.dumps(ch, ensure_ascii=False)[1:-1])

    def _string_done(self) -> None:
        self.token = ""
        self._put('"')
        key = self.expect in (_KEY, _FIRST_KEY)
        if len(self.stack) == 1 and self.head in (NAME_KEY, NAME, ARGS_KEY):  # the top-level object's head
            text = "".join(self.chars)
            if key and self.head == NAME_KEY:
                self.head = NAME if text == "name" else NO
            elif key and self.head == ARGS_KEY:
                self.head = ARGS_KEY if text in self.args_keys else NO
            elif not key and self.head == NAME:
                self.name = text
                self.head = ARGS_KEY if text else NO
        if key:
            self.expect = _COLON
        else:
            self._value_done()
