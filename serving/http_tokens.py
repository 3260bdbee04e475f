"""Prompt tokens over HTTP: completions' echo (the prompt's log-probs, from a Score job) and vLLM's POST /tokenize
and /detokenize. Split from serving/http_server.py; each function takes the HttpFront it serves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshserve.errors import UserError
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.openai_protocol import (
    Body,
    HttpError,
    ModelNotFound,
    OpenAIRequest,
    chat_messages,
    chat_template_json,
    check_text,
    ints,
    param_of,
)
from meshserve.serving.openai_responses import Echo
from meshserve.serving.openai_tools import check_tools, tools_json
from meshserve.serving.requests import QueueFullError, ShuttingDownError
from meshserve.serving.validation import RequestError

if TYPE_CHECKING:
    from meshserve.serving.http_server import HttpFront

__all__ = ["echo_prompts", "tokenize", "detokenize"]


def echo_prompts(front: HttpFront, parsed: OpenAIRequest, firsts: list) -> list[Echo]:
    """Each prompt's tokens with their log-probs (the first has none) and most likely alternatives, from one
    Score job on the engine thread (between decode steps, as gRPC's Score)."""
    prompts = [r.prompt for r in firsts]
    total = sum(len(p) for p in prompts)
    if total > front.limits.max_score_tokens:
        raise HttpError(400, f"prompt: {total} prompt tokens to echo exceed the limit of "
                        f"max_score_tokens={front.limits.max_score_tokens}", "prompt")  # fmt: skip
    items = [(p[:1], p[1:]) for p in prompts if len(p) > 1]
    try:
        out = front.orch.score(items) if items else None
    except QueueFullError as e:
        raise HttpError(429, str(e)) from None
    except ShuttingDownError as e:
        raise HttpError(503, str(e)) from None
    except UserError as e:
        raise HttpError(400, f"prompt: {e}", "prompt") from None
    except Exception as e:  # the engine thread died (orchestrator.error)
        raise HttpError(500, f"engine failed: {type(e).__name__}") from None
    echoes, k = [], 0
    for req, prompt in zip(parsed.requests, prompts, strict=True):
        # The prompt as the model saw it: the request's own text, unless truncate_prompt_tokens cut its beginning.
        whole = req.WhichOneof("input") == "text" and not req.truncate_prompt_tokens
        text = req.text if whole else front.model.tokenizer.decode(prompt)
        if len(prompt) > 1:
            lps, best, best_lps = out.token_logprobs[k], out.best_ids[k], out.best_logprobs[k]
            k += 1
            echoes.append(Echo(prompt, text, [None, *map(float, lps)],
                               [None, *zip(map(int, best), map(float, best_lps), strict=True)]))  # fmt: skip
        else:
            echoes.append(Echo(prompt, text, [None], [None]))
    return echoes


def tokenize(front: HttpFront, body) -> dict:
    """POST /tokenize: a prompt's ids as a completion would see them (BOS included), or a conversation's through
    the chat template; with the count and the context limit, so a client can budget max_tokens."""
    try:
        what, tools_json, kwargs_json = parse_tokenize(body, front.model_name)
        if isinstance(what, str):
            ids = front.parser.ids("prompt", front.model.encode_prompt(front.parser.text("prompt", what)))
        else:
            ids = front.parser.chat(what, tools_json, template_kwargs_json=kwargs_json)
    except ModelNotFound as e:
        raise HttpError(404, str(e), "model") from None
    except RequestError as e:
        raise HttpError(400, str(e), param_of(str(e))) from None
    return {"tokens": ids, "count": len(ids), "max_model_len": front.limits.max_context}


def detokenize(front: HttpFront, body) -> dict:
    """POST /detokenize: token ids -> text (every id checked against the vocabulary)."""
    try:
        ids = front.parser.ids("tokens", parse_detokenize(body, front.model_name))
    except ModelNotFound as e:
        raise HttpError(404, str(e), "model") from None
    except RequestError as e:
        raise HttpError(400, str(e), param_of(str(e))) from None
    return {"prompt": front.model.tokenizer.decode(ids)}


def parse_tokenize(body, served_model: str) -> tuple[str | list[pb.ChatMessage], str, str]:
    """POST /tokenize's body (vLLM's): {"prompt": text} or {"messages": [...], "tools"?: [...],
    "chat_template_kwargs"?: {...}, "add_generation_prompt"?, "continue_final_message"?} (through the chat
    template) -> (the text or the messages to encode, the tools as JSON text or "", the template variables as JSON
    text or ""). Raises RequestError naming the field. Tools are rendered whether or not the server parses tool
    calls: this only counts the prompt."""
    _check_fields(body, "/tokenize", {"model", "prompt", "messages", *_CHAT_ONLY}, served_model)
    b = Body(body)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise RequestError("prompt: give a prompt (text) or messages, one of them")
    if body.get("prompt") is not None:
        for key in _CHAT_ONLY:
            if body.get(key) is not None:
                raise RequestError(f"{key}: only messages take {key}")
        return b.string("prompt"), "", ""
    tools = check_tools(body["tools"]) if body.get("tools") is not None else None
    messages = chat_messages(b)
    return messages, tools_json(tools), chat_template_json(b, messages)


_CHAT_ONLY = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")


def parse_detokenize(body, served_model: str) -> list[int]:
    """POST /detokenize's body (vLLM's): {"tokens": [ids]} -> the ids. Raises RequestError naming the field."""
    _check_fields(body, "/detokenize", {"model", "tokens"}, served_model)
    tokens = Body(body).array("tokens")
    if tokens is None:
        raise RequestError("tokens: missing (a list of token ids)")
    return ints(tokens, "tokens")


def _check_fields(body, path: str, fields: set[str], served_model: str) -> None:
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {type(body).__name__}")
    check_text(body)
    for key in body:
        if key not in fields:
            raise RequestError(f"{key}: unknown field ({path} takes {', '.join(sorted(fields))})")
    model = Body(body).string("model")
    if model and model != served_model:
        raise ModelNotFound(f"model: {model!r} is not served here (this server serves {served_model!r})")
