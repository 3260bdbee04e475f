"""Prefix caching on an emulated 2x2x2 mesh: the sharded engine's extend steps (serving/sharding.py) reuse cached
prompt prefixes and produce exactly the tokens model.generate produces on one device, with the KV cache kept in
the decode layout's split (batch- or heads-sharded)."""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import EnginePlan, make_plan
from meshserve.serving.scheduler import Request, Scheduler
from meshserve.serving.sharding import mesh_steps

# tiny with a key/value head per query head: heads-sharded attention then splits the cache's K over the mesh (one
# multi-query head would leave it replicated), and the prefill's head split must not leak into a batch-split cache.
CONFIG = get_config("tiny", n_kv_heads=8)
MESH = {"x": 2, "y": 2, "z": 2}


def _plan(attention: str) -> EnginePlan:
    """Eight slots, prompt buckets 16 and 64 (a 40-token system prompt plus a few tokens needs 64, the rest after
    it 16), prefills of 1 and 4 prompts; the decode step in `attention` layout (the planner picks heads here)."""
    plan = make_plan(CONFIG, max_batch=8, max_context=64, length_buckets=(16,), decode_buckets=(8,), weights="f32",
                     mesh_axes=MESH, prefix_caching=True)  # fmt: skip
    steps = tuple(dataclasses.replace(s, attention_layout=attention) if s.phase == "decode" else s for s in plan.steps)
    return dataclasses.replace(plan, steps=steps)


def _wait(requests: list[Request], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.finished for r in requests):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements of its result, summed over a tuple's parts) for every all-gather, all-reduce, all-to-all and
    collective-permute in HLO text."""
    out = []
    ops = r"(all-gather|all-reduce|all-to-all|collective-permute)(?:-start)?\("
    for result, op in re.findall(r"= (\(?[\w\[\]{}, :]*?\)?) " + ops, hlo):
        shapes = re.findall(r"\w+\[([\d,]*)\]", result)
        out.append((op, sum(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in shapes)))
    return out


@pytest.mark.parametrize("attention", ["batch", "heads"])
def test_mesh_engine_with_reused_prefixes_equals_one_device_generate(attention):
    params = init_params(CONFIG, jax.random.key(7), jnp.float32)
    placed, steps, plan = mesh_steps(CONFIG, params, _plan(attention))
    decode = next(s for s in plan.steps if s.phase == "decode")
    assert (decode.attention_layout, plan.prefix_caching) == (attention, True)
    kv = steps.decode_state_sharding.cache.k
    # batch: the cache's B split over the mesh; heads: its K split
    assert (kv.spec[1] is not None, kv.spec[3] is not None) == (attention == "batch", attention == "heads")
    engine = Engine(placed, CONFIG, plan, steps)
    engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == plan.compile_count(("generate",))
    assert sorted(engine._extend) == [(b, 16, 64) for b in plan.prefill_batches]  # plan.extend_lengths: (16,)

    # The extend step takes and returns the decode state in the decode split (its donated cache is updated in
    # place), and never gathers the whole cache onto one chip: the prefix rows come out of the split cache.
    cache_elements = int(np.prod(engine._state.cache.k.shape))
    for key, step in engine._extend.items():
        state_in, state_out = step.input_shardings[0][1], step.output_shardings[0]
        for sharding in (state_in.cache.k, state_in.cache.v, state_out.cache.k, state_out.cache.v):
            assert sharding.is_equivalent_to(kv, 5), (key, sharding)
        gathered = [n for op, n in _collectives(step.as_text()) if op == "all-gather"]
        assert all(n < cache_elements for n in gathered), (key, gathered)

    orch = Orchestrator(engine, Scheduler.for_plan(plan, 8), ByteTokenizer()).start()
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(1, CONFIG.vocab_size, 40)]
    greedy, penalised = SamplingParams(), SamplingParams(repetition_penalty=1.5, presence_penalty=0.5)
    sampled = SamplingParams(0.8, top_k=30, seed=11)
    run = lambda prompt, n, sampling: orch.submit(Request(list(prompt), n, sampling=sampling)).request  # noqa: E731
    try:
        turn1 = run(system + [3, 4, 5, 6, 7], 8, greedy)
        _wait([turn1])
        # One extend batch: turn2 reuses turn 1's whole slot (prompt and answer); `other` reads the system prompt
        # from that slot in the same step that overwrites it with turn2.
        turn2 = run(turn1.prompt + turn1.tokens + [9, 10, 11], 6, penalised)
        other = run(system + [20, 21], 6, sampled)
        _wait([turn2, other])
        # Nothing cached for `fresh`, batched with one that reuses: a row without a prefix extends from position 0.
        fresh = run([int(t) for t in rng.integers(1, CONFIG.vocab_size, 30)], 5, greedy)
        again = run(system + [20, 21, 22, 23], 5, penalised)
        _wait([fresh, again])
    finally:
        orch.stop()
    assert orch.error is None
    assert turn1.cached_tokens == 0 and fresh.cached_tokens == 0
    assert turn2.cached_tokens == len(turn1.prompt) + len(turn1.tokens) - 1
    assert other.cached_tokens == 40 and again.cached_tokens >= 42
    state = engine._state.cache
    assert state.k.sharding.is_equivalent_to(kv, 5) and state.v.sharding.is_equivalent_to(kv, 5)
    for r in (turn1, turn2, other, fresh, again):
        ref = generate(params, CONFIG, [r.prompt], max_new_tokens=r.max_new_tokens, sampling=r.sampling)[0]
        assert r.tokens == list(ref.tokens), (r.cached_tokens, r.prompt)
        np.testing.assert_allclose(r.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
