"""Speculative decoding by prompt lookup (n-gram drafting): no draft model, drafts come from the request's own text.

Text that repeats (code being edited, a document being quoted or summarized, a chat that restates the question)
often continues the way it did before: when the last n tokens of a request (n = max_ngram down to 1) occurred
earlier in its prompt or output, the tokens that followed that occurrence are proposed as its next k tokens. The
engine's verify step (serving/engine_steps.py `verify_rows`) runs the row's last token and its drafts in one pass
and keeps the drafts the model itself would have produced, plus one token of its own: a step yields 1 to k + 1
tokens for about the cost of one decode step while decoding is bound by loading the weights (small batches).

Exact: only rows whose sampling is plain greedy draft (temperature 0; no penalties, logit bias, min_tokens or
top_logprobs), and for them every kept token is the model's argmax given the tokens before it, so the output equals
plain greedy decoding (up to float rounding between the verify and the decode step, as between any two buckets).
Other rows ride along in the same step with no drafts and get exactly a decode step's token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from meshserve.model.sampling_params import SamplingParams
from meshserve.serving.detok import StreamDecoder
from meshserve.serving.requests import Request, Update

__all__ = ["propose", "plain_greedy", "NgramSpeculator", "speculator_for", "push_verified"]


def propose(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n tokens, for the largest n in
    [min_ngram, max_ngram] that occurred before; [] when none did."""
    h = np.asarray(history, np.int64)
    L = len(h)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        # Windows starting at 0 .. L-n-1: every n-gram but the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        hits = np.flatnonzero((windows == h[L - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: the nearest context
            return h[start : start + k].tolist()
    return []


def plain_greedy(sampling: SamplingParams) -> bool:
    """Whether every token of this sampling is the argmax of the raw logits (the rows that may carry drafts)."""
    s = sampling
    return (
        s.temperature <= 0
        and s.repetition_penalty == 1.0
        and s.presence_penalty == 0.0
        and s.frequency_penalty == 0.0
        and not s.logit_bias
        and not s.min_tokens
        and not s.top_logprobs
    )


def speculator_for(plan) -> NgramSpeculator | None:
    """The speculator an EnginePlan asks for (its speculative_* fields), or None when speculation is off."""
    if not plan.speculative_tokens:
        return None
    return NgramSpeculator(plan.speculative_tokens, plan.speculative_ngram, plan.speculative_max_batch)


class NgramSpeculator:
    """Drafts for a decode step's rows: k tokens per plain-greedy row (fewer near its token limit or the end of
    the context), by `propose` over its prompt and output."""

    def __init__(self, k: int, max_ngram: int = 3, max_batch: int = 8):
        if k < 1 or max_ngram < 1:
            raise ValueError(f"speculative tokens and n-gram size must be >= 1, got {k}, {max_ngram}")
        self.k, self.max_ngram, self.max_batch = k, max_ngram, max_batch
        self.proposed = 0  # draft tokens sent to verify steps
        self.accepted = 0  # of those, tokens the model agreed with

    def _room(self, r: Request | None, max_context: int) -> int:
        """Drafts row r may carry: 0 unless it is a running plain-greedy request; the verify step keeps at most
        drafts + 1 tokens, so they stay within the request's limit and the cache."""
        if r is None or r.finished or not plain_greedy(r.sampling):
            return 0
        return min(self.k, r.max_new_tokens - len(r.tokens) - 1, max_context - len(r.prompt) - len(r.tokens))

    def may_draft(self, ticket: tuple[int, tuple[Request | None, ...]], max_context: int) -> bool:
        """Whether some row of the ticket could carry drafts (cheap: no lookup), so a step in flight is worth
        finishing first and `drafts` worth calling; when none could, decoding stays pipelined."""
        b, owners = ticket
        return b <= self.max_batch and any(self._room(r, max_context) > 0 for r in owners)

    def drafts(self, ticket: tuple[int, tuple[Request | None, ...]], max_context: int) -> np.ndarray | None:
        """int32 [b, k] drafts (-1 = none) for the ticket's rows, or None when no row has one (or the bucket is
        above max_batch): then a plain decode step is the better step."""
        b, owners = ticket
        if b > self.max_batch:
            return None
        out = np.full((b, self.k), -1, np.int32)
        found = False
        for i, r in enumerate(owners):
            room = self._room(r, max_context)
            if room <= 0:
                continue
            draft = propose([*r.prompt, *r.tokens], room, self.max_ngram)
            if draft:
                out[i, : len(draft)] = draft
                found = True
        return out if found else None

    def record(self, drafts: np.ndarray, updates: Sequence) -> tuple[int, int]:
        """Count a verify step's drafts and the ones its requests kept (an update's tokens but the last, the model's
        own; tokens past a request's end are not in its update); returns (proposed, accepted) of this step."""
        proposed = int((drafts >= 0).sum())
        accepted = sum(max(len(u.tokens) - 1, 0) for u in updates)
        self.proposed += proposed
        self.accepted += accepted
        return proposed, accepted


def push_verified(decoder: StreamDecoder, u: Update, lock: threading.Lock) -> tuple[str, bool, Update]:
    """Detokenize a verify step's update of several tokens one at a time, as plain decoding's updates would come:
    (settled text, whether a stop string ended the request, the update). The tokens after the one that completed a
    stop string are dropped from the update and from the request (its lists are the scheduler's: under `lock`)."""
    text, hit, used = "", False, 0
    for token in u.tokens:
        piece, hit = decoder.push((token,))
        text, used = text + piece, used + 1
        if hit:
            break
    drop = len(u.tokens) - used
    if drop:
        r = u.request
        with lock:
            del r.tokens[-drop:], r.logprobs[-drop:]
            if u.top_logprobs:
                del r.top_logprobs[-min(drop, len(u.top_logprobs)) :]
        u = Update(r, u.tokens[:used], u.logprobs[:used], u.finish_reason, u.top_logprobs[:used])
    return text, hit, u
