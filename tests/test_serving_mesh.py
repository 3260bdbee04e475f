"""The serving engine on an emulated 2x2x2 mesh (serving/sharding.py) computes what it computes on one device."""

import jax
import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan
from meshserve.serving.sharding import mesh_steps

PROMPTS = [[5, 17, 200, 3, 99], [42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _run(engine: Engine, steps: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Prefill the three prompts into slots 0..2, then decode `steps` tokens for all 8 slots."""
    first = engine.prefill_insert(PROMPTS, [0, 1, 2], [SamplingParams()] * 3, batch=4, length=16)
    tokens, logprobs = [first.tokens], [first.logprobs]
    for _ in range(steps):
        out = engine.decode(8)
        tokens.append(out.tokens[:3])
        logprobs.append(out.logprobs[:3])
    return np.stack(tokens, 1), np.stack(logprobs, 1)


@pytest.mark.parametrize("weights", ["f32"])
def test_mesh_engine_equals_one_device(weights):
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    buckets = dict(objective="latency", max_batch=8, length_buckets=(16,), decode_buckets=(8,), weights=weights)
    single = Engine(params, config, make_plan(config, **buckets))
    single.warm_up(phases=("generate",))
    plan = make_plan(config, mesh_axes={"x": 2, "y": 2, "z": 2}, **buckets)
    placed, steps, run_plan = mesh_steps(config, params, plan)
    assert run_plan.decode_batches == (8,)
    assert all(s.ffn_layout != "replicated" for s in run_plan.steps)
    assert len(placed["layers"]["wq"].sharding.device_set) == 8
    sharded = Engine(placed, config, run_plan, steps)
    sharded.warm_up(phases=("generate",))
    want_tokens, want_lp = _run(single)
    got_tokens, got_lp = _run(sharded)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
