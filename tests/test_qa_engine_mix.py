"""The engine's promise under a mixed load: whatever else is in the batch, a request's greedy output (and a seeded
sample's) equals the same request served alone.

One tiny f32 engine with every feature that changes how a request is computed: prefix caching, chunked prefill
(16-token chunks), speculative decoding (verify steps forced whenever a row has drafts), guided decoding, n samples
sharing a prefill, stop strings and stop ids, min_tokens, logit_bias, penalties, top_logprobs and a cancel, all
submitted at once; then a follow-up of every request (its prompt and output and two tokens more), which reuses the
cache rows those requests left (after verify steps, stop strings and the cancel). Each finished request is compared
with itself served alone on the same engine, and the orchestrator must end clean: no live slot, nothing queued, no
handle, guide, waiting mask or draft record left behind.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import wait_finished
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.guided import GuideSpec
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import PlanError, make_plan
from meshserve.serving.scheduler import Request, Scheduler
from meshserve.serving.speculative import NgramSpeculator

CONTEXT = 64


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = get_config("tiny")
    params = init_params(config, jax.random.key(1), jnp.float32)
    # Prompt buckets 16 and 32 (and 64): prompts cross both edges; chunks of 16 make a 40-token prompt three steps.
    plan = make_plan(config, max_batch=4, max_context=CONTEXT, length_buckets=(16, 32), decode_buckets=(4,),
                     context_buckets=(CONTEXT,), weights="f32", prefix_caching=True, prefill_chunk=16,
                     speculative_tokens=4)  # fmt: skip
    e = Engine(params, config, plan)
    e.warm_up(phases=("generate",))
    return e


def _copy(r: Request) -> Request:
    return Request(list(r.prompt), r.max_new_tokens, r.sampling, r.stop_ids, guide=r.guide)


def _alone(engine: Engine, r: Request, stop: tuple[str, ...]) -> Request:
    """r served alone: a fresh scheduler (empty prefix index), no speculator, nothing else queued."""
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        c = orch.submit(_copy(r), stop=stop).request
        wait_finished([c])
    finally:
        orch.stop()
    assert orch.error is None
    return c


def _new_token(tokens: list[int], printable: bool = False) -> int:
    """A token of this output, from its third on, that it did not produce before (printable: an ASCII letter)."""
    found = [t for j, t in enumerate(tokens) if j >= 2 and t not in tokens[:j] and (not printable or
             chr(t).isalpha() and t < 128)]  # fmt: skip
    assert found, f"no token to stop on in {tokens} (pick another prompt or seed)"
    return found[0]


def _mix(engine: Engine) -> list[tuple[Request, tuple[str, ...], int]]:
    """(request, stop strings, samples) of the first round: prompts sharing a 40-token system prompt or a repeated
    phrase (drafts to propose), of lengths on both sides of the 16 and 32 buckets. The stop id and the stop string
    are tokens the request produces alone, so both do end a request (min_tokens holds the stop id back)."""
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(1, engine.config.vocab_size, 40)]
    phrase = [int(t) for t in rng.integers(97, 123, 6)] * 4
    choice = GuideSpec("choice", choices=("alpha", "beta", "gamma delta"))
    stop_id = _new_token(_alone(engine, Request(phrase + [5], 12), ()).tokens)
    seeded = SamplingParams(temperature=0.7, seed=9)
    stop = chr(_new_token(_alone(engine, Request(system + phrase[:3], 14, seeded), ()).tokens, printable=True))
    return [
        (Request(system + [3, 4], 12), (), 1),
        (Request(system + [9], 10, SamplingParams(temperature=0.9, top_k=20, seed=3)), (), 2),
        (Request(phrase[:15], 20), (), 1),
        (Request(phrase[:17], 18, SamplingParams(logit_bias={phrase[0]: 3.0, 7: -100.0})), (), 1),
        (Request(system[:31] + phrase[:2], 10, SamplingParams(repetition_penalty=1.3, top_logprobs=2)), (), 1),
        (Request(phrase + [5], 12, SamplingParams(min_tokens=2, stop_ids=(stop_id,)), frozenset({stop_id})), (), 1),
        (Request(system + phrase[:3], 14, seeded), (stop,), 1),
        (Request(system[:20], 16, guide=choice), (), 1),
        (Request(phrase[:9], 12, guide=GuideSpec("regex", pattern=r"[a-c]{2,5}x?[0-9]{1,3}")), (), 1),
        (Request(system + [11, 12, 13], 20), (), 1),  # cancelled once it has a token
    ]


def test_a_mixed_batch_equals_each_request_alone_and_leaves_the_engine_clean(engine):
    mix = _mix(engine)  # before the orchestrator starts: one thread drives the engine at a time
    cancelled = mix[-1][0]
    scheduler = Scheduler.for_plan(engine.plan, 32)
    record_prefill = scheduler.record_prefill

    def cancel_after_its_first_token(*args, **kwargs):  # on the engine thread: on any machine, mid-stream
        updates = record_prefill(*args, **kwargs)
        if cancelled.tokens:
            scheduler.cancel(cancelled)
        return updates

    scheduler.record_prefill = cancel_after_its_first_token
    spec = NgramSpeculator(4, gate=False)  # verify whenever a row has drafts, on any machine
    orch = Orchestrator(engine, scheduler, ByteTokenizer(), speculator=spec).start()
    served: list[tuple[Request, tuple[str, ...]]] = []
    try:
        for r, stop, n in mix:
            handles = orch.submit_many(r.samples(n), stop)[0] if n > 1 else [orch.submit(r, stop)]
            served += [(h.request, stop) for h in handles]
        wait_finished([r for r, _ in served])
        # Follow-ups: each conversation goes on; its earlier tokens are in the cache rows the first round left.
        rng = np.random.default_rng(1)
        follow = []
        for r, _ in served:
            prompt = (r.prompt + r.tokens + [int(t) for t in rng.integers(1, 200, 2)])[: CONTEXT - 6]
            follow.append(orch.submit(Request(prompt, 6)).request)
        wait_finished(follow)
        time.sleep(0.05)  # the loop's last iteration: freed slots released, nothing left in flight
        left = (orch.scheduler.active, list(orch.scheduler.queue), dict(orch._handles), len(orch.guides),
                dict(orch.guides._masks), len(spec._tracks))  # fmt: skip
    finally:
        orch.stop()
    assert orch.error is None
    assert left == ([], [], {}, 0, {}, 0)
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < cancelled.max_new_tokens
    # Every way to end was taken: a stop id (after min_tokens), a stop string, a complete guided format.
    assert [r.finish_reason for r, _ in served[6:10]] == ["stop"] * 4
    assert spec.proposed > 0 and sum(r.cached_tokens for r in follow) > 0  # drafts verified, cache rows reused
    for r, stop in [*served, *((r, ()) for r in follow)]:
        if r is cancelled:
            continue
        alone = _alone(engine, r, stop)
        assert (r.tokens, r.finish_reason) == (alone.tokens, alone.finish_reason), (r.prompt, r.sampling, stop)
        np.testing.assert_allclose(r.logprobs, alone.logprobs, rtol=1e-4, atol=1e-4)
        assert [a[0] for a in r.top_logprobs] == [a[0] for a in alone.top_logprobs]
        if r.guide is None and not stop:  # and model.generate's, one device, no cache reuse, chunks or drafts
            ref = generate(engine.params, engine.config, [r.prompt], max_new_tokens=r.max_new_tokens,
                           sampling=r.sampling, stop_ids=tuple(r.stop_ids))[0]  # fmt: skip
            assert r.tokens == ref.tokens, (r.prompt, r.sampling)


def test_a_prompt_longer_than_the_context_is_refused_at_submit_and_the_engine_serves_on(engine):
    """A prompt no prefill bucket holds (callers that skip the servicer's checks: the Python API) is refused when it
    is queued, naming the limit; before, its prefill raised on the engine thread, which stopped and failed every
    request it held."""
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        running = orch.submit(Request([5, 6, 7], 20)).request
        with pytest.raises(PlanError, match=f"prompt of {CONTEXT + 1} tokens exceeds the largest length bucket"):
            orch.submit(Request([5] * (CONTEXT + 1), 1))
        with pytest.raises(PlanError):  # n samples: none queued
            orch.submit_many(Request([5] * (CONTEXT + 1), 1).samples(2))
        # A prompt that fits with too many new tokens: its decode would overwrite its last key (wrong text, unseen).
        with pytest.raises(PlanError, match=f"prompt of 3 tokens \\+ max_new_tokens {CONTEXT} exceed the context"):
            orch.submit(Request([5, 6, 7], CONTEXT))
        after = orch.submit(Request([8, 9], 4)).request
        wait_finished([running, after])
        assert orch.queued() == 0 and len(orch.guides) == 0
    finally:
        orch.stop()
    assert orch.error is None
    assert (running.finish_reason, len(running.tokens), after.finish_reason) == ("length", 20, "length")
