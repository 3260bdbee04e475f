"""OpenAI's Responses API output: the chat's pieces (openai_responses.Choices.add: reasoning_content, content and
tool-call deltas) as Response output items and the stream's events, and the Response object. No HTTP here.

`Items` is fed every piece of the one choice in order, streamed or not, so a whole answer is exactly the streamed
one's last event: a run of reasoning text is a reasoning item (its text as one reasoning_text content part), a run
of content a message item (one output_text part, annotations []), each tool call a function_call item (call_id the
chat call's id, its arguments growing by the deltas). A new kind of piece closes the open item; items in the order
generated. An answer with no item at all gets an empty message (output_text ""), as OpenAI's API answers. A token's
log-prob goes with the output_text delta of the engine event that brought it (a token of reasoning or of a call,
which writes no output_text, has none in the output). Each event carries the shape of openai/types/responses (the
`type` and an increasing `sequence_number`); ids are OpenAI's prefixes with random hex (resp_, rs_, msg_, fc_).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResponseSettings", "Items", "response_object", "usage", "reasoning_tokens"]


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class ResponseSettings:
    """What a Response echoes of its request (the fields Response has), and its id and time."""

    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0  # what the sampler used (OpenAI's defaults: 1 and 1)
    top_p: float = 1.0
    tools: list[dict] = field(default_factory=list)  # as given (the Responses' flat function shape)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict = field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict | None = None
    user: str | None = None
    top_logprobs: int = 0
    id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


def response_object(s: ResponseSettings, status: str, output: list[dict], usage_: dict | None) -> dict:
    """A Response: status "in_progress" (the stream's first events: no output, no usage), "completed" or
    "incomplete" (the length ran out: incomplete_details reason max_output_tokens)."""
    done = status in ("completed", "incomplete")
    return {
        "id": s.id, "object": "response", "created_at": s.created_at, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": s.instructions, "max_output_tokens": s.max_output_tokens, "model": s.model,
        "output": output if done else [], "parallel_tool_calls": s.parallel_tool_calls, "previous_response_id": None,
        "temperature": s.temperature, "top_p": s.top_p, "tool_choice": s.tool_choice, "tools": s.tools,
        "text": s.text, "top_logprobs": s.top_logprobs, "truncation": "disabled", "metadata": s.metadata,
        "user": s.user, "background": False, "usage": usage_ if done else None,
    }  # fmt: skip


def usage(chat_usage: dict, reasoning: int) -> dict:
    """The chat's usage (openai_responses.Choices.usage) as a Response's; `reasoning`: the output's reasoning
    tokens. cache_write_tokens (OpenAI's explicit prompt-cache writes) has no meshserve counterpart: 0."""
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                 "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": chat_usage["total_tokens"],
    }  # fmt: skip


def reasoning_tokens(tokenizer, tokens: list[int], split) -> int:
    """How many of the generated `tokens` are the reasoning block's (up to the token that ends it with "</think>";
    all of them when it never closes): the shortest prefix whose text leaves `split` (a fresh
    reasoning.ReasoningSplit, or None without a reasoning parser) past the block, found by bisection (the state only
    moves forward as the text grows). 0 when the output has no block."""
    if split is None or not tokens:
        return 0

    def closed(k: int) -> bool:
        probe = split()
        probe.feed(tokenizer.decode(tokens[:k]))
        return probe.reasoned and probe.state == "content"

    if not closed(len(tokens)):
        probe = split()
        probe.feed(tokenizer.decode(tokens), last=True)
        return len(tokens) if probe.reasoned else 0
    low, high = 0, len(tokens)  # closed(high) holds, closed(low) does not (no text closes nothing)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if closed(mid) else (mid, high)
    return high


class Items:
    """One response's output items, built from the chat pieces in order; `feed` returns the stream's events for
    each piece (each a dict with its type; `Events` numbers them)."""

    def __init__(self) -> None:
        self.output: list[dict] = []
        self._open: dict | None = None  # the item still growing
        self._calls: dict[int, dict] = {}  # chat call index -> its function_call item

    def feed(self, piece: dict) -> list[dict]:
        """A chat stream piece ({"delta": {reasoning_content?, content?, tool_calls?}, "logprobs"}) -> events."""
        delta, out = piece.get("delta", {}), []
        if delta.get("reasoning_content"):
            out += self._text("reasoning", delta["reasoning_content"], [])
        if delta.get("content"):
            logprobs = (piece.get("logprobs") or {}).get("content") or []
            out += self._text("message", delta["content"], logprobs)
        for call in delta.get("tool_calls") or []:
            out += self._call(call)
        return out

    def finish(self, incomplete: bool) -> list[dict]:
        """The answer ended: close the open item ("incomplete" when the length ran out); an empty message when
        there is no item."""
        out = self._close("incomplete" if incomplete else "completed")
        if not self.output:
            out += self._start_message() + self._close("incomplete" if incomplete else "completed")
        return out

    def _text(self, kind: str, text: str, logprobs: list[dict]) -> list[dict]:
        out = []
        if self._open is None or self._open["type"] != kind:
            out += self._close("completed")
            out += self._start_reasoning() if kind == "reasoning" else self._start_message()
        item = self._open
        part = item["content"][0]
        part["text"] += text
        where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
        if kind == "reasoning":
            return [*out, {"type": "response.reasoning_text.delta", **where, "delta": text}]
        part["logprobs"] += [_logprob(lp) for lp in logprobs]
        return [*out, {"type": "response.output_text.delta", **where, "delta": text, "logprobs": _brief(logprobs)}]

    def _call(self, delta: dict) -> list[dict]:
        out = []
        item = self._calls.get(delta["index"])
        if item is None:  # the call opens (its id and name), or comes whole
            out += self._close("completed")
            function = delta["function"]
            item = {"id": _id("fc"), "type": "function_call", "call_id": delta["id"], "name": function["name"],
                    "arguments": "", "status": "in_progress"}  # fmt: skip
            self._calls[delta["index"]] = item
            out += self._add(item)
        fragment = delta["function"].get("arguments") or ""
        if fragment:
            item["arguments"] += fragment
            out.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                        "output_index": self.output.index(item), "delta": fragment})  # fmt: skip
        return out

    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        self._open = item
        return [{"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": _copy(item)}]

    def _start_reasoning(self) -> list[dict]:
        item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                "text": ""}], "status": "in_progress"}  # fmt: skip
        out = self._add(item)
        return [*out, self._part_event("added", item, {"type": "reasoning_text", "text": ""})]

    def _start_message(self) -> list[dict]:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": [part]}
        out = self._add(item)
        return [*out, self._part_event("added", item, _copy(part))]

    def _part_event(self, what: str, item: dict, part: dict) -> dict:
        return {"type": f"response.content_part.{what}", "item_id": item["id"],
                "output_index": self.output.index(item), "content_index": 0, "part": part}  # fmt: skip

    def _close(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        index, out = self.output.index(item), []
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            out.append({"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                out.append({"type": "response.reasoning_text.done", **where, "content_index": 0, "text": part["text"]})
            else:
                out.append({"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"],
                            "logprobs": _brief(part["logprobs"])})  # fmt: skip
            out.append(self._part_event("done", item, _copy(part)))
        return [*out, {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}]


def _copy(obj: dict) -> dict:
    """A snapshot of an item as it is now (it grows after the event that carries it)."""
    return {k: [_copy(v) if isinstance(v, dict) else v for v in val] if isinstance(val, list) else val
            for k, val in obj.items()}  # fmt: skip


def _brief(logprobs: list[dict]) -> list[dict]:
    """Log-prob entries as the text events carry them (no bytes)."""
    return [{"token": lp["token"], "logprob": lp["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in lp.get("top_logprobs") or []]}
            for lp in logprobs]  # fmt: skip


def _logprob(chat: dict) -> dict:
    """A chat log-prob entry ({token, logprob, bytes, top_logprobs}) as an output_text one (the same keys)."""
    return {"token": chat["token"], "logprob": chat["logprob"], "bytes": chat["bytes"],
            "top_logprobs": [dict(t) for t in chat.get("top_logprobs") or []]}  # fmt: skip
