"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalties, logit_bias and min_tokens, with
a seed per request.

All parameters are per row ([B] arrays, the bias table [B, L_MAX]), so one compiled step serves a batch of requests
that each asked for something different. Returned log-probs (and top_logprobs) are those of the model's own
distribution (log_softmax of the raw logits), whatever the sampling transform, as vLLM (its default logprobs_mode,
raw_logprobs) and TGI report them: a logit_bias or min_tokens changes which token is drawn, not the log-prob
reported for it. (OpenAI's API reports the biased distribution instead; one rule for every knob here keeps a
token's reported log-prob comparable between requests that differ only in their sampling.)

The order is vLLM's (its v1 sampler; Hugging Face also adds SequenceBias before RepetitionPenalty): the bias table
(logit_bias, min_tokens) on the raw logits, then the penalties, both before temperature so they steer greedy
decoding too, then the top-k / top-p / min-p filters, then the draw. (So a repetition penalty r scales a biased
logit: (logit + bias) / r; min_tokens' -inf stays -inf whatever follows.) The knobs follow the usual definitions:
- repetition_penalty r (CTRL, Keskar et al. 2019; HF, TGI, vLLM): a token that occurs in the prompt or the output
  so far has its logit divided by r when positive and multiplied by r when negative; 1 = off.
- presence_penalty p and frequency_penalty f (OpenAI's API, vLLM): logit - p * [count > 0] - f * count, where
  count is the token's occurrences in the output so far (not the prompt); 0 = off.
- min_p m (Nguyen et al. 2024; HF, vLLM): keep tokens whose probability is at least m times the most likely
  token's (after temperature); 0 = off.
- logit_bias (OpenAI's API, vLLM): {id: b} adds b in [-100, 100] to that token's logit at every step.
- min_tokens n (vLLM; HF's MinNewTokensLengthLogitsProcessor, TGI's min_new_tokens): the request's stop ids
  (end-of-sequence included) get -inf while the row has generated fewer than n tokens, so the earliest a stop id can
  be drawn is as token n + 1.
Both are entries (id, bias, until) of the row's bias table (model/sampling_params.py); a row's generated count is
its sampling step (0 for the token sampled from the prefill).
- guided decoding (the serving engine's: serving/guided/): a row with guided True may only draw the tokens whose
  bit is set in its packed mask `allowed` uint32 [B, W] (token v: bit v % 32 of word v // 32); the others get
  -inf after the bias table and the penalties, so no bias can bring them back. The host writes each guided row's
  mask between steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.model.sampling_params import (
    FREQUENCY_PENALTY_MAX,
    L_MAX,
    LOGIT_BIAS_MAX,
    REPETITION_PENALTY_MAX,
    SAMPLING_FIELDS,
    TOP_K_MAX,
    TOP_LOGPROBS_MAX,
    SamplingError,
    SamplingParams,
    stack_sampling,
    validate_sampling,
)

__all__ = [
    "SamplingParams",
    "SamplingError",
    "TokenHistory",
    "sample",
    "stack_sampling",
    "validate_sampling",
    "TOP_K_MAX",
    "FREQUENCY_PENALTY_MAX",
    "REPETITION_PENALTY_MAX",
    "SAMPLING_FIELDS",
    "GUIDE_FIELDS",
    "guide_arrays",
    "TOP_LOGPROBS_MAX",
    "top_logprobs",
    "L_MAX",
    "LOGIT_BIAS_MAX",
]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TokenHistory:
    """The tokens each row has seen, for the penalties: `in_prompt` bool [B, V], `counts` int32 [B, V] (output)."""

    in_prompt: jax.Array
    counts: jax.Array

    @classmethod
    def of_prompts(cls, tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> TokenHistory:
        """tokens int32 [B, T] right-padded to lengths [B] -> the prompts' tokens, nothing generated yet."""
        B, T = tokens.shape
        valid = jnp.arange(T)[None] < lengths[:, None]
        ids = jnp.where(valid, tokens, vocab_size)  # padding -> out of range, dropped by the scatter
        in_prompt = jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")
        return cls(in_prompt, jnp.zeros((B, vocab_size), jnp.int32))

    def add(self, tokens: jax.Array, live: jax.Array | None = None) -> TokenHistory:
        """Count tokens int32 [B] as generated (only where live bool [B], when given)."""
        B = tokens.shape[0]
        one = jnp.ones((B,), jnp.int32) if live is None else live.astype(jnp.int32)
        return TokenHistory(self.in_prompt, self.counts.at[jnp.arange(B), tokens].add(one, mode="drop"))


def _penalize(logits: jax.Array, sampling: dict[str, jax.Array], history: TokenHistory) -> jax.Array:
    """Repetition, presence and frequency penalties on logits float32 [B, V] (the module docstring's definitions);
    history may hold more rows (a decode state's): its first B are these rows, sliced here, inside the branch, so
    a step that penalizes nothing copies none of it."""
    B = logits.shape[0]
    counts = history.counts[:B]
    generated = counts > 0
    rep = sampling["repetition_penalty"][:, None]
    seen = history.in_prompt[:B] | generated
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (
        logits
        - sampling["frequency_penalty"][:, None] * counts.astype(jnp.float32)
        - sampling["presence_penalty"][:, None] * generated.astype(jnp.float32)
    )


def _bias(logits: jax.Array, sampling: dict[str, jax.Array], active: jax.Array) -> jax.Array:
    """logits float32 [B, V] plus each row's active bias entries (active bool [B, L]); an inactive or unused entry
    points past the vocabulary and the scatter drops it. Entries on one token add up (-inf stays -inf)."""
    B, V = logits.shape
    ids = jnp.where(active, sampling["bias_ids"], V)
    return logits.at[jnp.arange(B)[:, None], ids].add(sampling["bias_values"], mode="drop")


GUIDE_FIELDS = ("allowed", "guided")  # the serving engine's per-row guided-decoding arrays (guide_arrays)


def guide_arrays(vocab_size: int, b: int, masks=()) -> dict[str, np.ndarray]:
    """Guided decoding's rows for `sample`: allowed uint32 [b, W] (W = ceil(V / 32); all bits set = no constraint)
    and guided bool [b]; masks: up to b packed masks [W] (None = that row is not guided)."""
    words = -(-vocab_size // 32)
    allowed = np.full((b, words), 0xFFFFFFFF, np.uint32)
    guided = np.zeros((b,), bool)
    for i, mask in enumerate(masks):
        if mask is not None:
            allowed[i], guided[i] = mask, True
    return {"allowed": allowed, "guided": guided}


def _guide(logits: jax.Array, sampling: dict[str, jax.Array]) -> jax.Array:
    """-inf on logits float32 [B, V] where a guided row's mask bit is clear (bit v % 32 of word v // 32)."""
    B, V = logits.shape
    words = sampling["allowed"]  # [B, W]
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
    allowed = bits.reshape(B, -1)[:, :V].astype(bool)
    return jnp.where(allowed | ~sampling["guided"][:, None], logits, -jnp.inf)


# On CUDA, sampling's cheap branches run unconditionally up to this many logits (B x V) per step: 64 rows of a
# 65k vocabulary. Each such pass reads [B, V] float32 (16 MiB here: ~4 us at 4 TB/s, the penalties' counts as much
# again), about what a host sync costs; larger batches keep the branches. A guess until a GPU run times both.
ALWAYS_MAX_ELEMENTS = 1 << 22


def _unbranched_on_cuda(n_logits: int, always, branched, *args):
    """branched(*args), except on CUDA for at most ALWAYS_MAX_ELEMENTS logits: always(*args), the same result
    computed without its `lax.cond`s (XLA:GPU runs a conditional outside a CUDA graph by copying its predicate to
    the host and blocking until the stream drains, so the GPU idles while the host catches up)."""
    if n_logits > ALWAYS_MAX_ELEMENTS:
        return branched(*args)
    return jax.lax.platform_dependent(*args, cuda=always, default=branched)


def _adjust(
    logits: jax.Array, sampling: dict[str, jax.Array], steps: jax.Array, history: TokenHistory | None
) -> jax.Array:
    """The bias table, then the penalties, then guided rows' masks on logits float32 [B, V] (steps int32 [B]).
    One batch-wide branch around them all, each inside under its own: a `lax.cond` returns a new [B, V] buffer even
    when its branch passes the logits through (XLA copies them: seen in the compiled HLO), so a batch that uses no
    knob pays for one such branch, as it did before the bias table existed. (Without a history, the bench's loops, the table's branch is the one.)"""
    conds = []
    if "bias_ids" in sampling:  # hand-built sampling dicts without the table (older callers) bias nothing
        # An entry is live while the row's generated count (its step) is below its `until`: min_tokens' entries
        # expire, so after min_tokens steps a batch with no logit_bias skips the scatter again.
        active = (sampling["bias_ids"] >= 0) & (steps[:, None] < sampling["bias_until"])
        conds.append((jnp.any(active), lambda x: _bias(x, sampling, active)))
    if history is not None:
        penalized = (sampling["repetition_penalty"] != 1.0) | (sampling["presence_penalty"] != 0.0)
        penalized |= sampling["frequency_penalty"] != 0.0
        conds.append((jnp.any(penalized), lambda x: _penalize(x, sampling, history)))
    if "guided" in sampling:  # the serving engine's steps (model.generate's loop has no guided rows)
        conds.append((jnp.any(sampling["guided"]), lambda x: _guide(x, sampling)))
    if not conds:
        return logits

    def branched(x: jax.Array) -> jax.Array:
        if len(conds) == 1:
            return jax.lax.cond(conds[0][0], conds[0][1], lambda y: y, x)

        def each(y: jax.Array) -> jax.Array:
            for on, fn in conds:
                y = jax.lax.cond(on, fn, lambda z: z, y)
            return y

        return jax.lax.cond(functools.reduce(jnp.logical_or, [on for on, _ in conds]), each, lambda y: y, x)

    def always(x: jax.Array) -> jax.Array:
        for _, fn in conds:
            x = fn(x)
        return x

    # Each fn is the identity where its condition is false (an inactive bias entry points past the vocabulary and
    # is dropped; penalties of 1 and 0 divide, multiply and subtract exactly nothing; an unguided row keeps every
    # logit), so skipping it only saves work; on CUDA a skip can cost more than it saves, and these branches are a
    # few elementwise passes over [B, V].
    return _unbranched_on_cuda(logits.size, always, branched, logits)


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


def sample(
    logits: jax.Array,
    sampling: dict[str, jax.Array],
    step: jax.Array,
    history: TokenHistory | None = None,
) -> tuple[jax.Array, jax.Array]:
    """logits float32 [B, V]; step: int scalar or [B] (each row's decode index = tokens it generated so far, folded
    into its key and compared with its bias entries' `until`); history: the tokens each row has seen, rows [0, B) of
    it (None: no row may ask for a penalty; the bench's loops).

    Returns tokens int32 [B] and their log-probs float32 [B] under the unmodified model distribution.
    The batch-wide conditions (any live bias entry? any row penalizes? filters? every row greedy?) are real
    branches: do not vmap this over rows (under vmap `lax.cond` runs both branches, i.e. the vocabulary sort for
    every row on every step); pass per-row steps instead.
    """
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    temperature = sampling["temperature"]
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), temperature.shape)
    logits = _adjust(logits, sampling, steps, history)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    needs_filter = jnp.any(~greedy & ((sampling["top_k"] > 0) | (sampling["top_p"] < 1.0)))
    # The sort over V is the costly part of a decode step's sampling: skip it unless a row filters.
    filtered = jax.lax.cond(needs_filter, lambda: _top_k_top_p(scaled, sampling), lambda: scaled)

    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        # min-p needs no sort: p >= min_p * p_max  <=>  scaled >= max(scaled) + log(min_p) (min_p 0: log 0 = -inf).
        floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(sampling["min_p"])[:, None]
        kept = jnp.where(scaled >= floor, filtered, -jnp.inf)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(_seed_key(s), t))(sampling["seed"], steps)
        sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, kept)
        return jnp.where(greedy, argmax, sampled.astype(jnp.int32))

    # An all-greedy batch skips the draw (a pass over [B, V] with its random bits), except on CUDA, where the skip
    # is a host sync and the draw's greedy rows take the argmax anyway.
    tokens = _unbranched_on_cuda(logits.size, draw, lambda: jax.lax.cond(jnp.all(greedy), lambda: argmax, draw))
    return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, sampling: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The K = min(TOP_LOGPROBS_MAX, V) most likely tokens of each row under the model: ids int32 [B, K], log-probs
    float32 [B, K], best first; zeros unless some row asked for them (a batch-wide branch, like sample's)."""
    B, K = logits.shape[0], min(TOP_LOGPROBS_MAX, logits.shape[1])

    def compute() -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), K)
        return ids.astype(jnp.int32), values

    def skip() -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32)

    asked = jnp.any(sampling["top_logprobs"] > 0)

    def always() -> tuple[jax.Array, jax.Array]:  # the same zeros for a batch that asked for none, by a select
        ids, values = compute()
        return jnp.where(asked, ids, 0), jnp.where(asked, values, 0.0)

    # On CUDA the branch is a host sync per step (a server's step had two, this and sample's sort): computed always.
    return _unbranched_on_cuda(logits.size, always, lambda: jax.lax.cond(asked, compute, skip))
