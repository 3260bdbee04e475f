"""Prefix caching: a new request reuses the keys and values of a prompt prefix some decode slot already holds.

Chat traffic repeats itself: every turn of a conversation resends the whole history, and many requests open with
the same system prompt or few-shot examples. The engine's KV cache keeps each slot's rows after its request ends
(until another request takes the slot), so the scheduler can look up, for each queued prompt, the slot whose cached
tokens share the longest prefix with it, and the engine then prefills only the rest ("extend": the new tokens attend
over the cached prefix, which is copied into the request's own slot in the same step).

`PrefixIndex` is the host's record of which tokens each slot holds; pure Python and numpy, owned by the scheduler.
What a slot holds:
- while its request runs: the prompt (decode steps in flight write later positions only);
- after it ends: the prompt and every generated token but the last, whose keys no step wrote. Decode steps that
  still run over a free slot write at its length and beyond, never below, except that a full row keeps rewriting
  position S - 1, so at most S - 1 tokens are ever recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PrefixReuse", "PrefixIndex", "ExtendSteps", "wait_for"]


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two id arrays have in common."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


@dataclass(frozen=True)
class ExtendSteps:
    """The extend steps the engine compiled, as the scheduler needs them: the largest length bucket T they take (the
    largest prompt bucket is left out: no reuse or chunk can need it), the context bucket C read for a prefix of n
    tokens, and the chunk length of chunked prefill (0 = off)."""

    max_length: int
    context_bucket: Callable[[int], int]
    chunk: int = 0


@dataclass(frozen=True)
class PrefixReuse:
    """How a prefill batch reuses cached prefixes: request i's first lengths[i] prompt tokens are in decode cache row
    sources[i] (0 = nothing reused: the row is prefilled whole); the step reads cache positions [0, context)."""

    sources: tuple[int, ...]
    lengths: tuple[int, ...]
    context: int


def wait_for(prompt: Sequence[int], cached: int, batch: Sequence[Sequence[int]], cost: Callable[[int], int]) -> bool:
    """Whether `prompt` (with `cached` tokens in the cache) shares more with a prompt a prefill step is about to
    compute (`batch`, each cut to what the step covers) than the cache holds, enough that it would compute less
    (cost: bucketed tokens to prefill n prompt tokens) by waiting a step and reusing that prompt. So a burst of
    requests with one system prompt or few-shot prefix prefills it once, not once per request of the first batch."""
    want = np.asarray(prompt[:-1], np.int64)
    shared = max((shared_prefix(np.asarray(p, np.int64), want) for p in batch), default=0)
    return shared > cached and cost(len(prompt) - shared) < cost(len(prompt) - cached)


class PrefixIndex:
    """Which tokens' keys and values each of `max_batch` decode slots holds (see the module docstring)."""

    def __init__(self, max_batch: int, max_context: int, cheap_batch: int = 1) -> None:
        """cheap_batch: slots below it may take a new request even when the live ones need a smaller decode bucket
        (EnginePlan.cheap_decode_batch: the cost model predicts that wider step at about the same time)."""
        self.cheap_batch = cheap_batch
        self.max_tokens = max_context - 1
        self._held: list[np.ndarray] = [np.zeros((0,), np.int64) for _ in range(max_batch)]
        self._used = [-1] * max_batch  # when each slot's cache was last written or read as a prefix (-1 = never)
        self._clock = 0

    def touch(self, slot: int) -> None:
        """Slot `slot`'s cache was just used (written, or read as a prefix): it is the last to be overwritten."""
        self._clock += 1
        self._used[slot] = self._clock

    def place(self, wants: Sequence[tuple[int, int]], free: Sequence[int]) -> list[int]:
        """One of the `free` slots (at least len(wants)) for each new request, given as (source slot, reused prefix
        length): its own source slot when that is free (the prefix is extended in place), else an empty slot, else
        the least recently used, sparing slots a request of this batch reads while others are left (ties: lowest).
        So the histories other conversations may come back to are overwritten last."""
        pool = list(free)
        chosen: list[int | None] = [None] * len(wants)
        for i, (source, start) in enumerate(wants):
            if start and source in pool:
                chosen[i] = source
                pool.remove(source)
        reading = {source for source, start in wants if start}
        for i in range(len(wants)):
            if chosen[i] is None:
                chosen[i] = min(pool, key=lambda s: (s in reading, self._used[s], s))
                pool.remove(chosen[i])
        return chosen

    def held(self, slot: int) -> np.ndarray:
        """The token ids whose keys and values slot `slot` holds at positions [0, n)."""
        return self._held[slot]

    def record(self, slot: int, tokens: Sequence[int]) -> None:
        """Slot `slot` now holds these tokens' keys and values (cut to S - 1)."""
        self._held[slot] = np.asarray(tokens[: self.max_tokens], np.int64)
        self.touch(slot)

    def reusable(self, prompt: Sequence[int], cost: Callable[[int], int]) -> tuple[int, int]:
        """`longest`, when reusing it is worth it: fewer bucketed tokens to prefill (cost of n prompt tokens; within
        one length bucket a whole prefill costs the same); else (0, 0)."""
        slot, n = self.longest(prompt)
        return (slot, n) if n and cost(len(prompt) - n) < cost(len(prompt)) else (0, 0)

    def longest(self, prompt: Sequence[int]) -> tuple[int, int]:
        """(slot, n): the slot holding the longest prefix of `prompt` and its length, at most len(prompt) - 1 (the
        last prompt token is always computed: its logits give the first new token); (0, 0) when none matches.
        Ties go to the lowest slot."""
        want = np.asarray(prompt, np.int64)[: len(prompt) - 1]
        best_slot, best = 0, 0
        for slot, held in enumerate(self._held):
            if min(len(held), len(want)) > best and (shared := shared_prefix(held, want)) > best:
                best_slot, best = slot, shared
        return best_slot, best
