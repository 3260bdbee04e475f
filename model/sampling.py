"""Token sampling: greedy, temperature, top-k, top-p, with a seed per request.

All parameters are per row ([B] arrays), so one compiled step serves a batch of requests that each
asked for something different. Returned log-probs are those of the model's own distribution
(log_softmax of the raw logits), whatever the sampling transform, as vLLM and TGI report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.errors import UserError

__all__ = ["SamplingParams", "SamplingError", "sample", "validate_sampling", "TOP_K_MAX"]


class SamplingError(UserError):
    """A sampling value out of its range; the message names the field and the limit."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p, self.seed)


TOP_K_MAX = 2**31 - 1  # int32; any k >= the vocabulary keeps every token anyway


def validate_sampling(temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
    if not np.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or not 0 <= top_k <= TOP_K_MAX:  # stored as int32 per row (stack_sampling)
        raise SamplingError(f"top_k must be an integer in [0, {TOP_K_MAX}] (0 = off), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
    if int(seed) != seed or not (0 <= seed < 2**63):
        raise SamplingError(f"seed must be an integer in [0, 2**63), got {seed}")


def stack_sampling(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row arrays for `sample`: temperature, top_k, top_p float/int [B] and seed uint32 [B, 2] (high, low)."""
    return {
        "temperature": np.array([p.temperature for p in params], np.float32),
        "top_k": np.array([p.top_k for p in params], np.int32),
        "top_p": np.array([p.top_p for p in params], np.float32),
        # Both 32-bit halves of the 63-bit seed: distinct seeds give distinct keys (folding them collided).
        "seed": np.array([(p.seed >> 32, p.seed & 0xFFFFFFFF) for p in params], np.uint32).reshape(len(params), 2),
    }


def _top_k_top_p(scaled: jax.Array, sampling: dict[str, jax.Array]) -> jax.Array:
    """Mask [B, V] logits outside each row's top-k and top-p sets with -inf."""
    V = scaled.shape[-1]
    # One descending sort serves both filters: top-k keeps ranks < k, top-p the smallest prefix whose
    # probability mass reaches p (the token that crosses p is kept, as in HF and vLLM).
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(sampling["top_k"] > 0, jnp.minimum(sampling["top_k"], V), V)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [B, 1]
    in_top_k = jnp.arange(V)[None] < k[:, None]
    sorted_probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    n_keep = jnp.maximum(jnp.sum(mass_before < sampling["top_p"][:, None], axis=-1), 1)
    # top_p = 1 keeps everything: float32 cumsum can reach 1.0 before the tail and would drop it.
    n_keep = jnp.where(sampling["top_p"] >= 1.0, V, n_keep)
    pth = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)


def _seed_key(halves: jax.Array) -> jax.Array:
    """A threefry key whose data is the seed's (high, low) uint32 halves [2]: what `jax.random.key(seed)` builds
    for a 64-bit seed, so seeds below 2**32 keep the streams they had (key data [0, seed])."""
    return jax.random.wrap_key_data(halves.astype(jnp.uint32), impl="threefry2x32")


def sample(logits: jax.Array, sampling: dict[str, jax.Array], step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float32 [B, V]; step: int scalar or [B] (each row's decode index, folded into its key).

    Returns tokens int32 [B] and their log-probs float32 [B] under the unmodified model distribution.
    The batch-wide conditions (any row filters? every row greedy?) are real branches: do not vmap this over rows
    (under vmap `lax.cond` runs both branches, i.e. the vocabulary sort for every row on every step); pass
    per-row steps instead.
    """
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    temperature = sampling["temperature"]
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    needs_filter = jnp.any(~greedy & ((sampling["top_k"] > 0) | (sampling["top_p"] < 1.0)))
    # The sort over V is the costly part of a decode step's sampling: skip it unless a row filters.
    filtered = jax.lax.cond(needs_filter, lambda: _top_k_top_p(scaled, sampling), lambda: scaled)

    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), greedy.shape)

    def draw() -> jax.Array:
        keys = jax.vmap(lambda s, t: jax.random.fold_in(_seed_key(s), t))(sampling["seed"], steps)
        sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
        return jnp.where(greedy, argmax, sampled.astype(jnp.int32))

    tokens = jax.lax.cond(jnp.all(greedy), lambda: argmax, draw)
    return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
