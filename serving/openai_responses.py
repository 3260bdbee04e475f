"""OpenAI response objects from engine events: text_completion and chat.completion, whole or as stream chunks.

One `Choices` per HTTP request gathers every sample's tokens, log-probs and finish reason as the engine's events
arrive (choice index = prompt index x n + sample index) and gives each event's piece of a stream chunk. Token
strings in log-probs are each token decoded alone (a piece of a multi-byte character shows as U+FFFD), as gRPC's
top_logprobs texts are. A chat with tools (serve --tool-call-parser) parses each choice's text for tool calls
(serving/openai_tools.py): the whole answer's message gets `tool_calls` and the text outside them as content; a
stream sends each call as it is generated (serving/tool_call_stream.py: a delta opening call k with its id and name,
then its arguments' JSON in fragments; a block that is not name-first whole once it closes), in each event's chunk
with the content outside the blocks. finish_reason is "tool_calls" when a choice that stopped by itself made a call.
With a reasoning parser (serve --reasoning-parser; serving/reasoning.py) a chat's <think> block goes to the
message's (or delta's) `reasoning_content`, as vLLM's, and only the answer after it is content and read for calls.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from http import HTTPStatus

from meshserve.serving.detok import alternatives_with_text
from meshserve.serving.openai_protocol import CHAT, HttpError, OpenAIRequest
from meshserve.serving.openai_tools import call_deltas, finish_reason, openai_calls, parse_calls
from meshserve.serving.reasoning import ChatOptions
from meshserve.serving.requests import Event, Request

__all__ = ["Choices", "Echo", "Unsent", "chunk", "error_body", "final_response"]


@dataclass(frozen=True)
class Echo:
    """A prompt as completions' echo returns it: its ids and text, and per token its log-prob and most likely
    (id, log-prob), None for the first token (nothing predicts it)."""

    ids: list[int]
    text: str
    logprobs: list[float | None]
    best: list[tuple[int, float] | None]


@dataclass
class Unsent:
    """A sample that is not generated (echo with max_tokens 0): its request, no text, finished by length."""

    request: Request
    text: str = ""


class Choices:
    """Every choice of one request: what the engine generated so far and how each ended."""

    def __init__(self, tokenizer, parsed: OpenAIRequest, handles: list, echo: list[Echo] | None = None,
                 chat: ChatOptions | None = None):  # fmt: skip
        """chat: the server's reasoning parser (a chat's reasoning_content); None: off."""
        self.tokenizer, self.parsed, self.handles, self.echo = tokenizer, parsed, handles, echo
        self.chat = chat if chat is not None and chat.reasoning_parser and parsed.kind == CHAT else None
        self._split = None if self.chat is None else [self.chat.splitter(h.request) for h in handles]
        prefix = "chatcmpl-" if parsed.kind == CHAT else "cmpl-"
        self.id = prefix + secrets.token_hex(12)
        self.created = int(time.time())
        n = len(handles)
        self.reasons: list[str | None] = ["length" if isinstance(h, Unsent) else None for h in handles]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.top: list[list] = [[] for _ in range(n)]
        self._offsets = [0] * n  # completions' text_offset: characters of token text so far, per choice
        self.tools = parsed.tools  # None: the text is the content, as is
        self._held = [call_deltas(self.tools.parser, self.tools.parallel) for _ in range(n)] if self.tools else None

    def add(self, index: int, event: Event) -> dict | None:
        """Record one event of choice `index`; returns its stream piece (None when it carries nothing to send)."""
        self.tokens[index] += event.tokens
        self.logprobs[index] += event.logprobs
        self.top[index] += event.top_logprobs
        reason = self.reasons[index] = event.finish_reason
        logprobs = self._logprobs(index, event.tokens, event.logprobs, event.top_logprobs)
        if not (event.text or reason is not None or (logprobs and event.tokens)):
            return None
        finish = None if reason is None else _finish(reason)
        if self.parsed.kind == CHAT:
            text, calls, reasoning = event.text, [], ""
            if self._split is not None:  # the <think> block's text, then the answer (read for tool calls)
                reasoning, text = self._split[index].feed(text, last=reason is not None)
            if self._held is not None:  # tool calls: the content outside blocks and the calls' deltas, in order
                stream = self._held[index]
                items = stream.feed(text) + (stream.finish() if reason is not None else [])
                text = "".join(item for item in items if isinstance(item, str))
                calls = _merged([item for item in items if isinstance(item, dict)])
                if reason is not None:
                    finish = finish_reason(finish, stream.complete)  # not for a call broken after it opened
            delta = {"reasoning_content": reasoning} if reasoning else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            if not (delta or reason is not None or (logprobs and event.tokens)):
                return None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": finish}

    def _keep(self, calls: list) -> list:
        """parallel_tool_calls false: only the first call."""
        return calls if self.tools is None or self.tools.parallel else calls[:1]

    def role_delta(self, index: int) -> dict:
        """A chat stream's first piece of each choice: the assistant's role, no content yet."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def whole(self) -> list[dict]:
        """Every choice, complete (non-streamed answer)."""
        self._offsets = [0] * len(self.handles)
        out = []
        for i, handle in enumerate(self.handles):
            logprobs = self._logprobs(i, self.tokens[i], self.logprobs[i], self.top[i])
            finish = _finish(self.reasons[i])
            if self.parsed.kind == CHAT:
                text, reasoning = handle.text, {}
                if self.chat is not None:  # vLLM's field: null when the output has no <think> block
                    split = self.chat.splitter(handle.request)
                    thought, text = split.feed(text, last=True)
                    # as the stream, which sends no empty piece: an empty block is no reasoning
                    reasoning = {"reasoning_content": thought if split.reasoned and thought else None}
                message = {"role": "assistant", "content": text, **reasoning}
                if self.tools is not None:
                    content, calls = parse_calls(text, self.tools.parser)
                    if calls := self._keep(calls):
                        message = {"role": "assistant", "content": content, **reasoning,
                                   "tool_calls": openai_calls(calls)}  # fmt: skip
                        finish = finish_reason(finish, calls)
                out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            elif self.echo is not None:
                echo = self.echo[i // self.parsed.n]
                logprobs = self._echo_logprobs(echo, logprobs)
                out.append({"index": i, "text": echo.text + handle.text, "logprobs": logprobs, "finish_reason": finish})
            else:
                out.append({"index": i, "text": handle.text, "logprobs": logprobs, "finish_reason": finish})
        return out

    def _echo_logprobs(self, echo: Echo, generated: dict | None) -> dict | None:
        """The prompt's tokens, log-probs and alternatives (logprobs = 1: the most likely token) before the
        generated ones; text offsets run over both."""
        if generated is None:
            return None
        texts = [self.tokenizer.decode([t]) for t in echo.ids]
        tops = None
        if self.parsed.top_logprobs:
            tops = [None if b is None else {self.tokenizer.decode([b[0]]): b[1]} for b in echo.best]
            tops += generated["top_logprobs"]
        ends = list(itertools.accumulate(len(t) for t in texts))
        offsets, shift = [0, *ends[:-1]], ends[-1]
        return {"tokens": texts + generated["tokens"], "token_logprobs": echo.logprobs + generated["token_logprobs"],
                "top_logprobs": tops, "text_offset": offsets + [shift + o for o in generated["text_offset"]]}  # fmt: skip

    def usage(self) -> dict:
        """Each prompt once (its first sample's), every sample's generated and prefix-cache-reused tokens."""
        prompts = sum(len(h.request.prompt) for h in self.handles[:: self.parsed.n])
        generated = sum(len(h.request.tokens) for h in self.handles)
        cached = sum(h.request.cached_tokens for h in self.handles)
        return {"prompt_tokens": prompts, "completion_tokens": generated, "total_tokens": prompts + generated,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    def usage_so_far(self) -> dict:
        """A stream chunk's usage with continuous_usage_stats (vLLM's): the prompts and the tokens of the events
        received so far (what the chunks up to this one carry, not what the engine has generated by now)."""
        prompts = sum(len(h.request.prompt) for h in self.handles[:: self.parsed.n])
        generated = sum(len(tokens) for tokens in self.tokens)
        return {"prompt_tokens": prompts, "completion_tokens": generated, "total_tokens": prompts + generated}

    def _logprobs(self, index: int, tokens, logprobs, top) -> dict | None:
        if not self.parsed.logprobs:
            return None
        texts = [self.tokenizer.decode([t]) for t in tokens]
        # Per token: its alternatives as (id, text, log-prob), each decoded alone; [] when none were asked for.
        rows = alternatives_with_text(self.tokenizer, top) if self.parsed.top_logprobs else [[] for _ in tokens]
        if self.parsed.kind == CHAT:
            return {"content": [{**_chat_logprob(text, lp), "top_logprobs": [_chat_logprob(s, a) for _, s, a in alts]}
                                for text, lp, alts in zip(texts, logprobs, rows, strict=True)]}  # fmt: skip
        offsets = []
        for text in texts:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        tops = [{s: a for _, s, a in alts} for alts in rows] if self.parsed.top_logprobs else None
        return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def _merged(deltas: list[dict]) -> list[dict]:
    """One event's call deltas with a call's consecutive ones joined (its opening and fragments: arguments
    concatenated), so a chunk names each call once, as a client accumulating them by index expects."""
    out: list[dict] = []
    for delta in deltas:
        if out and out[-1]["index"] == delta["index"]:
            out[-1]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            out.append(delta)
    return out


def _chat_logprob(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _finish(reason: str | None) -> str | None:
    """meshserve's finish reasons are OpenAI's (stop: a stop token or string, length); cancelled -> vLLM's abort."""
    return {"cancelled": "abort"}.get(reason, reason)  # type: ignore[arg-type]


def _object(out: Choices, streamed: bool) -> str:
    if out.parsed.kind == CHAT:
        return "chat.completion.chunk" if streamed else "chat.completion"
    return "text_completion"


def chunk(out: Choices, model: str, pieces: list[dict], usage: bool = False) -> dict:
    """One stream chunk: these choice pieces, or (usage=True) no choices and the request's usage."""
    body = {"id": out.id, "object": _object(out, True), "created": out.created, "model": model, "choices": pieces}
    if usage:
        body["usage"] = out.usage()
    elif out.parsed.continuous_usage:  # vLLM's continuous_usage_stats: the usage so far on every chunk
        body["usage"] = out.usage_so_far()
    elif out.parsed.include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def final_response(out: Choices, model: str) -> dict:
    """The whole answer of a request that did not stream."""
    return {"id": out.id, "object": _object(out, False), "created": out.created, "model": model,
            "choices": out.whole(), "usage": out.usage()}  # fmt: skip


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}  # fmt: skip


def error_body(error: HttpError) -> dict:
    """OpenAI's error object for an answer other than 200."""
    kind = _ERROR_TYPES.get(error.status, HTTPStatus(error.status).phrase)
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.status}}
