"""`--layers`: the serving engine over per-layer weights (an unrolled layer loop, the default on a GPU) gives the
tokens of the stacked weights' lax.scan; a mesh refuses it in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cli_helpers import run_cli
from engine_helpers import assert_equal_to_generate, run_prefix_scenario
from meshserve.model.config import get_config
from meshserve.model.params import init_params, unstack_layers
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan

CONFIG = get_config("tiny")


def test_an_engine_over_unrolled_layers_equals_generate_over_stacked_ones():
    params = init_params(CONFIG, jax.random.key(11), jnp.float32)
    plan = make_plan(CONFIG, max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,),
                     decode_buckets=(4,), weights="f32", prefix_caching=True)  # fmt: skip
    engine = Engine(unstack_layers(params), CONFIG, plan)
    engine.warm_up(phases=("generate",))
    assert isinstance(engine.params["layers"], list) and len(engine.params["layers"]) == CONFIG.n_layers
    requests, _ = run_prefix_scenario(engine)
    assert_equal_to_generate(params, CONFIG, requests)  # the reference runs the stacked weights (lax.scan)


def test_unrolled_layers_on_a_mesh_are_refused_before_loading(capsys):
    code, _, err = run_cli(capsys, "serve", "--model", "tiny", "--mesh", "2x2x2", "--layers", "unrolled")
    assert code == 2
    assert "--layers unrolled needs one device; --mesh 2x2x2 runs the stacked layers (scan)" in err


def test_consuming_unstack_deletes_each_stacked_leaf_and_keeps_every_value():
    """consume=True (serve, generate and bench on a GPU) frees the stacked weights as it slices them, so a large
    model is not held twice; the per-layer values are those of a plain unstack, int8 scales included."""
    from meshserve.model.params import cast_params

    params = cast_params(CONFIG, init_params(CONFIG, jax.random.key(3), jnp.float32), "int8")
    expected = jax.device_get(unstack_layers(params)["layers"])
    stacked = jax.tree_util.tree_leaves(params["layers"])
    unrolled = unstack_layers(params, consume=True)
    assert all(leaf.is_deleted() for leaf in stacked)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(unrolled))
    got = jax.device_get(unrolled["layers"])
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True):
        assert a.dtype == b.dtype and (a == b).all()


def test_unrolled_layers_keep_each_layers_window_and_rotary_base():
    """tiny-gemma3 (layer 0: a 5-token window and its own rotary base; layer 1 global): the unrolled loop indexes the
    per-layer tables with a Python int, the scan with a traced one; prefill over 12 tokens and a decode step agree."""
    import numpy as np
    from meshserve.model import transformer

    config = get_config("tiny-gemma3")
    params = init_params(config, jax.random.key(12), jnp.float32)
    tokens = jax.random.randint(jax.random.key(13), (2, 12), 0, config.vocab_size)
    lengths = jnp.array([12, 9], jnp.int32)
    outs = []
    for p in (params, unstack_layers(params)):
        logits, k, v = transformer.prefill(p, config, tokens, lengths, all_logits=True)
        cache = transformer.insert(transformer.init_cache(config, 2, 16, k.dtype), k, v, lengths, jnp.arange(2))
        step, _ = transformer.decode_step(p, config, jnp.array([3, 4], jnp.int32), cache)
        outs.append((logits, step))
    for stacked, unrolled in zip(*outs, strict=True):
        np.testing.assert_allclose(unrolled, stacked, rtol=1e-5, atol=1e-5)
