"""The continuous-batching scheduler as pure state: a bounded queue, decode slots and a prefill token budget.

No threads, no clocks of its own (callers pass `now`), no device: each call turns the current state and its inputs
into a schedule or a list of `Update`s, so it is tested synchronously with a mock engine. The driver loop
(orchestrator.py, offline.py) is, per iteration:

    reap(now)                       -> updates for cancelled / expired requests (their slots are free again)
    next_prefill(now)               -> a PrefillBatch: queued requests, their slots and bucket (and the cached
                                       prompt prefixes they reuse, with prefix caching), or None
    requeue(requests)               -> (only when the engine refused the batch) its good requests go back in front
    record_prefill(batch, tokens)   -> updates (each request's first token)
    ticket = decode_ticket()        -> which request owns each slot of the decode step about to run (or None)
    record_decode(ticket, tokens)   -> updates (one token per live request in the ticket)

Requests take the lowest free slot, so the live ones sit at the front and the decode bucket stays small.
With a PrefixIndex (prefix_cache.py), a request whose prompt starts with tokens some slot holds reuses them: it is
bucketed by the tokens left to compute, and the engine copies the prefix into its slot.
A ticket pins slot owners at dispatch time: the driver may dispatch the next step before it reads this one's
tokens, and a token that arrives for a request that has since finished is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from meshserve.serving.plan import PlanError
from meshserve.serving.prefix_cache import ExtendSteps, PrefixIndex, PrefixReuse, wait_for

# The request types live in serving/requests.py (plain data, no JAX); imported here for the scheduler's callers.
from meshserve.serving.requests import FINISH_REASONS, Alternatives, QueueFullError, Request, Update

__all__ = ["Request", "Update", "PrefillBatch", "Scheduler", "QueueFullError", "FINISH_REASONS", "Alternatives"]


def _alternatives(r: Request, top: tuple[np.ndarray, np.ndarray] | None, row: int) -> Alternatives | None:
    """Row `row` of a step's alternatives [b, K], cut to the request's top_logprobs; None when it asked for none."""
    n = r.sampling.top_logprobs
    if n == 0 or top is None:
        return None
    ids, lps = top
    return tuple(int(t) for t in ids[row, :n]), tuple(float(x) for x in lps[row, :n])


@dataclass(frozen=True)
class PrefillBatch:
    """Requests to prefill together as one [batch, length] bucket, and the slots they go to.

    Request i's step covers its prompt up to ends[i] (the whole prompt, or one chunk of a long one), from
    reuse.lengths[i] on when the batch continues cached or earlier-chunked prefixes (`reuse`; None = all from 0):
    `length` buckets the tokens computed, not the prompts.
    """

    requests: tuple[Request, ...]
    slots: tuple[int, ...]
    batch: int
    length: int
    ends: tuple[int, ...]
    reuse: PrefixReuse | None = None

    @property
    def prompts(self) -> list[list[int]]:
        """What the engine prefills: each prompt up to its end in this step."""
        return [r.prompt[:end] for r, end in zip(self.requests, self.ends, strict=True)]

    @property
    def completed(self) -> list[Request]:
        """The requests whose whole prompt is in the cache after this step (the others have chunks to go)."""
        return [r for r, end in zip(self.requests, self.ends, strict=True) if end == len(r.prompt)]


class Scheduler:
    """Queue -> slots. max_batch slots; at most max_queue requests waiting; prefill buckets from the plan.

    prefix_index: turns on prefix caching. extend: the engine's extend steps, which prefix caching needs; with
    extend.chunk (a length bucket), prompts longer than it are prefilled a chunk per loop iteration, with decode
    steps between, so one long prompt never stalls the running streams for longer than a chunk.
    """

    def __init__(
        self,
        max_batch: int,
        max_queue: int,
        prefill_batches: Sequence[int],
        length_bucket: Callable[[int], int],
        decode_batches: Sequence[int],
        prefill_token_budget: int,
        prefix_index: PrefixIndex | None = None,
        extend: ExtendSteps | None = None,
        max_context: int | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_context = max_context  # prompt + max_new_tokens must fit (None: unchecked, as in unit tests)
        self.max_queue = max_queue
        self.prefill_batches = tuple(sorted(prefill_batches))
        self.length_bucket = length_bucket
        self.decode_batches = tuple(sorted(decode_batches))
        self.prefill_token_budget = prefill_token_budget
        self.queue: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch
        self._held: set[int] = set()  # slots given to a request since they were last reported by take_freed
        if prefix_index is not None and extend is None:
            raise ValueError("prefix caching needs the engine's extend steps")
        self.prefix_index = prefix_index
        self.extend = extend
        self.prefill_chunk = extend.chunk if extend else 0

    @classmethod
    def for_plan(cls, plan, max_queue: int) -> Scheduler:
        """A scheduler over an EnginePlan's buckets, with prefix caching and chunked prefill as the plan has them."""
        index = extend = None
        if plan.prefix_caching and plan.extend_lengths:
            index = PrefixIndex(plan.max_batch, plan.max_context, plan.cheap_decode_batch())
        if plan.extend_lengths:
            extend = ExtendSteps(max(plan.extend_lengths), plan.context_bucket, plan.prefill_chunk)
        return cls(plan.max_batch, max_queue, plan.prefill_batches, plan.length_bucket, plan.decode_batches,
                   plan.prefill_token_budget, index, extend, plan.max_context)  # fmt: skip

    # ----- state -----

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.slots) if r is None]

    def idle(self) -> bool:
        return not self.queue and not self.active

    def take_freed(self) -> list[int]:
        """Slots that held a request since the last call and hold none now (the engine resets their sampling)."""
        freed = sorted(s for s in self._held if self.slots[s] is None)
        self._held.difference_update(freed)
        return freed

    def occupancy(self) -> float:
        return len(self.active) / self.max_batch

    # ----- inputs -----

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFullError when max_queue requests already wait; PlanError (a UserError) for a prompt
        past the largest prefill bucket (at its prefill it stopped the engine thread) or prompt + max_new_tokens past
        max_context (the servicer and the other fronts check both first; direct Python callers meet them here)."""
        self.length_bucket(len(request.prompt))
        if self.max_context is not None and len(request.prompt) + request.max_new_tokens > self.max_context:
            raise PlanError(f"prompt of {len(request.prompt)} tokens + max_new_tokens {request.max_new_tokens} exceed "
                            f"the context limit max_context={self.max_context}")  # fmt: skip
        if len(self.queue) >= self.max_queue:
            raise QueueFullError(f"queue full: {len(self.queue)} requests waiting (max_queue={self.max_queue})")
        self.queue.append(request)

    def cancel(self, request: Request) -> None:
        """Ask for a request to end; it is finished (slot freed) at the next `reap`."""
        request.cancel_requested = True

    def finish(self, request: Request, reason: str, now: float) -> Update | None:
        """End a request from outside (a stop string matched): free its slot now."""
        if request.finished:
            return None
        self._finish(request, reason, now)
        if request in self.queue:
            self.queue.remove(request)
        return Update(request, (), (), reason)

    def _finish(self, request: Request, reason: str, now: float) -> None:
        request.finish_reason = reason
        request.finish_time = now
        if request.slot is not None and self.slots[request.slot] is request:
            self.slots[request.slot] = None
            if self.prefix_index is not None and request.tokens:  # prefilled: the slot keeps its keys and values
                self.prefix_index.record(request.slot, request.prompt + request.tokens[:-1])

    def reap(self, now: float) -> list[Update]:
        """Finish cancelled and past-deadline requests, queued or running; their slots are free afterwards."""
        updates = []
        for r in [*self.queue, *self.active]:
            if r.cancel_requested or (r.deadline is not None and now >= r.deadline):
                self._finish(r, "cancelled", now)
                updates.append(Update(r, (), (), "cancelled"))
        if updates:
            self.queue = deque(r for r in self.queue if not r.finished)
        return updates

    # ----- schedules -----

    def next_prefill(self, now: float) -> PrefillBatch | None:
        """The next prefill step: requests part-way through a chunked prompt first, then queued requests (FIFO) for
        the free slots, within the largest prefill bucket and the token budget."""
        free = self.free_slots
        partial = [r for r in self.slots if r is not None and 0 < r.prefilled < len(r.prompt)]
        cap = self.prefill_batches[-1]
        work: list[tuple[Request, int, int, int]] = []  # (request, source slot, start, end) of each row
        length = 0

        def add(r: Request, source: int, start: int) -> bool:
            nonlocal length
            end = len(r.prompt) if not self.prefill_chunk else min(len(r.prompt), start + self.prefill_chunk)
            new_length = max(length, self.length_bucket(end - start))
            if work and self._batch_bucket(len(work) + 1) * new_length > self.prefill_token_budget:
                return False
            if (start or any(w[2] for w in work)) and new_length > self.extend.max_length:
                return False  # an extend batch with a whole prompt of the largest bucket: left for a plain one
            work.append((r, source, start, end))
            length = new_length
            return True

        for r in partial[:cap]:
            if not add(r, r.slot, r.prefilled):
                break
        queued, cost = 0, self._prefill_cost
        for r in self.queue:
            if len(work) == cap or queued == len(free):
                break
            source, start = (0, 0) if self.prefix_index is None else self.prefix_index.reusable(r.prompt, cost)
            if self.prefix_index is not None and wait_for(r.prompt, start, [w[0].prompt[: w[3]] for w in work], cost):
                continue  # it shares more with a prompt of this step than the cache holds: a later step reuses that
            if not add(r, source, start):
                break
            queued += 1
        if not work:
            return None
        newcomers = work[len(work) - queued :]  # the queue's head, but for requests waiting to reuse a batch-mate's
        admitted = {id(r) for r, _, _, _ in newcomers}
        self.queue = deque(r for r in self.queue if id(r) not in admitted)
        slots = self._free_slots_for([(source, start) for _, source, start, _ in newcomers], free)
        for (r, source, start, _), s in zip(newcomers, slots, strict=True):
            r.slot, r.prefill_start = s, now
            own = max(0, min(start, r.computed[1]) - r.computed[0])  # its own chunks, before a requeue
            r.cached_tokens = start - own  # from the prefix cache (a chunk continuation's start is its own work)
            self.slots[s] = r
            self._held.add(s)
            if start:
                self.prefix_index.touch(source)
        reuse = None
        if any(start for _, _, start, _ in work):
            reuse = PrefixReuse(
                sources=tuple(source if start else r.slot for r, source, start, _ in work),
                lengths=tuple(start for _, _, start, _ in work),
                context=self.extend.context_bucket(max(start for _, _, start, _ in work)),
            )
        requests = tuple(r for r, _, _, _ in work)
        ends = tuple(end for _, _, _, end in work)
        return PrefillBatch(
            requests, tuple(r.slot for r in requests), self._batch_bucket(len(work)), length, ends, reuse
        )

    def _free_slots_for(self, wants: list[tuple[int, int]], free: list[int]) -> list[int]:
        """A free slot for each new request, given as (source slot, reused prefix length): the lowest free slots
        (live requests stay at the front: a small decode bucket); with prefix caching, the index's choice among the
        free slots below the decode bucket these requests need anyway, or below its cheap_batch if that is wider."""
        if self.prefix_index is None:
            return free[: len(wants)]
        occupied = [i for i, r in enumerate(self.slots) if r is not None]
        need, above = len(occupied) + len(wants), occupied[-1] if occupied else -1
        bound = next((b for b in self.decode_batches if b >= need and b > above), self.max_batch)
        bound = max(bound, self.prefix_index.cheap_batch)  # a decode step that wide costs about the same
        return self.prefix_index.place(wants, [s for s in free if s < bound])  # every occupied slot is below bound

    def _prefill_cost(self, n: int) -> int:
        """Bucketed tokens computed to prefill n prompt tokens (whole chunks, then the rest's bucket)."""
        if not self.prefill_chunk:
            return self.length_bucket(n)
        full, rest = divmod(n, self.prefill_chunk)
        return full * self.prefill_chunk + (self.length_bucket(rest) if rest else 0)

    def requeue(self, requests: Sequence[Request]) -> None:
        """Put requests of a prefill batch that never ran back at the front of the queue, in their order.

        Their slots are free again and their prefill start is cleared; their arrival is kept, so the time they
        queued still counts from their submit. Finished ones are dropped. The queue may briefly hold more than
        max_queue: these were admitted already.
        """
        for r in requests:
            if r.slot is not None and self.slots[r.slot] is r:
                self.slots[r.slot] = None  # nothing was written: the slot keeps what the prefix index says
            r.slot = None
            r.prefill_start = None
            if r.prefilled > r.cached_tokens:  # chunks it computed, which the prefix index may hand back to it
                lo, hi = r.computed if r.computed[1] else (r.cached_tokens, 0)
                r.computed = (min(lo, r.cached_tokens), max(hi, r.prefilled))
            r.cached_tokens = 0
            r.prefilled = 0  # a chunked prompt starts over (or from what the prefix index still finds)
        self.queue.extendleft(r for r in reversed(requests) if not r.finished)

    def _batch_bucket(self, n: int) -> int:
        return next(b for b in self.prefill_batches if b >= n)

    def record_prefill(
        self,
        batch: PrefillBatch,
        tokens: Sequence[int],
        logprobs: Sequence[float],
        now: float,
        top: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """The prefill's first token per request whose whole prompt is in -> updates (a request with chunks to go
        gets none yet); top: alternatives' ids and log-probs [b, K]."""
        for r, slot, end in zip(batch.requests, batch.slots, batch.ends, strict=True):
            r.prefilled = end
            if self.prefix_index is not None:
                self.prefix_index.record(slot, r.prompt[:end])  # written by the step, even if since cancelled
        updates = []
        for i, (r, tok, lp, end) in enumerate(zip(batch.requests, tokens, logprobs, batch.ends, strict=True)):
            if r.finished or end < len(r.prompt):
                continue
            r.first_token_time = now
            updates.append(self._accept(r, int(tok), float(lp), now, _alternatives(r, top, i)))
        return updates

    def decode_batch(self) -> int | None:
        """The decode bucket covering every live slot (one whose request has its first token), or None."""
        live = [i for i, r in enumerate(self.slots) if r is not None and r.tokens]
        if not live:
            return None
        return next(b for b in self.decode_batches if b > live[-1])

    def decode_ticket(self) -> tuple[int, tuple[Request | None, ...]] | None:
        """(bucket, owner of each slot in it) for the step about to be dispatched; None when nothing is live."""
        b = self.decode_batch()
        # A slot still being prefilled in chunks is no owner: the step's token for it is not a token of its request.
        return None if b is None else (b, tuple(r if r is not None and r.tokens else None for r in self.slots[:b]))

    def record_decode(
        self,
        ticket: tuple[int, tuple[Request | None, ...]],
        tokens: Sequence[int],
        logprobs: Sequence[float],
        now: float,
        top: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[Update]:
        """One decode step's tokens [b] -> updates for the requests that owned the slots and are still running;
        top: the step's alternatives [b, K] (fetched when some owner asked for them: `wants_top`)."""
        _, owners = ticket
        updates = []
        for i, (r, tok, lp) in enumerate(zip(owners, tokens, logprobs, strict=False)):
            if r is None or r.finished:
                continue  # an empty slot, or a request that ended after this step was dispatched
            updates.append(self._accept(r, int(tok), float(lp), now, _alternatives(r, top, i)))
        return updates

    def record_verify(
        self,
        ticket: tuple[int, tuple[Request | None, ...]],
        tokens: np.ndarray,
        counts: np.ndarray,
        logprobs: np.ndarray,
        now: float,
        top: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[Update]:
        """A verify step's kept tokens (row i: tokens[i, :counts[i]], serving/speculative.py) -> one update per
        running owner, its tokens in order up to the one that ends it (a stop id or its limit: the rest, computed
        past the end, are dropped). top: position 0's alternatives [b, K] (rows that want them never draft)."""
        _, owners = ticket
        updates = []
        for i, r in enumerate(owners):
            if r is None or r.finished:
                continue
            parts = []
            for j in range(int(counts[i])):
                parts.append(self._accept(r, int(tokens[i, j]), float(logprobs[i, j]), now,
                                          _alternatives(r, top, i) if j == 0 else None))  # fmt: skip
                if r.finished:
                    break
            updates.append(Update(r, tuple(t for u in parts for t in u.tokens), tuple(x for u in parts for x in
                                  u.logprobs), parts[-1].finish_reason, tuple(a for u in parts for a in
                                  u.top_logprobs)))  # fmt: skip
        return updates

    @staticmethod
    def context_needed(ticket: tuple[int, tuple[Request | None, ...]]) -> int:
        """A decode context above every live row's cache length for the step about to be dispatched.

        A row's cache holds its prompt and all but its newest token; the step writes at that length, and one earlier
        step may still be in flight (dispatched, tokens not yet recorded), hence + 2.
        """
        live = [len(r.prompt) + len(r.tokens) for r in ticket[1] if r is not None and not r.finished]
        return max(live, default=0) + 2

    @staticmethod
    def wants_top(ticket: tuple[int, tuple[Request | None, ...]]) -> bool:
        """Whether any request of a decode step asked for alternatives (only then are they copied to the host)."""
        return any(r is not None and r.sampling.top_logprobs > 0 for r in ticket[1])

    def _accept(self, r: Request, tok: int, lp: float, now: float, alternatives: Alternatives | None) -> Update:
        r.tokens.append(tok)
        r.logprobs.append(lp)
        if alternatives is not None:
            r.top_logprobs.append(alternatives)
        reason = None
        if tok in r.stop_ids:
            reason = "stop"
        elif len(r.tokens) >= r.max_new_tokens:
            reason = "length"
        if reason:
            self._finish(r, reason, now)
        return Update(r, (tok,), (lp,), reason, () if alternatives is None else (alternatives,))
