"""Prefix caching on an emulated 2x2x2 mesh: the sharded engine's extend steps (serving/sharding.py) reuse cached
prompt prefixes and produce exactly the tokens model.generate produces on one device, with the KV cache kept in
the decode layout's split (batch- or heads-sharded)."""

from __future__ import annotations

import dataclasses
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import assert_equal_to_generate, run_prefix_scenario
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.serving.engine import Engine
from meshserve.serving.plan import EnginePlan, make_plan
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

    requests, orch = run_prefix_scenario(engine)
    state = engine._state.cache
    assert state.k.sharding.is_equivalent_to(kv, 5) and state.v.sharding.is_equivalent_to(kv, 5)
    assert_equal_to_generate(params, CONFIG, requests)


def test_mesh_engine_serves_from_covering_steps_while_the_rest_compile_on_a_thread():
    """A deferred warm-up on the mesh (serve's default): the prefix scenario runs while `compile_pending` compiles
    the other buckets on a second thread; every request equals one-device generate, and every step ends compiled."""
    params = init_params(CONFIG, jax.random.key(7), jnp.float32)
    placed, steps, plan = mesh_steps(CONFIG, params, _plan("batch"))
    engine = Engine(placed, CONFIG, plan, steps)
    engine.warm_up(phases=("generate",), defer=True)
    assert 0 < engine.compiled_steps() < plan.compile_count(("generate",))
    compiler = threading.Thread(target=engine.compile_pending)
    compiler.start()
    requests, _ = run_prefix_scenario(engine)
    compiler.join()
    assert engine.pending_steps() == 0 and engine.compiled_steps() == plan.compile_count(("generate",))
    assert_equal_to_generate(params, CONFIG, requests)
