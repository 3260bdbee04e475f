"""The engine: compiled prefill, insert, extend, decode (generate) and score steps, per phase and bucket of the plan.

Typed and free of protos: the orchestrator and the offline job drive it from one thread. Every step is compiled
ahead of time (`jit(...).lower(...).compile()`), never on the request path: `warm_up` compiles the whole plan, or
with defer=True only each kind's largest bucket, and `compile_pending` (on a background thread) the rest, smallest
first; until a bucket is in, its shapes run padded in the smallest compiled bucket that covers them
(serving/warm_up.py). A shape no compiled step covers is refused. What each step computes: serving/engine_steps.py.

Decode state lives on the device between steps: the KV cache [N, B, S, K, Q], each slot's last token [B],
its sampling step [B], its sampling parameters ([B] arrays) and the tokens it has seen ([B, V], for the
repetition penalties), so a decode step needs no host input; its one device->host copy is the sampled tokens
and their log-probs [b] (with the top_logprobs alternatives [b, K] on steps where a row asked for them).
Decode bucket b runs slots [0, b): the scheduler fills the lowest free slot first, so active requests sit at the
front.

An extend step (with prefix caching or chunked prefill) prefills prompts that continue a prefix already in the
cache: it gathers the prefix rows [0, C) of a source slot, runs the rest of the prompt over them, and writes prefix
and rest into the request's slot, in one compiled call per (batch, length, context) bucket (serving/prefix_cache.py).

The step functions come in as `ModelSteps` (default: model/transformer.py on one device); a sharded build
passes its own steps and shardings with the plan that chose them. Axis alphabet: model/config.py.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.model import transformer
from meshserve.model.config import ModelConfig
from meshserve.model.generate import Batch, validate_prompts
from meshserve.model.params import Params
from meshserve.model.sampling import SamplingParams, guide_arrays
from meshserve.serving.engine_compile import compile_job
from meshserve.serving.engine_steps import (
    DecodeState,
    ModelSteps,
    fresh_state,
)
from meshserve.serving.map_budget import MapBudget
from meshserve.serving.memory_fit import check_decode_state
from meshserve.serving.plan import EnginePlan
from meshserve.serving.prefix_cache import PrefixReuse
from meshserve.serving.warm_up import PHASES, CompileJob, compile_order, covering

__all__ = ["Engine", "ModelSteps", "DecodeState", "StepOutput", "ScoreOutput", "VerifyOutput"]


@dataclass(frozen=True)
class StepOutput:
    """Host copies of one step's sampled tokens int32 [b] and their log-probs float32 [b]; with the K most likely
    alternatives ids int32 [b, K] and log-probs float32 [b, K] (sampling.top_logprobs) when they were fetched."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class VerifyOutput:
    """A verify step on the host: tokens int32 [b, k + 1] of which row r keeps the first counts[r], their log-probs
    [b, k + 1], and position 0's alternatives [b, K] (see engine_steps.verify_rows)."""

    tokens: np.ndarray
    counts: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclass(frozen=True)
class ScoreOutput:
    """Per item, over its continuation's c tokens: their log-probs (float32 [c]), whether each is the argmax
    (bool [c]), and the argmax itself: ids (int32 [c]) and log-probs (float32 [c]; OpenAI's echo with logprobs=1)."""

    token_logprobs: list[np.ndarray]
    greedy: list[np.ndarray]
    best_ids: list[np.ndarray] = field(default_factory=list)
    best_logprobs: list[np.ndarray] = field(default_factory=list)

    def extend(self, other: ScoreOutput) -> None:
        for name in ("token_logprobs", "greedy", "best_ids", "best_logprobs"):
            getattr(self, name).extend(getattr(other, name))

    def pick(self, order: list[int]) -> ScoreOutput:
        """The items in this order."""
        lists = (self.token_logprobs, self.greedy, self.best_ids, self.best_logprobs)
        return ScoreOutput(*([x[j] for j in order] if x else [] for x in lists))


@dataclass
class Engine:
    """Compiled steps over one model and plan. One driver thread runs the steps; besides it, one other thread may run
    `compile_pending` (the only method meant for it)."""

    params: Params
    config: ModelConfig
    plan: EnginePlan
    steps: ModelSteps = field(default_factory=ModelSteps)
    _prefill: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _insert: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _extend: dict[tuple[int, int, int], Any] = field(default_factory=dict, init=False, repr=False)  # (b, T, C)
    _decode: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)  # (b, context)
    _verify: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)  # (b, context)
    _score: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _release: Any = field(default=None, init=False, repr=False)  # the slot-release step, compiled with generation
    _guide: dict[tuple[int], Any] = field(default_factory=dict, init=False, repr=False)  # guided masks' writes, (G,)
    _resample: dict[tuple[int], Any] = field(default_factory=dict, init=False, repr=False)  # (G,): sampling again
    _state: DecodeState | None = field(default=None, init=False, repr=False)
    _pending: deque[CompileJob] = field(default_factory=deque, init=False, repr=False)  # left by warm_up(defer=True)
    _allocate: Any = field(default=None, init=False, repr=False)  # compiled: a fresh state, in its split
    _fit_checked: bool = field(default=False, init=False, repr=False)  # the state was checked against device memory
    _maps: MapBudget = field(default_factory=MapBudget, init=False, repr=False)  # CPU: JIT code maps per compile

    @property
    def kv_dtype(self) -> jnp.dtype:
        """The KV cache's storage: the compute dtype, or int8 (plan.kv_cache_dtype, model/kv_quant.py)."""
        return jnp.dtype(jnp.int8) if self.int8_kv else jnp.dtype(transformer.compute_dtype(self.params))

    @property
    def int8_kv(self) -> bool:
        return self.plan.kv_cache_dtype == "int8"

    # ----- warm-up -----

    def _abstract_state(self) -> DecodeState:
        """The decode state's shapes, with the decode layout's shardings on a mesh: every step that takes the state
        is compiled for the state as `reset` places it, so its donated buffers are updated in place (left open,
        XLA may choose another input split and copy the whole cache on every call)."""
        B, S, dtype = self.plan.max_batch, self.plan.max_context, self.kv_dtype
        shapes = jax.eval_shape(lambda: fresh_state(self.config, B, S, dtype))
        if self.steps.decode_state_sharding is None:
            return shapes
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.steps.decode_state_sharding
        )

    def compiled_steps(self) -> int:
        """Steps compiled so far (a prefill and its insert count two, as in `EnginePlan.compile_count`)."""
        compiled = (self._prefill, self._insert, self._extend, self._decode, self._verify, self._score, self._resample)
        return sum(map(len, compiled)) + (self._release is not None)

    def warm_up(
        self,
        progress: Callable[[CompileJob], None] | None = None,
        phases: tuple[str, ...] = PHASES,
        defer: bool = False,
    ) -> None:
        """Compile the plan's steps for `phases` (generate = prefill, insert, extend, decode and slot release; score)
        and allocate the decode state. progress: called with each step's CompileJob once it is compiled.

        defer: compile only the largest bucket of each kind now (it serves every request, padded) and leave the rest
        to `compile_pending` (warm_up.py); by default every step is compiled before this returns. No step compiles
        on the request path: a shape no compiled step covers raises KeyError."""
        jobs = compile_order(self.plan, phases)
        state = self._abstract_state()
        if self._state is None and not self._fit_checked:  # before minutes of compiling, not after
            check_decode_state(state, self.plan.max_batch, self.plan.max_context, self.params)
            self._fit_checked = True
        for job in jobs:
            if job.first or not defer:
                self._compile(job, state, progress)
        self._pending = deque(job for job in jobs if defer and not job.first)
        self.reset()

    def pending_steps(self) -> int:
        """Steps a deferred warm-up has left to `compile_pending` (prefill and its insert count two)."""
        return sum(job.units for job in list(self._pending))

    def compile_pending(
        self, progress: Callable[[CompileJob], None] | None = None, stop: threading.Event | None = None
    ) -> list[tuple[CompileJob, Exception]]:
        """Compile what a deferred warm-up left, smallest buckets first, until done or `stop` is set; returns the
        steps that failed to compile, with their errors (their shapes stay with the larger steps that compiled).

        Meant for one background thread while another drives the engine: each step is usable as soon as it is
        stored. Tracing and lowering hold the GIL (~15% of a step's compile time here), XLA's compile releases it,
        so the driving thread keeps running. A step leaves `pending_steps` only once it is compiled."""
        state = self._abstract_state()
        failed = []
        while self._pending and not (stop is not None and stop.is_set()):
            job = self._pending[0]
            try:
                self._compile(job, state, progress)
            except Exception as e:  # e.g. out of device memory for one bucket: the others may still fit
                failed.append((job, e))
            self._pending.popleft()
        return failed

    def _compile(self, job: CompileJob, state: DecodeState, progress: Callable[[CompileJob], None] | None) -> None:
        held = self._maps.check(job.label)  # refused before the compile that would pass the process's map limit
        compile_job(self, job, state, progress)
        self._maps.record(held)

    def reset(self) -> None:
        """A fresh decode state (all slots empty). A scheduler's prefix index describes the old cache: drive the
        engine with a new Scheduler after a reset."""
        B, S, dtype = self.plan.max_batch, self.plan.max_context, self.kv_dtype
        if self._state is None and not self._fit_checked:  # the first allocation (unless warm_up checked it)
            check_decode_state(self._abstract_state(), B, S, self.params)
            self._fit_checked = True
        if self._allocate is None:
            # Allocated in place, in its split on a mesh (built whole on one device first, a large cache did not
            # fit that device).
            fresh = functools.partial(fresh_state, self.config, B, S, dtype)
            self._allocate = jax.jit(fresh, out_shardings=self.steps.decode_state_sharding)
        self._state = None  # the old state's buffers go before the new ones are allocated
        self._state = self._allocate()

    # ----- steps -----

    def prefill_insert(
        self,
        prompts: list[list[int]],
        slots: list[int],
        sampling: list[SamplingParams],
        batch: int,
        length: int,
        reuse: PrefixReuse | None = None,
        guides: Sequence[np.ndarray | None] = (),
    ) -> StepOutput:
        """Prefill prompts as one [batch, length] bucket, insert them into decode `slots`; first tokens to host.

        reuse: prompt prefixes already in the cache (prefix caching); `length` then buckets the tokens after them.
        guides: per prompt, the packed mask uint32 [W] its first token must follow (guided decoding), or None.
        """
        n = len(prompts)
        if not 0 < n <= batch or len(slots) != n or len(sampling) != n:
            raise ValueError(f"prefill of {n} prompts into bucket batch={batch} with {len(slots)} slots")
        if reuse is not None:
            return self._extend_insert(prompts, slots, sampling, batch, length, reuse, guides)
        # The bucket's own step, or a larger one while a deferred warm-up has not compiled it yet.
        key, prefill = covering(self._prefill, (batch, length), "prefill")
        # Right-padded [b, T] tokens, padding rows of length 1 (never inserted), sampling rows [b].
        packed = Batch.pack(self.config, prompts, 1, list(sampling), (), shape=key)
        tokens, lengths = packed.tokens, packed.lengths
        samp = {**packed.sampling, **guide_arrays(self.config.vocab_size, key[0], guides)}
        out, k, v, in_prompt = prefill(self.params, tokens, lengths, samp)
        self._state = self._insert[key](self._state, k, v, lengths, self._slot_rows(slots, key[0]), out[0], samp,
                                        in_prompt)  # fmt: skip
        return StepOutput(*(np.asarray(a)[:n] for a in jax.device_get(out)))

    def _slot_rows(self, slots: list[int], b: int) -> np.ndarray:
        """Decode slots int32 [b] of a step's rows; padding rows get index B, out of range: the scatter drops them."""
        rows = np.full((b,), self.plan.max_batch, np.int32)
        rows[: len(slots)] = slots
        return rows

    def _extend_insert(self, prompts, slots, sampling, batch: int, length: int, reuse: PrefixReuse,
                       guides: Sequence[np.ndarray | None]) -> StepOutput:  # fmt: skip
        """`prefill_insert` over cached prefixes: one compiled extend step (b, T, C)."""
        n = len(prompts)
        key, extend = covering(self._extend, (batch, length, reuse.context), "extend")
        batch, length, context = key
        if len(reuse.sources) != n or len(reuse.lengths) != n:
            raise ValueError(f"prefix reuse for {len(reuse.lengths)} of {n} prompts")
        for i, (p, m, src) in enumerate(zip(prompts, reuse.lengths, reuse.sources, strict=True)):
            if not (0 <= m < len(p) and m <= reuse.context and 0 <= src < self.plan.max_batch):
                raise ValueError(f"prompt {i}: cached prefix {m} from slot {src} (prompt {len(p)}, C={reuse.context})")
        validate_prompts(self.config, prompts, 1)  # the whole prompts, as a plain prefill would
        rests = [p[m:] for p, m in zip(prompts, reuse.lengths, strict=True)]
        rest = Batch.pack(self.config, rests, 1, list(sampling), (), shape=(batch, length))
        prefix_tokens = np.zeros((batch, context), np.int32)
        cached = np.zeros((batch,), np.int32)
        sources = np.zeros((batch,), np.int32)
        for i, (p, m) in enumerate(zip(prompts, reuse.lengths, strict=True)):
            prefix_tokens[i, :m], cached[i], sources[i] = p[:m], m, reuse.sources[i]
        samp = {**rest.sampling, **guide_arrays(self.config.vocab_size, batch, guides)}
        self._state, out = extend(self.params, self._state, rest.tokens, rest.lengths, prefix_tokens, cached, sources,
                                  self._slot_rows(slots, batch), samp)  # fmt: skip
        return StepOutput(*(np.asarray(a)[:n] for a in jax.device_get(out)))

    def release(self, slots: list[int]) -> None:
        """Reset the sampling settings of slots no request holds any more (see `release_slots`)."""
        free = np.zeros((self.plan.max_batch,), bool)
        free[list(slots)] = True
        self._state = self._release(self._state, free)

    def guide(self, slots: Sequence[int], masks: Sequence[np.ndarray]) -> None:
        """Guided rows' masks for the next step: masks[i] (packed uint32 [W]) for slot slots[i]."""
        if slots:
            self._state = self._guided(self._guide, slots, masks)

    def resamples(self, rows: int) -> bool:
        """Whether a resample step for `rows` guided rows is compiled (a deferred warm-up compiles them last)."""
        return any(g >= rows for (g,) in list(self._resample))

    def resample_async(self, slots: Sequence[int], masks: Sequence[np.ndarray]) -> tuple[jax.Array, jax.Array]:
        """Guided rows whose masks come after their decode step was dispatched (engine_steps.resample_rows): masks[i]
        (packed uint32 [W]) for slot slots[i], and those rows sampled again from the step's logits. -> device arrays
        tokens int32 [G], log-probs float32 [G] (G >= len(slots); the first len(slots) are theirs), replacing the
        step's own for those slots. Nothing waits."""
        self._state, out = self._guided(self._resample, slots, masks)
        return out

    def _guided(self, table: dict, slots: Sequence[int], masks: Sequence[np.ndarray]):
        (g,), step = covering(table, (len(slots),), "guided")
        rows = self._slot_rows(list(slots), g)
        packed = np.full((g, self._state.sampling["allowed"].shape[1]), 0xFFFFFFFF, np.uint32)
        packed[: len(slots)] = np.stack(masks)
        return step(self._state, rows, packed)

    def decode_async(self, batch: int, context: int | None = None) -> tuple[jax.Array, ...]:
        """Dispatch one decode step for slots [0, batch); returns device arrays (tokens [batch], log-probs [batch],
        top ids [batch, K], top log-probs [batch, K]).

        context: more than the longest cache length of any used row in [0, batch) at this step (the step then
        attends over the smallest context bucket >= it); None = the whole cache.
        Nothing waits: the caller may dispatch more work before fetching these with `fetch`.
        """
        c = self.plan.max_context if context is None else self.plan.context_bucket(context)
        # A wider step (while a deferred warm-up compiles this one) also runs the slots after `batch`: rows no
        # request owns, whose new keys land past anything the prefix index records, as a bucket's free slots do.
        (b, _), decode = covering(self._decode, (batch, c), "decode")
        self._state, out = decode(self.params, self._state)
        return out if b == batch else tuple(a[:batch] for a in out)

    @staticmethod
    def fetch(
        out: tuple[jax.Array, ...], top: bool = False, resampled: tuple[list[int], tuple] | None = None
    ) -> StepOutput:
        """The one device->host copy of a decode step; the alternatives only when `top` (some row asked for them:
        a step that needs none copies [batch] arrays only). resampled: (slots, `resample_async`'s output) of the
        step's guided rows sampled again: their tokens and log-probs replace the step's own."""
        if resampled is None:
            return StepOutput(*(np.asarray(a) for a in jax.device_get(out if top else out[:2])))
        slots, again = resampled
        got, (tokens, logprobs) = jax.device_get((out if top else out[:2], again))
        step = StepOutput(*(np.array(a) for a in got))  # copies: written below
        step.tokens[slots], step.logprobs[slots] = tokens[: len(slots)], logprobs[: len(slots)]
        return step

    def decode(self, batch: int, context: int | None = None, top: bool = False) -> StepOutput:
        """One decode step, waited for (see `fetch`)."""
        return self.fetch(self.decode_async(batch, context), top)

    def verify(self, drafts: np.ndarray, context: int) -> VerifyOutput:
        """One speculative step (engine_steps.verify_rows) over slots [0, b) of drafts int32 [b, k] (-1 = none):
        b is padded up to a compiled verify bucket, context to one >= every used row's length. Waited for."""
        b, k = drafts.shape
        if k != self.plan.speculative_tokens:
            raise ValueError(f"drafts of {k} tokens; the plan verifies {self.plan.speculative_tokens}")
        (bb, _), verify = covering(self._verify, (b, self.plan.context_bucket(context)), "verify")
        if bb > b:
            drafts = np.concatenate([drafts, np.full((bb - b, k), -1, np.int32)])
        self._state, out = verify(self.params, self._state, drafts)
        return VerifyOutput(*(np.asarray(a)[:b] for a in jax.device_get(out)))

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
        bucket = (
            next(x for x in plan.score_batches if x >= len(items)),
            plan.length_bucket(max(len(p) + len(c) for p, c in items)),
        )
        (b, t), score = covering(self._score, bucket, "score")
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, (p, c) in enumerate(items):
            tokens[i, : len(p) + len(c)] = list(p) + list(c)
            lengths[i] = len(p) + len(c)
        token_lp, best, best_lp = (np.asarray(a) for a in jax.device_get(score(self.params, tokens, lengths)))
        greedy = best == tokens[:, 1:]
        # position j predicts token j + 1: the continuation's tokens are predicted at len(p)-1 .. len(p+c)-2
        spans = [(len(p) - 1, len(p) + len(c) - 1) for p, c in items]
        return ScoreOutput(*([a[i, s:e] for i, (s, e) in enumerate(spans)] for a in (token_lp, greedy, best, best_lp)))

    def score(self, items: list[tuple[list[int], list[int]]]) -> ScoreOutput:
        """Log-probs of continuations given prompts; items of (prompt ids, continuation ids), any count.

        Items are packed into the plan's score buckets in the given order (sort by length first to limit padding),
        one `score_chunk` after another.
        """
        out = ScoreOutput([], [])
        cap = self.score_chunk_size
        for start in range(0, len(items), cap):
            out.extend(self.score_chunk(items[start : start + cap]))
        return out
