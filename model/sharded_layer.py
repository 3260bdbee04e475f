"""One decoder layer under a layout, on local shards inside `jax.shard_map`, plus the embedding and logits.

The dataflow of every layout is written out with explicit collectives (partition/ops.py), each with its
paper-notation comment and a `jax.named_scope`, so this file reads like PAPER.md; the math (norm, rope,
attend, int8 einsum) is model/layers.py's. partition/comm.py lists the same collectives per layer.
Both blocks share the pieces: the parallel block (PaLM) runs gather + norm, the fused input matmuls, attention
and the activation, and one output reduce-scatter; the serial block (Llama) runs the same pieces per half.
Biases (stored whole on every chip) are added on the local slice of whole sums, never to a partial sum; Gemma 3's
post norms likewise norm whole sums (after the output reduce-scatter, statistics all-reduced over the E split).
Axis alphabet (model/config.py); local (per-chip) shapes in comments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from meshserve.model import layers
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params, declare
from meshserve.model.quant import QuantizedArray, einsum
from meshserve.model.transformer import compute_dtype
from meshserve.partition.comm import MESH_AXES, MeshShape
from meshserve.partition.ops import Ops
from meshserve.partition.overlap import all_gather_matmul, matmul_reduce_scatter
from meshserve.partition.rules import Layout, Rules, attention_axes, rules_for

__all__ = ["Plan", "layer_fn", "rope_qk", "embed", "logits", "shard_map", "spec_of", "XYZ"]

XYZ = MESH_AXES
# Order in which weight-gathered layouts gather a layer's weights (partition/comm.py lists the same order).
WEIGHT_ORDER = ("w_up", "w_gate", "wq", "wk", "wv", "wo", "w_down")


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    # check_vma off: the bodies mix replicated and split values on purpose (e.g. MQA K/V repeated per chip).
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older JAX

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def spec_of(axes: tuple[str, ...], table: dict[str, tuple[str, ...]], multi_query: bool) -> P:
    dims = []
    for a in axes:
        mesh_axes = () if (a == "kv_heads" and multi_query) else table.get(a, ())
        dims.append(mesh_axes if mesh_axes else None)
    return P(*dims)


# ------------------------------------------------------------------------------------------ one layer


@dataclass(frozen=True)
class Plan:
    """Static facts one step's body needs."""

    config: ModelConfig
    layout: Layout
    shape: MeshShape
    batch: int  # the attention batch (prefill rows, or cache slots in decode)

    @property
    def rules(self) -> Rules:
        return rules_for(self.layout.ffn)

    @property
    def attn_axes(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return attention_axes(self.layout, self.shape, self.batch, self.config.multi_query)


def rope_qk(
    q: jax.Array, k: jax.Array, positions: jax.Array, config: ModelConfig, layer: Any
) -> tuple[jax.Array, jax.Array]:
    """q [B, T, H_loc, Q], k [B, T, K_loc, Q] rotated at positions [B, T] with layer `layer`'s base and scaling
    (`layers.layer_frequencies`), as layers.qkv_projection rotates them on one device."""
    inv_freq = layers.layer_frequencies(config, layer)
    return layers.rotate(q, positions, inv_freq), layers.rotate(k, positions, inv_freq)


def _norm_split_x(h: jax.Array, p: dict[str, jax.Array], config: ModelConfig, ops: Ops, axes) -> jax.Array:
    """Norm of h [B, T, E_axes]: the per-token statistics are summed over `axes` (one small all-reduce)."""
    h32 = h.astype(jnp.float32)
    stats = jnp.stack([jnp.sum(h32, -1), jnp.sum(h32 * h32, -1)], -1)  # [B, T, 2] partial over axes
    with jax.named_scope("norm_stats"):
        # BL2{partialsum-x} --all-reduce(x)--> BL2
        stats = ops.all_reduce(stats, axes)
    mean, msq = stats[..., :1] / config.d_model, stats[..., 1:] / config.d_model
    if config.norm == "layernorm":
        y = (h32 - mean) * jax.lax.rsqrt(msq - mean * mean + config.norm_eps)
    else:
        y = h32 * jax.lax.rsqrt(msq + config.norm_eps)
    y = y * layers.norm_scale(ops.local(p["scale"], axes, 0), config.norm_scale_offset)
    if "bias" in p:
        y = y + ops.local(p["bias"], axes, 0).astype(jnp.float32)
    return y.astype(h.dtype)


def _gather_weights(p: dict[str, Any], plan: Plan, ops: Ops) -> dict[str, Any]:
    """Weight-gathered layouts: all-gather each 2D-stored weight over the gathered axes before use."""
    G = plan.rules.gathered
    declared = declare(plan.config)["layers"]
    out = dict(p)
    for name in WEIGHT_ORDER:
        if name not in p:
            continue
        axes = declared[name].axes[1:]  # without the scanned layers axis
        split = {d: s for d, s in enumerate(spec_of(axes, plan.rules.weights, plan.config.multi_query)) if s}
        split = {d: (s,) if isinstance(s, str) else tuple(s) for d, s in split.items()}
        with jax.named_scope(f"gather_{name}"):
            # W_in E_x·F_yz --all-gather(G)--> E·F_rest (likewise every weight of the layer)
            w = p[name]
            if isinstance(w, QuantizedArray):
                contract = {axes.index(a) for a in declared[name].contract}
                scale_split = {d: s for d, s in split.items() if d not in contract}
                values = ops.gather_dims(w.values, split, _meets(G, split))
                out[name] = QuantizedArray(values, ops.gather_dims(w.scale, scale_split, _meets(G, scale_split)))
            else:
                out[name] = ops.gather_dims(w, split, _meets(G, split))
    return out


def _meets(G: tuple[str, ...], split: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    used = {a for s in split.values() for a in s}
    return tuple(a for a in XYZ if a in G and a in used)


def _out_split(plan: Plan, logical: str) -> tuple[str, ...]:
    """The mesh axes (split order) an input projection's output dim `logical` (heads, kv_heads, mlp) is split over
    on a chip: its weight's storage split less the axes a weight-gathered layout gathers (multi-query K/V: none)."""
    if logical == "kv_heads" and plan.config.multi_query:
        return ()
    return tuple(a for a in plan.rules.weights[logical] if a not in plan.rules.gathered)


def _bias(y: jax.Array, p: dict[str, Any], name: str, axes: tuple[str, ...], ops: Ops) -> jax.Array:
    """y [..., D_loc, (Q)] + this chip's block of bias p[name] [D, (Q)] (stored whole on every chip) whose D is
    split over `axes` as y's is; y itself when the model has no such bias (the program is then unchanged)."""
    return y + ops.local(p[name], axes, 0).astype(y.dtype) if name in p else y


def _qkv_bias(q, k, v, p: dict[str, Any], plan: Plan, ops: Ops):
    """q/k/v biases (Qwen2, linear_bias), then Qwen3's per-head q/k norms, on the local heads of whole sums (after
    ws2d's reduction over x: before it each of the X partial sums would carry the bias, adding it X times, and a
    norm of a partial sum is not the norm of the sum). Each head's Q is whole on its chip, so the norm is local."""
    heads, kv = _out_split(plan, "heads"), _out_split(plan, "kv_heads")
    q, k, v = _bias(q, p, "bq", heads, ops), _bias(k, p, "bk", kv, ops), _bias(v, p, "bv", kv, ops)
    if "q_norm" in p:
        eps, offset = plan.config.norm_eps, plan.config.norm_scale_offset
        q = layers.head_norm(q, p["q_norm"]["scale"], eps, offset)
        k = layers.head_norm(k, p["k_norm"]["scale"], eps, offset)
    return q, k, v


def _to_attention(q, k, v, p: dict[str, Any], plan: Plan, ops: Ops):
    """q [B, T, H_loc, Q], k, v [B, T, K_loc, Q] after the input projection -> the attention split (q/k/v biases
    added on the way)."""
    ffn = plan.layout.ffn
    batch_axes, _, _ = plan.attn_axes
    if ffn != "ws2d":
        q, k, v = _qkv_bias(q, k, v, p, plan, ops)
    if ffn == "ws2d":
        nq, nk = q.shape[2], k.shape[2]
        qkv = jnp.concatenate([q, k, v], axis=2)
        if not batch_axes:
            with jax.named_scope("qkv_all_reduce"):
                # BLHQ_yz{partialsum-x} --all-reduce(x)--> BLHQ_yz  (attention repeated over x)
                qkv = ops.all_reduce(qkv, ("x",))
        else:
            with jax.named_scope("qkv_reduce_scatter"):
                # BLHQ_yz{partialsum-x} --reduce-scatter(x)--> B_xLHQ_yz
                qkv = ops.reduce_scatter(qkv, ("x",), 0)
        q, k, v = _qkv_bias(*jnp.split(qkv, [nq, nq + nk], axis=2), p, plan, ops)
        inner = tuple(a for a in batch_axes if a != "x")
    else:
        inner = batch_axes if ffn == "ws1d" else ()
    if not inner:
        return q, k, v
    with jax.named_scope("to_batch_all_to_all"):
        # BLHQ_yz --all-to-all(yz)--> B_yzLHQ : the heads' split moves to the batch
        if plan.config.multi_query:
            q = ops.all_to_all(q, inner, 0, 2)
            k, v = ops.local(k, inner, 0), ops.local(v, inner, 0)  # one kv head, already on every chip
        else:
            nq, nk = q.shape[2], k.shape[2]
            qkv = ops.all_to_all(jnp.concatenate([q, k, v], axis=2), inner, 0, 2)
            qkv = qkv.reshape(qkv.shape[:2] + (ops.size(inner), nq + 2 * nk, qkv.shape[-1]))
            q, k, v = (t.reshape(t.shape[:2] + (-1, t.shape[-1])) for t in jnp.split(qkv, [nq, nq + nk], axis=3))
    return q, k, v


def _from_attention(o, plan: Plan, ops: Ops):
    """o in the attention split -> [B, T, H_loc, Q] as W_O's local heads expect."""
    ffn = plan.layout.ffn
    batch_axes, _, _ = plan.attn_axes
    if ffn not in ("ws1d", "ws2d") or not batch_axes:
        return o
    inner = tuple(a for a in batch_axes if a != "x") if ffn == "ws2d" else batch_axes
    with jax.named_scope("from_batch_all_to_all"):
        # B_yzLHQ --all-to-all(yz)--> BLHQ_yz
        o = ops.all_to_all(o, inner, 2, 0)
    if ffn == "ws2d":
        with jax.named_scope("attention_all_gather"):
            # B_xLHQ_yz --all-gather(x)--> BLHQ_yz
            o = ops.all_gather(o, ("x",), 0)
    return o


_IN = {
    "wq": "BTE,EHQ->BTHQ",
    "wk": "BTE,EKQ->BTKQ",
    "wv": "BTE,EKQ->BTKQ",
    "w_up": "BTE,EF->BTF",
    "w_gate": "BTE,EF->BTF",
}
_ATTN_IN, _MLP_IN = ("wq", "wk", "wv"), ("w_up", "w_gate")  # the serial block's two halves


def _in_projections(h: jax.Array, w: dict[str, Any], names=tuple(_IN)) -> dict[str, jax.Array]:
    """The input matmuls `names` (parallel block: W_Q, W_K, W_V fused with the MLP's W and V) of one normalised
    h [B, T, E_loc]."""
    return {name: einsum(_IN[name], h, w[name]) for name in names if name in w}


def _slice(w: Any, dim: int, start: jax.Array, size: int, scale_too: bool) -> Any:
    """A chunk of a weight along `dim` (an int8 scale is sliced too when `dim` is an output dim)."""
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=dim)  # noqa: E731
    if isinstance(w, QuantizedArray):
        return QuantizedArray(cut(w.values), cut(w.scale) if scale_too else w.scale)
    return cut(w)


def _looped_in(x: jax.Array, norm: dict[str, jax.Array], w: dict[str, Any], names, plan: Plan, ops: Ops):
    """ws2d with overlap: norm on BLE_xyz, then the input matmuls as a looped all-gather(yz) einsum."""
    h = _norm_split_x(x, norm, plan.config, ops, XYZ)  # statistics: all-reduce(xyz)
    n = x.shape[2]

    def matmul(chunk, c):
        rows = {name: _slice(w[name], 0, c * n, n, False) for name in names if name in w}
        return {k: v.astype(jnp.float32) for k, v in _in_projections(chunk, rows, names).items()}

    with jax.named_scope("looped_input"):
        # BLE_xyz --all-gather(yz)--> BLE_x as ring steps, each overlapped with the matmul of the chunk at hand
        out = all_gather_matmul(h, matmul, ("y", "z"), ops)
    return {k: v.astype(x.dtype) for k, v in out.items()}


def _input_matmuls(x: jax.Array, norm: dict[str, jax.Array], w: dict[str, Any], names, plan: Plan, ops: Ops):
    """The residual x in the layout's split -> gathered, normalised (`norm`'s weights) and projected by `names`."""
    c, ffn = plan.config, plan.layout.ffn
    if plan.layout.overlap:
        return _looped_in(x, norm, w, names, plan, ops)
    with jax.named_scope("gather_input"):
        if ffn == "ws1d":
            # BLE_xyz --all-gather(xyz)--> BLE
            h = layers.norm(ops.all_gather(x, XYZ, 2), norm, c)
        elif ffn == "ws2d":
            # BLE_xyz --all-gather(yz)--> BLE_x
            h = _norm_split_x(ops.all_gather(x, ("y", "z"), 2), norm, c, ops, ("x",))
        else:
            # B_xLE_yz --all-gather(yz)--> B_xLE  (weight-gathered: the batch stays split)
            h = layers.norm(ops.all_gather(x, plan.rules.residual["embed"], 2), norm, c)
    return _in_projections(h, w, names)


def _activation(up: jax.Array, gate: jax.Array | None, p: dict[str, Any], plan: Plan, ops: Ops) -> jax.Array:
    """The MLP's input matmuls [B, T, F_loc] -> the activation as W_down's rows expect (b_up / b_gate added on
    this chip's F block of whole sums)."""
    f_axes = _out_split(plan, "mlp")
    if plan.layout.ffn == "ws2d":
        with jax.named_scope("ffn_reduce_scatter"):
            # BLF_yz{partialsum-x} --reduce-scatter(x)--> BLF_xyz
            both = ops.reduce_scatter(jnp.stack([up] if gate is None else [up, gate], 2), ("x",), 3)
            up, gate = both[:, :, 0], (None if gate is None else both[:, :, 1])
        f_axes += ("x",)  # F_yz's block, split further over x by the reduce-scatter
    up = _bias(up, p, "b_up", f_axes, ops)
    if gate is not None:
        act = layers.gate_activation(_bias(gate, p, "b_gate", f_axes, ops), plan.config) * up
    else:
        act = jax.nn.gelu(up, approximate=False)
    if plan.layout.ffn == "ws2d":
        with jax.named_scope("ffn_all_gather"):
            # BLF_xyz --all-gather(x)--> BLF_yz
            act = ops.all_gather(act, ("x",), 2)
    return act


def _attention(mm: dict[str, jax.Array], p: dict[str, Any], plan: Plan, ops: Ops, attn) -> jax.Array:
    """q, k, v from the input matmuls -> attention's output [B, T, H_loc, Q] as W_O's local heads expect."""
    return _from_attention(attn(*_to_attention(mm["wq"], mm["wk"], mm["wv"], p, plan, ops)), plan, ops)


# Output matmuls: (einsum, weight, the weight's output (E) dim that the looped reduce-scatter chunks).
_DOWN, _WO = ("BTF,FE->BTE", "w_down", 1), ("BTHQ,HQE->BTE", "wo", 2)


def _residual_add(
    x: jax.Array, terms, w: dict[str, Any], p: dict[str, Any], biases, plan: Plan, ops: Ops, out_norm: str = ""
):
    """x + the sum over `terms` ((a, (einsum, weight, E dim)) pairs) of a·w, reduce-scattered into x's split.

    biases (bo, b_down) are added once, after the reduce-scatter, on this chip's E slice: added before it, each
    of the chips summed over would carry its own copy (the bias n times). out_norm: a post norm's weights
    (Gemma 3's attn_out_norm / mlp_out_norm) to norm the sum with before the add: its per-token statistics are
    summed over the E split (one small all-reduce), as the input norms' are.
    """
    ffn, rest = plan.layout.ffn, plan.rules.residual["embed"]

    def total(chunk=None):
        n = x.shape[2]  # looped: the E chunk of W's output dim this ring step's sum is headed to
        ws = [w[name] if chunk is None else _slice(w[name], dim, chunk * n, n, True) for _, (_, name, dim) in terms]
        out = None
        for (a, (sub, _, _)), weight in zip(terms, ws, strict=True):
            y = einsum(sub, a, weight)
            out = y if out is None else out + y
        return out

    if plan.layout.overlap:
        with jax.named_scope("looped_output"):
            # BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz as ring steps overlapped with the matmuls
            y = matmul_reduce_scatter(total, ("y", "z"), ops)
    else:
        y = total()
        with jax.named_scope("output_reduce_scatter"):
            if ffn == "ws1d":
                # BLE{partialsum-xyz} --reduce-scatter(xyz)--> BLE_xyz
                y = ops.reduce_scatter(y, XYZ, 2)
            elif ffn == "ws2d":
                # BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz
                y = ops.reduce_scatter(y, ("y", "z"), 2)
            else:
                # B_xLE{partialsum-yz} --reduce-scatter(yz)--> B_xLE_yz
                y = ops.reduce_scatter(y, rest, 2)
    for name in biases:
        y = _bias(y, p, name, rest, ops)
    if out_norm:
        with jax.named_scope(out_norm):
            y = _norm_split_x(y, p[out_norm], plan.config, ops, rest)  # statistics: all-reduce(E split)
    return x + y


def layer_fn(x: jax.Array, p: dict[str, Any], plan: Plan, ops: Ops, attn) -> jax.Array:
    """One decoder block on local shards. x: the residual in the layout's split; attn(q, k, v) -> o runs
    attention (and the cache) on the attention split, q/k not yet rotated.

    Parallel (PaLM): x + attn(h) + mlp(h) over one h = norm(x): one gather, the fused input matmuls, one output
    reduce-scatter of both outputs' sum. Serial (Llama): the attention half, then the MLP half on the updated
    residual, each with its own gather + norm and its own output reduce-scatter.
    """
    w = _gather_weights(p, plan, ops) if plan.rules.gathered else p
    if plan.config.parallel_block:
        mm = _input_matmuls(x, p["attn_norm"], w, tuple(_IN), plan, ops)
        o = _attention(mm, p, plan, ops, attn)
        act = _activation(mm["w_up"], mm.get("w_gate"), p, plan, ops)
        return _residual_add(x, [(act, _DOWN), (o, _WO)], w, p, ("bo", "b_down"), plan, ops)
    with jax.named_scope("attention_half"):
        # x += W_O·attn(norm1(x)): BLE_xyz -gather-> ... -reduce-scatter-> BLE_xyz
        mm = _input_matmuls(x, p["attn_norm"], w, _ATTN_IN, plan, ops)
        post = "attn_out_norm" if plan.config.post_norms else ""
        x = _residual_add(x, [(_attention(mm, p, plan, ops, attn), _WO)], w, p, ("bo",), plan, ops, post)
    with jax.named_scope("mlp_half"):
        # x += W_down·act(norm2(x)): the same gather and reduce-scatter again, around the MLP
        mm = _input_matmuls(x, p["mlp_norm"], w, _MLP_IN, plan, ops)
        act = _activation(mm["w_up"], mm.get("w_gate"), p, plan, ops)
        post = "mlp_out_norm" if plan.config.post_norms else ""
        return _residual_add(x, [(act, _DOWN)], w, p, ("b_down",), plan, ops, post)


# --------------------------------------------------------------------------------- embedding and logits


def embed(tokens: jax.Array, params: Params, plan: Plan, ops: Ops) -> jax.Array:
    """tokens [B, T] (whole on every chip) -> the residual [B, T, E] in the layout's split."""
    table = params["embed"]  # [V_xyz, E]
    rows = table.shape[0]
    ids = tokens - ops.index(XYZ) * rows
    here = (ids >= 0) & (ids < rows)
    x = jnp.where(here[..., None], table[jnp.clip(ids, 0, rows - 1)], jnp.zeros((), table.dtype))
    r = plan.rules.residual
    if set(ops.live(r["batch"] + r["embed"])) != set(ops.live(XYZ)):  # the sum must run over every chip
        raise ValueError(f"{plan.rules.name}: the residual split {r} does not cover the mesh axes {XYZ}")
    with jax.named_scope("embed_reduce_scatter"):
        # BLE{partialsum-xyz} --reduce-scatter(xyz)--> BLE_xyz (ws1d, ws2d) or B_xLE_yz (wg-x, likewise wg-xy,
        # wg-xyz): each token's row lives on one chip, and the first layer reads the residual in its split
        x = ops.reduce_scatter_dims(x, {0: r["batch"], 2: r["embed"]})
    return layers.embed_scale(x.astype(compute_dtype(params)), plan.config)


def logits(x: jax.Array, params: Params, plan: Plan, ops: Ops) -> jax.Array:
    """The residual [B, T, E] in the layout's split -> float32 logits [B, T, V] on every chip."""
    r = plan.rules.residual
    with jax.named_scope("final_all_gather"):
        # B_xLE_yz --all-gather(yz)--> B_xLE --all-gather(x)--> BLE
        x = ops.all_gather(ops.all_gather(x, r["embed"], 2), r["batch"], 0)
    h = layers.norm(x, params["final_norm"], plan.config)
    if "unembed" in params:
        logits = einsum("BTE,EV->BTV", h, params["unembed"], out_dtype=jnp.float32)
    else:
        logits = einsum("BTE,VE->BTV", h, params["embed"], out_dtype=jnp.float32)
    with jax.named_scope("logits_all_gather"):
        # BLV_xyz --all-gather(xyz)--> BLV
        return ops.all_gather(logits, XYZ, 2)
