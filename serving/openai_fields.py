"""Typed reads of an OpenAI JSON body's fields for serving/openai_protocol.py (and the other HTTP parsers): each
error names the field (a RequestError, answered 400). JSON null reads as unset; a bool is no integer; a string that
is not text (a lone surrogate) is refused before anything reads it. Split from serving/openai_protocol.py.
"""

from __future__ import annotations

from meshserve.serving.json_show import show
from meshserve.serving.validation import RequestError

__all__ = ["INT32", "Body", "as_float", "check_text", "encodable", "ints", "show"]

INT32 = 2**31  # the proto's int32 fields: a JSON integer must fit one before it is set


class Body:
    """Typed reads of a JSON object's fields; JSON null reads as unset. Errors name the field."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body = body
        self.prefix = prefix

    def _get(self, key: str, kinds: tuple[type, ...], what: str):
        value = self.body.get(key)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise RequestError(f"{self.prefix}{key}: expected {what}, got {show(value)}")
        return value

    def number(self, key: str) -> float | None:
        return as_float(self._get(key, (int, float), "a number"), f"{self.prefix}{key}")

    def integer(self, key: str, low: int = -INT32, high: int = INT32) -> int | None:
        value = self._get(key, (int,), "an integer")
        if value is not None and not low <= value < high:
            raise RequestError(f"{self.prefix}{key} must be in [{low}, {high - 1}], got {value}")
        return value

    def boolean(self, key: str) -> bool | None:
        return self._get(key, (bool,), "true or false")

    def string(self, key: str) -> str | None:
        return self._get(key, (str,), "a string")

    def object(self, key: str) -> dict | None:
        return self._get(key, (dict,), "an object")

    def array(self, key: str) -> list | None:
        return self._get(key, (list,), "a list")


def check_text(body: dict) -> None:
    """Refuse a body holding a string that is not text (JSON's \\ud800 escapes decode to lone surrogates, which no
    tokenizer, proto or reply can encode), naming the top-level field it is in."""
    for field, value in body.items():
        if not encodable(field):
            raise RequestError(f"{show(field)}: a field name that is not valid text (a lone surrogate)")
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str) and not encodable(item):
                raise RequestError(f"{field}: not valid text (a lone surrogate such as \\ud800)")
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                stack += item


def encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (False for a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_float(value, field: str) -> float | None:
    """A JSON number as a float (an integer of 400 digits does not fit one: refused naming the field)."""
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        raise RequestError(f"{field}: {show(value)} is out of range for a number") from None


def ints(values: list, field: str) -> list[int]:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < INT32:
            raise RequestError(f"{field}[{i}]: expected a token id (an integer in [0, 2**31)), got {show(v)}")
    return values
