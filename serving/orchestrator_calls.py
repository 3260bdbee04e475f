"""The caller side of the orchestrator (serving/orchestrator.py): the methods any thread calls to queue requests and
Score jobs, cancel them, read the load, and drain. Everything they touch is shared with the engine thread under
the orchestrator's lock.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

from meshserve.serving.detok import StreamDecoder
from meshserve.serving.engine import ScoreOutput
from meshserve.serving.guided.tracker import GuideTracker
from meshserve.serving.requests import RequestHandle, ShuttingDownError, TaggedQueue
from meshserve.serving.scheduler import QueueFullError, Request, Scheduler
from meshserve.serving.score_jobs import ScoreJobs, new_score_job, wait_for_score

__all__ = ["CallerSide", "GRACE_ENDED"]

# What a request (gRPC: UNAVAILABLE, HTTP: 503) or Score hears when the drain's grace period cancelled it.
GRACE_ENDED = "server shut down: the request was cancelled when the drain's grace period (--grace) ended"


class CallerSide:
    """Orchestrator's methods for callers (any thread); the state is the Orchestrator's (set in its __init__)."""

    scheduler: Scheduler
    scores: ScoreJobs
    guides: GuideTracker
    tokenizer: object
    grace_passed: bool
    _lock: threading.Lock
    _wake: threading.Event
    _handles: dict[int, RequestHandle]
    _accepting: bool
    _stop: bool
    _thread: threading.Thread

    def _decoder(self, request: Request, stop: Sequence[str]) -> StreamDecoder:
        """The request's text as it streams: its stop strings, kept or cut (include_stop_str), none before
        min_tokens."""
        return StreamDecoder(self.tokenizer, stop, request.include_stop_str, request.sampling.min_tokens)

    def submit(
        self, request: Request, stop: Sequence[str] = (), done: queue.SimpleQueue | None = None
    ) -> RequestHandle:
        """Queue a validated request; raises QueueFullError / ShuttingDownError (or a GuideError: a format past its
        bounds). `done` receives the handle at the end."""
        handle = RequestHandle(request, self._decoder(request, stop), done=done)
        self.guides.add([request])
        try:
            with self._lock:
                if not self._accepting:
                    raise ShuttingDownError("server is shutting down; not accepting new requests")
                request.arrival = time.monotonic()
                self.scheduler.submit(request)
                self._handles[request.id] = handle
        except BaseException:
            self.guides.forget(request, None)
            raise
        self.guides.queued([request])
        self._wake.set()
        return handle

    def submit_many(
        self, requests: Sequence[Request], stop: Sequence[str] = ()
    ) -> tuple[list[RequestHandle], queue.SimpleQueue]:
        """Queue the n samples of one request (validated), all or none: QueueFullError when the queue cannot take
        all n (none is queued), ShuttingDownError when draining. Returns their handles and the one queue all their
        events arrive on, as (sample index, Event or error). Queued at once under the lock, so the engine thread sees
        them together: where the prompt is long enough for reuse to pay, the first sample prefills it and the others
        reuse it (the scheduler's burst rule, prefix_cache.wait_for). One request (n = 1) behaves as `submit`."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handles = [
            RequestHandle(r, self._decoder(r, stop), events=TaggedQueue(events, i))  # type: ignore
            for i, r in enumerate(requests)
        ]
        self.guides.add(requests)
        try:
            self._queue_all(requests, handles)
        except BaseException:
            for r in requests:
                self.guides.forget(r, None)
            raise
        self.guides.queued(requests)
        self._wake.set()
        return handles, events

    def _queue_all(self, requests: Sequence[Request], handles: list[RequestHandle]) -> None:
        """submit_many's queueing, under the lock: all the requests or none."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("server is shutting down; not accepting new requests")
            waiting, limit = len(self.scheduler.queue), self.scheduler.max_queue
            if len(requests) > 1 and waiting + len(requests) > limit:  # one request: the scheduler's own check
                raise QueueFullError(
                    f"queue full: {waiting} requests waiting, and n={len(requests)} samples need {len(requests)} "
                    f"places (max_queue={limit})"
                )
            now = time.monotonic()
            for r, handle in zip(requests, handles, strict=True):
                r.arrival = now  # one arrival: the request's timing covers all its samples
                self.scheduler.submit(r)  # cannot fail now: the room was checked under the same lock
                self._handles[r.id] = handle

    def cancel(self, handle: RequestHandle) -> None:
        """Cancel (client gone); the slot is freed at the next loop iteration. No-op when already finished."""
        with self._lock:
            self.scheduler.cancel(handle.request)
        self._wake.set()

    def score(
        self,
        items: list[tuple[list[int], list[int]]],
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> ScoreOutput:
        """Score (prompt ids, continuation ids) pairs on the engine thread, one chunk between decode steps.

        Raises TimeoutError after `timeout` s (the engine stops the job at its next chunk) or once the engine passes
        `deadline` (time.monotonic(); default: now + timeout), ScoreCancelledError when `cancel` is set (checked
        between chunks), ScoreQueueFullError when `max_scores` Scores are pending, ShuttingDownError when draining,
        or the engine thread's error if it died.
        """
        job, order = new_score_job(items, timeout, cancel, deadline)
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("server is shutting down; not accepting new requests")
            self.scores.add(job)
        self._wake.set()
        return wait_for_score(job, order, timeout)

    def live_slots(self) -> int:
        with self._lock:
            return len(self.scheduler.active)

    def queued(self) -> int:
        with self._lock:
            return len(self.scheduler.queue)

    def drain(self, grace: float) -> bool:
        """Stop accepting, let in-flight requests and Score jobs finish for up to `grace` s, then cancel the rest
        (Score jobs fail with ShuttingDownError, a running one at its next chunk) and stop.

        Returns True when every request and Score finished on its own within the grace period.
        """
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace
        clean = True
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._lock:
                if self.scheduler.idle() and self.scores.pending == 0:
                    break
            time.sleep(0.02)
        else:
            clean = False
        with self._lock:
            left = [*self.scheduler.queue, *self.scheduler.active]
            self.grace_passed = bool(left)
            for r in left:
                self.scheduler.cancel(r)
                clean = False
        if self.scores.fail(ShuttingDownError(GRACE_ENDED.replace("the request", "the Score"))):
            clean = False
        self.stop()
        return clean

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
