"""What a request asks its output to be (`GuideSpec`), and the error for a spec meshserve cannot follow."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshserve.errors import UserError

__all__ = ["GuideError", "GuideSpec", "KINDS", "show"]

KINDS = ("json_object", "json_schema", "tool_calls", "choice", "regex")


class GuideError(UserError):
    """A format meshserve cannot guide to (a schema keyword it does not support, a tool that does not exist); the
    message names where in the spec, e.g. `schema.properties.age.pattern: not supported`."""


def show(value: Any) -> str:
    """A value as an error message quotes it (JSON, strings as repr; at most 40 characters)."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class GuideSpec:
    """One request's output format.

    kind "json_object": any JSON object (response_format {"type": "json_object"}).
    kind "json_schema": a JSON value `schema` (JSON text of a JSON Schema) accepts (response_format json_schema).
    kind "tool_calls": one or more calls (exactly one unless `parallel`) of the tools in `tools` (ChatMessages
      .tools_json: OpenAI's `tools` list as JSON text), written in the `parser`'s format (serve --tool-call-parser;
      "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`); `tool_name` "" = any of the tools
      (tool_choice "required"), else only that function (a named tool_choice). Arguments follow the tool's
      `parameters` schema where it has one, any JSON object otherwise.
    kind "choice": exactly one of the strings `choices`, as written (no quotes, no whitespace around; vLLM's
      guided_choice): a label for a classification job, say.
    kind "regex": a string the regular expression `pattern` matches whole (vLLM's guided_regex; the subset in
      serving/guided/regex.py).
    """

    kind: str
    schema: str = ""
    tools: str = ""
    tool_name: str = ""
    parallel: bool = True
    parser: str = "hermes"
    choices: tuple[str, ...] = ()
    pattern: str = ""
