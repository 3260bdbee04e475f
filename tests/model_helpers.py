"""Helpers shared by the model tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from meshserve.model import transformer


def prefill_and_decode_logits(params, config) -> list[jax.Array]:
    """Prefill logits [2, 12, V] of two rows of different lengths, then two decode steps' logits [2, V] each."""
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, config.vocab_size)
    lengths = jnp.array([12, 9], jnp.int32)
    logits, k, v = transformer.prefill(params, config, tokens, lengths, all_logits=True)
    cache = transformer.insert(transformer.init_cache(config, 2, 16, k.dtype), k, v, lengths, jnp.arange(2))
    steps = []
    for last in (jnp.array([3, 4], jnp.int32), jnp.array([5, 6], jnp.int32)):
        step, cache = transformer.decode_step(params, config, last, cache)
        steps.append(step)
    return [logits, *steps]
