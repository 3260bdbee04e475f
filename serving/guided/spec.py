"""What a request asks its output to be (`GuideSpec`), the error for a spec meshserve cannot follow, and the cache
compiled specs are kept in (`SizedCache`: bounded in entries and in bytes)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshserve.errors import UserError
from meshserve.serving.json_show import show  # re-exported: the guided modules quote values with it

__all__ = ["GuideError", "GuideSpec", "SizedCache", "KINDS", "show"]

KINDS = ("json_object", "json_schema", "tool_calls", "choice", "regex")


class GuideError(UserError):
    """A format meshserve cannot guide to (a schema keyword it does not support, a tool that does not exist); the
    message names where in the spec, e.g. `schema.properties.age.pattern: not supported`."""


@dataclass(frozen=True)
class GuideSpec:
    """One request's output format.

    kind "json_object": any JSON object (response_format {"type": "json_object"}).
    kind "json_schema": a JSON value `schema` (JSON text of a JSON Schema) accepts (response_format json_schema).
    kind "tool_calls": one or more calls (exactly one unless `parallel`) of the tools in `tools` (ChatMessages
      .tools_json: OpenAI's `tools` list as JSON text), written in the `parser`'s format (serve --tool-call-parser;
      "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; "llama3_json": one bare
      {"name": ..., "parameters": {...}}); `tool_name` "" = any of the tools
      (tool_choice "required"), else only that function (a named tool_choice). Arguments follow the tool's
      `parameters` schema where it has one, any JSON object otherwise.
    kind "choice": exactly one of the strings `choices`, as written (no quotes, no whitespace around; vLLM's
      guided_choice): a label for a classification job, say.
    kind "regex": a string the regular expression `pattern` matches whole (vLLM's guided_regex; the subset in
      serving/guided/regex.py).
    think (not for "regex"): "" the format from the first token; "start" / "open" a thinking model's reasoning
      block first (a chat on a server with --reasoning-parser), optional / already opened by the prompt (grammar.py).
    """

    kind: str
    schema: str = ""
    tools: str = ""
    tool_name: str = ""
    parallel: bool = True
    parser: str = "hermes"
    choices: tuple[str, ...] = ()
    pattern: str = ""
    think: str = ""


class SizedCache(OrderedDict):
    """Values by key, least recently put (or hit: `hit`, `memoize`) first, at most `max_entries` and `max_bytes`
    counted by `cost(key, value)` as each is put (the newest is kept whatever it costs); with `recount`, for values
    that grow while cached (a grammar's byte memo), every entry is counted again at each put and an entry again at
    each hit, so `nbytes` is their bytes as of the last put or hit, not as of their own put (`cost` must then be
    cheap: a put recounts them all). `get` is lock-free, not reordering (the engine thread reads masks so); changes
    hold its lock (grammars, refusals and masks are put from many threads)."""

    def __init__(self, max_entries: int, max_bytes: int, cost: Callable[[Any, Any], int], recount: bool = False):
        super().__init__()
        self.max_entries, self.max_bytes, self.cost, self.nbytes = max_entries, max_bytes, cost, 0
        self.recount = recount
        self._sizes: dict = {}  # key -> its bytes as last counted
        self._lock = threading.Lock()

    def put(self, key: Any, value: Any) -> Any:
        """Cache `value` unless `key` has one already (two threads computed it: counted once); the cached one."""
        size = self.cost(key, value)
        with self._lock:
            if key not in self:
                if self.recount:
                    self._sizes = {k: self.cost(k, v) for k, v in self.items()}
                    self.nbytes = sum(self._sizes.values())
                self[key], self._sizes[key] = value, size
                self.nbytes += size
                while len(self) > 1 and (len(self) > self.max_entries or self.nbytes > self.max_bytes):
                    self.nbytes -= self._sizes.pop(self.popitem(last=False)[0])
            return self[key]

    def hit(self, key: Any) -> Any:
        """The value of `key` (None when not cached), made the most recently used (and counted again: `recount`)."""
        value = self.get(key)
        if value is not None:
            size = self.cost(key, value) if self.recount else 0
            with self._lock:
                if key in self:
                    self.move_to_end(key)
                    if self.recount:
                        self.nbytes += size - self._sizes[key]
                        self._sizes[key] = size
        return value

    def clear(self) -> None:
        with self._lock:
            super().clear()
            self._sizes.clear()
            self.nbytes = 0

    def memoize(self, build: Callable[[Any], Any], recount: bool = True) -> Callable[[Any], Any]:
        """`build` cached here by its argument (a decorator, as functools.lru_cache: with cache_clear, and `cache`);
        its values are recounted (`recount`: compile_spec's grammars fill their byte memo as they are used)."""
        self.recount = recount

        @functools.wraps(build)
        def cached(key: Any) -> Any:
            value = self.hit(key)
            return self.put(key, build(key)) if value is None else value

        cached.cache, cached.cache_clear = self, self.clear  # type: ignore[attr-defined]
        return cached
