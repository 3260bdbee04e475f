"""Shared by the engine tests (no tests here): serve requests through a real Orchestrator over a warmed-up Engine
and collect what each caller receives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.scheduler import Request, Scheduler

__all__ = ["Received", "serve_requests", "wait_finished", "run_prefix_scenario", "assert_equal_to_generate"]


@dataclass
class Received:
    """What one request's caller got: its tokens, alternatives per token and the events' top_logprobs lengths."""

    tokens: list[int] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    events: int = 0
    aligned: bool = True  # every event carried no alternatives or one per token


def serve_requests(
    engine: Engine, cases: list[tuple[list[int], int, SamplingParams]], timeout: float = 60.0, speculator=None
) -> list[Received]:
    """Submit every (prompt ids, max_new_tokens, sampling) at once to an Orchestrator over `engine` (already warmed
    up; with `speculator`, its verify steps drafted by it) and read each stream to its end; asserts the engine
    thread ended without an error."""
    plan = engine.plan
    scheduler = Scheduler.for_plan(plan, 8)
    orch = Orchestrator(engine, scheduler, ByteTokenizer(), speculator=speculator).start()
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


def wait_finished(requests: list[Request], timeout: float = 60.0) -> None:
    """Wait until every request is finished (a request's fields are updated by the engine thread)."""
    deadline = time.monotonic() + timeout
    while not all(r.finished for r in requests):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


def run_prefix_scenario(engine: Engine) -> tuple[list[Request], Orchestrator]:
    """The prefix-caching scenario, through an Orchestrator over `engine` (warmed up, its plan with prefix caching):
    a first turn; then its follow-up (the whole conversation) and a request sharing only its 40-token system prompt,
    submitted together (one extend batch that reads slot 0 while overwriting it); then a prompt with nothing cached
    batched with one that reuses (a row without a prefix extends from position 0). Asserts what each reused and that
    the engine thread ended cleanly; returns the requests and the (stopped) orchestrator."""
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        requests = _prefix_requests(orch, engine.config.vocab_size)
    finally:
        orch.stop()
    assert orch.error is None
    return requests, orch


def _prefix_requests(orch: Orchestrator, vocab_size: int) -> list[Request]:
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(1, vocab_size, 40)]
    greedy, penalised = SamplingParams(), SamplingParams(repetition_penalty=1.5, presence_penalty=0.5)
    run = lambda prompt, n, sampling: orch.submit(Request(list(prompt), n, sampling=sampling)).request  # noqa: E731
    turn1 = run(system + [3, 4, 5, 6, 7], 8, greedy)
    wait_finished([turn1])
    turn2 = run(turn1.prompt + turn1.tokens + [9, 10, 11], 6, penalised)
    other = run(system + [20, 21], 6, SamplingParams(0.8, top_k=30, seed=11))
    wait_finished([turn2, other])
    fresh = run([int(t) for t in rng.integers(1, vocab_size, 30)], 5, greedy)
    again = run(system + [20, 21, 22, 23], 5, penalised)
    wait_finished([fresh, again])
    assert turn1.cached_tokens == 0 and fresh.cached_tokens == 0
    assert turn2.cached_tokens == len(turn1.prompt) + len(turn1.tokens) - 1
    assert other.cached_tokens == 40 and again.cached_tokens >= 42
    return [turn1, turn2, other, fresh, again]


def assert_equal_to_generate(params, config, requests: list[Request], kv_cache_dtype: str = "auto") -> None:
    """Each request got the tokens (and log-probs) `model.generate` gives its prompt alone on one device."""
    from meshserve.model.generate import generate

    for r in requests:
        ref = generate(params, config, [r.prompt], max_new_tokens=r.max_new_tokens, sampling=r.sampling,
                       kv_cache_dtype=kv_cache_dtype)[0]  # fmt: skip
        assert r.tokens == list(ref.tokens), (r.cached_tokens, r.prompt)
        np.testing.assert_allclose(r.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
