"""Speculative decoding by prompt lookup (n-gram drafting): no draft model, drafts come from the request's own text.

Text that repeats (code being edited, a document being quoted or summarized, a chat that restates the question)
often continues the way it did before: when the last n tokens of a request (n = max_ngram down to 1) occurred
earlier in its prompt or output, the tokens that followed that occurrence are proposed as its next k tokens. The
engine's verify step (serving/engine_steps.py `verify_rows`) runs the row's last token and its drafts in one pass
and keeps the drafts the model itself would have produced, plus one token of its own: a step yields 1 to k + 1
tokens for about the cost of one decode step while decoding is bound by loading the weights (small batches).

Exact, greedy or sampled: the verify step samples every position with the row's own sampler and the key plain
decoding would use for that token (its seed folded with the token's index) and keeps a draft only where it equals
the token sampled there, so the output equals plain decoding's token for token, seeded samples included (up to float
rounding between the verify and the decode step, as between any two buckets). A draft is kept with probability
p(draft) under the row's sampling, so drafts pay most for greedy and low-temperature rows. Rows with penalties
(repetition, presence, frequency: they read the history of tokens, which the drafts would change mid-step) or
top_logprobs do not draft; they ride along in the same step and get exactly a decode step's token.

Drafts that are mostly refused cost more than they save (a verify step costs more than a decode step, and the
engine loop gives up a step of pipelining to speculate), e.g. sampled rows at temperature 0.7: a row whose average
of kept drafts per verify step falls below MIN_KEPT pauses drafting for PAUSE_TOKENS tokens, then tries again.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from meshserve.model.sampling_params import SamplingParams
from meshserve.serving.detok import StreamDecoder
from meshserve.serving.requests import Request, Update

__all__ = [
    "propose",
    "NgramIndex",
    "may_draft_sampling",
    "NgramSpeculator",
    "speculator_for",
    "push_verified",
    "MIN_KEPT",
    "PAUSE_TOKENS",
]


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


def may_draft_sampling(sampling: SamplingParams) -> bool:
    """Whether a request with this sampling may carry drafts: any temperature, filter, seed, logit bias or
    min_tokens (the verify step samples each position as plain decoding would), but no penalties (the verify step
    samples positions after the first without the token history they read) and no top_logprobs (alternatives are
    computed for the first position only)."""
    s = sampling
    return (
        s.repetition_penalty == 1.0 and s.presence_penalty == 0.0 and s.frequency_penalty == 0.0 and not s.top_logprobs
    )


# A row keeps drafting while an exponential average (weight 1/2 on the newest step) of the drafts it kept per verify
# step stays >= MIN_KEPT, i.e. its steps yield >= 1.5 tokens; the break-even on this CPU is about 1.3 (a verify step
# 1.1-1.4x a decode step, plus the lost pipelining; BUILD.md). A new row starts at 1 (two steps with nothing kept
# pause it); a row back from a pause starts at MIN_KEPT (one step that keeps a draft keeps it going).
MIN_KEPT = 0.5
PAUSE_TOKENS = 32


class NgramIndex:
    """`propose` for a growing token sequence in O(max_ngram) per lookup: the latest earlier occurrence of every
    n-gram (n = 1 .. max_ngram), kept as it grows, instead of a scan of the whole history each step (about 0.3 ms
    for 4k tokens, per row and step, on this CPU)."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # n-gram -> where the tokens that followed its latest occurrence start (tuples of different n never equal)
        self._follow: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens; each one makes the n-grams that end just before it followed (they become proposals)."""
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending here are now followed by `token`
            self.tokens.append(int(token))
            for n in range(1, min(self.max_ngram, end) + 1):
                self._follow[tuple(self.tokens[end - n : end])] = end

    def propose(self, k: int, min_ngram: int = 1) -> list[int]:
        """What `propose(self.tokens, k, self.max_ngram, min_ngram)` returns."""
        L = len(self.tokens)
        for n in range(min(self.max_ngram, L - 1), min_ngram - 1, -1):
            start = self._follow.get(tuple(self.tokens[L - n :]))
            if start is not None:
                return self.tokens[start : start + k]
        return []


@dataclass
class _DraftTrack:
    """One request's drafting: its n-gram index, the average of drafts kept per verify step, and the generated-token
    count below which it does not draft (a pause)."""

    index: NgramIndex
    kept: float = 1.0
    resume_at: int = 0


def speculator_for(plan) -> NgramSpeculator | None:
    """The speculator an EnginePlan asks for (its speculative_* fields), or None when speculation is off."""
    if not plan.speculative_tokens:
        return None
    return NgramSpeculator(plan.speculative_tokens, plan.speculative_ngram, plan.speculative_max_batch)


class NgramSpeculator:
    """Drafts for a decode step's rows: k tokens per row that may draft (fewer near its token limit or the end of
    the context), by `propose` over its prompt and output (each request's NgramIndex)."""

    def __init__(self, k: int, max_ngram: int = 3, max_batch: int = 8):
        if k < 1 or max_ngram < 1:
            raise ValueError(f"speculative tokens and n-gram size must be >= 1, got {k}, {max_ngram}")
        self.k, self.max_ngram, self.max_batch = k, max_ngram, max_batch
        self.proposed = 0  # draft tokens sent to verify steps
        self.accepted = 0  # of those, tokens the model agreed with
        self.paused = 0  # times a row's drafts were paused for being mostly refused
        # Per request, dropped with the request (a cancelled or finished one is not recorded again).
        self._tracks: weakref.WeakKeyDictionary[Request, _DraftTrack] = weakref.WeakKeyDictionary()

    def _room(self, r: Request | None, max_context: int) -> int:
        """Drafts row r may carry: 0 unless it is a running request whose sampling may draft; the verify step keeps at most
        drafts + 1 tokens, so they stay within the request's limit and the cache."""
        if r is None or r.finished or not may_draft_sampling(r.sampling):
            return 0
        track = self._tracks.get(r)
        if track is not None and len(r.tokens) < track.resume_at:
            return 0  # paused: its recent drafts were mostly refused
        return min(self.k, r.max_new_tokens - len(r.tokens) - 1, max_context - len(r.prompt) - len(r.tokens))

    def _track(self, r: Request) -> _DraftTrack:
        """r's drafting record, its index brought up to the request's prompt and tokens so far."""
        track = self._tracks.get(r)
        if track is None:
            track = self._tracks[r] = _DraftTrack(NgramIndex(self.max_ngram))
        index, P = track.index, len(r.prompt)
        have = len(index.tokens)
        if have > P + len(r.tokens):  # tokens were taken back (a stop string inside a verify step): start over
            index = track.index = NgramIndex(self.max_ngram)
            have = 0
        if have < P:
            index.extend(r.prompt[have:])
            have = P
        index.extend(r.tokens[have - P :])
        return track

    def _lookup(self, r: Request | None, max_context: int) -> list[int]:
        """Row r's drafts now: up to its room of the tokens that followed its last n-gram's latest earlier
        occurrence; [] when it may not draft or nothing repeats."""
        room = self._room(r, max_context)
        return self._track(r).index.propose(room) if room > 0 else []

    def may_draft(self, ticket: tuple[int, tuple[Request | None, ...]], max_context: int) -> bool:
        """Whether some row of the ticket has drafts now, so a step in flight is worth finishing first and `drafts`
        worth calling; when none has, decoding stays pipelined. While a step is in flight a row's tokens lag it by
        one: a repeat found there usually still holds once its token is in (when not, one step runs unpipelined)."""
        b, owners = ticket
        return b <= self.max_batch and any(self._lookup(r, max_context) for r in owners)

    def drafts(self, ticket: tuple[int, tuple[Request | None, ...]], max_context: int) -> np.ndarray | None:
        """int32 [b, k] drafts (-1 = none) for the ticket's rows, or None when no row has one (or the bucket is
        above max_batch): then a plain decode step is the better step."""
        b, owners = ticket
        if b > self.max_batch:
            return None
        out = np.full((b, self.k), -1, np.int32)
        found = False
        for i, r in enumerate(owners):
            draft = self._lookup(r, max_context)
            if draft:
                out[i, : len(draft)] = draft
                found = True
        return out if found else None

    def record(
        self, ticket: tuple[int, tuple[Request | None, ...]], drafts: np.ndarray, counts: np.ndarray, updates: Sequence
    ) -> tuple[int, int]:
        """Count a verify step's drafts int32 [b, k] and the ones its requests kept (an update's tokens but the last,
        the model's own; tokens past a request's end are not in its update), and pause the rows whose drafts are
        mostly refused (counts int32 [b]: tokens each row's step yielded). Returns (proposed, accepted)."""
        proposed = int((drafts >= 0).sum())
        accepted = sum(max(len(u.tokens) - 1, 0) for u in updates)
        self.proposed += proposed
        self.accepted += accepted
        for i, r in enumerate(ticket[1]):
            if r is None or r.finished or not (drafts[i] >= 0).any():
                continue
            track = self._track(r)
            track.kept = (track.kept + int(counts[i]) - 1) / 2
            if track.kept < MIN_KEPT:
                track.kept, track.resume_at = MIN_KEPT, len(r.tokens) + PAUSE_TOKENS
                self.paused += 1
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
