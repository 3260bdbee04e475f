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

A verify step costs more than a decode step (by little while a step is bound by reading the weights, by up to
k + 1 times once it is bound by compute), and the engine loop gives up a step of pipelining to speculate. So the
speculator times both kinds of step per batch bucket as the server runs them (StepCosts: the median of the recent
ones) and verifies only when the drafts are expected to pay: sum over the drafting rows of their expected kept
tokens (an average of what each row kept per verify step, drifting back to one kept token over RECOVER_TOKENS
tokens, so a row whose text turns repetitive later is tried again) > live rows x (verify time / decode time - 1).
A bucket's first steps decode plainly (the decode time is measured first), then one verify step measures its cost.
"""

from __future__ import annotations

import statistics
import threading
import weakref
from collections import deque
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
    "StepCosts",
    "KEPT_PRIOR",
    "RECOVER_TOKENS",
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


# A row's expected kept drafts per verify step: an average (weight 1/2 on the newest step) of what it kept, which
# drifts back to KEPT_PRIOR over RECOVER_TOKENS generated tokens without a verify step. A new row starts at the prior.
KEPT_PRIOR = 1.0
RECOVER_TOKENS = 256
COST_WINDOW = 16  # step times kept per (kind, bucket) for their median
COST_MIN_SAMPLES = 3  # before as many, a bucket's step time is not known (verify steps run to time it)


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
    """One request's drafting: its n-gram index, the average of drafts kept per verify step, and how many tokens it
    had generated when that average was last updated."""

    index: NgramIndex
    kept: float = KEPT_PRIOR
    at_tokens: int = 0

    def expected(self, tokens: int) -> float:
        """The drafts it is expected to keep in a verify step now that it has generated `tokens`."""
        if self.kept >= KEPT_PRIOR:
            return self.kept
        return min(KEPT_PRIOR, self.kept + (KEPT_PRIOR - self.kept) * (tokens - self.at_tokens) / RECOVER_TOKENS)


class StepCosts:
    """Wall times of the engine's decode and verify steps per batch bucket, as the engine loop saw them: the median
    of the last COST_WINDOW of each (kind, bucket), once COST_MIN_SAMPLES were timed after the first (a compiled
    step's first run can pay one-off costs; one slow sample must not close the gate for good); None before."""

    def __init__(self) -> None:
        self._times: dict[tuple[str, int], deque[float]] = {}
        self._medians: dict[tuple[str, int], float] = {}  # computed when a time comes in, read every step

    def add(self, kind: str, bucket: int, seconds: float) -> None:
        key = (kind, bucket)
        if key not in self._times:  # the first is dropped
            self._times[key] = deque(maxlen=COST_WINDOW)
            return
        times = self._times[key]
        times.append(seconds)
        if len(times) >= COST_MIN_SAMPLES:
            self._medians[key] = statistics.median(times)

    def median(self, kind: str, bucket: int) -> float | None:
        return self._medians.get((kind, bucket))


def speculator_for(plan) -> NgramSpeculator | None:
    """The speculator an EnginePlan asks for (its speculative_* fields), or None when speculation is off."""
    if not plan.speculative_tokens:
        return None
    return NgramSpeculator(plan.speculative_tokens, plan.speculative_ngram, plan.speculative_max_batch)


class NgramSpeculator:
    """Drafts for a decode step's rows: up to k tokens per row that may draft (fewer near its token limit or the end
    of the context), by `propose` over its prompt and output (each request's NgramIndex), when they are expected to
    pay for the verify step (see the module docstring)."""

    def __init__(self, k: int, max_ngram: int = 3, max_batch: int = 8, gate: bool = True):
        """gate=False verifies whenever some row has drafts, whatever the steps cost (tests that must run verify
        steps on any machine)."""
        if k < 1 or max_ngram < 1:
            raise ValueError(f"speculative tokens and n-gram size must be >= 1, got {k}, {max_ngram}")
        self.k, self.max_ngram, self.max_batch, self.gate = k, max_ngram, max_batch, gate
        self.proposed = 0  # draft tokens sent to verify steps
        self.accepted = 0  # of those, tokens the model agreed with
        self.costs = StepCosts()  # the orchestrator reports every decode and verify step's time
        # Per request; `forget` drops one when it finishes (an offline job keeps its finished requests alive).
        self._tracks: weakref.WeakKeyDictionary[Request, _DraftTrack] = weakref.WeakKeyDictionary()

    def _room(self, r: Request | None, max_context: int) -> int:
        """Drafts row r may carry: 0 unless it is a running request whose sampling may draft; the verify step keeps
        at most drafts + 1 tokens, so they stay within the request's limit and the cache."""
        # A guided row's masks follow its tokens one step at a time: it never drafts (position 0 only).
        if r is None or r.finished or r.guide is not None or not may_draft_sampling(r.sampling):
            return 0
        return min(self.k, r.max_new_tokens - len(r.tokens) - 1, max_context - len(r.prompt) - len(r.tokens))

    def _track(self, r: Request) -> _DraftTrack:
        """r's drafting record, its index brought up to the request's prompt and tokens so far."""
        track = self._tracks.get(r)
        if track is None:
            track = self._tracks[r] = _DraftTrack(NgramIndex(self.max_ngram), at_tokens=len(r.tokens))
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

    def forget(self, r: Request) -> None:
        """Drop a finished request's record (its index holds ~300 bytes per token)."""
        self._tracks.pop(r, None)

    def worth_verifying(self, bucket: int, live: int, expected_kept: float) -> bool:
        """Whether a verify step of this bucket, `live` rows running, is expected to yield more tokens per second
        than a decode step: (live + expected_kept) / verify time > live / decode time. A bucket whose decode time is
        not known yet decodes (it is timed first); one whose verify time is not verifies (until it is timed)."""
        if expected_kept <= 0 or bucket > self.max_batch:
            return False
        if not self.gate:
            return True
        decode, verify = self.costs.median("decode", bucket), self.costs.median("verify", bucket)
        if decode is None:
            return False
        return verify is None or expected_kept > live * (verify / decode - 1.0)

    def drafts(self, ticket: tuple[int, tuple[Request | None, ...]], max_context: int) -> np.ndarray | None:
        """int32 [b, k] drafts (-1 = none) for the ticket's rows, or None when a plain decode step is the better
        step: no row has drafts, or they are not expected to pay for a verify step (`worth_verifying`). Called
        while a step is in flight too (the engine loop asks before giving up its pipelining): the rows' tokens then
        lag by one, and a repeat found there usually still holds once its token is in."""
        b, owners = ticket
        if b > self.max_batch:
            return None
        rows = [(i, r, self._room(r, max_context)) for i, r in enumerate(owners) if r is not None and not r.finished]
        # First the most the rows could be expected to keep, from their records alone (no lookup): most steps of
        # rows that keep little end here, at the cost of a few attribute reads.
        tracks = self._tracks
        most = sum(min(t.expected(len(r.tokens)) if (t := tracks.get(r)) else KEPT_PRIOR, room)
                   for _, r, room in rows if room > 0)  # fmt: skip
        if not self.worth_verifying(b, len(rows), most):
            return None
        out = np.full((b, self.k), -1, np.int32)
        expected = 0.0
        for i, r, room in rows:
            if room <= 0:
                continue
            track = self._track(r)
            draft = track.index.propose(room)
            if draft:
                out[i, : len(draft)] = draft
                expected += min(track.expected(len(r.tokens)), len(draft))
        return out if self.worth_verifying(b, len(rows), expected) else None

    def record(
        self, ticket: tuple[int, tuple[Request | None, ...]], drafts: np.ndarray, counts: np.ndarray, updates: Sequence
    ) -> tuple[int, int]:
        """Count a verify step's drafts int32 [b, k] and the ones its requests kept (an update's tokens but the last,
        the model's own; tokens past a request's end are not in its update), and update each drafting row's average
        kept (counts int32 [b]: tokens each row's step yielded). Returns (proposed, accepted)."""
        proposed = int((drafts >= 0).sum())
        accepted = sum(max(len(u.tokens) - 1, 0) for u in updates)
        self.proposed += proposed
        self.accepted += accepted
        for i, r in enumerate(ticket[1]):
            if r is None or r.finished or not (drafts[i] >= 0).any():
                continue
            track = self._track(r)
            track.kept = (track.expected(len(r.tokens)) + int(counts[i]) - 1) / 2
            track.at_tokens = len(r.tokens)
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
