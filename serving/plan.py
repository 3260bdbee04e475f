"""The serving plan: which steps the engine compiles (phase x batch bucket x length bucket) and with which layout.

The engine compiles exactly the buckets listed here. `make_plan` asks analytics' plan chooser
(`meshserve.analytics.plan.choose_plan`) for the layout and predicted step time of each bucket on this mesh and
chip; on one device every layout computes the same thing, so there the plan labels and prices the steps (the
degenerate case of the same path, not a separate one). Without analytics every step is `replicated`.

Axis alphabet (model/config.py): B batch, T tokens in this pass, S context.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from meshserve.errors import UserError
from meshserve.model.config import ModelConfig

__all__ = [
    "guide_buckets",
    "DEFAULT_MAX_BATCH",
    "EnginePlan",
    "StepPlan",
    "PlanError",
    "make_plan",
    "pow2_buckets",
    "replicate_kv_for_plan",
]

Objective = Literal["latency", "throughput"]


# Decode slots when max_batch is not given (serve and the offline jobs lower it to what fits the device's memory).
DEFAULT_MAX_BATCH = {"latency": 32, "throughput": 128}


class PlanError(UserError):
    """A serving plan that cannot work (batch or context out of range)."""


def guide_buckets(max_batch: int) -> list[int]:
    """Row counts G the guided masks' write and resample steps are compiled for: powers of 4 below max_batch, and
    max_batch (a step with g guided rows uploads the smallest G >= g masks, not B)."""
    return sorted({*(4**i for i in range(max_batch.bit_length()) if 4**i < max_batch), max_batch})


@dataclass(frozen=True)
class StepPlan:
    """One compiled step: phase, batch bucket B, tokens per row T, its layouts and predicted time."""

    phase: str  # prefill | decode | score
    batch: int
    length: int
    ffn_layout: str = "replicated"
    attention_layout: str = "replicated"
    predicted_ms: float = 0.0


@dataclass(frozen=True)
class EnginePlan:
    """Everything the engine compiles at warm-up, and the limits it enforces."""

    objective: Objective
    max_batch: int  # decode slots (B of the KV cache)
    max_context: int  # S of the KV cache: prompt + generated tokens per request
    prefill_batches: tuple[int, ...]  # batch buckets for prefill (requests prefilled together)
    prefill_lengths: tuple[int, ...]  # prompt-length buckets T
    decode_batches: tuple[int, ...]  # decode buckets: the step runs on slots [0, b)
    score_batches: tuple[int, ...]  # batch buckets for Score (all-token logits)
    prefill_token_budget: int  # most prompt tokens (B*T of the bucket) in one prefill between decode steps
    mesh_axes: dict[str, int] = field(default_factory=lambda: {"x": 1, "y": 1, "z": 1})
    steps: tuple[StepPlan, ...] = ()
    source: str = "fixed"  # "fixed" (one device) or the planner that chose the layouts
    planner: dict[str, Any] = field(default_factory=dict)  # the planner's own report (Plan.to_dict()), if any
    # Decode context buckets C: a step attends over cache positions [0, C) for the smallest C above every live
    # row's length, so it reads the filled part of the cache. () = (max_context,), e.g. on a mesh.
    decode_contexts: tuple[int, ...] = ()
    # Prefix caching (serving/prefix_cache.py): a prompt that starts with tokens a cache slot holds prefills only
    # the rest, in an "extend" step per prefill bucket and context bucket (on a mesh: the one context, max_context).
    prefix_caching: bool = False
    # Chunked prefill: a prompt longer than this (a length bucket) is prefilled one chunk per engine-loop iteration
    # through the same extend steps, with decode steps between the chunks. 0 = off.
    prefill_chunk: int = 0
    # Speculative decoding (serving/speculative.py): up to this many drafted tokens per row (rows without penalties)
    # are verified in one "verify" step per decode bucket <= speculative_max_batch and context bucket. 0 = off.
    speculative_tokens: int = 0
    speculative_max_batch: int = 8
    speculative_ngram: int = 3  # the longest suffix n-gram looked up in a request's own tokens
    # The KV cache's storage: "auto" (the compute dtype) or "int8" (model/kv_quant.py: half of bf16's bytes).
    kv_cache_dtype: str = "auto"

    @property
    def verify_batches(self) -> tuple[int, ...]:
        """The decode buckets a verify step is compiled for (speculation pays at small batches, where a decode step
        is bound by loading the weights; above, the extra positions cost compute). () when speculation is off."""
        if not self.speculative_tokens:
            return ()
        return tuple(b for b in self.decode_batches if b <= self.speculative_max_batch)

    @property
    def extend_lengths(self) -> tuple[int, ...]:
        """The length buckets T of the extend steps (prefix caching and chunked prefill use them): all but the
        largest, which no reuse or chunk needs (the rest of a reused prompt falls in a smaller bucket than the whole,
        and a chunk is below max_context)."""
        return self.prefill_lengths[:-1] if self.prefix_caching or self.prefill_chunk else ()

    def contexts(self) -> tuple[int, ...]:
        """The decode context buckets, ascending, max_context last."""
        return self.decode_contexts or (self.max_context,)

    def compile_count(self, phases: tuple[str, ...] = ("generate", "score")) -> int:
        """How many steps `Engine.warm_up(phases=...)` compiles (prefill and its insert count two; generation adds
        one slot-release step and one guided resample step per guide bucket, and prefix caching one extend step per
        prefill bucket and context)."""
        n = 0
        if "generate" in phases:
            n += 1 + len(guide_buckets(self.max_batch)) + 2 * len(self.prefill_batches) * len(self.prefill_lengths)
            n += len(self.decode_batches) * len(self.contexts())
            n += len(self.prefill_batches) * len(self.extend_lengths) * len(self.contexts())
            n += len(self.verify_batches) * len(self.contexts())
        if "score" in phases:
            n += len(self.score_batches) * len(self.prefill_lengths)
        return n

    def cheap_decode_batch(self, within: float = 0.05) -> int:
        """The largest decode bucket whose predicted step time is within `within` of the smallest bucket's: below
        it, a wider decode step costs about nothing (weight loads dominate), so free slots there may keep prefix
        cache histories. 1 without the cost model's predictions (a CPU has no chip model)."""
        times = {s.batch: s.predicted_ms for s in self.steps if s.phase == "decode"}
        base = times.get(self.decode_batches[0], 0.0)
        if base <= 0:
            return 1
        return max(b for b in self.decode_batches if times.get(b, float("inf")) <= (1 + within) * base)

    def context_bucket(self, n: int) -> int:
        """The smallest decode context bucket >= n (max_context for anything longer)."""
        return next((c for c in self.contexts() if c >= n), self.max_context)

    def length_bucket(self, n: int) -> int:
        """The smallest prompt-length bucket >= n (n <= max_context)."""
        for length in self.prefill_lengths:
            if length >= n:
                return length
        raise PlanError(f"prompt of {n} tokens exceeds the largest length bucket {self.prefill_lengths[-1]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from lo up to hi, with hi itself last (so every size up to hi has a bucket)."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(sorted(set(out)))


def _chip(device_kind: str):
    """The analytics chip for this device kind; `local` (meshserve calibrate) for anything else, or None."""
    from meshserve.analytics.chips import chip_for_device, get_chip

    name = chip_for_device(device_kind) or "local"
    try:
        return get_chip(name)
    except UserError:
        return None  # an uncalibrated CPU: layouts without predicted times


def _layouts(config: ModelConfig, plan: EnginePlan, weights: str, device_kind: str):
    """Layouts and predicted step times per compiled step, from analytics' plan chooser.

    Returns (steps, source, planner report). Without the chooser (or a chip to price it on) every step is
    `replicated` with no prediction; with one device every layout computes the same thing, so the plan only
    labels and prices the steps, while a sharded build runs the named layouts.
    """
    mesh = plan.mesh_axes
    n = mesh["x"] * mesh["y"] * mesh["z"]
    grid = (
        [("prefill", b, t) for b in plan.prefill_batches for t in plan.prefill_lengths]
        + [("decode", b, 1) for b in plan.decode_batches]
        + [("score", b, t) for b in plan.score_batches for t in plan.prefill_lengths]
    )
    try:
        from meshserve.analytics.plan import choose_plan
        from meshserve.partition.comm import MeshShape
    except ImportError:
        if n > 1:
            raise PlanError(f"a mesh of {n} devices needs meshserve.analytics (not in this build)") from None
        return tuple(StepPlan(p, b, t) for p, b, t in grid), "fixed", {}
    chip = _chip(device_kind)
    if chip is None:
        from meshserve.analytics.chips import get_chip

        chip, priced = get_chip("tpu-v4"), False  # layouts still come from the cost model; times would mislead
    else:
        priced = True
    dtype = "int8" if weights == "int8" else "bf16"  # f32 is priced as bf16 (the chooser knows bf16 and int8)
    shape = MeshShape(mesh["x"], mesh["y"], mesh["z"])
    buckets = sorted({*plan.prefill_batches, *plan.score_batches})
    # The largest prompt length decides the weight storage (1d or 2d: the weights are stored once) and the decode
    # cache's layout (the largest decode bucket's); each shorter length only chooses its prefill layouts, within
    # that storage and priced with the switch into that same cache.
    longest = plan.prefill_lengths[-1]
    by_length: dict[int, Any] = {}
    for t in sorted(plan.prefill_lengths, reverse=True):
        cache = None if t == longest else by_length[longest].lookup("decode", plan.max_batch)
        by_length[t] = choose_plan(
            config, chip, mesh=shape, objective=plan.objective, batch_buckets=plan.decode_batches,
            prefill_buckets=buckets, prompt_len=t, gen_len=max(1, plan.max_context - t), weights=dtype,
            decode_cache=None if cache is None else (cache.ffn_layout, cache.attention),
            kv_dtype="int8" if plan.kv_cache_dtype == "int8" else "bf16",  # auto: priced as bf16, as the weights
        )  # fmt: skip
    # choose_plan prices each prefill with the phase switch into the decode cache (the largest decode bucket's
    # layout, as the sharded engine runs it); a score step runs the same pass but inserts nothing.
    steps = []
    for phase, b, t in grid:
        chosen = by_length[longest if phase == "decode" else t]
        entry = chosen.lookup("decode" if phase == "decode" else "prefill", b)
        ms = (entry.step_s - (entry.reshard_s if phase == "score" else 0.0)) * 1e3 if priced else 0.0
        steps.append(StepPlan(phase, b, t, entry.ffn_layout, entry.attention, ms))
    report = by_length[longest].to_dict()
    report["priced_on"] = chip.name if priced else None
    return tuple(steps), "analytics", report


def make_plan(
    config: ModelConfig,
    *,
    objective: Objective = "latency",
    max_batch: int | None = None,
    max_context: int | None = None,
    mesh_axes: dict[str, int] | None = None,
    length_buckets: tuple[int, ...] | None = None,
    decode_buckets: tuple[int, ...] | None = None,
    context_buckets: tuple[int, ...] | None = None,
    weights: str = "bf16",
    device_kind: str = "cpu",
    prefix_caching: bool = False,
    prefill_chunk: int = 0,
    speculative_tokens: int = 0,
    speculative_max_batch: int = 8,
    speculative_ngram: int = 3,
    kv_cache_dtype: str = "auto",
) -> EnginePlan:
    """The bucket grid for an objective. latency: 32 slots, prefill one or four prompts at a time;
    throughput: 128 slots, prefill up to 32 prompts at a time (weight-gathered prefill pays at large B*T).

    length_buckets / decode_buckets override the power-of-two grids (fewer buckets: faster warm-up, more padding);
    max_context and max_batch are added to them when missing, so every request still has a bucket; None takes the
    default for either (0 is refused like any other value out of range).
    context_buckets: decode context buckets (default powers of two from 128 to max_context on one device; on a
    mesh only max_context, as the sharded decode step attends over the whole cache).
    prefix_caching: compile the extend steps that reuse cached prompt prefixes, one per prefill batch, length bucket
    in `extend_lengths` and context bucket (on a mesh the one context, max_context: the sharded engine runs them
    too). serve and batch-generate turn it on by default.
    prefill_chunk: prefill prompts longer than this many tokens in chunks (rounded down to a length bucket; 0 = off):
    a long prompt then stalls the running streams for one chunk's prefill at a time, not for all of it. serve
    turns it on (512) for the latency objective.
    speculative_tokens: draft tokens per verify step (serving/speculative.py; 0 = off), compiled for the decode
    buckets up to speculative_max_batch (on a mesh: the one decode bucket, max_batch, which must not exceed it).
    speculative_ngram: the longest n-gram looked up.
    kv_cache_dtype: "auto" (the compute dtype) or "int8" (model/kv_quant.py: half of bf16's bytes).
    """
    if objective not in ("latency", "throughput"):
        raise PlanError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    if kv_cache_dtype not in ("auto", "int8"):
        raise PlanError(f"kv_cache_dtype must be 'auto' or 'int8', got {kv_cache_dtype!r}")
    # None (not 0) means the default: a 0 from a flag is a mistake to refuse, not a request for the default.
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH[objective]
    if max_context is None:
        max_context = config.max_seq_len
    if not 1 <= max_batch <= 4096:
        raise PlanError(f"max_batch must be in [1, 4096], got {max_batch}")
    if not 2 <= max_context <= config.max_seq_len:
        raise PlanError(f"max_context must be in [2, max_seq_len={config.max_seq_len}], got {max_context}")
    # Short prompts share one 16-token bucket: below that the step is weight-load bound and padding is free.
    lengths = pow2_buckets(min(16, max_context), max_context)
    if length_buckets:
        if min(length_buckets) < 1 or max(length_buckets) > max_context:
            raise PlanError(f"length buckets must be in [1, max_context={max_context}], got {list(length_buckets)}")
        lengths = tuple(sorted({*length_buckets, max_context}))
    prefill_cap = 4 if objective == "latency" else 32
    prefill_batches = tuple(b for b in (1, prefill_cap) if b <= max_batch) or (1,)
    if max_batch < prefill_cap:
        prefill_batches = tuple(sorted({1, max_batch}))
    decode_batches = pow2_buckets(1, max_batch)
    if decode_buckets:
        if min(decode_buckets) < 1 or max(decode_buckets) > max_batch:
            raise PlanError(f"decode buckets must be in [1, max_batch={max_batch}], got {list(decode_buckets)}")
        decode_batches = tuple(sorted({*decode_buckets, max_batch}))
    score_batches = tuple(sorted({1, min(8 if objective == "latency" else 32, max_batch)}))
    on_mesh = math.prod((mesh_axes or {}).values() or [1]) > 1
    contexts = (max_context,) if on_mesh else pow2_buckets(min(128, max_context), max_context)
    if context_buckets:
        if on_mesh:
            raise PlanError("context buckets need one device: the sharded decode step attends over the whole cache")
        if min(context_buckets) < 1 or max(context_buckets) > max_context:
            raise PlanError(f"context buckets must be in [1, max_context={max_context}], got {list(context_buckets)}")
        contexts = tuple(sorted({*context_buckets, max_context}))
    # One length bucket: the rest of a prompt never falls in a smaller one, so there is nothing to reuse.
    prefix_caching = prefix_caching and len(lengths) > 1
    if prefill_chunk:
        if not 1 <= prefill_chunk < max_context:
            raise PlanError(f"prefill chunk must be in [1, max_context={max_context}), got {prefill_chunk} (0 = off)")
        # A chunk is a whole length bucket (no padding inside a long prompt); below the smallest it is the smallest.
        prefill_chunk = max([t for t in lengths if t <= prefill_chunk], default=lengths[0])
        if prefill_chunk >= max_context:
            raise PlanError(f"prefill chunk needs a length bucket below max_context={max_context}; buckets {lengths}")
    if speculative_tokens:
        if not 1 <= speculative_tokens <= min(16, max_context - 1):
            raise PlanError(f"speculative tokens must be in [1, {min(16, max_context - 1)}] (0 = off), got "
                            f"{speculative_tokens}")  # fmt: skip
        if speculative_max_batch < 1 or speculative_ngram < 1:
            raise PlanError(f"speculative max batch and n-gram must be >= 1, got {speculative_max_batch}, "
                            f"{speculative_ngram}")  # fmt: skip
        if on_mesh and max_batch > speculative_max_batch:
            # The sharded engine runs every decode step over all max_batch slots (serving/sharding.py), so a
            # verify step would too: with more slots than speculative_max_batch it would never run.
            raise PlanError(f"on a mesh every step runs all max_batch={max_batch} slots, above speculative max batch "
                            f"{speculative_max_batch}: speculation would never run; raise the speculative max batch "
                            f"or lower max_batch")  # fmt: skip
    # Latency: a prefill never stalls decode by more than ~1k tokens of work; throughput: large prefill batches.
    budget = 1024 if objective == "latency" else 16384
    plan = EnginePlan(
        objective=objective,
        max_batch=max_batch,
        max_context=max_context,
        prefill_batches=prefill_batches,
        prefill_lengths=lengths,
        decode_batches=decode_batches,
        score_batches=score_batches,
        decode_contexts=contexts,
        prefill_token_budget=max(budget, max_context),  # the longest prompt must always fit alone
        mesh_axes=dict(mesh_axes or {"x": 1, "y": 1, "z": 1}),
        prefix_caching=prefix_caching,
        prefill_chunk=prefill_chunk,
        speculative_tokens=speculative_tokens,
        speculative_max_batch=speculative_max_batch,
        speculative_ngram=speculative_ngram,
        kv_cache_dtype=kv_cache_dtype,
    )
    steps, source, report = _layouts(config, plan, weights, device_kind)
    return EnginePlan(**{**plan.__dict__, "steps": steps, "source": source, "planner": report})


def replicate_kv_for_plan(config: ModelConfig, params: Any, plan: EnginePlan) -> tuple[ModelConfig, Any]:
    """(config, params) as `plan`'s mesh runs them: a grouped-query model's kv heads replicated for the weight
    storage of the plan's decode layout (model.sharded_specs.replicate_for_mesh; the plan chooser priced the same),
    the original kv weights freed once repeated. One device, or kv heads the split already divides: as given."""
    shape = plan.mesh_axes
    if math.prod(shape.values()) <= 1:
        return config, params
    from meshserve.model.sharded_specs import replicate_for_mesh
    from meshserve.partition.comm import MeshShape

    decode = next((s for s in plan.steps if s.phase == "decode" and s.batch == plan.max_batch), None)
    ffn = decode.ffn_layout if decode is not None and decode.ffn_layout != "replicated" else "ws2d"
    return replicate_for_mesh(config, params, MeshShape(shape["x"], shape["y"], shape["z"]), ffn, consume=True)
