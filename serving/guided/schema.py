"""A `GuideSpec` compiled to a `Grammar` (`compile_spec`): JSON Schema's subset, any JSON object, Hermes tool calls.

Supported keywords: type (one or a list), properties, required, additionalProperties (false, true or absent with
properties: no keys beyond them either way; without properties a schema for every value), items (a schema or false),
prefixItems, minItems, maxItems, enum, const (any JSON values), anyOf, oneOf (read as anyOf), allOf of one schema,
$ref to "#/$defs/..." or "#/definitions/..." (recursion allowed), minLength, maxLength, minimum / maximum /
exclusiveMinimum / exclusiveMaximum on type integer (ranges.py), pattern (the string's content fullmatches it, written
without JSON escapes; with minLength / maxLength counted: patterns.py) and format (date, time, date-time, uuid, email,
ipv4, ipv6, hostname, uri enforced as a pattern from formats.py's table; not together with a pattern; other formats,
and a format that cannot be enforced together with minLength / maxLength, are annotations; format beside anyOf /
oneOf / allOf / $ref / enum / const is not applied). Annotations are ignored:
title, description, default, examples, $schema, $id, $comment, deprecated, readOnly, writeOnly, discriminator (its
oneOf is still enforced). Any other keyword raises GuideError naming its place and the supported ones.

What is generated is always valid for the schema, sometimes more strictly than the schema asks:
- properties are written in the schema's order, a schema without "type" takes the type its keywords imply (e.g.
  {"minLength": 1} -> a string), a const/enum value is written as Python's json.dumps writes it (compact, UTF-8), an
  object or array const as an object or array of consts (whitespace free), and a surrogate pair written as two
  \\u escapes counts two characters toward minLength/maxLength;
- a pattern's unanchored search is written as a whole match (`abc` writes exactly "abc"), and a format as the subset
  of it in formats.py's table.
"""

from __future__ import annotations

import json
from typing import Any

from meshserve.serving.guided.grammar import LIT, MAX_OPEN, T_OPEN, TOOLS, VAL, Grammar
from meshserve.serving.guided.patterns import compile_regex, held_bytes, string_node
from meshserve.serving.guided.ranges import BOUNDS, read_bounds
from meshserve.serving.guided.spec import KINDS, GuideError, GuideSpec, SizedCache
from meshserve.serving.guided.spec import show as _show
from meshserve.serving.guided.think import check_think

__all__ = ["compile_spec", "SUPPORTED_KEYWORDS", "IGNORED_KEYWORDS", "MAX_DEPTH", "MAX_CHOICES", "GRAMMAR_CACHE_BYTES"]

MAX_DEPTH = 64  # schema (and const/enum value) nesting levels a guided format may have
MAX_CHOICES = 4096  # strings of a "choice" format (vLLM's guided_choice)
GRAMMAR_CACHE_BYTES = 256 << 20  # compiled grammars kept (a regex of 20,000 NFA states: ~6 MB, a date format: 0.1 MB)

SUPPORTED_KEYWORDS = (
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "enum",
    "const", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "pattern", "format",
)  # fmt: skip
IGNORED_KEYWORDS = ("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                    "readOnly", "writeOnly", "discriminator", "$defs", "definitions")  # fmt: skip
_NOT_APPLIED = ("format",)  # followed on a string type only; beside a combinator or enum/const it is not applied
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_IMPLIED = {  # the type a keyword implies when a schema has no "type"
    "properties": "object", "required": "object", "additionalProperties": "object", "items": "array",
    "prefixItems": "array", "minItems": "array", "maxItems": "array", "minLength": "string", "maxLength": "string",
    "minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
    "pattern": "string",
}  # fmt: skip
_SUPPORTED_TEXT = ", ".join(SUPPORTED_KEYWORDS)


def _key(name: str) -> bytes:
    return json.dumps(name, ensure_ascii=False).encode()


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class _Compiler:
    """Schemas -> nodes (see grammar.py's docstring for the node forms)."""

    def __init__(self):
        self.nodes: list[tuple] = [("str", 0, -1)]  # node 0: any object's keys (Grammar._key_node)
        self.paths: list[str] = ["keys"]
        self.refs: dict[tuple[int, str], int] = {}
        self.doc: Any = None  # the schema document $refs resolve in
        self.doc_path = "schema"
        self._any: int | None = None
        self._known: dict[tuple, int] = {}  # node -> its id (add)
        self.depth = 0  # schema levels being compiled (_nest)

    def add(self, node: tuple, path: str) -> int:
        """node's id: an equal node already added is reused (so identical subschemas, e.g. two anyOf branches
        alike, are one alternative, not two that the matcher would follow side by side), except the empty
        alternatives that $refs and any_value fill in later."""
        if node != ("alt", ()) and (known := self._known.get(node)) is not None:
            return known
        self.nodes.append(node)
        self.paths.append(path)
        if node != ("alt", ()):
            self._known[node] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def _nest(self, path: str) -> None:
        """One level deeper into the schema; a GuideError past MAX_DEPTH (a deeper schema would exhaust Python's
        recursion: an internal error, not an answer)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            where = path if len(path) <= 100 else f"{path[:40]}...{path[-40:]}"
            raise GuideError(f"{where}: nested deeper than {MAX_DEPTH} levels (the limit for a guided schema)")

    def any_value(self) -> int:
        """Any JSON value (objects and arrays of any values, recursively)."""
        if self._any is None:
            self._any = self.add(("alt", ()), "any value")
            obj = self.add(("obj", None, self._any), "any object")
            arr = self.add(("arr", (), self._any, 0, -1), "any array")
            leaves = [obj, arr, self.add(("str", 0, -1), "any string"), self.add(("num", False), "any number")]
            leaves += [self.add(("lit", word), "literal") for word in (b"true", b"false", b"null")]
            self.nodes[self._any] = ("alt", tuple(leaves))
        return self._any

    def any_object(self) -> int:
        return self.add(("obj", None, self.any_value()), "any object")

    def const(self, value: Any, path: str) -> int:
        self._nest(path)
        try:
            return self._const(value, path)
        finally:
            self.depth -= 1

    def _const(self, value: Any, path: str) -> int:
        if isinstance(value, dict):
            props = tuple((_key(k), self.const(v, f"{path}.{k}"), True) for k, v in value.items())
            return self.add(("obj", props, -1), path)
        if isinstance(value, list):
            items = tuple(self.const(v, f"{path}[{i}]") for i, v in enumerate(value))
            return self.add(("arr", items, -1, len(items), len(items)), path)
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError as e:
            raise GuideError(f"{path}: {_show(value)} is not a JSON value ({e})") from None
        return self.add(("lit", text.encode()), path)

    def compile(self, schema: Any, path: str) -> int:
        self._nest(path)
        try:
            return self._compile(schema, path)
        finally:
            self.depth -= 1

    def _compile(self, schema: Any, path: str) -> int:
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, dict):
            raise GuideError(f"{path}: expected a JSON Schema object, got {_show(schema)}")
        for key in schema:
            if key not in SUPPORTED_KEYWORDS and key not in IGNORED_KEYWORDS:
                raise GuideError(f"{path}.{key}: not supported (supported keywords: {_SUPPORTED_TEXT})")
        used = [k for k in schema if k in SUPPORTED_KEYWORDS and k not in _NOT_APPLIED]
        for alone in ("$ref", "allOf", "anyOf", "oneOf"):
            if alone in schema:
                others = [k for k in used if k != alone]
                if others:
                    raise GuideError(f"{path}: {alone} together with {', '.join(others)} is not supported")
        if "$ref" in schema:
            return self.ref(schema["$ref"], f"{path}.$ref")
        if "allOf" in schema:
            options = schema["allOf"]
            if not isinstance(options, list) or len(options) != 1:
                raise GuideError(f"{path}.allOf: only a list of one schema is supported, got {_show(options)}")
            return self.compile(options[0], f"{path}.allOf[0]")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise GuideError(f"{path}.{key}: expected a non-empty list of schemas, got {_show(options)}")
                ids = tuple(self.compile(s, f"{path}.{key}[{i}]") for i, s in enumerate(options))
                return self.add(("alt", ids), path)
        types = self.types(schema, path)
        if "enum" in schema or "const" in schema:
            return self.enum(schema, types, path)
        ids = tuple(self.typed(t, schema, path) for t in types)
        return ids[0] if len(ids) == 1 else self.add(("alt", ids), path)

    def types(self, schema: dict, path: str) -> list[str]:
        kind = schema.get("type")
        if kind is None:
            implied = list(dict.fromkeys(_IMPLIED[k] for k in schema if k in _IMPLIED))
            return implied or list(TYPES)
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in TYPES for k in kinds) or len(set(kinds)) != len(kinds):
            raise GuideError(f"{path}.type: expected one of {', '.join(TYPES)} or a list of them, got {_show(kind)}")
        return kinds

    def enum(self, schema: dict, types: list[str], path: str) -> int:
        others = [k for k in schema if k in SUPPORTED_KEYWORDS and k not in ("type", "enum", "const", *_NOT_APPLIED)]
        if others:
            raise GuideError(f"{path}: enum/const together with {', '.join(others)} is not supported")
        if "const" in schema:
            values, where = [schema["const"]], f"{path}.const"
            if "enum" in schema:
                raise GuideError(f"{path}: enum together with const is not supported")
        else:
            values, where = schema["enum"], f"{path}.enum"
            if not isinstance(values, list) or not values:
                raise GuideError(f"{where}: expected a non-empty list of values, got {_show(values)}")
        allowed = set(types) | ({"integer"} if "number" in types else set())
        kept = [v for v in values if _type_of(v) in allowed]
        if not kept:
            raise GuideError(f"{where}: no value has type {_show(schema.get('type'))}")
        if "const" in schema:
            return self.const(kept[0], where)
        ids = tuple(self.const(v, f"{where}[{i}]") for i, v in enumerate(kept))
        return ids[0] if len(ids) == 1 else self.add(("alt", ids), path)

    def _count(self, schema: dict, key: str, path: str) -> int:
        value = schema.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GuideError(f"{path}.{key}: expected a non-negative integer, got {_show(value)}")
        return value

    def typed(self, kind: str, schema: dict, path: str) -> int:
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            return self.array(schema, path)
        if kind == "string":
            lo, hi = self._count(schema, "minLength", path), self._count(schema, "maxLength", path)
            hi = hi if "maxLength" in schema else -1
            if 0 <= hi < lo:
                raise GuideError(f"{path}.maxLength: {hi} is below minLength {lo}")
            return self.add(string_node(schema, lo, hi, path), path)
        if kind in ("number", "integer"):
            given = [k for k in BOUNDS if k in schema]
            if given and kind == "number":
                raise GuideError(f"{path}.{given[0]}: followed for type integer only (a number's decimals have no "
                                 "bound here): use type integer, or drop it")  # fmt: skip
            if given:
                return self.add(("int", *read_bounds(schema, path)), path)
            return self.add(("num", kind == "integer"), path)
        if kind == "boolean":
            return self.add(("alt", (self.const(True, path), self.const(False, path))), path)
        return self.const(None, path)

    def object(self, schema: dict, path: str) -> int:
        props, required = schema.get("properties"), schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GuideError(f"{path}.required: expected a list of property names, got {_show(required)}")
        if props is None:
            if required:
                raise GuideError(f"{path}.required: not supported without properties (an object without "
                                 "properties is any object)")  # fmt: skip
            if extra is False:
                return self.add(("obj", (), -1), path)
            return self.add(("obj", None, self.compile(extra, f"{path}.additionalProperties")), path)
        if not isinstance(props, dict):
            raise GuideError(f"{path}.properties: expected an object of schemas, got {_show(props)}")
        if not isinstance(extra, bool):
            raise GuideError(f"{path}.additionalProperties: a schema together with properties is not supported "
                             "(use false)")  # fmt: skip
        for name in required:
            if name not in props:
                raise GuideError(f"{path}.required: {_show(name)} is not in properties (no other keys are written)")
        out = tuple((_key(name), self.compile(s, f"{path}.properties.{name}"), name in required)
                    for name, s in props.items())  # fmt: skip
        return self.add(("obj", out, -1), path)

    def array(self, schema: dict, path: str) -> int:
        prefix = schema.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise GuideError(f"{path}.prefixItems: expected a list of schemas, got {_show(prefix)}")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise GuideError(f"{path}.items: a list (tuple form) is not supported (use prefixItems)")
        lo = self._count(schema, "minItems", path)
        hi = self._count(schema, "maxItems", path) if "maxItems" in schema else -1
        ids = tuple(self.compile(s, f"{path}.prefixItems[{i}]") for i, s in enumerate(prefix))
        item = -1 if items is False else self.compile(items, f"{path}.items")
        if item < 0:
            hi = len(ids) if hi < 0 else min(hi, len(ids))
        if 0 <= hi < lo:
            raise GuideError(f"{path}.minItems: {lo} is more than the {hi} items allowed")
        return self.add(("arr", ids, item, lo, hi), path)

    def ref(self, ref: Any, path: str) -> int:
        prefixes = ("#/$defs/", "#/definitions/")
        if not isinstance(ref, str) or not ref.startswith(prefixes):
            raise GuideError(f"{path}: only references to '#/$defs/...' or '#/definitions/...' are supported, got "
                             f"{_show(ref)}")  # fmt: skip
        key = (id(self.doc), ref)
        if key in self.refs:
            return self.refs[key]
        target, where = self.doc, self.doc_path
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise GuideError(f"{path}: {_show(ref)} names nothing in the schema")
            target, where = target[part], f"{where}.{part}"
        slot = self.refs[key] = self.add(("alt", ()), where)  # filled below; recursion finds it here
        self.nodes[slot] = ("alt", (self.compile(target, where),))
        return slot

    def check(self, grammar: Grammar) -> None:
        """Every alternative can be some value (a $ref cycle with no value in between can not), and no value's first
        byte opens more than MAX_OPEN alternatives (refused here, not mid-stream: grammar.opened)."""
        for i, node in enumerate(self.nodes):
            if node[0] == "alt" and not grammar.leaves(i):
                raise GuideError(f"{self.paths[i]}: refers only to itself (a $ref cycle with no value)")
            if node[0] == "alt" and (n := grammar.opened(i)) > MAX_OPEN:
                raise GuideError(f"{self.paths[i]}: keeps more than {MAX_OPEN} alternatives open at once where its "
                                 f"value begins ({n}: branches that start alike, a pattern string's counted by the "
                                 "alternatives its pattern starts with): simplify it")  # fmt: skip


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise GuideError(f"{field}: not valid JSON ({e})") from None


def _tools(spec: GuideSpec, c: _Compiler) -> int:
    """The call objects {"name": <a tool's name>, "arguments" (hermes) or "parameters" (llama3_json): <its
    parameters>} as alternatives."""
    if spec.parser not in ("hermes", "llama3_json"):
        raise GuideError(f"parser: {spec.parser!r} is not supported (supported: hermes, llama3_json)")
    args_key = "parameters" if spec.parser == "llama3_json" else "arguments"
    tools = _json(spec.tools, "tools")
    if not isinstance(tools, list) or not tools:
        raise GuideError(f"tools: expected a non-empty list of tools, got {_show(tools)}")
    calls, names = [], []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise GuideError(f'{where}: expected {{"type": "function", "function": {{...}}}}, got {_show(tool)}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise GuideError(f"{where}.function.name: expected a non-empty string, got {_show(name)}")
        if name in names:
            raise GuideError(f"{where}.function.name: {_show(name)} is also tools[{names.index(name)}]'s name")
        names.append(name)
        if spec.tool_name and name != spec.tool_name:
            continue
        params = function.get("parameters")
        if params is None:
            args = c.any_object()
        else:
            c.doc, c.doc_path = params, f"{where}.function.parameters"
            args = c.compile(params, c.doc_path)
        props = ((_key("name"), c.const(name, f"{where}.function.name"), True), (_key(args_key), args, True))
        calls.append(c.add(("obj", props, -1), where))
    if not calls:
        raise GuideError(f"tools: no tool named {_show(spec.tool_name)} (tools: {', '.join(names)})")
    return c.add(("alt", tuple(calls)), "tools")


def _choices(spec: GuideSpec, c: _Compiler) -> list[tuple]:
    """One stack per choice: its literal bytes from the first (equal choices are one)."""
    if not spec.choices:
        raise GuideError("choices: expected at least one string")
    if len(spec.choices) > MAX_CHOICES:
        raise GuideError(f"choices: {len(spec.choices)} strings exceed the limit of {MAX_CHOICES}")
    for i, choice in enumerate(spec.choices):
        if not isinstance(choice, str) or not choice:
            raise GuideError(f"choices[{i}]: expected a non-empty string, got {_show(choice)}")
    return [((LIT, c.add(("lit", choice.encode()), f"choices[{i}]"), 0),) for i, choice in enumerate(spec.choices)]


@SizedCache(256, GRAMMAR_CACHE_BYTES, lambda _, grammar: held_bytes(grammar)).memoize
def compile_spec(spec: GuideSpec) -> Grammar:
    """The spec's grammar (cached per spec: at most 256 grammars and GRAMMAR_CACHE_BYTES counted by
    patterns.held_bytes). Raises GuideError naming the place in the spec that is not supported
    ("schema.properties.age.pattern: not supported (...)"); callers prefix the request's field."""
    try:
        return _compile_spec(spec)
    except RecursionError:  # MAX_DEPTH bounds what the compiler walks; this is the last guard, never a crash
        raise GuideError(f"{spec.kind}: nested too deeply to compile") from None


def _compile_spec(spec: GuideSpec) -> Grammar:
    check_think(spec)
    if spec.kind == "regex":
        return compile_regex(spec.pattern, "pattern")
    c = _Compiler()
    if spec.kind == "json_object":
        start = ((VAL, c.any_object(), 0),)
    elif spec.kind == "json_schema":
        c.doc = _json(spec.schema, "schema")
        start = ((VAL, c.compile(c.doc, "schema"), 0),)
    elif spec.kind == "choice":
        start = _choices(spec, c)
    elif spec.kind == "tool_calls":
        call = _tools(spec, c)  # llama3_json: one bare call object (Llama 3.1's template asks for one at a time)
        parallel = bool(spec.parallel)
        start = ((VAL, call, 0),) if spec.parser == "llama3_json" else ((TOOLS, c.add(("tools", call, parallel),
                                                                                      "tools"), T_OPEN, 0, 0),)  # fmt: skip
    else:
        raise GuideError(f"kind: {spec.kind!r} is not supported (supported: {', '.join(KINDS)})")
    grammar = Grammar(c.nodes, start, spec.kind, spec.think, 0 if spec.kind == "choice" else 2)
    c.check(grammar)
    return grammar
