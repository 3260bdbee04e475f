"""Guided decoding's request fields, checked, as the GuideSpec a Request carries (serving/guided/spec.py).

Two shapes reach it:
- OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
  "strict"?, "description"?}}): the HTTP API's bodies, batch-generate's lines and the Python client's keyword, all
  checked by `response_format` (JSON types, the name's alphabet, unknown keys refused) and sent as the proto's
  ResponseFormat (`format_proto`).
- The gRPC fields (GenerateRequest.response_format, ChatMessages.tool_choice / tool_choice_function /
  parallel_tool_calls): `request_guide` builds the spec and compiles it once (`compile_spec`, cached per spec, so the
  engine's own compile is free), so a schema meshserve cannot follow is INVALID_ARGUMENT before anything is queued.

Every error is a RequestError whose message starts with the field (gRPC's names; the HTTP front renames them).
No JAX here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from meshserve.protos import inference_pb2 as pb
from meshserve.serving.guided.spec import GuideError, GuideSpec
from meshserve.serving.validation import RequestError, refuse_unknown

__all__ = ["FORMAT_TYPES", "TOOL_CHOICES", "response_format", "format_proto", "request_guide", "compiled"]

FORMAT_TYPES = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("", "auto", "none", "required")  # ChatMessages.tool_choice's values
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
_SCHEMA_KEYS = ("name", "schema", "strict", "description")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def response_format(value: Any, field: str = "response_format") -> GuideSpec | None:
    """OpenAI's response_format -> the GuideSpec it asks for; None for unset (None) or {"type": "text"}. The schema
    is kept as JSON text in the client's key order. Raises RequestError naming the field
    (`response_format.json_schema.name: ...`); whether meshserve can follow the schema is `compiled`'s question."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f"{field}: expected an object {{'type': 'json_object'}} or {{'type': 'json_schema', "
                           f"'json_schema': {{...}}}}, got {_show(value)}")  # fmt: skip
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise RequestError(f"{field}.type: expected one of {', '.join(map(repr, FORMAT_TYPES))}, got {_show(kind)}")
    takes = "type and json_schema" if kind == "json_schema" else "type only"
    allowed = ("type", "json_schema") if kind == "json_schema" else ("type",)
    refuse_unknown(value, allowed, field, f"{field} of type {kind!r} takes {takes}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuideSpec("json_object")
    inner = value.get("json_schema")
    where = f"{field}.json_schema"
    if not isinstance(inner, Mapping):
        raise RequestError(f"{where}: expected an object {{'name', 'schema', 'strict'?, 'description'?}}, got "
                           f"{_show(inner)}")  # fmt: skip
    refuse_unknown(inner, _SCHEMA_KEYS, where, f"takes {', '.join(_SCHEMA_KEYS)}")
    name = inner.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(f"{where}.name: expected 1 to 64 characters of a-z, A-Z, 0-9, _ and -, got {_show(name)}")
    schema = inner.get("schema")
    if not isinstance(schema, Mapping):
        raise RequestError(f"{where}.schema: expected a JSON Schema object, got {_show(schema)}")
    if inner.get("strict") is not None and not isinstance(inner["strict"], bool):
        raise RequestError(f"{where}.strict: expected true or false, got {_show(inner['strict'])}")
    if inner.get("description") is not None and not isinstance(inner["description"], str):
        raise RequestError(f"{where}.description: expected a string, got {_show(inner['description'])}")
    # strict is accepted and always holds: guided decoding follows the schema whatever its value.
    return GuideSpec("json_schema", schema=json.dumps(schema, ensure_ascii=False))


def format_proto(spec: GuideSpec | None) -> pb.ResponseFormat | None:
    """A json_object / json_schema spec as GenerateRequest.response_format; None for free text."""
    if spec is None:
        return None
    if spec.kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if spec.kind == "json_schema":
        return pb.ResponseFormat(json_schema=spec.schema)
    raise ValueError(f"{spec.kind!r} is no response_format (tool calls are ChatMessages.tool_choice)")


def _format_guide(req: pb.GenerateRequest, max_chars: int) -> GuideSpec | None:
    """GenerateRequest.response_format -> its spec (None: unset, no format, or json_object false)."""
    if not req.HasField("response_format"):
        return None
    fmt = req.response_format
    which = fmt.WhichOneof("format")
    if which == "json_object":
        return GuideSpec("json_object") if fmt.json_object else None
    if which != "json_schema":
        return None
    text = fmt.json_schema
    if len(text) > max_chars:
        raise RequestError(f"response_format.json_schema: {len(text)} characters exceed the limit of {max_chars}")
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"response_format.json_schema: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise RequestError(f"response_format.json_schema: expected a JSON Schema object, got {_show(schema)}")
    return GuideSpec("json_schema", schema=text)


def _tool_guide(chat: pb.ChatMessages, tools: list | None, parser: str | None) -> GuideSpec | None:
    """ChatMessages' tool_choice fields -> a tool_calls spec (None: the model decides, or no tools)."""
    choice, function = chat.tool_choice, chat.tool_choice_function
    if choice not in TOOL_CHOICES:
        raise RequestError(
            f"messages.tool_choice must be one of {', '.join(map(repr, TOOL_CHOICES))} (or name a function in "
            f"tool_choice_function), got {_show(choice)}"
        )
    if function and choice not in ("", "required"):
        raise RequestError(
            f"messages.tool_choice_function: a named function is called whatever the model wants: give it with "
            f"tool_choice '' or 'required', not {choice!r}"
        )
    if choice != "required" and not function:
        return None
    field, what = (
        ("messages.tool_choice_function", f"function {function!r}") if function
        else ("messages.tool_choice", "'required'")
    )  # fmt: skip
    if not tools:
        raise RequestError(f"{field}: {what} needs tools (messages.tools_json is empty)")
    if parser is None:
        raise RequestError(f"{field}: {what} needs a server started with --tool-call-parser (tool calls are off on "
                           "this server)")  # fmt: skip
    names = [t["function"]["name"] for t in tools]
    if function and function not in names:
        raise RequestError(f"messages.tool_choice_function: no tool named {function!r} in messages.tools_json (it "
                           f"has {', '.join(map(repr, names))})")  # fmt: skip
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
    return GuideSpec("tool_calls", tools=chat.tools_json, tool_name=function, parallel=parallel, parser=parser)


def compiled(spec: GuideSpec, field: str) -> GuideSpec:
    """`spec` once `compile_spec` accepts it (its Grammar is cached for the engine); GuideError as a RequestError
    under `field`: "response_format.json_schema: schema.properties.age.pattern: not supported ...". A tool_calls
    spec's errors about a tool ("tools[0].function.parameters...") are named under messages.tools_json."""
    from meshserve.serving.guided import compile_spec

    try:
        compile_spec(spec)
    except GuideError as e:
        message = str(e)
        if spec.kind == "tool_calls" and message.startswith("tools"):
            raise RequestError("messages.tools_json" + message[len("tools") :]) from None
        raise RequestError(f"{field}: {message}") from None
    return spec


def request_guide(req: pb.GenerateRequest, tools: list | None, parser: str | None, max_chars: int) -> GuideSpec | None:
    """The GuideSpec a GenerateRequest asks for, checked and compiled; None for free text. tools: its chat's checked
    tools (None: no chat or no tools); parser: the server's --tool-call-parser (None: off); max_chars: a schema's
    size limit (limits.max_text_chars)."""
    fmt = _format_guide(req, max_chars)
    tool = _tool_guide(req.messages, tools, parser) if req.WhichOneof("input") == "messages" else None
    if fmt is not None and tool is not None:
        raise RequestError(
            "response_format: cannot be combined with messages.tool_choice 'required' or a named function (the "
            "output is then tool calls); drop one"
        )
    if fmt is not None:
        return compiled(fmt, "response_format" if fmt.kind == "json_object" else "response_format.json_schema")
    if tool is not None:
        return compiled(tool, "messages.tool_choice")
    return None
