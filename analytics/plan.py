"""The plan chooser: mesh shape, weight dtype, weight storage and, per phase and batch bucket, the layouts to run.

A server stores its weights once, in one of two storages: 1D (E·F_xyz, read by ws1d) or 2D (E_x·F_yz, read by
ws2d and every weight-gathered layout, so prefill and decode switch between them without moving weights). So a
plan uses layouts of one storage in every bucket of both phases. Within a candidate (mesh, dtype, storage) the
decode layout of each bucket is the lowest-latency one of that storage that fits in memory (the rule
`meshserve analyze` marks as `chosen`); the KV cache lives in the largest decode bucket's layout, and each prefill
bucket takes the lowest-latency layout of the storage once the phase switch into that cache is paid. The
candidates are whole plans, compared by the objective's total:
  latency     lowest prefill latency at the smallest prefill bucket + decode latency at the smallest decode bucket
  throughput  lowest chip-ms per token at the largest buckets (prefill + decode)
  cost        lowest chip-ms per token at the largest decode bucket whose step meets `latency_bound_s`
int8 weights cost some quality, so objectives other than latency keep bf16 unless int8 is needed to fit or improves
the objective by more than INT8_GAIN (the paper: int8 "best at low batch, neutral at large batch"). The KV cache's
storage (kv_dtype: bf16, or int8 as serve --kv-cache-dtype int8 stores it) is the caller's choice, not a candidate:
every estimate of the plan prices it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshserve.analytics.chips import Chip
from meshserve.analytics.cost import KV_DTYPES, Estimate, estimate
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.partition.comm import FFN_LAYOUTS, LayoutError, MeshShape
from meshserve.partition.dims import heads_split
from meshserve.partition.rules import storage_of

__all__ = [
    "Plan",
    "PhasePlan",
    "choose_plan",
    "candidate_meshes",
    "evaluate_layouts",
    "best_of",
    "analysis_config",
    "OBJECTIVES",
    "STORAGES",
]

OBJECTIVES = ("latency", "throughput", "cost")
# Weight storages and the layouts that read each, in FFN_LAYOUTS order. 2D first: on a tie (e.g. one chip) the
# storage every weight-gathered layout shares wins.
STORAGES = {s: tuple(f for f in FFN_LAYOUTS if storage_of(f) == s) for s in ("2d", "1d")}
INT8_GAIN = 0.10  # int8 must beat bf16 by this fraction before a quality-neutral objective takes it
# Among layouts of equal cost, prefer batch-sharded attention (smaller KV cache per chip), then this FFN order.
_ATTENTION_ORDER = ("batch", "heads")


@dataclass(frozen=True)
class PhasePlan:
    """What to run for one phase at batches up to `batch`."""

    phase: str
    batch: int
    ffn_layout: str
    attention: str
    step_s: float
    latency_s: float
    mfu: float
    cost_chip_ms_per_token: float
    memory_per_chip_bytes: float
    fits: bool
    reshard_s: float = 0.0  # prefill: the phase switch into the decode cache, inside step_s (score does not pay it)


@dataclass(frozen=True)
class Plan:
    """The mesh, weight storage and per-(phase, bucket) layouts a server runs."""

    model: str
    hardware: str
    chips: int
    mesh: str
    weights: str  # weight dtype: bf16 or int8
    storage: str  # weight storage, one for every bucket: "1d" (ws1d) or "2d" (ws2d and weight-gathered)
    objective: str
    prompt_len: int
    gen_len: int
    phases: tuple[PhasePlan, ...]
    fits: bool
    score: float  # the objective's value (seconds for latency, chip-ms per token otherwise)
    n_kv_heads: int = 0  # kv heads as the storage runs them (analysis_config: replicated for the heads split)
    kv_replication: int = 1  # how many times each of the model's kv heads is repeated for this mesh and storage
    kv_cache_dtype: str = "bf16"  # the KV cache's storage every entry was priced with (bf16 or int8)

    def lookup(self, phase: str, batch: int) -> PhasePlan:
        """The entry for the smallest bucket that holds `batch` (the largest bucket if none does)."""
        entries = sorted((p for p in self.phases if p.phase == phase), key=lambda p: p.batch)
        if not entries:
            raise UserError(f"plan has no {phase!r} entries")
        return next((p for p in entries if p.batch >= batch), entries[-1])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidate_meshes(n_chips: int) -> list[MeshShape]:
    """Every x·y·z = n_chips factorisation."""
    if not isinstance(n_chips, int) or n_chips < 1:
        raise UserError(f"chips must be a positive integer, got {n_chips!r}")
    out = []
    for x in range(1, n_chips + 1):
        if n_chips % x:
            continue
        for y in range(1, n_chips // x + 1):
            if (n_chips // x) % y == 0:
                out.append(MeshShape(x, y, n_chips // (x * y)))
    return out


def analysis_config(config: ModelConfig, mesh: MeshShape, ffn_layout: str) -> ModelConfig:
    """`config` with multi-query query heads zero-padded to what `ffn_layout` splits them over on `mesh`.

    ws1d splits heads over all n chips (H_xyz), every other layout reads the 2D storage (H_yz), so heads pad to a
    multiple of n or of y·z respectively, from the real head count. PaLM 540B (48 heads) on 4x8x8: ws2d pads to 64
    (as the paper did), ws1d to 256. A config whose heads already divide (e.g. `padded_heads(64)`) is unchanged.
    Multi-head and grouped models are never padded (their kv heads would have to grow too). A grouped-query
    model's kv heads are instead replicated the fewest times that the split gives every chip whole kv heads
    (ModelConfig.for_kv_split, as the mesh entry points load it): Llama 2 70B (K = 8) on 4x4x4 runs ws2d with
    K = 16 and ws1d with K = 64, and each row is priced with those (more KV cache and K/V weight bytes per chip).
    When no replication works the config is unchanged and partition/dims.check_layout names H, K and the split.
    """
    split = heads_split(ffn_layout, mesh)
    if split <= 1:
        return config
    if not config.multi_query:
        try:
            return config.for_kv_split(split)
        except UserError:
            return config
    if config.n_heads % split == 0:
        return config
    return config.padded_heads(-(-config.real_heads // split) * split)


def evaluate_layouts(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    *,
    phase: str,
    batch: int,
    prompt_len: int,
    gen_len: int,
    weights: str,
    ffn_layouts: Sequence[str] = FFN_LAYOUTS,
    attentions: Sequence[str] = _ATTENTION_ORDER,
    overlap: bool = False,
    decode: Estimate | None = None,
    reasons: list[str] | None = None,
    kv_dtype: str = "bf16",
) -> list[Estimate]:
    """Estimates for every layout that can split these dims (the others are skipped).

    reasons: when given, each skipped layout's LayoutError message is appended to it (partition/dims.check_layout
    names the dim and the split), so a caller left with no estimate can say why.

    Multi-query heads are padded per layout (`analysis_config`), so each row is charged only its own padding.
    decode (prefill only): the decode step whose KV cache the prefill fills; each prefill row then pays the phase
    switch into that cache's split (`Breakdown.reshard_s`), and only layouts of its weight storage are tried
    (both phases read one copy of the weights). None: the switch into the prefill's own layout and batch.
    kv_dtype: the KV cache's storage, "bf16" or "int8" (cost.estimate).
    """
    if decode is not None:
        ffn_layouts = [f for f in ffn_layouts if storage_of(f) == storage_of(decode.ffn_layout)]
    switch = {} if decode is None else dict(decode_layout=decode.ffn_layout, decode_attention=decode.attention,
                                            decode_batch=decode.batch)  # fmt: skip
    rows = []
    for ffn, attention in itertools.product(ffn_layouts, attentions):
        try:
            rows.append(
                estimate(
                    analysis_config(config, mesh, ffn), chip, mesh, phase=phase, batch=batch, prompt_len=prompt_len,
                    gen_len=gen_len, weights=weights, ffn_layout=ffn, attention=attention, overlap=overlap, **switch,
                    kv_dtype=kv_dtype,
                )
            )  # fmt: skip
        except LayoutError as e:
            if reasons is not None:
                reasons.append(f"{ffn}/{attention}: {e}")
            continue
    return rows


def best_of(rows: Sequence[Estimate]) -> Estimate | None:
    """Lowest latency among the rows that fit; if none fits, the one needing the least memory."""
    fitting = [r for r in rows if r.fits]
    if fitting:
        return min(fitting, key=lambda r: r.latency_s)
    return min(rows, key=lambda r: r.memory_per_chip_bytes) if rows else None


def _phase_plan(e: Estimate) -> PhasePlan:
    return PhasePlan(
        phase=e.phase, batch=e.batch, ffn_layout=e.ffn_layout, attention=e.attention, step_s=e.step_s,
        latency_s=e.latency_s, mfu=e.mfu, cost_chip_ms_per_token=e.cost_chip_ms_per_token,
        memory_per_chip_bytes=e.memory_per_chip_bytes, fits=e.fits, reshard_s=e.breakdown.reshard_s,
    )  # fmt: skip


def _score(objective: str, chosen: dict[tuple[str, int], Estimate], latency_bound_s: float | None) -> float:
    pre = sorted(b for p, b in chosen if p == "prefill")
    dec = sorted(b for p, b in chosen if p == "decode")
    if objective == "latency":
        return chosen["prefill", pre[0]].latency_s + chosen["decode", dec[0]].latency_s
    if objective == "throughput":
        return chosen["prefill", pre[-1]].cost_chip_ms_per_token + chosen["decode", dec[-1]].cost_chip_ms_per_token
    ok = [b for b in dec if latency_bound_s is None or chosen["decode", b].step_s <= latency_bound_s]
    if not ok:
        return float("inf")
    return min(chosen["decode", b].cost_chip_ms_per_token for b in ok)


def _choose_layouts(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    weights: str,
    ffn_layouts: Sequence[str],
    decode_buckets: Sequence[int],
    pre_buckets: Sequence[int],
    decode_cache: tuple[str, str] | None = None,
    **kw: Any,
) -> dict[tuple[str, int], Estimate] | None:
    """The best layout per (phase, bucket) among `ffn_layouts` (one storage); None if some bucket has none.

    Decode first: the KV cache lives in the largest decode bucket's layout (a server's cache has that many slots),
    and every prefill pays the phase switch into it. decode_cache fixes that bucket's (ffn_layout, attention).
    """
    chosen: dict[tuple[str, int], Estimate] = {}
    for phase, buckets in (("decode", decode_buckets), ("prefill", pre_buckets)):
        cache = chosen["decode", decode_buckets[-1]] if phase == "prefill" else None
        for b in buckets:
            only = {}
            if phase == "decode" and b == decode_buckets[-1] and decode_cache is not None:
                only = dict(ffn_layouts=[f for f in ffn_layouts if f == decode_cache[0]], attentions=[decode_cache[1]])
            rows = evaluate_layouts(config, chip, mesh, phase=phase, batch=b, weights=weights,
                                    **{"ffn_layouts": ffn_layouts, **only}, decode=cache, **kw)  # fmt: skip
            best = best_of(rows)
            if best is None:
                return None
            chosen[phase, b] = best
    return chosen


def choose_plan(
    config: ModelConfig,
    chip: Chip,
    n_chips: int | None = None,
    mesh: MeshShape | str | None = None,
    objective: str = "latency",
    batch_buckets: Sequence[int] = (1, 8, 64),
    prefill_buckets: Sequence[int] | None = None,
    prompt_len: int = 2048,
    gen_len: int = 64,
    weights: str | None = None,
    latency_bound_s: float | None = None,
    overlap: bool = False,
    storage: str | None = None,
    decode_cache: tuple[str, str] | None = None,
    kv_dtype: str = "bf16",
) -> Plan:
    """Pick mesh, weights and per-(phase, bucket) layouts for `objective`.

    batch_buckets are the decode buckets (and the prefill ones unless prefill_buckets is given). latency_bound_s
    bounds the decode step time for objective "cost". weights / storage fix the weight dtype (bf16, int8) / storage
    (1d, 2d); None: each is a candidate, chosen by the objective's total over the whole plan. decode_cache fixes the
    (ffn_layout, attention) of the largest decode bucket, the KV cache every prefill switches into (a server pricing
    more prompt lengths against the cache it already runs); it implies its storage. kv_dtype is the KV cache's
    storage ("bf16" or "int8": serve --kv-cache-dtype), priced in every entry (decode's cache reads, prefill's
    writes, memory). Raises UserError on bad input; a plan that does not fit is returned with fits=False.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if kv_dtype not in KV_DTYPES:
        raise UserError(f"kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if isinstance(mesh, str):
        mesh = MeshShape.parse(mesh)
    if mesh is not None and n_chips is not None and mesh.n != n_chips:
        raise UserError(f"mesh {mesh} has {mesh.n} chips but chips = {n_chips}")
    if mesh is None and n_chips is None:
        raise UserError("give chips or a mesh")
    if latency_bound_s is not None and not (latency_bound_s > 0 and math.isfinite(latency_bound_s)):
        raise UserError(f"latency bound must be a positive number of seconds, got {latency_bound_s!r}")
    if storage is not None and storage not in STORAGES:
        raise UserError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if decode_cache is not None:
        if len(decode_cache) != 2 or decode_cache[0] not in FFN_LAYOUTS or decode_cache[1] not in _ATTENTION_ORDER:
            raise UserError(
                f"decode cache must be (ffn_layout in {', '.join(FFN_LAYOUTS)}, attention in "
                f"{', '.join(_ATTENTION_ORDER)}), got {decode_cache!r}"
            )
        if storage is not None and storage != storage_of(decode_cache[0]):
            raise UserError(
                f"decode cache {decode_cache[0]} reads storage {storage_of(decode_cache[0])}, not {storage}"
            )
        storage = storage_of(decode_cache[0])
    decode_buckets = sorted(set(batch_buckets))
    pre_buckets = sorted(set(prefill_buckets if prefill_buckets is not None else batch_buckets))
    for b in [*decode_buckets, *pre_buckets]:
        if not isinstance(b, int) or b < 1:
            raise UserError(f"batch buckets must be positive integers, got {b!r}")
    if not decode_buckets or not pre_buckets:
        raise UserError("batch buckets must not be empty")
    meshes = [mesh] if mesh is not None else candidate_meshes(int(n_chips))  # type: ignore[arg-type]
    dtypes = [weights] if weights else ["bf16", "int8"]
    storages = [storage] if storage else list(STORAGES)

    candidates: list[Plan] = []
    for m, w, s in itertools.product(meshes, dtypes, storages):
        chosen = _choose_layouts(
            config, chip, m, w, STORAGES[s], decode_buckets, pre_buckets, decode_cache, prompt_len=prompt_len,
            gen_len=gen_len, overlap=overlap, kv_dtype=kv_dtype,
        )  # fmt: skip
        if chosen is None:
            continue  # some bucket has no layout of this storage that splits on this mesh
        phases = tuple(_phase_plan(chosen[k]) for k in sorted(chosen, key=lambda k: (k[0] != "prefill", k[1])))
        run = analysis_config(config, m, STORAGES[s][0])  # every layout of a storage splits heads alike
        candidates.append(
            Plan(
                model=config.name, hardware=chip.name, chips=m.n, mesh=str(m), weights=w, storage=s,
                objective=objective, prompt_len=prompt_len, gen_len=gen_len, phases=phases,
                fits=all(p.fits for p in phases), score=_score(objective, chosen, latency_bound_s),
                n_kv_heads=run.n_kv_heads, kv_replication=run.n_kv_heads // config.n_kv_heads,
                kv_cache_dtype=kv_dtype,
            )
        )  # fmt: skip
    if not candidates:
        # Why, for one mesh (the given one, else the first candidate, 1x1xn, whose reason names the dim that n does
        # not divide): a refusal of the largest decode bucket (ws2d's, the usual decode layout) names the dim and
        # the split (e.g. kv heads that the heads split does not divide), which the user can act on.
        reasons: list[str] = []
        evaluate_layouts(config, chip, meshes[0], phase="decode", batch=max(decode_buckets), prompt_len=prompt_len,
                         gen_len=gen_len, weights=dtypes[0], reasons=reasons, kv_dtype=kv_dtype)  # fmt: skip
        raise LayoutError(
            f"no layout{' of storage ' + storage if storage else ''} splits {config.name} with batches "
            f"{decode_buckets} on {'mesh ' + str(mesh) if mesh else str(n_chips) + ' chips'}"
            + (f" (e.g. {next((r for r in reasons if r.startswith('ws2d')), reasons[0])})" if reasons else "")
        )
    if objective == "cost" and all(math.isinf(p.score) for p in candidates):
        # No mesh/dtype/storage meets the bound at any decode bucket: an error, not an arbitrary plan with score inf.
        fitting = [p for p in candidates if p.fits] or candidates
        best = min(min(e.step_s for e in p.phases if e.phase == "decode") for p in fitting)
        raise UserError(
            f"latency bound {latency_bound_s:g} s per decode step cannot be met: the fastest decode step "
            f"{'that fits ' if any(p.fits for p in candidates) else ''}is {best:.4g} s"
        )
    return _pick(candidates, objective)


def _pick(candidates: list[Plan], objective: str) -> Plan:
    fitting = [p for p in candidates if p.fits] or candidates
    best_by_weights = {}
    for p in sorted(fitting, key=lambda p: p.score):
        best_by_weights.setdefault(p.weights, p)
    best = min(best_by_weights.values(), key=lambda p: p.score)
    bf16 = best_by_weights.get("bf16")
    # Quality-neutral objectives keep bf16 unless int8 pays for itself (or bf16 does not fit).
    keep_bf16 = objective != "latency" and bf16 is not None and bf16.fits and best.weights == "int8"
    if keep_bf16 and best.score > (1 - INT8_GAIN) * bf16.score:
        return bf16
    return best
