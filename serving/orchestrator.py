"""The orchestrator: one engine thread drives the scheduler and the engine; callers get per-request event queues.

Thin by design: all batching decisions are the scheduler's (pure state), all device work the engine's. This file
owns the thread, a lock around the scheduler, the per-request detokenizers and the hand-off to callers.

Loop (one iteration): reap cancelled/expired requests -> score one chunk of the running Score job (one compiled
bucket call; a Score of many items spreads over many iterations, so streams keep decoding) -> prefill + insert queued
requests into free slots (or the next chunk of a long prompt; reusing cached prefixes) -> dispatch decode step n+1
-> read step n's tokens (the one device->host copy) and deliver them. Dispatching before reading keeps the device
busy while the host detokenizes and streams. Guided rows (structured outputs) need step n's tokens for step n+1's
masks: either step n is read first, or their masks come after the dispatch and those rows are drawn again from the
step's logits (serving/guided/tracker.py: whichever has been faster).
When the engine refuses a prefill batch (a prompt it cannot take), only the bad requests fail; the rest go back to
the front of the queue and are prefilled in the next iteration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from meshserve.errors import UserError
from meshserve.model.generate import prompt_error
from meshserve.model.tokenizer import Tokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.guided.tracker import GuideTracker
from meshserve.serving.metrics import ServerMetrics
from meshserve.serving.orchestrator_calls import GRACE_ENDED, CallerSide
from meshserve.serving.requests import (
    Event,
    RequestFailedError,
    RequestHandle,
    ScoreCancelledError,
    ScoreQueueFullError,
    ShuttingDownError,
)
from meshserve.serving.scheduler import PrefillBatch, Request, Scheduler, Update
from meshserve.serving.score_jobs import DEFAULT_MAX_SCORES, ScoreJobs
from meshserve.serving.speculative import NgramSpeculator, push_verified

__all__ = [
    "Orchestrator",
    "Event",
    "RequestHandle",
    "ShuttingDownError",
    "ScoreQueueFullError",
    "ScoreCancelledError",
    "RequestFailedError",
    "GRACE_ENDED",
]


class Orchestrator(CallerSide):
    """Runs `engine` (already warmed up) with `scheduler` on a background thread.

    `max_scores` bounds the Score requests accepted and not answered yet (running + queued)."""

    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        metrics: ServerMetrics | None = None,
        max_scores: int = DEFAULT_MAX_SCORES,
        speculator: NgramSpeculator | None = None,
    ):
        """speculator: draft tokens for the rows that may draft, verified in the engine's verify steps when they are
        expected to pay (the plan must have them: speculative_tokens = the speculator's k); None = plain decoding."""
        if speculator is not None and speculator.k != engine.plan.speculative_tokens:
            raise ValueError(f"the speculator drafts {speculator.k} tokens; the plan verifies "
                             f"{engine.plan.speculative_tokens}")  # fmt: skip
        self.speculator = speculator
        self.engine = engine
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics or ServerMetrics()
        # Guided requests' grammars and masks (serving/guided/).
        self.guides = GuideTracker(tokenizer, engine, self.metrics)
        self.metrics.bind(self.live_slots, self.queued)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._handles: dict[int, RequestHandle] = {}
        self.scores = ScoreJobs(self._lock, max_scores)
        self._accepting = True
        self.grace_passed = False  # drain's grace ran out and it cancelled what was left (servicer: UNAVAILABLE)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
        self.steps = 0  # decode steps run
        self.step_seconds = 0.0  # their wall time in the loop (dispatch to the next dispatch)
        self.error: BaseException | None = None

    # ----- caller side (any thread): serving/orchestrator_calls.py, and -----

    def start(self) -> Orchestrator:
        self._thread.start()
        return self

    # ----- engine thread -----

    def _run(self) -> None:
        # (ticket, device output, dispatch time, guided rows sampled again or None) of the decode step in flight
        pending = None
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    updates = self.scheduler.reap(now)
                    freed = self.scheduler.take_freed()
                if freed:  # slots no request holds now: their sampling settings go back to the defaults
                    self.engine.release(freed)
                with self._lock:
                    if self._stop and self.scheduler.idle() and pending is None and self.scores.idle():
                        break
                self._deliver(updates)
                worked = self.scores.run_chunk(self.engine)
                with self._lock:
                    batch = self.scheduler.next_prefill(time.monotonic())
                if batch is not None:
                    try:
                        out = self.engine.prefill_insert(
                            batch.prompts,
                            list(batch.slots),
                            [r.sampling for r in batch.requests],
                            batch.batch,
                            batch.length,
                            reuse=batch.reuse,
                            **self.guides.prefill_kwargs(batch.requests),
                        )
                    except UserError as e:
                        # A prompt the model cannot take (an id outside its vocabulary) that got past the caller's
                        # checks: refused while packing, before any device work, so the decode state is intact.
                        # Only the bad requests fail; the rest of the batch is tried again; the loop goes on.
                        self._refuse_batch(batch, e)
                        continue
                    with self._lock:
                        updates = self.scheduler.record_prefill(
                            batch, out.tokens, out.logprobs, time.monotonic(), top=(out.top_ids, out.top_logprobs)
                        )
                    self.metrics.generated(sum(len(u.tokens) for u in updates))  # each request's first token
                    done = batch.completed  # counted once, when the whole prompt is in
                    self.metrics.prefilled(sum(len(r.prompt) for r in done), sum(r.cached_tokens for r in done))
                    self._deliver(updates)
                    worked = True
                with self._lock:
                    ticket = self.scheduler.decode_ticket()
                self.guides.flush()  # the guided rows' masks known now (a new row's first)
                spec = self.speculator  # the engine's plan is read only when speculating (test engines have none)
                if ticket is not None and spec is not None:
                    context = self.engine.plan.max_context
                    drafts = spec.drafts(ticket, context)  # on tokens a step behind while one is in flight
                    if drafts is not None and pending is not None:
                        # Worth it: finish the step in flight, whose tokens the drafts must follow, and look again.
                        ticket, pending = self._read_in_flight(pending), None
                        drafts = None if ticket is None else spec.drafts(ticket, context)
                    if drafts is not None:
                        self.guides.untimed()
                        self._verify_step(ticket, drafts)
                        continue
                mode = None if ticket is None else self.guides.step_mode(ticket[1])
                if mode is False and pending is not None:  # guided rows, read first (GuideTracker's docstring)
                    ticket, pending = self._read_in_flight(pending), None
                dispatched = None
                if ticket is None or worked:
                    self.guides.untimed()
                if ticket is not None:
                    dispatched = (
                        ticket,
                        self.engine.decode_async(ticket[0], Scheduler.context_needed(ticket)),
                        time.monotonic(),
                    )
                    self.guides.dispatched(ticket[0], mode, dispatched[2])
                if pending is not None:
                    self._finish_step(pending, dispatched)
                if dispatched is not None:
                    # Pipelined: guided rows whose masks the finished step's tokens gave, sampled again under them.
                    dispatched = (*dispatched, self.guides.resample(ticket[1]))
                pending = dispatched
                if pending is None and not worked:
                    self._wake.wait(0.05)  # idle: wake on submit/cancel/score, or to check deadlines
                    self._wake.clear()
        except BaseException as e:  # a bug: fail every waiting request instead of hanging it
            self.error = e
            with self._lock:
                self._accepting = False
                handles = list(self._handles.values())
                self._handles.clear()
            for h in handles:
                h.events.put(e)
                if h.done is not None:
                    h.done.put(e)
            self.scores.fail(e, running=False)
            self.scores.abort_running(e)
            raise
        finally:
            # Whatever ended the loop, no Score caller may wait forever on a future nobody will answer.
            self.scores.fail(ShuttingDownError("the engine stopped before this Score ran"), running=False)

    def _refusal(self, request: Request) -> str | None:
        """Why the engine cannot take this request's prompt on its own (the message its caller gets), or None."""
        # What the engine checks while packing a prefill (max_new_tokens 1: prefill makes one token).
        return prompt_error(self.engine.config, request.prompt, 1)

    def _refuse_batch(self, batch: PrefillBatch, error: UserError) -> None:
        """The engine refused a prefill batch: fail the requests whose own prompt it cannot take, and put the others
        back at the front of the queue in their order (slots freed, arrival kept), to be prefilled again next
        iteration. A refusal no single request explains fails the whole batch."""
        refused = {r.id: why for r in batch.requests if (why := self._refusal(r)) is not None}
        if not refused:
            why = f"refused with its prefill batch, which held a prompt the model cannot take: {error}"
            self._fail(batch.requests, {r.id: why for r in batch.requests})
            return
        self._fail([r for r in batch.requests if r.id in refused], refused)
        # Each retry drops at least one request, so a batch is never retried forever.
        with self._lock:
            self.scheduler.requeue([r for r in batch.requests if r.id not in refused])

    def _fail(self, requests: Sequence[Request], why: dict[int, str]) -> None:
        """End each request now: free its slot, and hand its caller a RequestFailedError(why[id]) (a UserError: the
        servicer answers INVALID_ARGUMENT, an offline job writes the line to its errors file)."""
        now = time.monotonic()
        for r in requests:
            self.guides.forget(r, r.slot)
            with self._lock:
                self.scheduler.finish(r, "cancelled", now)
                handle = self._handles.pop(r.id, None)
            if handle is None:
                continue
            failure = RequestFailedError(why[r.id])
            handle.error = failure
            handle.events.put(failure)
            if handle.done is not None:
                handle.done.put(handle)

    def _verify_step(self, ticket: tuple[int, tuple[Request | None, ...]], drafts) -> None:
        """A speculative step (serving/speculative.py): verify the drafts, deliver each row's kept tokens."""
        t0 = time.monotonic()
        out = self.engine.verify(drafts, Scheduler.context_needed(ticket))
        now = time.monotonic()
        with self._lock:
            updates = self.scheduler.record_verify(
                ticket, out.tokens, out.counts, out.logprobs, now, top=(out.top_ids, out.top_logprobs)
            )
            occupancy = self.scheduler.occupancy()
        proposed, accepted = self.speculator.record(ticket, drafts, out.counts, updates)
        self.speculator.costs.add("verify", ticket[0], now - t0)
        self._stepped(now - t0, sum(len(u.tokens) for u in updates), occupancy)
        self.metrics.speculated(proposed, accepted)
        self._deliver(updates)

    def _read_in_flight(self, pending) -> tuple[int, tuple[Request | None, ...]] | None:
        """Finish the step in flight (its tokens delivered, the masks they give written) before the next dispatch:
        -> a fresh ticket (rows may have finished)."""
        self._finish_step(pending, None)
        with self._lock:
            ticket = self.scheduler.decode_ticket()
        self.guides.flush()
        return ticket

    def _finish_step(self, pending, dispatched) -> None:
        ticket, out, t0, resampled = pending
        out = self.engine.fetch(out, top=Scheduler.wants_top(ticket), resampled=resampled)
        now = time.monotonic()
        with self._lock:
            updates = self.scheduler.record_decode(
                ticket,
                out.tokens,
                out.logprobs,
                now,
                top=None if out.top_ids is None else (out.top_ids, out.top_logprobs),
            )
            occupancy = self.scheduler.occupancy()
        # Step time: this step's dispatch to the next one's (or to now when none follows): what a token costs.
        seconds = (dispatched[2] if dispatched else now) - t0
        if self.speculator is not None:  # what speculating must beat, per bucket
            self.speculator.costs.add("decode", ticket[0], seconds)
        self._stepped(seconds, len(updates), occupancy)
        self._deliver(updates)

    def _stepped(self, seconds: float, tokens: int, occupancy: float) -> None:
        """A decode or verify step ran: counted, timed and in the metrics."""
        self.steps += 1
        self.step_seconds += seconds
        self.metrics.step(seconds, tokens, occupancy)

    def _deliver(self, updates: list[Update]) -> None:
        for u in updates:
            r = u.request
            handle = self._handles.get(r.id)
            if handle is None:
                continue
            slot = r.slot  # before a finish frees it
            reason = u.finish_reason
            if len(u.tokens) > 1:  # a verify step's: a stop string may complete before its last token
                text, hit, u = push_verified(handle.decoder, u, self._lock)
            else:
                text, hit = handle.decoder.push(u.tokens) if u.tokens else ("", False)
            if reason is None and not hit and u.tokens:
                try:  # guided: past its new tokens; a complete format ends the request as a stop string does
                    hit = self.guides.advance(r, u.tokens)
                except ValueError as e:  # a token its mask did not allow: a bug, this request fails alone
                    self._fail([r], {r.id: f"guided decoding failed: {e}"})
                    continue
            if hit:
                # A stop string wins over `length`: it may complete on the last allowed token.
                if reason is None:
                    with self._lock:
                        self.scheduler.finish(r, "stop", time.monotonic())
                reason = r.finish_reason = "stop"
            if reason is not None:
                text += handle.decoder.finish()
            handle.text += text
            handle.events.put(Event(u.tokens, u.logprobs, text, reason, u.top_logprobs))
            if reason is not None:
                with self._lock:
                    self._handles.pop(r.id, None)
                if self.speculator is not None:
                    self.speculator.forget(r)
                self.guides.forget(r, slot)
                if handle.done is not None:
                    handle.done.put(handle)
                end = r.finish_time or time.monotonic()
                self.metrics.finished(
                    None if r.prefill_start is None else r.prefill_start - r.arrival,
                    None if r.first_token_time is None else r.first_token_time - r.arrival,
                    end - r.arrival,
                    len(r.tokens),
                    reason,
                )
