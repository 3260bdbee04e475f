"""Chat messages -> prompt text, through the chat template that ships with a Hugging Face checkpoint.

A template is the Jinja string of tokenizer_config.json's `chat_template` (or chat_template.jinja). It is rendered as
transformers' `apply_chat_template` renders it (utils/chat_template_utils.py `_compile_jinja_template`): an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension, a `tojson` filter that
does not escape HTML, the globals `raise_exception` and `strftime_now`, a namespace that refuses underscore names, and
`{% generation %}` blocks rendered as plain text. The variables are `messages`, `tools` (None, or the request's tools:
OpenAI's [{"type": "function", "function": {...}}] dicts as given), `documents` (None), `add_generation_prompt`, and
the special tokens `bos_token` and `eos_token` (strings), as transformers' `apply_chat_template(messages, tools=tools)`.

Two of the request's template options may come among the extra variables (vLLM's chat_template_kwargs may set them;
the HTTP front passes its top-level fields that way): `add_generation_prompt` (default true: the template opens the
assistant's turn) and `continue_final_message` (default false; true: the prompt ends inside the last message, which
must be the assistant's, so the model continues it: transformers' `apply_chat_template(continue_final_message=True)`,
which appends a tag to that message's content, renders, and cuts the text where the tag begins; it needs
add_generation_prompt false, as transformers and vLLM refuse the two together).

Messages are OpenAI's: role system/user/assistant/tool and content; an assistant message may carry `tool_calls`
(its content may then be None, rendered as ""), a tool message carries `tool_call_id`. Each call's
`function.arguments` is parsed from its JSON string into a dict (or whatever JSON value it holds) before rendering:
tool-use templates expect a dict (transformers' docs), and vLLM parses them the same way.

The rendered text carries the template's own special tokens (BOS included where the model wants one), so it is
encoded without adding any (model/loading.py `LoadedModel.encode_chat`): transformers'
`apply_chat_template(..., tokenize=True)` encodes with add_special_tokens=False too.

A checkpoint keeps the template as `chat_template.jinja` and the special tokens in meshserve.json's "chat" entry
(model/checkpoint.py); `hf_chat_template` reads both from a Hugging Face directory at convert time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from meshserve.errors import UserError

__all__ = [
    "ChatTemplate",
    "ChatError",
    "ROLES",
    "TEMPLATE_FILE",
    "check_messages",
    "check_template_kwargs",
    "read_template_kwargs",
    "check_template",
    "render_chat",
    "hf_chat_template",
]

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"  # the file name in a meshserve checkpoint (and transformers' newer one)


class ChatError(UserError):
    """Messages a chat template cannot take, a model without a template, or the template's own refusal."""


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special-token strings it may reference."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        return render_chat(self.template, messages, self.bos_token, self.eos_token, add_generation_prompt, tools, extra)


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, Any]]:
    """`messages` as plain dicts for the template; raises ChatError naming the first bad field (`messages[2].role`,
    `messages[1].tool_calls[0].function.arguments`): an empty list, a role outside ROLES, content that is not a string
    (None only beside tool_calls), tool_calls off an assistant message or malformed, arguments that are not JSON, a
    tool message without a tool_call_id, other keys. Keys a message does not use are left out, as a client would."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ChatError(f"{field} must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    if not messages:
        raise ChatError(f"{field}: empty list (give at least one message)")
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise ChatError(f"{where} must be a {{'role', 'content'}} mapping, got {type(m).__name__}")
        extra = sorted(str(k) for k in m if k not in _KEYS)
        if extra:
            raise ChatError(f"{where}: unknown key {extra[0]!r} (a message has {', '.join(map(repr, _KEYS))})")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = m.get("tool_calls") or None  # [] is no calls, as None (clients send either)
        if calls is not None and role != "assistant":
            raise ChatError(f"{where}.tool_calls: only an assistant message calls tools (role is {role!r})")
        if content is None and calls is not None:
            content = ""  # a message that only calls tools has no text (the proto's content cannot be None either)
        if not isinstance(content, str):
            raise ChatError(f"{where}.content must be a string, got {type(content).__name__}")
        message: dict[str, Any] = {"role": role, "content": content}
        reasoning = m.get("reasoning_content")
        if reasoning is not None:  # a thinking model's earlier answer, as the server returned it
            if role != "assistant" or not isinstance(reasoning, str):
                raise ChatError(f"{where}.reasoning_content: a string, on an assistant message only")
            if reasoning:
                message["reasoning_content"] = reasoning
        if calls is not None:
            message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        call_id = m.get("tool_call_id")
        if role == "tool":
            if not isinstance(call_id, str) or not call_id:
                raise ChatError(f"{where}.tool_call_id: a tool message names the call it answers (a non-empty string)")
            message["tool_call_id"] = call_id
        elif call_id is not None:
            raise ChatError(f"{where}.tool_call_id: only a tool message answers a call (role is {role!r})")
        out.append(message)
    return out


_KEYS = ("role", "content", "tool_calls", "tool_call_id", "reasoning_content")


def _tool_calls(calls: Any, field: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as templates read them: {"id", "type": "function", "function": {"name",
    "arguments"}}, arguments parsed from JSON text (a dict or other JSON value given as such is kept)."""
    if isinstance(calls, str | bytes) or not isinstance(calls, Sequence):
        raise ChatError(f"{field} must be a list of calls, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        where = f"{field}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ChatError(f"{where}.function: missing (a call is {{'id', 'type': 'function', 'function': "
                            "{'name', 'arguments'}}})")  # fmt: skip
        if call.get("type", "function") != "function":
            raise ChatError(f"{where}.type must be 'function', got {call.get('type')!r}")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise ChatError(f"{where}.function.name: expected a non-empty string, got {name!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError) as e:
                raise ChatError(f"{where}.function.arguments: not JSON ({e})") from None
        elif arguments is None:
            raise ChatError(f"{where}.function.arguments: missing (the arguments as a JSON string)")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ChatError(f"{where}.id: expected a string, got {type(call_id).__name__}")
        entry: dict[str, Any] = {"id": call_id} if call_id else {}
        out.append({**entry, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    tools: list | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text `template` makes of `messages` (checked by `check_messages`) and `tools` (None: none; a
    list: the template's `tools`, OpenAI's tool dicts as the client sent them). `extra`: more template variables
    (vLLM's chat_template_kwargs, e.g. Qwen3's {"enable_thinking": false}; `check_template_kwargs`). A template
    that refuses the conversation (its raise_exception) or fails (a Jinja error) raises ChatError with the
    template's message."""
    import jinja2

    messages = check_messages(messages)
    extra = check_template_kwargs(extra)
    add_generation_prompt = add_generation_prompt and extra.pop("add_generation_prompt", True)
    if continue_final := extra.pop("continue_final_message", False):
        messages = _tag_final_message(messages, add_generation_prompt)
    compiled = _compile(template)
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    try:  # tools and documents are always defined, as transformers' render: templates test `tools is not none`
        text = compiled.render(
            messages=messages,
            tools=tools or None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special,
            **extra,
        )
    except jinja2.TemplateError as e:  # raise_exception's, undefined names, sandbox refusals
        raise ChatError(f"chat template: {e.message or type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # Python errors inside the template's expressions: the template's fault with these messages, not the server's.
        raise ChatError(f"chat template: {type(e).__name__}: {e}") from None
    return _cut_at_tag(text, messages[-1]["content"]) if continue_final else text


# transformers' marker (utils/chat_template_utils.py): appended to the final message, the render is cut where it begins.
_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[dict[str, Any]]:
    """continue_final_message: the messages with the tag after the last one's content (it must be the assistant's,
    and no generation prompt asked for). ChatError naming the field otherwise."""
    if add_generation_prompt:
        raise ChatError("continue_final_message: needs add_generation_prompt false (a new assistant turn, or the "
                        "last message continued: not both)")  # fmt: skip
    role = messages[-1]["role"]
    if role != "assistant":
        raise ChatError(f"messages[{len(messages) - 1}].role: continue_final_message continues the assistant's last "
                        f"message, and the last message is {role!r}")  # fmt: skip
    return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _TAG}]


def _cut_at_tag(text: str, tagged: str) -> str:
    """The render cut where the final message's tag begins (transformers': where the template kept the tag's
    trailing space, right there; else with the whitespace the template trimmed before it stripped too)."""
    final = tagged[: -len(_TAG)]
    if final.strip() not in text or _TAG.strip() not in text:
        raise ChatError("continue_final_message: the chat template does not render the last message's content as "
                        "given, so the prompt cannot end inside it")  # fmt: skip
    at = text.rindex(_TAG.strip())
    return text[:at] if text[at : at + len(_TAG)] == _TAG else text[:at].rstrip()


def read_template_kwargs(text: str, field: str) -> dict[str, Any]:
    """Template variables given as JSON text ("" = none), checked by `check_template_kwargs`; ChatError naming
    `field` for text that is not JSON."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ChatError(f"{field}: not JSON ({e})") from None
    return check_template_kwargs(value, field)


def check_template_kwargs(extra: Any, field: str = "chat_template_kwargs") -> dict[str, Any]:
    """Extra template variables as a dict (None: none); ChatError naming `field` for anything but an object whose
    keys are identifiers other than the variables the server sets itself (messages, tools, ...)."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ChatError(f"{field}: expected an object of template variables, got {type(extra).__name__}")
    for key in extra:
        if not isinstance(key, str) or not key.isidentifier():
            raise ChatError(f"{field}: {key!r} is not a template variable name")
        if key in _OPTIONS:
            if not isinstance(extra[key], bool):
                raise ChatError(f"{field}.{key}: expected true or false, got {extra[key]!r}")
        elif key in _RESERVED:
            raise ChatError(f"{field}.{key}: set by the server (the names it reserves: {', '.join(_RESERVED)})")
    return dict(extra)


_OPTIONS = ("add_generation_prompt", "continue_final_message")  # the request's render options, as vLLM lets them pass


# What render_chat passes, and the environment's globals (a variable of that name would hide the function).
_RESERVED = ("messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
             "strftime_now", "namespace", "range", "dict", "lipsum", "cycler", "joiner")  # fmt: skip


@functools.lru_cache(maxsize=8)  # a server renders one template for every request: compile it once
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed names (transformers' guard against reaching internals)."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=...)` still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"chat template: line {e.lineno}: {e.message}") from None


def check_template(template: str, source: str | Path) -> None:
    """Raise ChatError naming `source` (the file it came from) and the line when `template` is not valid Jinja."""
    try:
        _compile(template)
    except ChatError as e:
        raise ChatError(f"{source}: {e} (fix the template, or delete it to serve without chat)") from None


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def hf_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face directory, as transformers loads it: chat_template.jinja when present
    (it takes priority), else tokenizer_config.json's `chat_template` (a string, or from a list of {name, template}
    the one named "default"); the bos/eos strings from tokenizer_config.json, else special_tokens_map.json.
    None when the directory has no template."""
    directory = Path(directory)
    config = _json_object(directory / "tokenizer_config.json")
    template = None
    jinja_file = directory / TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatError(f"cannot read {jinja_file}: {e}") from None
    else:
        raw = config.get("chat_template")
        if isinstance(raw, str):
            template = raw
        elif isinstance(raw, list):  # named templates: the default one (tool_use and others are not served)
            template = next(
                (t.get("template") for t in raw if isinstance(t, dict) and t.get("name") == "default"), None
            )
    if not isinstance(template, str) or not template.strip():
        return None
    source = jinja_file if jinja_file.is_file() else directory / "tokenizer_config.json"
    check_template(template, source)  # a template that cannot compile is refused now, not at the first request
    tokens = _json_object(directory / "special_tokens_map.json")
    bos = _token_string(config.get("bos_token")) or _token_string(tokens.get("bos_token"))
    eos = _token_string(config.get("eos_token")) or _token_string(tokens.get("eos_token"))
    return ChatTemplate(template, bos, eos)
