"""What the orchestrator hands out and keeps per request: events, request handles, Score jobs and their errors.

Split from serving/orchestrator.py (the engine thread and its loop); everything here is plain data.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from meshserve.errors import UserError
from meshserve.serving.detok import StreamDecoder
from meshserve.serving.scheduler import Alternatives, QueueFullError, Request

__all__ = [
    "Event",
    "RequestHandle",
    "ScoreJob",
    "ShuttingDownError",
    "ScoreQueueFullError",
    "ScoreCancelledError",
    "RequestFailedError",
]


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


@dataclass(eq=False)
class ScoreJob:
    """One Score request on the engine thread: its items (sorted by length), progress and how it may end early."""

    items: list[tuple[list[int], list[int]]]
    future: Future
    deadline: float | None  # time.monotonic() after which the engine stops it between chunks
    cancel: threading.Event  # set by the caller (client gone, or gave up waiting)
    error: BaseException | None = None  # set with `cancel` when the server fails it (drain past grace)
    done: int = 0  # items scored so far
    token_logprobs: list = field(default_factory=list)
    greedy: list = field(default_factory=list)
