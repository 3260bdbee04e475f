"""Guided decoding's request fields, checked, as the GuideSpec a Request carries (serving/guided/spec.py).

Two shapes reach it:
- OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
  "strict"?, "description"?}}), vLLM's `guided_choice` (a list of strings) and `guided_regex` (a regular expression)
  and, over HTTP, `guided_json` (a JSON Schema object or its JSON text): the HTTP API's bodies (`http_format`),
  batch-generate's lines and the Python client's keywords (`client_fields`), all checked here (JSON types, the
  name's alphabet, unknown keys refused, at most one format) and sent as the proto's ResponseFormat (`format_proto`).
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
from meshserve.serving.guided.regex import MAX_PATTERN
from meshserve.serving.guided.spec import GuideError, GuideSpec
from meshserve.serving.json_show import show
from meshserve.serving.validation import RequestError, refuse_unknown

__all__ = [
    "FORMAT_TYPES",
    "TOOL_CHOICES",
    "UNSUPPORTED",
    "HTTP_FORMATS",
    "response_format",
    "choice_spec",
    "regex_spec",
    "guided_json",
    "one_format",
    "read_format",
    "http_format",
    "http_renames",
    "submit_error",
    "client_fields",
    "format_proto",
    "request_guide",
    "compiled",
]

FORMAT_TYPES = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("", "auto", "none", "required")  # ChatMessages.tool_choice's values
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
_SCHEMA_KEYS = ("name", "schema", "strict", "description")
# vLLM's other guided_* field: refused by name rather than ignored (the output would not follow it).
UNSUPPORTED = ("guided_grammar",)
HTTP_FORMATS = ("guided_json", "guided_choice", "guided_regex", *UNSUPPORTED)  # vLLM's fields an HTTP body may hold
CHOICE_FIELD = "response_format.choice.values"  # the gRPC name of a choice format's strings
REGEX_FIELD = "response_format.regex"  # the gRPC name of a regex format's pattern


def response_format(value: Any, field: str = "response_format") -> GuideSpec | None:
    """OpenAI's response_format -> the GuideSpec it asks for; None for unset (None) or {"type": "text"}. The schema
    is kept as JSON text in the client's key order. Raises RequestError naming the field
    (`response_format.json_schema.name: ...`); whether meshserve can follow the schema is `compiled`'s question."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f'{field}: expected an object {{"type": "json_object"}} or '
                           f'{{"type": "json_schema", "json_schema": {{...}}}}, got {show(value)}')  # fmt: skip
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise RequestError(f"{field}.type: expected one of {', '.join(map(show, FORMAT_TYPES))}, got {show(kind)}")
    takes = "type and json_schema" if kind == "json_schema" else "type only"
    allowed = ("type", "json_schema") if kind == "json_schema" else ("type",)
    refuse_unknown(value, allowed, field, f"{field} of type {show(kind)} takes {takes}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuideSpec("json_object")
    inner = value.get("json_schema")
    where = f"{field}.json_schema"
    if not isinstance(inner, Mapping):
        raise RequestError(f'{where}: expected an object {{"name", "schema", "strict"?, "description"?}}, got '
                           f"{show(inner)}")  # fmt: skip
    refuse_unknown(inner, _SCHEMA_KEYS, where, f"takes {', '.join(_SCHEMA_KEYS)}")
    name = inner.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(f"{where}.name: expected 1 to 64 characters of a-z, A-Z, 0-9, _ and -, got {show(name)}")
    schema = inner.get("schema")
    if not isinstance(schema, Mapping):
        raise RequestError(f"{where}.schema: expected a JSON Schema object, got {show(schema)}")
    if inner.get("strict") is not None and not isinstance(inner["strict"], bool):
        raise RequestError(f"{where}.strict: expected true or false, got {show(inner['strict'])}")
    if inner.get("description") is not None and not isinstance(inner["description"], str):
        raise RequestError(f"{where}.description: expected a string, got {show(inner['description'])}")
    # strict is accepted and always holds: guided decoding follows the schema whatever its value.
    return GuideSpec("json_schema", schema=json.dumps(schema, ensure_ascii=False))


def choice_spec(values: Any, field: str = "guided_choice") -> GuideSpec:
    """vLLM's guided_choice (a list of non-empty strings, at most MAX_CHOICES = 4096) -> its "choice" spec, compiled;
    RequestError naming the field and the string ("guided_choice[1]: expected a non-empty string, got "")."""
    if not isinstance(values, list | tuple):
        raise RequestError(f"{field}: expected a list of strings, got {show(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value:  # before compiling: the spec must be hashable
            raise RequestError(f"{field}[{i}]: expected a non-empty string, got {show(value)}")
    return compiled(GuideSpec("choice", choices=tuple(values)), field)


def regex_spec(value: Any, field: str = "guided_regex") -> GuideSpec:
    """vLLM's guided_regex (a Python regular expression the whole output must match, in serving/guided/regex.py's
    subset, at most 4096 characters) -> its "regex" spec, compiled; RequestError naming the field ("guided_regex:
    backreferences are not supported"). Whether its token masks can all be prepared (at most 1024 positions) is
    known only at submit (the orchestrator's GuideError, `submit_error`)."""
    if not isinstance(value, str):
        raise RequestError(f"{field}: expected a regular expression (a string), got {show(value)}")
    return compiled(GuideSpec("regex", pattern=value), field)


def guided_json(value: Any, field: str = "guided_json") -> GuideSpec:
    """vLLM's guided_json (a JSON Schema object, or its JSON text) -> a json_schema spec (the schema as JSON text,
    in the client's key order), as response_format's json_schema; whether meshserve can follow it is `compiled`'s."""
    if isinstance(value, str):
        return _schema_text(value, field)
    if not isinstance(value, Mapping):
        raise RequestError(f"{field}: expected a JSON Schema object or its JSON text, got {show(value)}")
    return GuideSpec("json_schema", schema=json.dumps(value, ensure_ascii=False))


def one_format(given: Mapping[str, bool]) -> None:
    """RequestError naming the first two fields of `given` that are set (each asks for the output's format)."""
    both = [name for name, set_ in given.items() if set_][:2]
    if len(both) < 2:
        return
    if both[1] == "tool_choice":
        raise RequestError(f'{both[0]}: cannot be combined with tool_choice "required" or a named function (the '
                           "output is then tool calls); drop one")  # fmt: skip
    raise RequestError(f"{both[0]}: cannot be combined with {both[1]} (each sets the output's format); give one")


def _required(choice: Any) -> bool:
    """Whether an OpenAI tool_choice guides into calls ("required" or a named function; its checks are elsewhere)."""
    return choice == "required" or isinstance(choice, Mapping)


# vLLM's format fields and how each is read (response_format, OpenAI's, is the default).
_READERS = {"guided_json": guided_json, "guided_choice": choice_spec, "guided_regex": regex_spec}


def _given(fields: Mapping[str, Any], tool_choice: Any = None) -> dict[str, bool]:
    """Which of the format fields are set (response_format counts unless it is {"type": "text"}), in the order
    `one_format` names them."""
    fmt = fields.get("response_format")
    return {
        "response_format": fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"),
        **{key: fields.get(key) is not None for key in _READERS},
        "tool_choice": _required(tool_choice),
    }


def read_format(fields: Mapping[str, Any], tool_choice: Any = None) -> tuple[str, GuideSpec | None]:
    """The output format of `fields` (an HTTP body, a batch-generate line, the client's keywords: response_format
    and vLLM's guided_json / guided_choice / guided_regex) -> (the field it came from, its spec; None for free
    text). At most one of them and a tool_choice "required" / named function. Raises RequestError naming the
    field; a choice or a pattern is compiled here, a schema is `compiled`'s to check."""
    one_format(_given(fields, tool_choice))
    field = next((key for key in _READERS if fields.get(key) is not None), "response_format")
    return field, _READERS.get(field, response_format)(fields.get(field))


def http_format(body: Mapping[str, Any], req: pb.GenerateRequest) -> str:
    """An HTTP body's output format (`read_format`) into req.response_format (left unset for free text); returns the
    field it came from, so that the server's errors about it are named after it. guided_grammar is refused by name.
    Raises RequestError naming the field."""
    for key in UNSUPPORTED:
        if body.get(key) is not None:
            raise RequestError(f"{key}: not supported: meshserve guides to JSON, JSON Schema, choices and regular "
                               "expressions (response_format, guided_json, guided_choice, guided_regex)")  # fmt: skip
    field, spec = read_format(body, body.get("tool_choice"))
    if (proto := format_proto(spec)) is not None:
        req.response_format.CopyFrom(proto)
    return field


def http_renames(guide_field: str) -> tuple[tuple[str, str], ...]:
    """(gRPC name, HTTP name) of the format's fields in RequestParser's messages for a body whose format came from
    `guide_field` (http_format's): a choice is guided_choice's and a pattern guided_regex's (OpenAI's
    response_format has neither), a schema is guided_json's when the body sent one."""
    schema = (("response_format.json_schema", "guided_json"),) if guide_field == "guided_json" else ()
    return ((CHOICE_FIELD, "guided_choice"), (REGEX_FIELD, "guided_regex"), *schema)


def submit_error(message: str, guide_field: str) -> tuple[str, str]:
    """A GuideError from queueing a request (the orchestrator preparing a regex's masks: "pattern: more than 1024
    positions ...") as (message, param) named after the body's format field (`guide_field`: "guided_regex: more
    than 1024 positions ...")."""
    if message.startswith("pattern:"):
        message = guide_field + message[len("pattern") :]
    return message, guide_field


def client_fields(req: pb.GenerateRequest, response_format_: Any, guided_choice: Any, tool_choice: Any,
                  parallel_tool_calls: Any, tools: Any, validate: bool, guided_regex: Any = None) -> None:  # fmt: skip
    """The Python client's guided-decoding keywords into `req`: response_format (OpenAI's dict), guided_choice (a
    list of strings), guided_regex (a pattern), a chat's tool_choice (OpenAI's value) and parallel_tool_calls.
    validate=False sends a response_format's schema, the choices, the pattern and a tool_choice string as given, for
    the server to refuse. Raises RequestError (UserError) naming the keyword."""
    from meshserve.serving.openai_tools import tool_choice as choice_fields

    chat = req.WhichOneof("input") == "messages"
    if not chat and (tool_choice is not None or parallel_tool_calls is not None):
        raise RequestError("tool_choice: only a chat (messages=[...]) with tools takes tool_choice and "
                           "parallel_tool_calls")  # fmt: skip
    if validate:
        fields = {"response_format": response_format_, "guided_choice": guided_choice, "guided_regex": guided_regex}
        if (fmt := format_proto(read_format(fields, tool_choice)[1])) is not None:  # {"type": "text"}: left unset
            req.response_format.CopyFrom(fmt)
    elif guided_regex is not None:
        if not isinstance(guided_regex, str):
            raise RequestError(f"guided_regex: the proto field holds a string, got {show(guided_regex)}")
        req.response_format.regex = guided_regex  # an empty string is sent set (for the server to refuse)
    elif guided_choice is not None:
        if isinstance(guided_choice, list | tuple) and all(isinstance(v, str) for v in guided_choice):
            req.response_format.choice.values.extend(guided_choice)  # an empty list sends an empty Choices
            req.response_format.choice.SetInParent()
        else:
            raise RequestError(f"guided_choice: the proto field holds a list of strings, got {show(guided_choice)}")
    elif response_format_ is not None:  # as given, for the server to refuse: a str schema is sent as its text
        schema = (response_format_.get("json_schema") or {}).get("schema")
        if response_format_.get("type") == "json_object":
            req.response_format.json_object = True
        else:
            req.response_format.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    if tool_choice is not None:
        if validate or not isinstance(tool_choice, str):
            choice, function = choice_fields(tool_choice)
        else:
            choice, function = tool_choice, ""
        if validate and choice == "required" and not tools:
            raise RequestError(f"tool_choice: {show(tool_choice)} needs tools=[...] (the functions to call)")
        names = [(t.get("function") or {}).get("name") for t in tools or () if isinstance(t, Mapping)]
        if validate and function and function not in names:
            raise RequestError(f"tool_choice.function.name: no tool named {show(function)} in tools")
        req.messages.tool_choice, req.messages.tool_choice_function = choice, function
    if parallel_tool_calls is not None:
        if validate and not isinstance(parallel_tool_calls, bool):
            raise RequestError(f"parallel_tool_calls: expected True or False, got {parallel_tool_calls!r}")
        req.messages.parallel_tool_calls = parallel_tool_calls


def format_proto(spec: GuideSpec | None) -> pb.ResponseFormat | None:
    """A json_object / json_schema / choice / regex spec as GenerateRequest.response_format; None for free text."""
    if spec is None:
        return None
    if spec.kind == "json_object":
        return pb.ResponseFormat(json_object=True)
    if spec.kind == "json_schema":
        return pb.ResponseFormat(json_schema=spec.schema)
    if spec.kind == "choice":
        return pb.ResponseFormat(choice=pb.Choices(values=spec.choices))
    if spec.kind == "regex":
        return pb.ResponseFormat(regex=spec.pattern)
    raise ValueError(f"{spec.kind!r} is no response_format (tool calls are ChatMessages.tool_choice)")


def _format_guide(req: pb.GenerateRequest, max_chars: int) -> GuideSpec | None:
    """GenerateRequest.response_format -> its spec (None: unset, no format, or json_object false)."""
    if not req.HasField("response_format"):
        return None
    fmt = req.response_format
    which = fmt.WhichOneof("format")
    if which == "json_object":
        return GuideSpec("json_object") if fmt.json_object else None
    if which == "choice":  # the strings themselves are compile_spec's to check (named under CHOICE_FIELD)
        chars = sum(map(len, fmt.choice.values))
        if chars > max_chars:
            raise RequestError(f"{CHOICE_FIELD}: {chars} characters exceed the limit of {max_chars}")
        return GuideSpec("choice", choices=tuple(fmt.choice.values))
    if which == "regex":  # the pattern itself is compile_spec's to check (named under REGEX_FIELD)
        limit = min(max_chars, MAX_PATTERN)  # the pattern's own limit (4096) unless the server's text limit is lower
        if len(fmt.regex) > limit:
            raise RequestError(f"{REGEX_FIELD}: {len(fmt.regex)} characters exceed the limit of {limit}")
        return GuideSpec("regex", pattern=fmt.regex)
    if which != "json_schema":
        return None
    text = fmt.json_schema
    if len(text) > max_chars:
        raise RequestError(f"response_format.json_schema: {len(text)} characters exceed the limit of {max_chars}")
    return _schema_text(text, "response_format.json_schema")


def _schema_text(text: str, field: str) -> GuideSpec:
    """A schema given as JSON text -> its json_schema spec (the text kept as sent); RequestError naming `field` when
    it is not JSON or not an object."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"{field}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise RequestError(f"{field}: expected a JSON Schema object, got {show(schema)}")
    return GuideSpec("json_schema", schema=text)


def _tool_guide(chat: pb.ChatMessages, tools: list | None, parser: str | None) -> GuideSpec | None:
    """ChatMessages' tool_choice fields -> a tool_calls spec (None: the model decides, or no tools)."""
    choice, function = chat.tool_choice, chat.tool_choice_function
    if choice not in TOOL_CHOICES:
        raise RequestError(
            f"messages.tool_choice must be one of {', '.join(map(show, TOOL_CHOICES))} (or name a function in "
            f"tool_choice_function), got {show(choice)}"
        )
    if function and choice not in ("", "required"):
        raise RequestError(
            f"messages.tool_choice_function: a named function is called whatever the model wants: give it with "
            f'tool_choice "" or "required", not {show(choice)}'
        )
    if choice != "required" and not function:
        return None
    field, what = (
        ("messages.tool_choice_function", f"function {show(function)}") if function
        else ("messages.tool_choice", '"required"')
    )  # fmt: skip
    if not tools:
        raise RequestError(f"{field}: {what} needs tools (messages.tools_json is empty)")
    if parser is None:
        raise RequestError(f"{field}: {what} needs a server started with --tool-call-parser (tool calls are off on "
                           "this server)")  # fmt: skip
    names = [t["function"]["name"] for t in tools]
    if function and function not in names:
        raise RequestError(f"messages.tool_choice_function: no tool named {show(function)} in messages.tools_json (it "
                           f"has {', '.join(map(show, names))})")  # fmt: skip
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
    return GuideSpec("tool_calls", tools=chat.tools_json, tool_name=function, parallel=parallel, parser=parser)


def compiled(spec: GuideSpec, field: str) -> GuideSpec:
    """`spec` once `compile_spec` accepts it (its Grammar is cached for the engine); GuideError as a RequestError
    under `field`: "response_format.json_schema: schema.properties.age.pattern: not supported ...". A tool_calls
    spec's errors about a tool ("tools[0].function.parameters...") are named under messages.tools_json, a choice
    spec's about its strings ("choices[1]: ...") under `field` ("response_format.choice.values[1]: ..."), a regex
    spec's about its pattern ("pattern: ...") under `field` ("response_format.regex: ...")."""
    from meshserve.serving.guided import compile_spec

    try:
        compile_spec(spec)
    except GuideError as e:
        message = str(e)
        if spec.kind == "tool_calls" and message.startswith("tools"):
            raise RequestError("messages.tools_json" + message[len("tools") :]) from None
        if spec.kind == "choice" and message.startswith("choices"):
            raise RequestError(field + message[len("choices") :]) from None
        if spec.kind == "regex" and message.startswith("pattern"):
            raise RequestError(field + message[len("pattern") :]) from None
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
            'response_format: cannot be combined with messages.tool_choice "required" or a named function (the '
            "output is then tool calls); drop one"
        )
    if fmt is not None:
        fields = {"json_schema": "response_format.json_schema", "choice": CHOICE_FIELD, "regex": REGEX_FIELD}
        return compiled(fmt, fields.get(fmt.kind, "response_format"))
    if tool is not None:
        return compiled(tool, "messages.tool_choice")
    return None
