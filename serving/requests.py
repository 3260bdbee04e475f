"""The requests and what the orchestrator hands out and keeps per request: a generation Request and its Updates,
events, request handles, Score jobs and their errors.

Split from serving/orchestrator.py and serving/scheduler.py (the engine thread's loop and the scheduling state);
everything here is plain data, with no JAX import (the servicer's validation builds Requests before any model).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from meshserve.errors import UserError
from meshserve.model.sampling_params import SamplingError, SamplingParams
from meshserve.serving.detok import StreamDecoder
from meshserve.serving.guided.spec import GuideSpec

__all__ = [
    "truncate_prompt",
    "ClientGone",
    "sample_events",
    "Request",
    "Update",
    "QueueFullError",
    "FINISH_REASONS",
    "Alternatives",
    "Event",
    "RequestHandle",
    "TaggedQueue",
    "ScoreJob",
    "ShuttingDownError",
    "ScoreQueueFullError",
    "ScoreCancelledError",
    "RequestFailedError",
]

FINISH_REASONS = ("length", "stop", "cancelled")
_ids = itertools.count(1)

Alternatives = tuple[tuple[int, ...], tuple[float, ...]]  # the n most likely tokens at one step: ids, log-probs


class QueueFullError(UserError):
    """The bounded queue is full (the servicer answers RESOURCE_EXHAUSTED)."""


def truncate_prompt(prompt: list[int], keep: int, max_context: int, new_tokens: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (its beginning dropped, BOS with it, as vLLM
    does); -1 keeps the most that leave room for `new_tokens` in the context; 0 leaves it whole. Raises ValueError
    naming the field and its range (one prompt token at least, and room for one generated token)."""
    if keep == -1:  # a bad new_tokens (0, too many) is its own field's error, reported after this
        keep = min(max(1, max_context - max(new_tokens, 1)), max_context - 1)
    if keep == 0:
        return prompt
    if not 1 <= keep < max_context:
        raise ValueError(f"truncate_prompt_tokens must be -1 or in [1, {max_context - 1}] (0 = off), got {keep}")
    return prompt[-keep:]


@dataclass(eq=False)
class Request:
    """One generation request and its progress. prompt: token ids (validated by the caller)."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    deadline: float | None = None  # absolute time (same clock as `now`); past it the request is cancelled
    guide: GuideSpec | None = None  # the format its output must follow (guided decoding); None = free text
    # A chat whose template's generation prompt opened a reasoning block (serving/reasoning.py; with a reasoning
    # parser only): its output starts inside the block.
    think_open: bool = False
    # Stop strings (the orchestrator's, not the engine's) end the text with themselves (vLLM's
    # include_stop_str_in_output) rather than before.
    include_stop_str: bool = False
    arrival: float = 0.0
    id: int = field(default_factory=lambda: next(_ids))
    # progress (owned by the scheduler)
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # per generated token, when sampling.top_logprobs > 0: the n most likely (ids, log-probs), best first
    top_logprobs: list[Alternatives] = field(default_factory=list)
    finish_reason: str | None = None
    prefill_start: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    cancel_requested: bool = False
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    prefilled: int = 0  # prompt tokens in its slot's cache so far (less than the prompt while a chunked prefill runs)
    # Prompt positions [a, b) it prefilled itself before a requeue: found in the cache again, they are no cache hit.
    computed: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.sampling.min_tokens > self.max_new_tokens:  # as vLLM: it could never be met
            raise SamplingError(
                f"min_tokens must be <= max_new_tokens ({self.max_new_tokens}), got {self.sampling.min_tokens}"
            )
        # min_tokens holds back the ids this request stops on, which the engine reads from `sampling`: a caller
        # that gave none there (SamplingParams(min_tokens=k) alone) gets the request's stop ids.
        if self.sampling.min_tokens and not self.sampling.stop_ids and self.stop_ids:
            self.sampling = self.sampling.with_stop_ids(sorted(self.stop_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def samples(self, n: int) -> list[Request]:
        """This request and n - 1 new ones like it, sample i with seed + i (OpenAI's and vLLM's n: the gRPC
        request's and a batch-generate line's). Raises SamplingError when the last seed would pass 2**63."""
        seed = self.sampling.seed
        if seed + n - 1 >= 2**63:
            raise SamplingError(f"seed + n - 1 must be below 2**63 (sample i uses seed + i), got seed {seed}, n {n}")
        rest = [
            Request(list(self.prompt), self.max_new_tokens, dataclasses.replace(self.sampling, seed=seed + i),
                    self.stop_ids, deadline=self.deadline, guide=self.guide, think_open=self.think_open,
                    include_stop_str=self.include_stop_str)
            for i in range(1, n)
        ]  # fmt: skip
        return [self, *rest]


@dataclass(frozen=True)
class Update:
    """New tokens for a request, and its finish reason when this update ends it."""

    request: Request
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None
    top_logprobs: tuple[Alternatives, ...] = ()  # one per token when the request asked for them


class ShuttingDownError(UserError):
    """The server is draining and accepts no new requests (the servicer answers UNAVAILABLE)."""


class ScoreQueueFullError(QueueFullError):
    """Too many Score requests accepted and not answered yet (the servicer answers RESOURCE_EXHAUSTED)."""


class RequestFailedError(UserError):
    """A request the engine refused at prefill (its prompt; or its whole batch when no one prompt explains the
    refusal); the engine goes on, and the other requests of that batch are prefilled again."""


class ScoreCancelledError(Exception):
    """The Score's caller cancelled it (client gone); the engine stopped between chunks."""


@dataclass(frozen=True)
class Event:
    """New tokens/text of one request; finish_reason is set on its last event."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str | None = None
    top_logprobs: tuple[Alternatives, ...] = ()  # per token, when the request asked for alternatives


@dataclass(eq=False)
class RequestHandle:
    """What a caller holds: the request (progress, timings) and the queue its events arrive on."""

    request: Request
    decoder: StreamDecoder
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    text: str = ""
    done: queue.SimpleQueue | None = None  # also gets this handle when the request finishes (offline jobs)
    counted: bool = False  # the servicer has counted this RPC's outcome in the metrics (exactly once)
    error: BaseException | None = None  # set when the request failed (RequestFailedError), before `done` gets it


class TaggedQueue:
    """One sample's event queue (RequestHandle.events) in a group from `submit_many`: whatever the engine thread puts
    in (events, failures) goes to the queue the group shares, as (sample index, item), so one reader sees every
    sample's events in the order they came. Put-only: read the shared queue."""

    def __init__(self, shared: queue.SimpleQueue, index: int):
        self.shared = shared
        self.index = index

    def put(self, item) -> None:
        self.shared.put((self.index, item))


@dataclass(eq=False)
class ScoreJob:
    """One Score request on the engine thread: its items (sorted by length), progress and how it may end early."""

    items: list[tuple[list[int], list[int]]]
    future: Future
    deadline: float | None  # time.monotonic() after which the engine stops it between chunks
    cancel: threading.Event  # set by the caller (client gone, or gave up waiting)
    error: BaseException | None = None  # set with `cancel` when the server fails it (drain past grace)
    done: int = 0  # items scored so far
    output: Any = None  # engine.ScoreOutput of the items scored so far (set by the orchestrator)


class ClientGone(Exception):
    """The caller of a request went away (a gRPC client cancelled, an HTTP connection closed): cancel its samples."""


def sample_events(
    events: queue.SimpleQueue, samples: int, gone: Callable[[], bool], poll_s: float = 0.5
) -> Iterator[tuple[int, Event]]:
    """(sample index, Event) from a request's event queue (TaggedQueue's) until each of `samples` samples had its
    last event. gone() is asked at least every poll_s seconds, also while events keep coming: once it says the
    caller went away this raises ClientGone. An engine error on the queue is raised as is: a UserError when the
    engine refused this request's prefill batch (the engine goes on), another exception when its thread failed;
    the gRPC and HTTP fronts map them to their status codes."""
    left, checked = samples, time.monotonic()
    while left:
        try:
            index, event = events.get(timeout=poll_s)
        except queue.Empty:
            index, event = None, None
        if time.monotonic() - checked >= poll_s:
            checked = time.monotonic()
            if gone():
                raise ClientGone
        if event is None:
            continue
        if isinstance(event, BaseException):
            raise event
        yield index, event
        if event.finish_reason is not None:
            left -= 1
