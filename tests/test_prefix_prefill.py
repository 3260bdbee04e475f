"""Prefill that continues from a cached prefix (prefix caching, chunked prompts), at the model level.

`transformer.prefill(..., prefix=...)` over a prompt's suffix, attending over the prefix's cached keys, must give the
logits and new keys of a full prefill of the whole prompt; `insert(..., prefix=...)` must leave the cache row exactly
as a full prefill's insert would, also when the prefix comes from another row or the row held another prompt.
A windowed model (tiny-gemma3: a 5-token window on layer 0) gives the same equality with cuts on both sides of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.params import init_params

CONFIG = get_config("tiny")
S = 48


def _full(params, prompts: list[list[int]], T: int, config=CONFIG):
    tokens = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    return transformer.prefill(params, config, jnp.asarray(tokens), lengths), lengths


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma3"])
def test_suffix_over_a_cached_prefix_equals_the_full_prefill(name):
    CONFIG = get_config(name)  # noqa: N806  (the module's name, per case)
    params = init_params(CONFIG, jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, CONFIG.vocab_size, n)) for n in (21, 9, 30)]
    cut = [13, 0, 29]  # prefix lengths: a middle cut, no prefix, all but the last token
    (full_logits, full_k, full_v), full_lengths = _full(params, prompts, 32, CONFIG)

    # The prefixes sit in a cache, in rows other than where the prompts will end up; other rows hold noise.
    B = 4
    shape = (CONFIG.n_layers, B, S, CONFIG.n_kv_heads, CONFIG.d_head)
    noise = jax.random.normal(jax.random.key(3), shape)
    cache = transformer.KVCache(noise, noise + 1, jnp.zeros((B,), jnp.int32))
    sources = jnp.array([2, 0, 3])
    cache = transformer.insert(cache, full_k, full_v, full_lengths, sources)  # whole prompts; prefix = first `cut`

    C, T = 32, 16
    suffix = np.zeros((3, T), np.int32)
    for i, (p, c) in enumerate(zip(prompts, cut, strict=True)):
        suffix[i, : len(p) - c] = p[c:]
    offsets = jnp.array(cut, jnp.int32)
    prefix = transformer.Prefix(cache.k[:, sources, :C], cache.v[:, sources, :C], offsets)
    new_lengths = full_lengths - offsets
    logits, k, v = transformer.prefill(params, CONFIG, jnp.asarray(suffix), new_lengths, prefix=prefix)
    np.testing.assert_allclose(logits, full_logits, rtol=2e-5, atol=2e-5)
    for i, (p, c) in enumerate(zip(prompts, cut, strict=True)):
        np.testing.assert_allclose(k[:, i, : len(p) - c], full_k[:, i, c : len(p)], rtol=2e-5, atol=2e-5)

    # Insert into other rows (1 takes row 2's prefix; 0 and 3 overwrite themselves), past whatever they held.
    slots = jnp.array([1, 0, 3])
    out = transformer.insert(cache, k, v, new_lengths, slots, prefix=prefix)
    np.testing.assert_array_equal(out.lengths[slots], full_lengths)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(out.k[:, int(slots[i]), : len(p)], full_k[:, i, : len(p)], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(out.v[:, int(slots[i]), : len(p)], full_v[:, i, : len(p)], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out.k[:, 2], cache.k[:, 2])  # a row no slot names is untouched

    # A padding row (slot index B) writes nothing.
    dropped = transformer.insert(cache, k, v, new_lengths, jnp.array([B, B, B]), prefix=prefix)
    np.testing.assert_array_equal(dropped.k, cache.k)
    np.testing.assert_array_equal(dropped.lengths, cache.lengths)


def test_a_prefix_key_past_the_row_prefix_length_is_ignored():
    params = init_params(CONFIG, jax.random.key(0), jnp.float32)
    tokens = jnp.array([[5, 6, 7, 0]], jnp.int32)
    lengths = jnp.array([3], jnp.int32)
    C = 8
    key = jax.random.key(4)
    shape = (CONFIG.n_layers, 1, C, CONFIG.n_kv_heads, CONFIG.d_head)
    pk, pv = jax.random.normal(key, shape), jax.random.normal(jax.random.fold_in(key, 1), shape)
    base = transformer.prefill(params, CONFIG, tokens, lengths, prefix=transformer.Prefix(pk, pv, jnp.array([4])))
    junk = pk.at[:, :, 4:].set(1e3), pv.at[:, :, 4:].set(-1e3)
    same = transformer.prefill(params, CONFIG, tokens, lengths, prefix=transformer.Prefix(*junk, jnp.array([4])))
    np.testing.assert_allclose(same[0], base[0], rtol=1e-6, atol=1e-6)
    # ...and one below it is not (the test can fail).
    moved = transformer.prefill(
        params, CONFIG, tokens, lengths, prefix=transformer.Prefix(pk.at[:, :, 1].set(1e3), pv, jnp.array([4]))
    )
    assert not np.allclose(moved[0], base[0], atol=1e-3)
