"""Shared by the engine tests (no tests here): serve requests through a real Orchestrator over a warmed-up Engine
and collect what each caller receives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.scheduler import Request, Scheduler

__all__ = ["Received", "serve_requests"]


@dataclass
class Received:
    """What one request's caller got: its tokens, alternatives per token and the events' top_logprobs lengths."""

    tokens: list[int] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    events: int = 0
    aligned: bool = True  # every event carried no alternatives or one per token


def serve_requests(
    engine: Engine, cases: list[tuple[list[int], int, SamplingParams]], timeout: float = 60.0
) -> list[Received]:
    """Submit every (prompt ids, max_new_tokens, sampling) at once to an Orchestrator over `engine` (already warmed
    up) and read each stream to its end; asserts the engine thread ended without an error."""
    plan = engine.plan
    scheduler = Scheduler.for_plan(plan, 8)
    orch = Orchestrator(engine, scheduler, ByteTokenizer()).start()
    got = []
    try:
        handles = [orch.submit(Request(list(p), n, sampling=s)) for p, n, s in cases]
        for h in handles:
            r, deadline = Received(), time.monotonic() + timeout
            while True:
                event = h.events.get(timeout=max(0.1, deadline - time.monotonic()))
                r.tokens += event.tokens
                r.top_logprobs += event.top_logprobs
                r.events += 1
                r.aligned &= len(event.top_logprobs) in (0, len(event.tokens))
                if event.finish_reason is not None:
                    break
            got.append(r)
    finally:
        orch.stop()
    assert orch.error is None
    return got
