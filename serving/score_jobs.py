"""Score requests on the engine thread: the bounded queue of accepted jobs and the one being scored, a compiled
chunk per orchestrator loop iteration (so streams keep decoding while a large Score runs).

Split from serving/orchestrator.py. `ScoreJobs` shares the orchestrator's lock: a job is taken off the queue and
made the running one in one step under it, so a drain that fails the jobs sees each one either queued or running,
never in between.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from meshserve.serving.engine import Engine, ScoreOutput
from meshserve.serving.requests import ScoreCancelledError, ScoreJob, ScoreQueueFullError

__all__ = ["ScoreJobs", "DEFAULT_MAX_SCORES", "new_score_job", "wait_for_score"]

DEFAULT_MAX_SCORES = 16


class ScoreJobs:
    """Accepted Score jobs (running + queued, at most `max_pending`) and the engine-thread side that scores them."""

    def __init__(self, lock: threading.Lock, max_pending: int = DEFAULT_MAX_SCORES):
        self._lock = lock
        self.max_pending = max_pending
        self.queue: queue.SimpleQueue[ScoreJob] = queue.SimpleQueue()
        self.running: ScoreJob | None = None  # set and cleared on the engine thread; read elsewhere under the lock
        self.pending = 0  # accepted and not yet answered (queued or running); under the lock

    def add(self, job: ScoreJob) -> None:
        """Accept a job (the caller holds the lock); raises ScoreQueueFullError past `max_pending`."""
        if self.pending >= self.max_pending:
            raise ScoreQueueFullError(
                f"Score queue full: {self.pending} Score requests pending (max_score_queue={self.max_pending}); "
                "retry later"
            )
        # Counted under the caller's accepting check: a drain sees every Score it has to wait for.
        self.pending += 1
        job.future.add_done_callback(self._answered)
        self.queue.put(job)

    def _answered(self, future: Future) -> None:
        with self._lock:
            self.pending -= 1

    def idle(self) -> bool:
        """No job queued or running (engine thread, or under the lock)."""
        return self.queue.empty() and self.running is None

    def fail(self, error: BaseException, running: bool = True) -> int:
        """Fail every queued job with `error` (and, with `running`, stop the running one at its next chunk);
        returns how many."""
        n = 0
        queued = []
        with self._lock:
            job = self.running
            if running and job is not None and not job.future.done():
                job.error = error
                job.cancel.set()
                n += 1
            while True:
                try:
                    queued.append(self.queue.get_nowait())
                except queue.Empty:
                    break
        for job in queued:  # outside the lock: a future's done callback (_answered) takes it
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
                n += 1
        return n

    def abort_running(self, error: BaseException) -> None:
        """The engine thread died: answer the running job's caller with its error."""
        if self.running is not None and not self.running.future.done():
            self.running.future.set_exception(error)

    def run_chunk(self, engine: Engine) -> bool:
        """Score one chunk (one compiled bucket call) of the running job, starting the next queued one when none
        runs; stops a job that was cancelled or passed its deadline. Returns whether there was a job."""
        with self._lock:  # taken and made the running job in one step: fail() sees it either way
            job = self.running
            if job is None:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    return False
                if not job.future.set_running_or_notify_cancel():
                    return True  # its caller gave up before it started
                self.running = job
        n = len(job.items)
        if n == 0:
            self._end(job, result=ScoreOutput([], []))
        elif job.cancel.is_set() or (job.deadline is not None and time.monotonic() >= job.deadline):
            if job.error is not None:
                self._end(job, error=job.error)
            elif job.cancel.is_set():
                self._end(job, error=ScoreCancelledError(f"Score cancelled after {job.done} of {n} items"))
            else:
                self._end(job, error=TimeoutError(f"Score deadline passed after {job.done} of {n} items"))
        else:
            try:
                out = engine.score_chunk(job.items[job.done : job.done + engine.score_chunk_size])
            except Exception as e:  # a bad item must not kill the loop
                self._end(job, error=e)
                return True
            job.output.extend(out)
            job.done += len(out.token_logprobs)
            if job.done >= n:
                self._end(job, result=job.output)
        return True

    def _end(self, job: ScoreJob, result: ScoreOutput | None = None, error: BaseException | None = None) -> None:
        self.running = None
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


def new_score_job(
    items: list[tuple[list[int], list[int]]],
    timeout: float | None,
    cancel: threading.Event | None,
    deadline: float | None,
) -> tuple[ScoreJob, list[int]]:
    """A job for `items`, sorted by length so a chunk packs similar lengths (less padding), and the order it sorted
    them in (`wait_for_score` puts the answers back). deadline defaults to now + timeout."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    job = ScoreJob(
        [items[i] for i in order], Future(), deadline, cancel or threading.Event(), output=ScoreOutput([], [])
    )
    return job, order


def wait_for_score(job: ScoreJob, order: list[int], timeout: float | None) -> ScoreOutput:
    """The job's answers in the caller's item order; TimeoutError after `timeout` s (the job is stopped: a running
    one at its next chunk, a queued one skipped)."""
    try:
        out: ScoreOutput = job.future.result(timeout)
    except TimeoutError:
        job.cancel.set()
        job.future.cancel()
        raise
    back = [0] * len(order)
    for pos, i in enumerate(order):
        back[i] = pos
    return out.pick(back)
