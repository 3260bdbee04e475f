"""The orchestrator over the real Engine (tiny preset): a prompt the model cannot take fails alone; the good requests
that shared its prefill batch go back to the front of the queue and are served as if it had never been there."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import make_plan
from meshserve.serving.scheduler import Request, Scheduler

CONFIG = get_config("tiny")  # vocab_size V = 256


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(4), jnp.float32)
    plan = make_plan(CONFIG, max_batch=4, max_context=16, length_buckets=(16,), decode_buckets=(4,), weights="f32")
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    return params, engine


def _scheduler(plan) -> Scheduler:
    return Scheduler(plan.max_batch, 8, plan.prefill_batches, plan.length_bucket, plan.decode_batches,
                     plan.prefill_token_budget)  # fmt: skip


def _outcome(handle, timeout: float = 60.0) -> list[int] | BaseException:
    """The request's tokens once it finished, or the error its caller got."""
    tokens, deadline = [], time.monotonic() + timeout
    while True:
        event = handle.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(event, BaseException):
            return event
        tokens += event.tokens
        if event.finish_reason is not None:
            return tokens


def test_bad_prompt_fails_alone_and_its_batch_mates_are_served_as_if_alone(model):
    params, engine = model
    engine.reset()
    plan = engine.plan
    assert plan.max_batch in plan.prefill_batches  # the four requests below share one prefill batch
    cases = [
        ([1, 2, 3, 4, 5], 6, SamplingParams()),
        ([7, 300, 9], 6, SamplingParams()),  # 300 is outside [0, 256): the model cannot take it
        ([40, 41, 42], 5, SamplingParams(0.9, seed=5)),
        ([11, 12, 13, 14, 15, 16, 17], 7, SamplingParams(0.7, top_k=20, seed=2)),
    ]
    calls = []  # the prompts of every prefill the engine was asked for, refused or not
    real = engine.prefill_insert

    def recording(prompts, *args, **kwargs):
        calls.append([list(p) for p in prompts])
        return real(prompts, *args, **kwargs)

    engine.prefill_insert = recording
    orch = Orchestrator(engine, _scheduler(plan), ByteTokenizer())
    # Queued before the engine thread starts: its first prefill takes all four as one batch.
    handles = [orch.submit(Request(list(p), n, sampling=s)) for p, n, s in cases]
    arrivals = [h.request.arrival for h in handles]
    orch.start()
    try:
        got = [_outcome(h) for h in handles]
    finally:
        orch.stop()
        del engine.prefill_insert
    assert orch.error is None
    # One refused batch of all four, then the three good ones again, in their order, as the next batch.
    assert calls == [[p for p, _, _ in cases], [cases[i][0] for i in (0, 2, 3)]], calls
    bad = got[1]
    assert isinstance(bad, UserError) and "token id 300 outside the vocabulary [0, 256)" in str(bad), bad
    assert handles[1].error is bad and handles[1].request.first_token_time is None
    for i in (0, 2, 3):
        prompt, n, sampling = cases[i]
        ref = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0]
        assert got[i] == list(ref.tokens), (i, got[i])
        r = handles[i].request
        assert r.finish_reason == "length" and handles[i].error is None
        # The arrival is kept across the retry: the time queued counts from the submit, not from the requeue.
        assert r.arrival == arrivals[i] and r.arrival <= r.prefill_start <= r.first_token_time
    s = orch.scheduler
    assert len(s.free_slots) == s.max_batch and s.idle()  # no slot leaked by the refused batch
