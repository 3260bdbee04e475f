"""The engine: compiled prefill, insert, extend, decode (generate) and score steps, per phase and bucket of the plan.

Typed, single-threaded and free of protos: the orchestrator and the offline job drive it. Every step is
compiled ahead of time in `warm_up` (`jit(...).lower(...).compile()`), and the engine refuses a shape it has no
executable for, so no request ever pays a compile.

Decode state lives on the device between steps: the KV cache [N, B, S, K, Q], each slot's last token [B],
its sampling step [B], its sampling parameters ([B] arrays) and the tokens it has seen ([B, V], for the
repetition penalties), so a decode step needs no host input; its one device->host copy is the sampled tokens
and their log-probs [b] (with the top_logprobs alternatives [b, K] on steps where a row asked for them).
Decode bucket b runs slots [0, b): the
scheduler fills the lowest free slot first, so active requests sit at the front.

An extend step (with prefix caching or chunked prefill) prefills prompts that continue a prefix already in the
cache: it gathers the prefix rows [0, C) of a source slot, runs the rest of the prompt over them, and writes prefix
and rest into the request's slot, in one compiled call per (batch, length, context) bucket (serving/prefix_cache.py).

The step functions come in as `ModelSteps` (default: model/transformer.py on one device); a sharded build
passes its own steps and shardings with the plan that chose them. Axis alphabet: model/config.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.model import transformer
from meshserve.model.config import ModelConfig
from meshserve.model.generate import Batch, validate_prompts
from meshserve.model.params import Params
from meshserve.model.sampling import SamplingParams, TokenHistory, sample, stack_sampling, top_logprobs
from meshserve.serving.plan import EnginePlan
from meshserve.serving.prefix_cache import PrefixReuse

__all__ = ["Engine", "ModelSteps", "DecodeState", "StepOutput", "ScoreOutput"]

SamplingArrays = dict[str, jax.Array]  # SAMPLING_FIELDS: [B] each, seed [B, 2] (model/sampling.py)


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
    step: jax.Array  # int32 [B]: each slot's sampling step (0 = the prefill's token), folded into its key
    sampling: SamplingArrays
    history: TokenHistory  # in_prompt bool [B, V], counts int32 [B, V] of generated tokens


@dataclass(frozen=True)
class StepOutput:
    """Host copies of one step's sampled tokens int32 [b] and their log-probs float32 [b]; with the K most likely
    alternatives ids int32 [b, K] and log-probs float32 [b, K] (sampling.top_logprobs) when they were fetched."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """Per-item continuation log-probs (float32 [c]) and whether each token is the argmax (bool [c])."""

    token_logprobs: list[np.ndarray]
    greedy: list[np.ndarray]


def _pad_sampling(params: list[SamplingParams], b: int) -> dict[str, np.ndarray]:
    return stack_sampling(list(params) + [SamplingParams()] * (b - len(params)))


@dataclass
class Engine:
    """Compiled steps over one model and plan. Not thread-safe: one driver thread calls it."""

    params: Params
    config: ModelConfig
    plan: EnginePlan
    steps: ModelSteps = field(default_factory=ModelSteps)
    _prefill: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _insert: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _extend: dict[tuple[int, int, int], Any] = field(default_factory=dict, init=False, repr=False)  # (b, T, C)
    _decode: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)  # (b, context)
    _score: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _release: Any = field(default=None, init=False, repr=False)  # the slot-release step, compiled with generation
    _state: DecodeState | None = field(default=None, init=False, repr=False)

    # ----- the step functions (traced once per bucket) -----

    def _prefill_fn(self, params, tokens, lengths, sampling):
        """tokens [b, T], lengths [b] -> (first tokens [b], log-probs [b], top ids and log-probs [b, K]), k, v
        [N, b, T, K, Q], and the prompts' tokens in_prompt bool [b, V] (for insert)."""
        logits, k, v = self.steps.prefill(params, self.config, tokens, lengths)
        history = TokenHistory.of_prompts(tokens, lengths, self.config.vocab_size)
        tok, lp = sample(logits, sampling, jnp.int32(0), history)
        return (tok, lp, *top_logprobs(logits, sampling)), k, v, history.in_prompt

    def _extend_fn(self, params, state: DecodeState, tokens, lengths, prefix_tokens, cached, sources, slots, sampling):
        """Prefill the rest of prompts whose first cached [b] tokens (prefix_tokens [b, C], right-padded) already sit
        in cache rows sources [b], and insert them into slots [b] (prefix included): tokens [b, T] are the rest,
        lengths [b] their counts. -> new state, (first tokens [b], log-probs [b], top ids and log-probs [b, K])."""
        C = prefix_tokens.shape[1]
        c = state.cache
        prefix = transformer.Prefix(c.k[:, sources, :C], c.v[:, sources, :C], cached)  # [N, b, C, K, Q]
        logits, k, v = self.steps.prefill(params, self.config, tokens, lengths, prefix=prefix)
        rest = TokenHistory.of_prompts(tokens, lengths, self.config.vocab_size)
        history = TokenHistory(
            rest.in_prompt | TokenHistory.of_prompts(prefix_tokens, cached, self.config.vocab_size).in_prompt,
            rest.counts,
        )
        tok, lp = sample(logits, sampling, jnp.int32(0), history)
        insert = functools.partial(self.steps.insert, prefix=prefix)
        new = self._insert_fn(insert, state, k, v, lengths, slots, tok, sampling, history.in_prompt)
        return new, (tok, lp, *top_logprobs(logits, sampling))

    @staticmethod
    def _insert_fn(insert, state: DecodeState, k, v, lengths, slots, first, sampling, in_prompt) -> DecodeState:
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

    def _decode_fn(self, b: int, context: int, params, state: DecodeState):
        """One token for slots [0, b), attending over cache positions [0, context) (every used row's length is
        below it): -> new state, (tokens int32 [b], log-probs float32 [b], top ids int32 and log-probs [b, K])."""
        full = b == state.last.shape[0]
        c = state.cache
        sub = c if full else transformer.KVCache(c.k[:, :b], c.v[:, :b], c.lengths[:b])
        bounded = {} if context == c.max_len else {"context": context}
        logits, sub = self.steps.decode_step(params, self.config, state.last[:b], sub, **bounded)
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

    @staticmethod
    def _release_fn(state: DecodeState, free: jax.Array) -> DecodeState:
        """Default sampling settings in the slots where free bool [B]: a finished request's penalties, filters or
        top_logprobs must not keep the batch-wide branches of later steps switched on."""
        defaults = _pad_sampling([], 1)
        sampling = {
            n: jnp.where(free.reshape(-1, *[1] * (a.ndim - 1)), jnp.asarray(defaults[n][0]), a)
            for n, a in state.sampling.items()
        }
        return dataclasses.replace(state, sampling=sampling)

    def _score_fn(self, params, tokens, lengths):
        """tokens [b, T], lengths [b] -> log p(tokens[:, t+1] | tokens[:, :t+1]) [b, T-1], argmax-hit bool [b, T-1]."""
        logits, _, _ = self.steps.prefill(params, self.config, tokens, lengths, all_logits=True)  # [b, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        target = tokens[:, 1:]
        token_lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return token_lp, jnp.argmax(logits[:, :-1], axis=-1) == target

    # ----- warm-up -----

    def _abstract_state(self) -> DecodeState:
        """The decode state's shapes, with the decode layout's shardings on a mesh: every step that takes the state
        is compiled for the state as `reset` places it, so its donated buffers are updated in place (left open,
        XLA may choose another input split and copy the whole cache on every call)."""
        B, S = self.plan.max_batch, self.plan.max_context
        dtype = transformer.compute_dtype(self.params)
        shapes = jax.eval_shape(lambda: self._fresh_state(B, S, dtype))
        if self.steps.decode_state_sharding is None:
            return shapes
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.steps.decode_state_sharding
        )

    def _fresh_state(self, B: int, S: int, dtype) -> DecodeState:
        sampling = {n: jnp.asarray(a) for n, a in _pad_sampling([], B).items()}
        return DecodeState(
            transformer.init_cache(self.config, B, S, dtype),
            jnp.zeros((B,), jnp.int32),
            jnp.zeros((B,), jnp.int32),
            sampling,
            TokenHistory(
                jnp.zeros((B, self.config.vocab_size), bool), jnp.zeros((B, self.config.vocab_size), jnp.int32)
            ),
        )

    def compiled_steps(self) -> int:
        compiled = (self._prefill, self._insert, self._extend, self._decode, self._score)
        return sum(map(len, compiled)) + (self._release is not None)

    def warm_up(
        self, progress: Callable[[str], None] | None = None, phases: tuple[str, ...] = ("generate", "score")
    ) -> None:
        """Compile every step of the plan for `phases` (generate = prefill, insert, extend and decode; score) and
        allocate the decode state. A step missing here raises KeyError when called, never compiles on the request
        path."""
        plan = self.plan
        i32 = jax.ShapeDtypeStruct
        state = self._abstract_state()
        dtype = transformer.compute_dtype(self.params)
        # Each sampling array's shape as stack_sampling builds it ([b], seed [b, 2]), with b rows.
        samp = lambda b: {n: i32((b, *a.shape[1:]), a.dtype) for n, a in _pad_sampling([], b).items()}  # noqa: E731
        for b in plan.prefill_batches if "generate" in phases else ():
            for t in plan.prefill_lengths:
                tokens, lengths = i32((b, t), jnp.int32), i32((b,), jnp.int32)
                self._prefill[(b, t)] = jax.jit(self._prefill_fn).lower(self.params, tokens, lengths, samp(b)).compile()
                kv = i32((self.config.n_layers, b, t, self.config.n_kv_heads, self.config.d_head), dtype)
                in_prompt = i32((b, self.config.vocab_size), jnp.bool_)
                insert = jax.jit(
                    lambda *a: self._insert_fn(self.steps.insert, *a),
                    donate_argnums=0,
                    out_shardings=self.steps.decode_state_sharding,
                )
                self._insert[(b, t)] = insert.lower(
                    state, kv, kv, lengths, i32((b,), jnp.int32), i32((b,), jnp.int32), samp(b), in_prompt
                ).compile()
                if progress:
                    progress(f"prefill b={b} T={t}")
                for c in plan.contexts() if t in plan.extend_lengths else ():
                    extend = jax.jit(
                        self._extend_fn, donate_argnums=1, out_shardings=(self.steps.decode_state_sharding, None)
                    )
                    rows, prefix = i32((b,), jnp.int32), i32((b, c), jnp.int32)
                    self._extend[(b, t, c)] = extend.lower(
                        self.params, state, tokens, lengths, prefix, rows, rows, rows, samp(b)
                    ).compile()
                    if progress:
                        progress(f"extend b={b} T={t} C={c}")
        if "generate" in phases:
            release = jax.jit(self._release_fn, donate_argnums=0, out_shardings=self.steps.decode_state_sharding)
            self._release = release.lower(state, i32((plan.max_batch,), jnp.bool_)).compile()
        for b in plan.decode_batches if "generate" in phases else ():
            for c in plan.contexts():
                fn = jax.jit(lambda p, s, b=b, c=c: self._decode_fn(b, c, p, s), donate_argnums=1)
                self._decode[(b, c)] = fn.lower(self.params, state).compile()
                if progress:
                    progress(f"decode b={b} C={c}")
        for b in plan.score_batches if "score" in phases else ():
            for t in plan.prefill_lengths:
                tokens, lengths = i32((b, t), jnp.int32), i32((b,), jnp.int32)
                self._score[(b, t)] = jax.jit(self._score_fn).lower(self.params, tokens, lengths).compile()
                if progress:
                    progress(f"score b={b} T={t}")
        self.reset()

    def reset(self) -> None:
        """A fresh decode state (all slots empty). A scheduler's prefix index describes the old cache: drive the
        engine with a new Scheduler after a reset."""
        self._state = self._fresh_state(
            self.plan.max_batch, self.plan.max_context, transformer.compute_dtype(self.params)
        )
        if self.steps.decode_state_sharding is not None:
            self._state = jax.device_put(self._state, self.steps.decode_state_sharding)

    # ----- steps -----

    def prefill_insert(
        self,
        prompts: list[list[int]],
        slots: list[int],
        sampling: list[SamplingParams],
        batch: int,
        length: int,
        reuse: PrefixReuse | None = None,
    ) -> StepOutput:
        """Prefill prompts as one [batch, length] bucket, insert them into decode `slots`; first tokens to host.

        reuse: prompt prefixes already in the cache (prefix caching); `length` then buckets the tokens after them.
        """
        n = len(prompts)
        if not 0 < n <= batch or len(slots) != n or len(sampling) != n:
            raise ValueError(f"prefill of {n} prompts into bucket batch={batch} with {len(slots)} slots")
        slot_arr = np.full((batch,), self.plan.max_batch, np.int32)  # index B is out of range: the scatter drops it
        slot_arr[:n] = slots
        if reuse is not None:
            return self._extend_insert(prompts, slot_arr, sampling, batch, length, reuse)
        key = (batch, length)
        if key not in self._prefill:
            raise KeyError(f"no compiled prefill for bucket {key}; plan has {sorted(self._prefill)}")
        # Right-padded [batch, length] tokens, padding rows of length 1 (never inserted), sampling rows [batch].
        packed = Batch.pack(self.config, prompts, 1, list(sampling), (), shape=key)
        tokens, lengths, samp = packed.tokens, packed.lengths, packed.sampling
        out, k, v, in_prompt = self._prefill[key](self.params, tokens, lengths, samp)
        self._state = self._insert[key](self._state, k, v, lengths, slot_arr, out[0], samp, in_prompt)
        return StepOutput(*(np.asarray(a)[:n] for a in jax.device_get(out)))

    def _extend_insert(self, prompts, slot_arr, sampling, batch: int, length: int, reuse: PrefixReuse) -> StepOutput:
        """`prefill_insert` over cached prefixes: one compiled extend step (b, T, C)."""
        n = len(prompts)
        key = (batch, length, reuse.context)
        if key not in self._extend:
            raise KeyError(f"no compiled extend step for {key}; plan has {sorted(self._extend)}")
        if len(reuse.sources) != n or len(reuse.lengths) != n:
            raise ValueError(f"prefix reuse for {len(reuse.lengths)} of {n} prompts")
        for i, (p, m, src) in enumerate(zip(prompts, reuse.lengths, reuse.sources, strict=True)):
            if not (0 <= m < len(p) and m <= reuse.context and 0 <= src < self.plan.max_batch):
                raise ValueError(f"prompt {i}: cached prefix {m} from slot {src} (prompt {len(p)}, C={reuse.context})")
        validate_prompts(self.config, prompts, 1)  # the whole prompts, as a plain prefill would
        rests = [p[m:] for p, m in zip(prompts, reuse.lengths, strict=True)]
        rest = Batch.pack(self.config, rests, 1, list(sampling), (), shape=(batch, length))
        prefix_tokens = np.zeros((batch, reuse.context), np.int32)
        cached = np.zeros((batch,), np.int32)
        sources = np.zeros((batch,), np.int32)
        for i, (p, m) in enumerate(zip(prompts, reuse.lengths, strict=True)):
            prefix_tokens[i, :m], cached[i], sources[i] = p[:m], m, reuse.sources[i]
        self._state, out = self._extend[key](
            self.params, self._state, rest.tokens, rest.lengths, prefix_tokens, cached, sources, slot_arr, rest.sampling
        )
        return StepOutput(*(np.asarray(a)[:n] for a in jax.device_get(out)))

    def release(self, slots: list[int]) -> None:
        """Reset the sampling settings of slots no request holds any more (see `_release_fn`)."""
        free = np.zeros((self.plan.max_batch,), bool)
        free[list(slots)] = True
        self._state = self._release(self._state, free)

    def decode_async(self, batch: int, context: int | None = None) -> tuple[jax.Array, ...]:
        """Dispatch one decode step for slots [0, batch); returns device arrays (tokens [batch], log-probs [batch],
        top ids [batch, K], top log-probs [batch, K]).

        context: more than the longest cache length of any used row in [0, batch) at this step (the step then
        attends over the smallest context bucket >= it); None = the whole cache.
        Nothing waits: the caller may dispatch more work before fetching these with `fetch`.
        """
        c = self.plan.max_context if context is None else self.plan.context_bucket(context)
        if (batch, c) not in self._decode:
            raise KeyError(f"no compiled decode for batch {batch}, context {c}; plan has {sorted(self._decode)}")
        self._state, out = self._decode[(batch, c)](self.params, self._state)
        return out

    @staticmethod
    def fetch(out: tuple[jax.Array, ...], top: bool = False) -> StepOutput:
        """The one device->host copy of a decode step; the alternatives only when `top` (some row asked for them:
        a step that needs none copies [batch] arrays only)."""
        return StepOutput(*(np.asarray(a) for a in jax.device_get(out if top else out[:2])))

    def decode(self, batch: int, context: int | None = None, top: bool = False) -> StepOutput:
        """One decode step, waited for (see `fetch`)."""
        return self.fetch(self.decode_async(batch, context), top)

    @property
    def score_chunk_size(self) -> int:
        """Most items one `score_chunk` call takes (the largest score batch bucket)."""
        return max(self.plan.score_batches)

    def score_chunk(self, items: list[tuple[list[int], list[int]]]) -> ScoreOutput:
        """Score at most `score_chunk_size` (prompt ids, continuation ids) items as one compiled [b, T] bucket call.

        The orchestrator calls this once per loop iteration, so decode steps run between the chunks of a Score.
        """
        plan = self.plan
        if not 0 < len(items) <= self.score_chunk_size:
            raise ValueError(f"score chunk of {len(items)} items; a chunk holds 1 to {self.score_chunk_size}")
        b = next(x for x in plan.score_batches if x >= len(items))
        t = plan.length_bucket(max(len(p) + len(c) for p, c in items))
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, (p, c) in enumerate(items):
            tokens[i, : len(p) + len(c)] = list(p) + list(c)
            lengths[i] = len(p) + len(c)
        token_lp, greedy = jax.device_get(self._score[(b, t)](self.params, tokens, lengths))
        # position j predicts token j + 1: the continuation's tokens are predicted at len(p)-1 .. len(p+c)-2
        spans = [(len(p) - 1, len(p) + len(c) - 1) for p, c in items]
        return ScoreOutput(
            [np.asarray(token_lp[i, a:z]) for i, (a, z) in enumerate(spans)],
            [np.asarray(greedy[i, a:z]) for i, (a, z) in enumerate(spans)],
        )

    def score(self, items: list[tuple[list[int], list[int]]]) -> ScoreOutput:
        """Log-probs of continuations given prompts; items of (prompt ids, continuation ids), any count.

        Items are packed into the plan's score buckets in the given order (sort by length first to limit padding),
        one `score_chunk` after another.
        """
        out = ScoreOutput([], [])
        cap = self.score_chunk_size
        for start in range(0, len(items), cap):
            part = self.score_chunk(items[start : start + cap])
            out.token_logprobs.extend(part.token_logprobs)
            out.greedy.extend(part.greedy)
        return out
