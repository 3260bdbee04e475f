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
from meshserve.model import kv_quant, transformer
from meshserve.model.config import ModelConfig
from meshserve.model.sampling import (
    SamplingParams,
    TokenHistory,
    guide_arrays,
    sample,
    stack_sampling,
    top_logprobs,
)

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
    "resample_rows",
    "score_tokens",
    "set_guides",
    "verify_rows",
]

# SAMPLING_FIELDS: [B] each, seed [B, 2], bias table [B, L_MAX]; GUIDE_FIELDS: allowed [B, W], guided [B] (sampling.py)
SamplingArrays = dict[str, jax.Array]


@dataclass(frozen=True)
class ModelSteps:
    """The model functions the engine compiles, and where their outputs live (None = default device)."""

    prefill: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] = transformer.prefill
    decode_step: Callable[..., tuple[jax.Array, transformer.KVCache]] = transformer.decode_step
    insert: Callable[..., transformer.KVCache] = transformer.insert
    # Decode-layout sharding of the decode state (insert reshards prefill's k, v into it); None on one device.
    decode_state_sharding: Any = None
    # Whether decode_step can run a step's b rows over the whole cache's first b (transformer.decode_step can; the
    # meshes' step cannot): see decode_rows.
    decode_reads_rows: bool = True


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
    # float32 [B, V]: each slot's logits of its latest decode step, kept for `resample_rows` (a guided row whose mask
    # was not known when its step was dispatched is sampled again from them once it is)
    logits: jax.Array


def pad_sampling(params: list[SamplingParams], b: int, vocab_size: int, masks=()) -> dict[str, np.ndarray]:
    """Sampling arrays of `params` padded with defaults to b rows ([b] each, seed [b, 2], bias table [b, L_MAX]),
    and guided decoding's (allowed uint32 [b, ceil(V / 32)], guided bool [b]) from masks: the packed mask of each
    guided row, None for the others (serving/guided/)."""
    return {
        **stack_sampling(list(params) + [SamplingParams()] * (b - len(params))),
        **guide_arrays(vocab_size, b, masks),
    }


def fresh_state(config: ModelConfig, B: int, S: int, dtype) -> DecodeState:
    """All B slots empty: an [N, B, S, K, Q] cache of `dtype` (int8: `kv_quant.Int8KV`), default sampling, no
    history."""
    return DecodeState(
        transformer.init_cache(config, B, S, dtype),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B,), jnp.int32),
        {n: jnp.asarray(a) for n, a in pad_sampling([], B, config.vocab_size).items()},
        TokenHistory(jnp.zeros((B, config.vocab_size), bool), jnp.zeros((B, config.vocab_size), jnp.int32)),
        jnp.zeros((B, config.vocab_size), jnp.float32),
    )


def prefill_step(steps: ModelSteps, config: ModelConfig, params, tokens, lengths, sampling, *, int8_kv: bool = False):
    """tokens [b, T], lengths [b] -> (first tokens [b], log-probs [b], top ids and log-probs [b, K]), k, v
    [N, b, T, K, Q], and the prompts' tokens in_prompt bool [b, V] (for insert). int8_kv: the decode cache is int8
    (k, v rounded to its grid before the prompt attends over them, model/kv_quant.py)."""
    logits, k, v = steps.prefill(params, config, tokens, lengths, int8_kv=int8_kv)
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
    logits, k, v = steps.prefill(params, config, tokens, lengths, prefix=prefix, int8_kv=_is_int8(c))
    rest = TokenHistory.of_prompts(tokens, lengths, config.vocab_size)
    history = TokenHistory(
        rest.in_prompt | TokenHistory.of_prompts(prefix_tokens, cached, config.vocab_size).in_prompt,
        rest.counts,
    )
    tok, lp = sample(logits, sampling, jnp.int32(0), history)
    insert = functools.partial(steps.insert, prefix=prefix)
    new = insert_rows(insert, state, k, v, lengths, slots, tok, sampling, history.in_prompt)
    return new, (tok, lp, *top_logprobs(logits, sampling))


def _is_int8(cache: transformer.KVCache) -> bool:
    return isinstance(cache.k, kv_quant.Int8KV)


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
        logits=state.logits,
    )


def decode_rows(steps: ModelSteps, config: ModelConfig, b: int, context: int, params, state: DecodeState):
    """One token for slots [0, b), attending over cache positions [0, context) (every used row's length is
    below it): -> new state, (tokens int32 [b], log-probs float32 [b], top ids int32 and log-probs [b, K])."""
    return _on_lowest_slots(steps, b, functools.partial(_decode_rows, steps, config, b, context), params, state)


def _on_lowest_slots(steps: ModelSteps, b: int, step: Callable[..., Any], params, state: DecodeState, *args):
    """step(params, state, *args, whole=...) for slots [0, b): whole=True takes the whole cache (rows [0, b) of it),
    whole=False a slice of those rows put back after.

    b of B slots: the step reads and writes rows [0, b) where they lie, in the whole cache, where the backend writes
    a scatter in place; sliced out and put back, they were copied twice per step on a GPU (deviceless H100 compile,
    falcon-7b, 8 of 64 slots, 2048 positions: 128 MiB per step). XLA:CPU converts a bf16 scatter's whole operand to
    float32 and back, so there the slice of b rows is the smaller copy. Chosen when lowered, so a compile for a GPU
    on a CPU host (benchmarks/server_step_hlo.py --target) gets the GPU's form; the price is tracing the step twice
    per bucket with b < B (about 0.2 s more for falcon-7b's unrolled layers). All B slots, or a mesh's step
    (decode_reads_rows=False), make no choice."""
    if b == state.last.shape[0] or not steps.decode_reads_rows:
        return step(params, state, *args, whole=b == state.last.shape[0])
    return jax.lax.platform_dependent(
        params,
        state,
        *args,
        cpu=functools.partial(step, whole=False),
        default=functools.partial(step, whole=True),
    )


def _decode_rows(steps: ModelSteps, config: ModelConfig, b: int, context: int, params, state: DecodeState, *,
                 whole: bool):  # fmt: skip
    """`decode_rows`; whole: the step takes the whole cache (rows [0, b) of it), else a slice of those rows."""
    c = state.cache
    sub = c if whole else transformer.KVCache(c.k[:, :b], c.v[:, :b], c.lengths[:b])
    bounded = {} if context == c.max_len else {"context": context}
    logits, sub = steps.decode_step(params, config, state.last[:b], sub, **bounded)
    samp = {n: a[:b] for n, a in state.sampling.items()}
    # The whole history goes in: sample slices rows [0, b) only inside its penalty branch.
    tok, lp = sample(logits, samp, state.step[:b], state.history)  # each row's own step, as in `generate`
    if whole:
        cache = sub
    else:
        cache = transformer.KVCache(
            c.k.at[:, :b].set(sub.k), c.v.at[:, :b].set(sub.v), c.lengths.at[:b].set(sub.lengths)
        )
    new = dataclasses.replace(state, cache=cache, last=state.last.at[:b].set(tok), step=state.step.at[:b].add(1),
                              history=state.history.add(tok),
                              logits=state.logits.at[:b].set(logits.astype(jnp.float32)))  # fmt: skip
    return new, (tok, lp, *top_logprobs(logits, samp))


def verify_rows(steps: ModelSteps, config: ModelConfig, b: int, context: int, params, state: DecodeState, drafts):
    """Speculative decoding's step: each slot of [0, b) runs its last token and its drafts int32 [b, k] (proposed
    next tokens, -1 = none) in one pass over cache positions [0, context) (>= every used row's length), and keeps
    the drafts the model itself would have produced, plus one token of its own after them.

    Position 0 is sampled as `decode_rows` samples (every row's own sampler, step, history), so a row without
    drafts gets exactly a decode step's token. Position j >= 1 is sampled by the row's own sampler at step + j,
    the key and bias entries plain decoding would use for that token, without the penalties' history: only rows
    without penalties (or top_logprobs) may carry drafts (the caller's rule, speculative.may_draft_sampling). Row r
    keeps n[r] = 1 + (its leading drafts equal to the tokens sampled before them): each kept token was sampled
    from the context plain decoding would have had, with the same key, so the tokens are plain decoding's, greedy
    or sampled. (A draft d is kept with probability p(d), as speculative sampling keeps a one-token draft, and a
    rejected draft's position gets a token drawn from p without d, its residual.)

    -> new state (k, v of the kept positions written, lengths + n, last = the n-th token, step + n, history), and
    (tokens int32 [b, k + 1] (the first n[r] are row r's), n int32 [b], log-probs float32 [b, k + 1] under the
    model, top ids and log-probs [b, K] of position 0).
    """
    step = functools.partial(_verify_rows, steps, config, b, context)
    return _on_lowest_slots(steps, b, step, params, state, drafts)


def _verify_rows(steps: ModelSteps, config: ModelConfig, b: int, context: int, params, state: DecodeState, drafts,
                 *, whole: bool):  # fmt: skip
    """`verify_rows`; whole: write rows [0, b) in the whole cache, else in a slice of them put back after."""
    c = state.cache
    k_drafts = drafts.shape[1]
    T = k_drafts + 1
    lengths = c.lengths[:b]
    sub_k, sub_v = (c.k, c.v) if whole else (c.k[:, :b], c.v[:, :b])  # [N, B or b, S, K, Q]
    tokens = jnp.concatenate([state.last[:b, None], jnp.maximum(drafts, 0)], axis=1)  # [b, T]
    prefix = transformer.Prefix(sub_k[:, :b, :context], sub_v[:, :b, :context], jnp.minimum(lengths, context))
    logits, k_new, v_new = steps.prefill(params, config, tokens, jnp.full((b,), T, jnp.int32), all_logits=True,
                                         prefix=prefix, int8_kv=_is_int8(c))  # fmt: skip  # [b, T, V], [N, b, T, K, Q]
    samp = {n: a[:b] for n, a in state.sampling.items()}
    first, first_lp = sample(logits[:, 0], samp, state.step[:b], state.history)
    # Positions 1 .. k as b * k rows of one sample call: each row's settings repeated, its step advanced by j (an
    # all-greedy batch takes sample's argmax branch, as before sampled rows could draft).
    V = logits.shape[-1]
    steps = (state.step[:b, None] + jnp.arange(1, T)[None, :]).reshape(-1)  # [b * k]
    rest, rest_lp = sample(logits[:, 1:].reshape(-1, V), {n: jnp.repeat(a, k_drafts, axis=0) for n, a in samp.items()},
                           steps)  # fmt: skip  # [b * k] each
    out = jnp.concatenate([first[:, None], rest.reshape(b, k_drafts)], axis=1)  # [b, T]
    out_lp = jnp.concatenate([first_lp[:, None], rest_lp.reshape(b, k_drafts)], axis=1)
    match = (drafts >= 0) & (drafts == out[:, :k_drafts])  # [b, k]
    n = 1 + jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)  # [b], 1..T
    S = c.max_len
    rows = jnp.arange(b)[:, None]
    at = lengths[:, None] + jnp.arange(T)[None, :]  # [b, T]; past S dropped (the caller keeps rows within S)
    sub_k = sub_k.at[:, rows, at].set(kv_quant.storable(k_new, sub_k), mode="drop")
    sub_v = sub_v.at[:, rows, at].set(kv_quant.storable(v_new, sub_v), mode="drop")
    new_lengths = c.lengths.at[:b].set(jnp.minimum(lengths + n, S))
    if whole:
        cache = transformer.KVCache(sub_k, sub_v, new_lengths)
    else:
        cache = transformer.KVCache(c.k.at[:, :b].set(sub_k), c.v.at[:, :b].set(sub_v), new_lengths)
    kept = jnp.arange(T)[None, :] < n[:, None]  # [b, T]
    counts = state.history.counts
    counts = counts.at[:b].set(counts[:b].at[rows, out].add(kept.astype(jnp.int32), mode="drop"))
    last = jnp.take_along_axis(out, (n - 1)[:, None], axis=1)[:, 0]
    new = dataclasses.replace(state, cache=cache, last=state.last.at[:b].set(last), step=state.step.at[:b].add(n),
                              history=dataclasses.replace(state.history, counts=counts))  # fmt: skip
    return new, (out, n, out_lp, *top_logprobs(logits[:, 0], samp))


def set_guides(state: DecodeState, rows: jax.Array, masks: jax.Array) -> DecodeState:
    """Guided rows' next masks: masks uint32 [G, W] into slots rows [G] (index B = a padding row, dropped)."""
    allowed = state.sampling["allowed"].at[rows].set(masks, mode="drop")
    return dataclasses.replace(state, sampling={**state.sampling, "allowed": allowed})


def resample_rows(state: DecodeState, rows: jax.Array, masks: jax.Array):
    """Guided rows whose masks were computed while their decode step ran (the engine loop dispatches a step before
    it reads the previous one's tokens, and a guided row's mask needs its token): write masks uint32 [G, W] into
    slots rows [G] (index B = a padding row, dropped) and sample those rows again from the step's logits with the
    step index, key and penalty history the step used, so each gets the token the step would have drawn had the
    mask been in place. -> new state (last and history counts corrected), (tokens int32 [G], log-probs [G]).
    top_logprobs need no second pass: they are the model's, before any mask."""
    state = set_guides(state, rows, masks)
    B, G = state.last.shape[0], rows.shape[0]
    take = jnp.minimum(rows, B - 1)  # a padding row reads slot B - 1; its results are dropped below
    drawn = state.last[take]  # what the step drew under the old mask
    history = TokenHistory(state.history.in_prompt[take], state.history.counts[take].at[jnp.arange(G), drawn].add(-1))
    samp = {n: a[take] for n, a in state.sampling.items()}
    tok, lp = sample(state.logits[take], samp, state.step[take] - 1, history)
    counts = state.history.counts.at[rows, drawn].add(-1, mode="drop").at[rows, tok].add(1, mode="drop")
    new = dataclasses.replace(state, last=state.last.at[rows].set(tok, mode="drop"),
                              history=dataclasses.replace(state.history, counts=counts))  # fmt: skip
    return new, (tok, lp)


def release_slots(state: DecodeState, free: jax.Array) -> DecodeState:
    """Default sampling settings in the slots where free bool [B]: a finished request's penalties, filters, bias
    entries or top_logprobs must not keep the batch-wide branches of later steps switched on."""
    defaults = pad_sampling([], 1, 32 * state.sampling["allowed"].shape[1])
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
