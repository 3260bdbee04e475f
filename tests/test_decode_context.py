"""Decode steps that attend over the filled part of the cache only (context buckets), on one device.

`transformer.decode_step(..., context=C)` must equal the full-cache step for every row whose length is below C, and
the serving engine must produce the same tokens as `model.generate` while its steps move through several context
buckets (a long generation crosses them) and back down when long requests leave.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import serve_requests
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.plan import PlanError, make_plan

CONFIG = get_config("tiny")


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma3"])
def test_bounded_context_step_equals_the_full_cache_step(name):
    CONFIG = get_config(name)  # noqa: N806  (the module's name, per case; tiny-gemma3: a 5-token window)
    params = init_params(CONFIG, jax.random.key(0), jnp.float32)
    B, S, C = 3, 64, 16
    key = jax.random.key(1)
    shape = (CONFIG.n_layers, B, S, CONFIG.n_kv_heads, CONFIG.d_head)
    cache = transformer.KVCache(
        jax.random.normal(key, shape), jax.random.normal(jax.random.fold_in(key, 1), shape), jnp.array([3, 15, 9])
    )
    tokens = jnp.array([5, 7, 11], jnp.int32)
    full_logits, full_cache = transformer.decode_step(params, CONFIG, tokens, cache)
    logits, bounded = transformer.decode_step(params, CONFIG, tokens, cache, context=C)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bounded.k, full_cache.k)  # the new token is written the same way
    np.testing.assert_array_equal(bounded.lengths, full_cache.lengths)
    # Keys past C would matter to the full step: with garbage there, only the bounded step ignores it.
    k_far = cache.k.at[:, :, C:].set(1e3)
    far_logits, _ = transformer.decode_step(params, CONFIG, tokens, transformer.KVCache(k_far, cache.v, cache.lengths))
    near_logits, _ = transformer.decode_step(
        params, CONFIG, tokens, transformer.KVCache(k_far, cache.v, cache.lengths), context=C
    )
    np.testing.assert_allclose(near_logits, full_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(far_logits, full_logits, rtol=1e-5, atol=1e-5)  # masked either way (pos < C)
    with pytest.raises(ValueError, match="context must be in"):
        transformer.decode_step(params, CONFIG, tokens, cache, context=S + 1)


@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.int8])
def test_windowed_layers_read_their_window_and_still_reproduce_prefill(kv_dtype):
    """tiny-gemma3's layer 0 has a 5-token window: past it, a decode step reads only each row's last 5 positions
    (a gather) instead of the whole context. Its logits must equal the prefill of the whole sequence (masks over
    every key), for rows of different lengths, with the layers scanned (the read chosen per layer by lax.cond) and
    unrolled (chosen in Python); and keys outside a row's window must not matter."""
    from meshserve.model.params import unstack_layers

    config = get_config("tiny-gemma3")
    assert config.layer_windows[0] == 5 and config.layer_windows[1] == 0
    params = init_params(config, jax.random.key(3), jnp.float32)
    tokens = jax.random.randint(jax.random.key(4), (2, 20), 0, config.vocab_size)
    starts = [3, 9]  # prefilled lengths: row 0 crosses the window while decoding, row 1 starts past it
    full, _, _ = transformer.prefill(params, config, tokens, jnp.asarray([20, 20]), all_logits=True)
    tol = 1e-4 if kv_dtype == jnp.float32 else 3e-2  # int8: prefill attends over the unrounded prompt keys
    for layer_params in (params["layers"], unstack_layers(params)["layers"]):
        stepped = {**params, "layers": layer_params}
        cache = transformer.init_cache(config, 2, 32, kv_dtype)
        for row, n in enumerate(starts):
            _, k, v = transformer.prefill(params, config, tokens[row : row + 1, :n], jnp.asarray([n]))
            cache = transformer.insert(cache, k, v, jnp.asarray([n]), jnp.asarray([row]))
        step_fn = jax.jit(lambda p, t, c: transformer.decode_step(p, config, t, c, context=32))  # one compile
        for step in range(20 - max(starts)):
            at = [n + step for n in starts]
            logits, cache = step_fn(stepped, tokens[jnp.arange(2), jnp.asarray(at)], cache)
            for row in range(2):  # decode at position at[row] predicts what prefill's logits there predict
                np.testing.assert_allclose(logits[row], full[row, at[row]], rtol=tol, atol=tol)
    if kv_dtype == jnp.float32:  # garbage in layer 0's keys before each row's window changes nothing
        pos = cache.lengths  # [2]: the positions the next step writes
        before = jnp.arange(32)[None, :, None, None] < (pos - 4)[:, None, None, None]  # [B, S, 1, 1]
        k_bad = cache.k.at[0].set(jnp.where(before, 1e3, cache.k[0]))
        next_tokens = tokens[jnp.arange(2), jnp.minimum(pos, 19)]
        clean, _ = transformer.decode_step(params, config, next_tokens, cache, context=32)
        dirty, _ = transformer.decode_step(
            params, config, next_tokens, transformer.KVCache(k_bad, cache.v, cache.lengths), context=32
        )
        np.testing.assert_allclose(dirty, clean, rtol=1e-6, atol=1e-6)


def test_plan_context_buckets():
    plan = make_plan(CONFIG, max_context=128, context_buckets=(16, 32, 64), decode_buckets=(2,), max_batch=2)
    assert plan.contexts() == (16, 32, 64, 128)
    assert [plan.context_bucket(n) for n in (1, 16, 17, 65, 500)] == [16, 16, 32, 128, 128]
    assert make_plan(get_config("demo")).contexts() == (128, 256, 512)  # default: powers of two from 128
    mesh = make_plan(CONFIG, mesh_axes={"x": 2, "y": 2, "z": 2}, max_batch=8)
    assert mesh.contexts() == (mesh.max_context,)  # the sharded step attends over the whole cache
    with pytest.raises(PlanError, match="context buckets must be in"):
        make_plan(CONFIG, max_context=64, context_buckets=(128,))
    with pytest.raises(PlanError, match="context buckets need one device"):
        make_plan(CONFIG, mesh_axes={"x": 2, "y": 2, "z": 2}, max_batch=8, context_buckets=(32,))


def test_engine_tokens_equal_generate_across_context_buckets():
    params = init_params(CONFIG, jax.random.key(2), jnp.float32)
    plan = make_plan(CONFIG, max_batch=2, max_context=128, length_buckets=(16,), decode_buckets=(2,),
                     context_buckets=(16, 32, 64), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == plan.compile_count(("generate",))  # what the CLIs' progress bars count
    used = []
    dispatch = engine.decode_async

    def recording(batch, context=None):
        used.append(plan.context_bucket(context))
        return dispatch(batch, context)

    engine.decode_async = recording
    cases = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, SamplingParams()), ([40, 41, 42], 20, SamplingParams(0.9, seed=5))]
    got = [r.tokens for r in serve_requests(engine, cases)]
    for (prompt, n, sampling), tokens in zip(cases, got, strict=True):
        ref = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0]
        assert tokens == list(ref.tokens)
    assert {16, 32, 64, 128} <= set(used)  # the long request walked up through every bucket


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_attend_cached_equals_attention_over_cache_plus_new_key(kv_heads):
    from meshserve.model import layers

    B, C, H, Q = 3, 10, 4, 8
    keys = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(keys[0], (B, 1, H, Q))
    kc, vc = (jax.random.normal(k, (B, C, kv_heads, Q)) for k in keys[1:3])
    kn, vn = (jax.random.normal(k, (B, 1, kv_heads, Q)) for k in keys[3:5])
    visible = jnp.arange(C)[None, :] < jnp.array([[0], [4], [10]])  # nothing cached, some, all
    got = layers.attend_cached(q, kc, vc, visible, kn, vn)
    mask = jnp.concatenate([visible, jnp.ones((B, 1), bool)], axis=-1)[:, None, :]  # [B, 1, C+1]
    want = layers.attend(q, jnp.concatenate([kc, kn], 1), jnp.concatenate([vc, vn], 1), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
