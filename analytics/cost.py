"""The cost model: time, MFU, cost and per-chip memory of one phase (prefill or decode) under one layout.

Axis alphabet as in model/config.py and PAPER.md: B batch, L tokens per sequence in this pass (prefill: prompt
length; decode: 1), S context attended over, E, F, H, K (kv heads), Q, V, N layers, n chips.

Terms per pass (PAPER.md "Cost model: three times"):
  compute     (2·B·L·P_layers + 2·B·E·V + N·4·B·L·S·H·Q) / (n · peak · matmul_efficiency)
  weight load bytes of the weights each chip reads / (HBM bandwidth · hbm_efficiency)
  KV load     bytes of KV cache each chip reads (decode) or writes (prefill) / same bandwidth; kv_dtype prices the
              cache's storage: bf16 2 bytes per element, int8 1 + 1/Q (model/kv_quant.py: a per-vector exponent)
  comm        N · Σ over partition.comm.layer_collectives: bytes/bw(axes) · (K-1)/K + ring steps · hop latency,
              all-reduce = 2 × all-gather
  step comm   once per pass (not per layer): embedding reduce-scatter, final all-gather, logits all-gather
              (partition.comm.step_collectives), priced like comm
  reshard     prefill only, once per pass: the phase switch of the KV cache into the decode layout's split
              (partition.comm.reshard_collectives for all N layers), priced like comm
The terms add (what the paper's measured numbers follow with the fitted TPU v4 constants), except what the code
really overlaps: weight-gathered layouts' weight all-gathers (which need no activations) are prefetched under the
matmuls, and with overlap=True (ws2d only: the looped collective einsum, partition.comm's overlap list) the ring
steps that replace the all-gather(yz) and reduce-scatter(yz) run under the projection matmuls; only their excess
shows. Every other collective and every hop latency stays serial. Layouts without a looped einsum ignore
overlap=True and report Estimate.overlap = False.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from meshserve.analytics.chips import Chip
from meshserve.analytics.sizes import KV_DTYPES, ModelSizes, kv_bytes_per_element, model_sizes
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.partition.comm import (
    Collective,
    LayerDims,
    LayoutError,
    MeshShape,
    gathered_axes,
    kv_axes,
    layer_collectives,
    reshard_collectives,
    step_collectives,
)
from meshserve.partition.rules import weight_bytes_per_chip

__all__ = [
    "Estimate",
    "Breakdown",
    "LayoutError",
    "estimate",
    "collective_time",
    "layer_dims",
    "memory_per_chip",
    "PHASES",
    "ANALYZE_WEIGHTS",
    "KV_DTYPES",
]

PHASES = ("prefill", "decode")
ANALYZE_WEIGHTS = ("f32", "bf16", "int8")
ACT_BYTES = 2  # activations are bf16 (PAPER.md); the KV cache too unless kv_dtype="int8"


@dataclass(frozen=True)
class Breakdown:
    """Seconds per pass (one prefill, or one decode step) of each term."""

    compute_s: float
    weight_load_s: float
    kv_load_s: float
    comm_s: float
    comm_latency_s: float  # the per-hop part of comm_s
    overhead_s: float = 0.0
    reshard_s: float = 0.0  # prefill only: the phase switch (prefill KV split -> decode cache split), once per pass
    step_comm_s: float = 0.0  # once per pass: embedding reduce-scatter, final all-gather, logits all-gather


@dataclass(frozen=True)
class Estimate:
    """One (phase, layout, batch) on one mesh. Times in seconds; memory in bytes per chip."""

    phase: str
    ffn_layout: str
    attention: str
    batch: int
    chips: int
    mesh: str
    weights: str
    prompt_len: int
    gen_len: int
    step_s: float  # prefill: the whole prompt; decode: one step at the mean context
    step_overlap_s: float  # the same with ws2d's looped collective einsum (= step_s for layouts without one)
    latency_s: float  # prefill: step_s; decode: gen_len steps
    tokens: int  # tokens this phase produces or consumes (prefill B·L, decode B·gen_len)
    throughput_tokens_s: float
    mfu: float
    cost_chip_ms_per_token: float
    memory: dict[str, float]  # weights, kv_cache, activations, total
    memory_per_chip_bytes: float
    fits: bool
    overflow: str  # what overflows when it does not fit, else ""
    breakdown: Breakdown
    collectives: list[dict[str, Any]] = field(default_factory=list)
    once_collectives: list[dict[str, Any]] = field(default_factory=list)  # once per pass (phase switch, ...)
    overlap: bool = False  # step_s priced the looped collective einsum (ws2d with overlap=True only)
    kv_cache_dtype: str = "bf16"  # the KV cache's storage priced (sizes.KV_DTYPES)

    def row(self) -> dict[str, Any]:
        """The flat JSON row of `meshserve analyze --json` (without the collectives lists)."""
        d = asdict(self)
        d.pop("collectives")
        d.pop("once_collectives")
        d["breakdown"] = asdict(self.breakdown)
        return d


def _ring_steps(mesh: MeshShape, axes: tuple[str, ...], chip: Chip) -> int:
    if chip.topology == "switch":
        return max(0, mesh.size(axes) - 1)
    return sum(mesh.size((a,)) - 1 for a in axes)


def _within_node(mesh: MeshShape, axes: tuple[str, ...], chip: Chip) -> bool:
    """Devices are numbered x-major (z fastest), so a group is inside one node if its span fits in node_size."""
    if not chip.node_size:
        return True
    names = ("x", "y", "z")
    span = 1
    for a in axes:
        inner = math.prod(mesh.size((b,)) for b in names[names.index(a) + 1 :])
        span = max(span, inner * mesh.size((a,)))
    return span <= chip.node_size


def collective_time(c: Collective, mesh: MeshShape, chip: Chip) -> tuple[float, float]:
    """(total seconds, latency part) of one collective: D/bw · (K-1)/K + ring steps · hop latency
    (a collective-permute, one step of a looped einsum: D/bw + one hop)."""
    k = mesh.size(c.axes)
    if k <= 1:
        return 0.0, 0.0
    bw = chip.collective_bandwidth(_within_node(mesh, c.axes, chip))
    if c.kind == "collective-permute":  # one ring step: the chunk to the next chip, one hop (partition.comm)
        return c.bytes_per_chip / bw + chip.hop_latency_s, chip.hop_latency_s
    factor = 2.0 if c.kind == "all-reduce" else 1.0
    latency = factor * _ring_steps(mesh, c.axes, chip) * chip.hop_latency_s
    return factor * c.bytes_per_chip / bw * (k - 1) / k + latency, latency


def _layer_comm(
    colls: list[Collective], mesh: MeshShape, chip: Chip, n_layers: int, compute_s: float, matmul_s: float
) -> tuple[float, float, float, list[dict[str, Any]]]:
    """(comm seconds, its latency part, the part left exposed, rows) of N layers of `colls`.

    Hidden, as the code runs them: weight-gathered layouts' weight all-gathers (they need no activations, so
    they are prefetched under the matmuls: only their excess over compute shows) and the looped collective
    einsum's collective-permutes (each overlaps the input/output projection matmul of the chunk at hand,
    whose time is max(compute, weight load): only their excess shows). Every hop latency and every other
    collective is serial.
    """
    comm = lat_total = prefetch = ring = 0.0
    rows = []
    for coll in colls:
        t, lat = collective_time(coll, mesh, chip)
        comm, lat_total = comm + n_layers * t, lat_total + n_layers * lat
        if coll.block == "weights":
            prefetch += n_layers * (t - lat)
        elif coll.kind == "collective-permute":
            ring += n_layers * (t - lat)
        rows.append({**asdict(coll), "seconds_per_layer": t})
    exposed = comm - prefetch - ring + max(0.0, prefetch - compute_s) + max(0.0, ring - matmul_s)
    return comm, lat_total, exposed, rows


def layer_dims(config: ModelConfig, batch: int, tokens: int, context: int, weights: str) -> LayerDims:
    """What one layer's pass sees, in partition.comm's terms."""
    c = config
    return LayerDims(
        batch=batch, tokens=tokens, context=context, d_model=c.d_model, d_ff=c.d_ff, n_heads=c.n_heads,
        n_kv_heads=c.n_kv_heads, d_head=c.d_head, act_bytes=ACT_BYTES, weight_bytes=1 if weights == "int8" else
        (4 if weights == "f32" else 2), gated=c.gated_mlp, serial=not c.parallel_block,
        post_norms=c.post_norms,
    )  # fmt: skip


def _weight_read_bytes(sizes: ModelSizes, weights: str, ffn_layout: str, mesh: MeshShape) -> float:
    """Bytes of weights one chip reads from HBM per pass: its shard, or the gathered copies under weight gathering."""
    gathered = mesh.size(gathered_axes(ffn_layout))
    layers = sizes.n_layers * sizes.layer_weight_bytes(weights) * gathered
    rest = sizes.weight_bytes(weights) - sizes.n_layers * sizes.layer_weight_bytes(weights)
    return (layers + rest) / mesh.n


def _kv_bytes_per_token(
    config: ModelConfig, ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims, kv_dtype: str = "bf16"
) -> float:
    """KV-cache bytes one chip holds per context position for the whole batch, split as partition.comm says, in
    the cache's storage (bf16: 2 bytes per element; int8: 1 + 1/Q, the exponent of each Q-vector)."""
    batch_axes, head_axes = kv_axes(ffn_layout, attention, mesh, dims)
    rows = dims.batch // mesh.size(batch_axes)
    heads = config.n_kv_heads // mesh.size(head_axes)
    return 2 * config.n_layers * rows * heads * config.d_head * kv_bytes_per_element(kv_dtype, config.d_head)


def _decode_context_read(config: ModelConfig, prompt_len: int, gen_len: int) -> float:
    """Cached positions a one-device decode step reads, summed over the layers, averaged (as an integral) over the
    contexts prompt_len + i, i in [0, gen_len): the context on a global layer, min(context, W) on one of window W."""
    start, end = prompt_len, prompt_len + gen_len

    def mean_read(window: int) -> float:
        if not window or window >= end:
            return start + gen_len / 2
        if window <= start:
            return float(window)
        below = (window - start) * (start + window) / 2  # contexts in [start, W): read whole
        return (below + (end - window) * window) / gen_len

    return sum(mean_read(w) for w in config.layer_windows)


def estimate(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    *,
    phase: str,
    batch: int,
    prompt_len: int,
    gen_len: int,
    weights: str = "bf16",
    ffn_layout: str = "ws2d",
    attention: str = "heads",
    overlap: bool = False,
    decode_layout: str | None = None,
    decode_attention: str | None = None,
    decode_batch: int | None = None,
    tokens_per_step: int = 1,
    kv_dtype: str = "bf16",
) -> Estimate:
    """Cost of one phase. Prefill: one pass over B·prompt_len tokens. Decode: gen_len steps of B tokens.

    tokens_per_step (decode only): each row runs this many query tokens a step over its cache (speculative
    decoding's verify step: the last token and k drafts, logits at every one); 1 is plain decoding.

    Prefill also pays the phase switch into the decode cache (`breakdown.reshard_s`, partition.comm's
    reshard_collectives for all N layers): decode_layout / decode_attention / decode_batch name the decode
    side (default: the prefill's own layout and batch).

    kv_dtype: the KV cache's storage, "bf16" or "int8" (serve --kv-cache-dtype): the bytes a decode step reads from
    the cache, a prefill writes into it, and the cache's share of memory. The phase switch stays bf16 (it moves the
    prefill's own k, v; the engine quantises at the write into the cache).
    """
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("gen_len", gen_len),
                        ("tokens_per_step", tokens_per_step)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if phase not in PHASES:
        raise UserError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if phase == "prefill" and tokens_per_step != 1:
        raise UserError(f"tokens_per_step is a decode step's; prefill takes 1, got {tokens_per_step}")
    if weights not in ANALYZE_WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(ANALYZE_WEIGHTS)}, got {weights!r}")
    if kv_dtype not in KV_DTYPES:
        raise UserError(f"kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    sizes = model_sizes(config)
    c, n = config, mesh.n
    E, H, Q, V, N = c.d_model, c.n_heads, c.d_head, c.vocab_size, c.n_layers
    if phase == "prefill":
        L, S, passes, tokens = prompt_len, prompt_len, 1, batch * prompt_len
    else:  # the KV load grows linearly with the context, so one step at the mean context times gen_len is exact
        L, S, passes, tokens = tokens_per_step, prompt_len + gen_len / 2, gen_len, batch * gen_len
    dims = layer_dims(c, batch, L, math.ceil(S), weights)
    colls = layer_collectives(ffn_layout, attention, mesh, dims)  # LayoutError when the dims do not split
    # The looped collective einsum exists for ws2d only (partition/ refuses it elsewhere): other layouts are
    # priced without overlap and say so in Estimate.overlap.
    looped = layer_collectives(ffn_layout, attention, mesh, dims, overlap=True) if ffn_layout == "ws2d" else None
    overlapped = bool(overlap and looped is not None)

    # Logits only at the last prompt token (prefill) or at each of a decode step's tokens: B (·L) rows.
    logit_rows = batch * (L if phase == "decode" else 1)
    matmul_flops = 2 * batch * L * N * sizes.layer_matmul + 2 * logit_rows * E * V
    # Context positions read per step, summed over the layers: the whole (masked) context on every layer, except in
    # a one-token decode step on one device, where a windowed layer reads min(context, W) (transformer.decode_step;
    # a mesh's decode, model/sharded.py, and a verify step mask the window over the whole context instead).
    windows_read = phase == "decode" and tokens_per_step == 1 and n == 1
    context_read = _decode_context_read(c, prompt_len, gen_len) if windows_read else N * S
    attn_flops = 4 * batch * L * context_read * H * Q
    # ws2d with heads-sharded attention repeats attention on every x (partition/comm.py: all-reduce(x) of qkv).
    attn_split = n // mesh.x if (ffn_layout == "ws2d" and attention == "heads") else n
    rate = chip.peak_flops(weights) * chip.matmul_efficiency
    compute_s = matmul_flops / (n * rate) + attn_flops / (attn_split * rate)
    hbm = chip.hbm_bandwidth * chip.hbm_efficiency
    weight_load_s = _weight_read_bytes(sizes, weights, ffn_layout, mesh) / hbm
    kv_per_token = _kv_bytes_per_token(c, ffn_layout, attention, mesh, dims, kv_dtype)
    # decode reads the cache; prefill writes it (int8: the quantised values and exponents, what the cache stores)
    kv_load_s = kv_per_token * (context_read / N if phase == "decode" else L) / (hbm * chip.kv_efficiency)

    comm_s, comm_lat, exposed_comm, rows = _layer_comm(looped if overlapped else colls, mesh, chip, N, compute_s,
                                                       max(compute_s, weight_load_s))  # fmt: skip
    overhead_s = N * chip.step_overhead_s

    reshard_s, once = 0.0, []
    if phase == "prefill":  # the phase switch runs once per prefill pass, after the last layer
        # Priced at bf16 whatever kv_dtype is: the switch moves the prefill's own k, v (bf16 activations) into the
        # decode cache's split, and the engine quantises them only at the write into the cache, after the move.
        switch = reshard_collectives(
            ffn_layout, attention, decode_layout or ffn_layout, decode_attention or attention, mesh, dims,
            n_layers=N, cache_bytes=ACT_BYTES, decode_batch=decode_batch,
        )  # fmt: skip
        for coll in switch:
            t, lat = collective_time(coll, mesh, chip)
            reshard_s += t
            once.append({**asdict(coll), "seconds": t, "what": "phase switch"})

    step_comm_s = 0.0  # embedding, final gather, logits: once per pass, on the critical path
    for coll in step_collectives(ffn_layout, attention, mesh, dims, V, logits_tokens=logit_rows // batch):
        t, _ = collective_time(coll, mesh, chip)
        step_comm_s += t
        once.append({**asdict(coll), "seconds": t, "what": "once per pass"})

    # The phase switch waits for the last layer and overlaps nothing; nor do the once-per-pass collectives.
    serial = compute_s + weight_load_s + kv_load_s + overhead_s + reshard_s + step_comm_s
    step = serial + exposed_comm
    step_overlap_s = step
    if looped is not None:
        step_overlap_s = serial + _layer_comm(looped, mesh, chip, N, compute_s, max(compute_s, weight_load_s))[2]
    latency_s = step * passes

    memory = memory_per_chip(c, mesh, sizes, weights, ffn_layout, dims, kv_per_token * (prompt_len + gen_len))
    total = memory["total"]
    overflow = ""
    if total > chip.hbm_bytes:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items() if k != "total")
        overflow = f"needs {total / 2**30:.2f} GiB per chip > {chip.hbm_bytes / 2**30:.2f} GiB HBM ({parts})"
    useful = 2 * sizes.real_params * tokens
    return Estimate(
        phase=phase,
        ffn_layout=ffn_layout,
        attention=attention,
        batch=batch,
        chips=n,
        mesh=f"{mesh.x}x{mesh.y}x{mesh.z}",
        weights=weights,
        prompt_len=prompt_len,
        gen_len=gen_len,
        step_s=step,
        step_overlap_s=step_overlap_s,
        latency_s=latency_s,
        tokens=tokens,
        throughput_tokens_s=tokens / latency_s,
        mfu=useful / (n * chip.peak_flops(weights) * latency_s),
        cost_chip_ms_per_token=n * latency_s * 1e3 / tokens,
        memory=memory,
        memory_per_chip_bytes=total,
        fits=not overflow,
        overflow=overflow,
        breakdown=Breakdown(compute_s, weight_load_s, kv_load_s, comm_s, comm_lat, overhead_s, reshard_s, step_comm_s),
        collectives=rows,
        once_collectives=once,
        overlap=overlapped,
        kv_cache_dtype=kv_dtype,
    )


def memory_per_chip(
    config: ModelConfig,
    mesh: MeshShape,
    sizes: ModelSizes,
    weights: str,
    ffn_layout: str,
    dims: LayerDims,
    kv_cache_bytes: float,
) -> dict[str, float]:
    """Bytes per chip: stored weights as the layout really splits them (partition.rules.weight_bytes_per_chip:
    multi-query W_K/W_V split over E_x only, norms whole, int8 scales split like their output dim), the given
    KV cache, live activations.

    Activations: the residual stream and the fused input-projection output (2F + HQ + 2KQ per token) as each layout
    shards them (ws1d BLE + BLF_xyz; ws2d BLE_x + BLF_yz; weight-gathered over G chips B_G·L·E + B_G·L·F_(n/G)),
    plus float32 logits (the gathered B·V and this chip's B·V/n); weight-gathered layouts also hold the largest gathered matrix (E·F) twice.
    """
    c = config
    from meshserve.model.params import declare  # imports JAX, as model_sizes already did for this config

    weights_b = float(weight_bytes_per_chip(declare(c), ffn_layout, mesh, weights, c.multi_query))
    fused = 2 * c.d_ff + c.n_heads * c.d_head + 2 * c.n_kv_heads * c.d_head
    t = dims.batch * dims.tokens
    g = mesh.size(gathered_axes(ffn_layout))
    if ffn_layout == "ws1d":
        width = t * (c.d_model + fused / mesh.n)
    elif ffn_layout == "ws2d":
        width = t * (c.d_model / mesh.x + fused / (mesh.y * mesh.z))
    else:
        width = t / g * (c.d_model + fused * g / mesh.n)
    # float32 logits: every chip holds the all-gathered [B, V] (partition.comm.step_collectives) beside its V_xyz part
    act_b = ACT_BYTES * width + 4 * dims.batch * c.vocab_size * (1 + 1 / mesh.n)
    if g > 1:  # the largest gathered matrix (E·F), twice: the next gather runs during this matmul
        act_b += 2 * c.d_model * c.d_ff * max(1.0, dims.weight_bytes) * g / mesh.n
    total = weights_b + kv_cache_bytes + act_b
    return {"weights": weights_b, "kv_cache": kv_cache_bytes, "activations": act_b, "total": total}
