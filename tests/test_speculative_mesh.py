"""Speculative decoding on an emulated 2x2x2 mesh: the sharded engine's verify step (an extend of every slot's last
token and drafts in the decode layout, serving/sharding.py) keeps the KV cache in the decode split, and greedy and
sampled requests served with drafts get exactly the tokens model.generate gives on one device; a request with a
penalty (no drafts) beside them too."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import serve_requests
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan
from meshserve.serving.sharding import mesh_steps
from meshserve.serving.speculative import NgramSpeculator
from test_prefix_caching_mesh import _collectives

# A key/value head per query head, so heads-sharded attention splits the cache's K (one multi-query head would
# leave it replicated); batch-sharded attention splits its B, across which the verify step scatters.
CONFIG = get_config("tiny", n_kv_heads=8)
MESH = {"x": 2, "y": 2, "z": 2}
K = 4


@pytest.mark.parametrize("attention", ["batch", "heads"])
def test_mesh_speculation_equals_one_device_generate(attention):
    params = init_params(CONFIG, jax.random.key(7), jnp.float32)
    plan = make_plan(CONFIG, max_batch=8, max_context=64, length_buckets=(16,), decode_buckets=(8,), weights="f32",
                     mesh_axes=MESH, prefix_caching=False, speculative_tokens=K)  # fmt: skip
    steps = tuple(dataclasses.replace(s, attention_layout=attention) if s.phase == "decode" else s for s in plan.steps)
    placed, model_steps, plan = mesh_steps(CONFIG, params, dataclasses.replace(plan, steps=steps))
    assert plan.verify_batches == (8,)  # on a mesh the one decode bucket, all slots
    engine = Engine(placed, CONFIG, plan, model_steps)
    engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == plan.compile_count(("generate",)) and list(engine._verify) == [(8, 64)]
    # The verify step takes and returns the cache in the decode split: it is donated and updated in place.
    kv = model_steps.decode_state_sharding.cache.k
    (verify,) = engine._verify.values()
    state_in, state_out = verify.input_shardings[0][1], verify.output_shardings[0]
    for sharding in (state_in.cache.k, state_in.cache.v, state_out.cache.k, state_out.cache.v):
        assert sharding.is_equivalent_to(kv, 5), sharding
    # ... and never gathers the whole cache onto one chip (its prefix is read in the split).
    cache_elements = int(np.prod(engine._state.cache.k.shape))
    gathered = [n for op, n in _collectives(verify.as_text()) if op == "all-gather"]
    assert all(n < cache_elements for n in gathered), gathered

    loop = [7, 3, 9, 12, 4, 7, 3, 9, 12, 4, 7, 3]  # repeats: drafts are found from the start
    cases = [
        (loop, 40, SamplingParams()),
        ([2, 8, 2, 8, 2, 8, 5], 30, SamplingParams()),
        ([11, 5, 6], 24, SamplingParams()),
        (loop, 20, SamplingParams(temperature=0.5, seed=5)),  # sampled: drafts too
        (loop, 20, SamplingParams(temperature=0.9, seed=6, repetition_penalty=1.2)),  # never drafts (a penalty)
    ]
    speculator = NgramSpeculator(K, gate=False)  # verify steps whatever they cost here
    got = serve_requests(engine, cases, speculator=speculator)
    for (prompt, n, sampling), received in zip(cases, got, strict=True):
        want = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0]
        assert received.tokens == list(want.tokens), prompt
    assert speculator.accepted > 0 and speculator.proposed >= speculator.accepted
    assert engine._state.cache.k.sharding.is_equivalent_to(kv, 5)
