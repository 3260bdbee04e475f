"""What each compiled step of the engine computes: pure functions of the parameters and the decode state, traced
once per bucket by `Engine` (serving/engine.py), which owns the compiled executables and the state between steps.

Shapes in the paper's alphabet (model/config.py): b rows of a step, B decode slots, T prompt bucket, C context
bucket, S cache length, V vocabulary, N layers, K kv heads, Q head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.model import transformer
from meshserve.model.config import ModelConfig
from meshserve.model.sampling import SamplingParams, TokenHistory, sample, stack_sampling, top_logprobs

__all__ = [
    "DecodeState",
    "ModelSteps",
    "decode_rows",
    "extend_step",
    "fresh_state",
    "insert_rows",
    "pad_sampling",
    "prefill_step",
    "release_slots",
    "score_tokens",
]

SamplingArrays = dict[str, jax.Array]  # SAMPLING_FIELDS: [B] each, seed [B, 2], bias table [B, L_MAX] (sampling.py)


@dataclass(frozen=True)
class ModelSteps:
    """The model functions the engine compiles, and where their outputs live (None = default device)."""

    prefill: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] = transformer.prefill
    decode_step: Callable[..., tuple[jax.Array, transformer.KVCache]] = transformer.decode_step
    insert: Callable[..., transformer.KVCache] = transformer.insert
    # Decode-layout sharding of the decode state (insert reshards prefill's k, v into it); None on one device.
    decode_state_sharding: Any = None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeState:
    """Per-slot state carried on device from step to step."""

    cache: transformer.KVCache  # k, v [N, B, S, K, Q], lengths [B]
    last: jax.Array  # int32 [B]: each slot's latest token (the next step's input)
    # int32 [B]: each slot's sampling step (0 = the prefill's token) = tokens it generated so far, folded into its
    # key and compared with its bias entries' `until` (min_tokens)
    step: jax.Array
    sampling: SamplingArrays
    history: TokenHistory  # in_prompt bool [B, V], counts int32 [B, V] of generated tokens


def pad_sampling(params: list[SamplingParams], b: int) -> dict[str, np.ndarray]:
    """Sampling arrays of `params` padded with defaults to b rows ([b] each, seed [b, 2])."""
    return stack_sampling(list(params) + [SamplingParams()] * (b - len(params)))


def fresh_state(config: ModelConfig, B: int, S: int, dtype) -> DecodeState:
    """All B slots empty: an [N, B, S, K, Q] cache of `dtype`, default sampling, no history."""
    return DecodeState(
        transformer.init_cache(config, B, S, dtype),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B,), jnp.int32),
        {n: jnp.asarray(a) for n, a in pad_sampling([], B).items()},
        TokenHistory(jnp.zeros((B, config.vocab_size), bool), jnp.zeros((B, config.vocab_size), jnp.int32)),
    )


def prefill_step(steps: ModelSteps, config: ModelConfig, params, tokens, lengths, sampling):
    """tokens [b, T], lengths [b] -> (first tokens [b], log-probs [b], top ids and log-probs [b, K]), k, v
    [N, b, T, K, Q], and the prompts' tokens in_prompt bool [b, V] (for insert)."""
    logits, k, v = steps.prefill(params, config, tokens, lengths)
    history = TokenHistory.of_prompts(tokens, lengths, config.vocab_size)
    tok, lp = sample(logits, sampling, jnp.int32(0), history)
    return (tok, lp, *top_logprobs(logits, sampling)), k, v, history.in_prompt


def extend_step(
    steps: ModelSteps,
    config: ModelConfig,
    params,
    state: DecodeState,
    tokens,
    lengths,
    prefix_tokens,
    cached,
    sources,
    slots,
    sampling,
):
    """Prefill the rest of prompts whose first cached [b] tokens (prefix_tokens [b, C], right-padded) already sit
    in cache rows sources [b], and insert them into slots [b] (prefix included): tokens [b, T] are the rest,
    lengths [b] their counts. -> new state, (first tokens [b], log-probs [b], top ids and log-probs [b, K])."""
    C = prefix_tokens.shape[1]
    c = state.cache
    prefix = transformer.Prefix(c.k[:, sources, :C], c.v[:, sources, :C], cached)  # [N, b, C, K, Q]
    logits, k, v = steps.prefill(params, config, tokens, lengths, prefix=prefix)
    rest = TokenHistory.of_prompts(tokens, lengths, config.vocab_size)
    history = TokenHistory(
        rest.in_prompt | TokenHistory.of_prompts(prefix_tokens, cached, config.vocab_size).in_prompt,
        rest.counts,
    )
    tok, lp = sample(logits, sampling, jnp.int32(0), history)
    insert = functools.partial(steps.insert, prefix=prefix)
    new = insert_rows(insert, state, k, v, lengths, slots, tok, sampling, history.in_prompt)
    return new, (tok, lp, *top_logprobs(logits, sampling))


def insert_rows(insert, state: DecodeState, k, v, lengths, slots, first, sampling, in_prompt) -> DecodeState:
    """Write b prefilled rows into decode slots `slots` [b] (index B = a padding row, dropped)."""
    cache = insert(state.cache, k, v, lengths, slots)
    counts = state.history.counts.at[slots].set(0, mode="drop").at[slots, first].set(1, mode="drop")
    return DecodeState(
        cache=cache,
        last=state.last.at[slots].set(first, mode="drop"),
        step=state.step.at[slots].set(1, mode="drop"),
        sampling={n: state.sampling[n].at[slots].set(sampling[n], mode="drop") for n in state.sampling},
        history=TokenHistory(state.history.in_prompt.at[slots].set(in_prompt, mode="drop"), counts),
    )


def decode_rows(steps: ModelSteps, config: ModelConfig, b: int, context: int, params, state: DecodeState):
    """One token for slots [0, b), attending over cache positions [0, context) (every used row's length is
    below it): -> new state, (tokens int32 [b], log-probs float32 [b], top ids int32 and log-probs [b, K])."""
    full = b == state.last.shape[0]
    c = state.cache
    sub = c if full else transformer.KVCache(c.k[:, :b], c.v[:, :b], c.lengths[:b])
    bounded = {} if context == c.max_len else {"context": context}
    logits, sub = steps.decode_step(params, config, state.last[:b], sub, **bounded)
    samp = {n: a[:b] for n, a in state.sampling.items()}
    # The whole history goes in: sample slices rows [0, b) only inside its penalty branch.
    tok, lp = sample(logits, samp, state.step[:b], state.history)  # each row's own step, as in `generate`
    if full:
        cache = sub
    else:
        cache = transformer.KVCache(
            c.k.at[:, :b].set(sub.k), c.v.at[:, :b].set(sub.v), c.lengths.at[:b].set(sub.lengths)
        )
    new = DecodeState(cache, state.last.at[:b].set(tok), state.step.at[:b].add(1), state.sampling,
                      state.history.add(tok))  # fmt: skip
    return new, (tok, lp, *top_logprobs(logits, samp))


def release_slots(state: DecodeState, free: jax.Array) -> DecodeState:
    """Default sampling settings in the slots where free bool [B]: a finished request's penalties, filters, bias
    entries or top_logprobs must not keep the batch-wide branches of later steps switched on."""
    defaults = pad_sampling([], 1)
    sampling = {
        n: jnp.where(free.reshape(-1, *[1] * (a.ndim - 1)), jnp.asarray(defaults[n][0]), a)
        for n, a in state.sampling.items()
    }
    return dataclasses.replace(state, sampling=sampling)


def score_tokens(steps: ModelSteps, config: ModelConfig, params, tokens, lengths):
    """tokens [b, T], lengths [b] -> log p(tokens[:, t+1] | tokens[:, :t+1]) [b, T-1], and the most likely token at
    each position with its log-prob: ids int32 [b, T-1], log-probs [b, T-1] (a token is greedy when it is that id)."""
    logits, _, _ = steps.prefill(params, config, tokens, lengths, all_logits=True)  # [b, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = tokens[:, 1:]
    token_lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    return token_lp, best, jnp.take_along_axis(logp, best[..., None], axis=-1)[..., 0]
