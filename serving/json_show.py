"""How an error message quotes a client's value: as JSON spells it (`got true`, `got "hot"`, `got null`), since
requests and job lines are JSON and Python's repr (`True`, `'hot'`, `None`) is not what the client wrote."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["show", "SHOW_MAX"]

SHOW_MAX = 80  # characters: enough for a short object or string, and one line of a log stays readable


def show(value: Any, limit: int = SHOW_MAX) -> str:
    """`value` as JSON text (non-ASCII kept as is), cut to at most `limit` characters with a trailing "...".
    A lone surrogate, which no UTF-8 answer can carry, is shown escaped (`"\\ud800"`, as the client wrote it); a value
    JSON has no spelling for (bytes, a proto message) falls back to repr."""
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): shown as the escape the client wrote
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON-serialisable, or a circular container
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
