"""A server's step over b of its B slots reads and writes rows [0, b) of the whole cache (transformer.decode_step
with tokens [b] and a cache of B rows; engine_steps' decode_rows and verify_rows on GPUs): the same logits, cache
rows and lengths as the step over a cache of those b rows alone, and rows b.. untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.params import init_params, unstack_layers
from meshserve.serving import engine_steps

B, S = 4, 32


def _model(name: str, unrolled: bool = False):
    config = get_config(name)
    params = init_params(config, jax.random.key(0), jnp.float32)
    return config, unstack_layers(params) if unrolled else params


def _filled(config, params, dtype):
    """A cache of B rows of different lengths, prefilled."""
    tokens = jax.random.randint(jax.random.key(1), (B, 10), 0, config.vocab_size)
    lengths = jnp.array([10, 7, 9, 5], jnp.int32)
    _, k, v = transformer.prefill(params, config, tokens, lengths)
    return transformer.insert(transformer.init_cache(config, B, S, dtype), k, v, lengths, jnp.arange(B))


@pytest.mark.parametrize(
    ("name", "unrolled", "kv", "attention"),
    [("tiny-falcon", False, "auto", "xla"), ("tiny-falcon", True, "auto", "pallas"), ("tiny-gemma3", True, "auto", "xla"),
     ("tiny", False, "int8", "xla")],
)  # fmt: skip
def test_decode_step_over_the_first_b_rows_of_the_whole_cache(monkeypatch, name, unrolled, kv, attention):
    """Stacked and unrolled layers, the attention kernel (interpreted), sliding windows, an int8 cache."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", attention)
    config, params = _model(name, unrolled)
    cache = _filled(config, params, jnp.int8 if kv == "int8" else jnp.float32)
    b = 2
    last = jnp.array([3, 4], jnp.int32)
    want, want_cache = transformer.decode_step(params, config, last, jax.tree.map(lambda a: a[:, :b] if a.ndim > 1
                                                                                 else a[:b], cache), context=16)  # fmt: skip
    got, got_cache = transformer.decode_step(params, config, last, cache, context=16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for new, sub, old in zip(
        jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), jax.tree.leaves(cache), strict=True
    ):
        rows_axis = 0 if new.ndim == 1 else 1
        np.testing.assert_array_equal(np.take(new, range(b), rows_axis), sub)  # the step's rows: as over b alone
        np.testing.assert_array_equal(np.take(new, range(b, B), rows_axis), np.take(old, range(b, B), rows_axis))
    assert list(got_cache.lengths) == [11, 8, 9, 5]


@pytest.mark.parametrize("verify", [False, True])
def test_engine_step_in_place_equals_the_sliced_step(verify):
    """decode_rows / verify_rows over b = 2 of 4 slots: the whole-cache form (GPUs) and the sliced one (XLA:CPU)
    leave the same state and return the same tokens."""
    config, params = _model("tiny")
    state = engine_steps.fresh_state(config, B, S, jnp.float32)
    state = engine_steps.dataclasses.replace(state, cache=_filled(config, params, jnp.float32),
                                             last=jnp.array([3, 4, 5, 6], jnp.int32))  # fmt: skip
    steps = engine_steps.ModelSteps()
    if verify:
        drafts = jnp.array([[7, -1], [8, 9]], jnp.int32)
        run = lambda whole: engine_steps._verify_rows(steps, config, 2, 16, params, state, drafts, whole=whole)  # noqa: E731
    else:
        run = lambda whole: engine_steps._decode_rows(steps, config, 2, 16, params, state, whole=whole)  # noqa: E731
    (in_place, out_a), (sliced, out_b) = run(True), run(False)
    for a, b in zip(jax.tree.leaves((in_place, out_a)), jax.tree.leaves((sliced, out_b)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(in_place.cache.k[:, :2], state.cache.k[:, :2])  # the step wrote its rows
    np.testing.assert_array_equal(in_place.cache.k[:, 2:], state.cache.k[:, 2:])
