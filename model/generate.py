"""In-process generation: prefill a batch of prompts, then decode on device until max tokens or a stop token.

The whole decode loop is one `lax.while_loop` inside one jit, so no token pays a host round trip.
Shapes are bucketed (batch, prompt length and context to powers of two) so a few compiles serve
any mix of requests; padding never changes a result (see transformer.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.errors import UserError
from meshserve.model import transformer
from meshserve.model.config import ModelConfig, vocab_error
from meshserve.model.kv_quant import check_kv_cache_dtype
from meshserve.model.params import Params
from meshserve.model.sampling import (
    TOP_LOGPROBS_MAX,
    SamplingParams,
    TokenHistory,
    sample,
    stack_sampling,
    top_logprobs,
)

__all__ = [
    "GenerationResult",
    "GenerateError",
    "generate",
    "validate_prompts",
    "prompt_error",
    "sampling_error",
    "bucket",
    "Batch",
    "decode_loop",
]


class GenerateError(UserError):
    """A request the model cannot serve; the message names the field and the limit."""


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated ids (a stop token, when hit, is the last one)
    logprobs: list[float]  # log p(token) under the model, one per generated token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    # per token, when sampling.top_logprobs > 0: the most likely (ids, log-probs) at that step, best first
    top_logprobs: list[tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=list)


def bucket(n: int, minimum: int = 8) -> int:
    """The power of two >= n (at least `minimum`): shapes seen by the compiler."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def prompt_error(config: ModelConfig, prompt: Sequence[int], max_new_tokens: int, name: str = "prompt") -> str | None:
    """Why the model cannot take this prompt with max_new_tokens more tokens (a message naming `name`), or None."""
    if len(prompt) == 0:
        return f"{name} is empty"
    if error := vocab_error(config, prompt, name):
        return error
    if len(prompt) + max_new_tokens > config.max_seq_len:
        return (
            f"{name}: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} exceed the context "
            f"limit max_seq_len={config.max_seq_len}"
        )
    return None


def sampling_error(config: ModelConfig, sampling: SamplingParams, prefix: str = "") -> str | None:
    """Why the model cannot take these sampling settings (a logit_bias id outside its vocabulary), or None; the
    message names the field (after `prefix`, e.g. "sampling."). Stop ids are not checked here: one past the
    vocabulary can never be drawn, and its min_tokens entry falls out of the bias scatter."""
    return vocab_error(config, [t for t, _ in sampling.logit_bias], f"{prefix}logit_bias")


def _with_stops(rows: list[SamplingParams], stops: tuple[int, ...]) -> list[SamplingParams]:
    """Rows that ask for min_tokens hold back the batch's stop ids as well as their own (generate's stop_ids end
    every row; a row's own stop_ids came from whoever built it)."""
    return [r.with_stop_ids((*r.stop_ids, *stops)) if r.min_tokens and stops else r for r in rows]


def validate_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if error := prompt_error(config, prompt, max_new_tokens, f"prompt {i}"):
            raise GenerateError(error)


@dataclass(frozen=True)
class Batch:
    """Prompts packed for one compiled generate call (numpy arrays; padding rows have length 1, results dropped)."""

    tokens: np.ndarray  # int32 [B, T], right-padded
    lengths: np.ndarray  # int32 [B]
    sampling: dict[str, np.ndarray]  # per-row arrays from stack_sampling, [B] each
    stop_ids: np.ndarray  # int32 [P], -1 = unused
    max_new: np.ndarray  # int32 [B]
    context: int  # S of the decode cache
    steps: int  # decode loop length (max_new_tokens rounded up to a bucket)
    n_real: int  # rows that carry real prompts
    stops: tuple[int, ...]

    @classmethod
    def pack(
        cls,
        config: ModelConfig,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams | Sequence[SamplingParams] | None,
        stop_ids: Sequence[int],
        batch_multiple: int = 1,
        shape: tuple[int, int] | None = None,
    ) -> Batch:
        """Validate and pad a request batch (B to a power of two that is a multiple of `batch_multiple`).

        `shape` = (B, T) pads to exactly that compiled bucket instead (the serving engine's prefill buckets).
        """
        validate_prompts(config, prompts, max_new_tokens)
        sampling = sampling or SamplingParams()
        rows = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(rows) != len(prompts):
            raise GenerateError(f"{len(rows)} sampling settings for {len(prompts)} prompts")
        if shape is None:
            B = -(-bucket(len(prompts), 1) // batch_multiple) * batch_multiple
            T = bucket(max(len(p) for p in prompts))
        else:
            B, T = shape
            longest = max(len(p) for p in prompts)
            if len(prompts) > B or longest > T:
                raise GenerateError(f"{len(prompts)} prompts of up to {longest} tokens do not fit shape=({B}, {T})")
        steps = bucket(max_new_tokens, 1)
        tokens = np.zeros((B, T), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        stops = tuple(sorted(set(stop_ids)))
        rows = _with_stops(rows, stops)
        for i, row in enumerate(rows):
            if error := sampling_error(config, row, f"sampling {i}: " if len(rows) > 1 else ""):
                raise GenerateError(error)
        stop_arr = np.full((max(1, len(stops)),), -1, np.int32)
        stop_arr[: len(stops)] = stops
        return cls(tokens=tokens, lengths=lengths, sampling=stack_sampling(rows + [SamplingParams()] * (B - len(rows))),
                   stop_ids=stop_arr, max_new=np.full((B,), max_new_tokens, np.int32),
                   context=min(bucket(T + steps), bucket(config.max_seq_len)), steps=steps, n_real=len(prompts),
                   stops=stops)  # fmt: skip

    @property
    def with_top(self) -> bool:
        """Whether some row asked for alternatives (decode_loop's static with_top)."""
        return bool(self.sampling["top_logprobs"].max() > 0)

    def results(self, out: dict[str, np.ndarray]) -> list[GenerationResult]:
        """The real rows of a decode_loop's output (host copies), in input order."""
        results = []
        for i in range(self.n_real):
            n, k = int(out["n"][i]), int(self.sampling["top_logprobs"][i])
            ids = [int(t) for t in out["tokens"][i, :n]]
            reason = "stop" if ids and ids[-1] in self.stops else "length"
            top = []
            if k:
                top = [(tuple(int(t) for t in out["top_ids"][i, j, :k]),
                        tuple(float(x) for x in out["top_logprobs"][i, j, :k])) for j in range(n)]  # fmt: skip
            results.append(GenerationResult(ids, [float(x) for x in out["logprobs"][i, :n]], reason, top))
        return results


def decode_loop(
    step_fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    logits: jax.Array,
    cache: Any,
    sampling: dict[str, jax.Array],
    stop_ids: jax.Array,
    max_new: jax.Array,
    steps: int,
    history: TokenHistory,
    with_top: bool = False,
) -> dict[str, jax.Array]:
    """Sample from prefill logits [B, V], then decode on device until every row hit a stop token or max_new.

    step_fn(last tokens [B], cache) -> (logits [B, V], cache) is one decode step (one device or a mesh layout);
    history: the prompts' tokens (`TokenHistory.of_prompts`), for the repetition penalties.
    Returns {"tokens" int32, "logprobs" float32 [B, steps], "n" int32 [B] (tokens per row), and with_top
    "top_ids" int32, "top_logprobs" float32 [B, steps, K] (sampling.top_logprobs)}; the whole loop is one
    `lax.while_loop`, so no token pays a host round trip.
    """
    B = logits.shape[0]
    out = {"tokens": jnp.zeros((B, steps), jnp.int32), "logprobs": jnp.zeros((B, steps), jnp.float32)}
    if with_top:
        K = min(TOP_LOGPROBS_MAX, logits.shape[1])
        out |= {"top_ids": jnp.zeros((B, steps, K), jnp.int32), "top_logprobs": jnp.zeros((B, steps, K), jnp.float32)}

    def record(out, step, logits, tok, lp, live):
        """Write step `step`'s outputs for the live rows (finished rows keep zeros)."""
        new = {"tokens": tok, "logprobs": lp}
        if with_top:
            new["top_ids"], new["top_logprobs"] = top_logprobs(logits, sampling)
        return {
            name: buf.at[:, step].set(jnp.where(live.reshape(B, *[1] * (buf.ndim - 2)), new[name], 0))
            for name, buf in out.items()
        }

    first, first_lp = sample(logits, sampling, jnp.int32(0), history)
    history = history.add(first)
    out = record(out, 0, logits, first, first_lp, jnp.ones((B,), bool))
    done = jnp.isin(first, stop_ids) | (max_new <= 1)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, cache, last, n, done, out, history = state
        logits, cache = step_fn(last, cache)
        tok, lp = sample(logits, sampling, step, history)
        history = history.add(tok, live=~done)
        out = record(out, step, logits, tok, lp, ~done)
        n = n + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop_ids) | (n >= max_new)
        return step + 1, cache, tok, n, done, out, history

    state = (jnp.int32(1), cache, first, jnp.ones((B,), jnp.int32), done, out, history)
    _, _, _, n, _, out, _ = jax.lax.while_loop(cond, body, state)
    return out | {"n": n}


@partial(jax.jit, static_argnames=("config", "context", "steps", "with_top", "int8_kv"))
def _generate(params: Params, config: ModelConfig, tokens: jax.Array, lengths: jax.Array,
              sampling: dict[str, jax.Array], stop_ids: jax.Array, max_new: jax.Array, context: int, steps: int,
              with_top: bool, int8_kv: bool = False) -> dict[str, jax.Array]:  # fmt: skip
    """tokens [B, T], lengths [B] -> decode_loop's outputs on one device."""
    logits, k, v = transformer.prefill(params, config, tokens, lengths, int8_kv=int8_kv)
    cache = transformer.init_cache(config, tokens.shape[0], context, jnp.int8 if int8_kv else k.dtype)
    cache = transformer.insert(cache, k, v, lengths, jnp.arange(tokens.shape[0]))
    step = lambda last, cache: transformer.decode_step(params, config, last, cache)
    history = TokenHistory.of_prompts(tokens, lengths, config.vocab_size)
    return decode_loop(step, logits, cache, sampling, stop_ids, max_new, steps, history, with_top)


def generate(
    params: Params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_ids: Sequence[int] = (),
    kv_cache_dtype: str = "auto",
) -> list[GenerationResult]:
    """Generate for several prompts as one batch of different lengths; results in input order.
    kv_cache_dtype: "auto" (the compute dtype) or "int8" (model/kv_quant.py)."""
    int8_kv = check_kv_cache_dtype(kv_cache_dtype) == "int8"
    b = Batch.pack(config, prompts, max_new_tokens, sampling, stop_ids)
    out = _generate(params, config, jnp.asarray(b.tokens), jnp.asarray(b.lengths), b.sampling, jnp.asarray(b.stop_ids),
                    jnp.asarray(b.max_new), context=b.context, steps=b.steps, with_top=b.with_top,
                    int8_kv=int8_kv)  # fmt: skip
    return b.results(jax.device_get(out))
