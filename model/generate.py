"""In-process generation: prefill a batch of prompts, then decode on device until max tokens or a stop token.

The whole decode loop is one `lax.while_loop` inside one jit, so no token pays a host round trip.
Shapes are bucketed (batch, prompt length and context to powers of two) so a few compiles serve
any mix of requests; padding never changes a result (see transformer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.errors import UserError
from meshserve.model import transformer
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params
from meshserve.model.sampling import SamplingParams, sample, stack_sampling

__all__ = ["GenerationResult", "GenerateError", "generate", "validate_prompts", "bucket"]


class GenerateError(UserError):
    """A request the model cannot serve; the message names the field and the limit."""


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated ids (a stop token, when hit, is the last one)
    logprobs: list[float]  # log p(token) under the model, one per generated token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


def bucket(n: int, minimum: int = 8) -> int:
    """The power of two >= n (at least `minimum`): shapes seen by the compiler."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def validate_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerateError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise GenerateError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise GenerateError(
                f"prompt {i}: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} exceed the context "
                f"limit max_seq_len={config.max_seq_len}"
            )


@partial(jax.jit, static_argnames=("config", "context", "steps"))
def _generate(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    lengths: jax.Array,
    sampling: dict[str, jax.Array],
    stop_ids: jax.Array,
    max_new: jax.Array,
    context: int,
    steps: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens [B, T], lengths [B], stop_ids [P] (-1 = unused), max_new [B] -> out ids/logprobs [B, steps], n [B]."""
    B = tokens.shape[0]
    logits, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.init_cache(config, B, context, k.dtype)
    cache = transformer.insert(cache, k, v, lengths, jnp.arange(B))
    first, first_lp = sample(logits, sampling, jnp.int32(0))
    out_tokens = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(first)
    out_lp = jnp.zeros((B, steps), jnp.float32).at[:, 0].set(first_lp)
    done = jnp.isin(first, stop_ids) | (max_new <= 1)
    n = jnp.ones((B,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, cache, last, n, done, out_tokens, out_lp = state
        logits, cache = transformer.decode_step(params, config, last, cache)
        tok, lp = sample(logits, sampling, step)
        out_tokens = out_tokens.at[:, step].set(jnp.where(done, 0, tok))
        out_lp = out_lp.at[:, step].set(jnp.where(done, 0.0, lp))
        n = n + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop_ids) | (n >= max_new)
        return step + 1, cache, tok, n, done, out_tokens, out_lp

    state = (jnp.int32(1), cache, first, n, done, out_tokens, out_lp)
    _, _, _, n, _, out_tokens, out_lp = jax.lax.while_loop(cond, body, state)
    return out_tokens, out_lp, n


def generate(
    params: Params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_ids: Sequence[int] = (),
) -> list[GenerationResult]:
    """Generate for several prompts as one batch of different lengths; results in input order."""
    validate_prompts(config, prompts, max_new_tokens)
    sampling = sampling or SamplingParams()
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise GenerateError(f"{len(sampling)} sampling settings for {len(prompts)} prompts")
    n_real = len(prompts)
    B = bucket(n_real, 1)
    T = bucket(max(len(p) for p in prompts))
    steps = bucket(max_new_tokens, 1)
    context = min(bucket(T + steps), bucket(config.max_seq_len))
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)  # padding rows: one token, results dropped
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    rows = list(sampling) + [SamplingParams()] * (B - n_real)
    stops = sorted(set(stop_ids))
    stop_arr = np.full((max(1, len(stops)),), -1, np.int32)
    stop_arr[: len(stops)] = stops
    max_new = np.full((B,), max_new_tokens, np.int32)
    out_tokens, out_lp, n = jax.device_get(
        _generate(
            params,
            config,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            stack_sampling(rows),
            jnp.asarray(stop_arr),
            jnp.asarray(max_new),
            context=context,
            steps=steps,
        )
    )
    results = []
    for i in range(n_real):
        count = int(n[i])
        ids = [int(t) for t in out_tokens[i, :count]]
        reason = "stop" if ids and ids[-1] in stops else "length"
        results.append(
            GenerationResult(tokens=ids, logprobs=[float(x) for x in out_lp[i, :count]], finish_reason=reason)
        )
    return results
