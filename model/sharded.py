"""The decoder's steps under a layout on a device mesh: prefill, insert (the phase switch) and decode.

Each step is one `jax.shard_map` over the (x, y, z) mesh whose body reads like PAPER.md: the dataflow of
every layout is written out with explicit collectives (partition/ops.py), each with its paper-notation
comment and a `jax.named_scope`; the math (norm, rope, attend, int8 einsum) is model/layers.py's.
partition/comm.py lists the same collectives per layer for the cost model; tests compare the two in HLO.

Axis alphabet (model/config.py): B batch, T tokens, S cache, E, F, H, K, Q, V, N layers. Local shapes in
comments are per chip. Supported models: parallel block without linear biases (PaLM, Falcon-7B, demo).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.errors import UserError
from meshserve.model import layers
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params, ParamSpec, declare
from meshserve.model.quant import QuantizedArray, einsum
from meshserve.model.transformer import KVCache, compute_dtype
from meshserve.partition.comm import MESH_AXES, LayerDims, LayoutError, MeshShape, check_layout
from meshserve.partition.mesh import mesh_shape
from meshserve.partition.ops import Ops
from meshserve.partition.overlap import all_gather_matmul, matmul_reduce_scatter
from meshserve.partition.rules import TABLE_RULES, Layout, Rules, attention_axes, rules_for

__all__ = [
    "Layout",
    "param_specs",
    "param_shardings",
    "shard_params",
    "check_model",
    "kv_spec",
    "init_cache",
    "prefill",
    "insert",
    "decode_step",
    "layer_fn",
]

XYZ = MESH_AXES
# Order in which weight-gathered layouts gather a layer's weights (partition/comm.py lists the same order).
WEIGHT_ORDER = ("w_up", "w_gate", "wq", "wk", "wv", "wo", "w_down")


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    # check_vma off: the bodies mix replicated and split values on purpose (e.g. MQA K/V repeated per chip).
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older JAX

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ----------------------------------------------------------------------------------------------- specs


def _spec(axes: tuple[str, ...], table: dict[str, tuple[str, ...]], multi_query: bool) -> P:
    dims = []
    for a in axes:
        mesh_axes = () if (a == "kv_heads" and multi_query) else table.get(a, ())
        dims.append(mesh_axes if mesh_axes else None)
    return P(*dims)


def _leaf_specs(config: ModelConfig, rules: Rules) -> dict[str, Any]:
    """PartitionSpec per declared weight: layer matmuls by the layout's rules, tables over vocab, norms whole."""

    def one(path, spec: ParamSpec) -> P:
        top = path[0].key
        if top in ("embed", "unembed"):
            return _spec(spec.axes, TABLE_RULES, config.multi_query)
        if spec.contract:
            return _spec(spec.axes, rules.weights, config.multi_query)
        return P()

    return jax.tree_util.tree_map_with_path(one, declare(config), is_leaf=lambda s: isinstance(s, ParamSpec))


def param_specs(config: ModelConfig, ffn_layout: str, params: Params | None = None) -> Any:
    """PartitionSpecs matching `params` (QuantizedArray leaves get values and scale specs; a scale is
    not split on its contracted, size-1 dims). Without params: the specs of plain (unquantised) weights."""
    specs = _leaf_specs(config, rules_for(ffn_layout))
    if params is None:
        return specs
    declared = declare(config)

    def one(spec: P, decl: ParamSpec, leaf: Any) -> Any:
        if isinstance(leaf, QuantizedArray):
            scale = P(*(None if a in decl.contract else s for a, s in zip(decl.axes, spec, strict=True)))
            return QuantizedArray(values=spec, scale=scale)
        return spec

    is_leaf = lambda x: isinstance(x, (P, ParamSpec, QuantizedArray))  # noqa: E731
    return jax.tree_util.tree_map(one, specs, declared, params, is_leaf=is_leaf)


def param_shardings(config: ModelConfig, mesh: Mesh, ffn_layout: str = "ws2d"):
    """A function abstract params -> NamedSharding tree, for `load_checkpoint(path, shardings=fn)`."""

    def fn(abstract: Params) -> Any:
        specs = param_specs(config, ffn_layout, abstract)
        return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    return fn


def shard_params(params: Params, config: ModelConfig, mesh: Mesh, ffn_layout: str = "ws2d") -> Params:
    """Place params in the layout's storage (2D for every layout but ws1d) on `mesh`."""
    check_model(config, mesh, Layout(ffn_layout), 1 if ffn_layout.startswith("ws") else mesh.size)
    return jax.device_put(params, param_shardings(config, mesh, ffn_layout)(params))


def _dims(config: ModelConfig, batch: int, tokens: int) -> LayerDims:
    return LayerDims(
        batch, tokens, tokens, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads, config.d_head,
        gated=config.mlp == "swiglu",
    )  # fmt: skip


def check_model(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int) -> None:
    """Refuse (before any compile) a model, mesh, layout and batch that do not fit; messages name the dims."""
    if not config.parallel_block or config.linear_bias:
        raise UserError(f"sharded steps support parallel-block models without linear biases; {config.name} is not")
    shape = mesh_shape(mesh)
    if config.vocab_size % shape.n:
        raise LayoutError(f"vocab_size V = {config.vocab_size} is not divisible by the {shape.n} chips of mesh {shape}")
    check_layout(layout.ffn, layout.attention, shape, _dims(config, batch, 1))


def kv_spec(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int) -> P:
    """The KV cache's split [N, B, S, K, Q] under `layout` for `batch` rows."""
    b, _, kv = attention_axes(layout, mesh_shape(mesh), batch, config.multi_query)
    return P(None, b or None, None, kv or None, None)


def init_cache(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int, max_len: int, dtype=jnp.bfloat16):
    """An empty KV cache placed in the decode layout's split."""
    check_model(config, mesh, layout, batch)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    kv = NamedSharding(mesh, kv_spec(config, mesh, layout, batch))
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv)
    lengths = jax.device_put(jnp.zeros((batch,), jnp.int32), NamedSharding(mesh, P()))
    return KVCache(k=zeros(), v=zeros(), lengths=lengths)


# ------------------------------------------------------------------------------------------ one layer


@dataclass(frozen=True)
class _Plan:
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
    y = y * ops.local(p["scale"], axes, 0).astype(jnp.float32)
    if "bias" in p:
        y = y + ops.local(p["bias"], axes, 0).astype(jnp.float32)
    return y.astype(h.dtype)


def _gather_weights(p: dict[str, Any], plan: _Plan, ops: Ops) -> dict[str, Any]:
    """Weight-gathered layouts: all-gather each 2D-stored weight over the gathered axes before use."""
    G = plan.rules.gathered
    declared = declare(plan.config)["layers"]
    out = dict(p)
    for name in WEIGHT_ORDER:
        if name not in p:
            continue
        axes = declared[name].axes[1:]  # without the scanned layers axis
        split = {d: s for d, s in enumerate(_spec(axes, plan.rules.weights, plan.config.multi_query)) if s}
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


def _to_attention(q, k, v, plan: _Plan, ops: Ops):
    """q [B, T, H_loc, Q], k, v [B, T, K_loc, Q] after the input projection -> the attention split."""
    ffn = plan.layout.ffn
    batch_axes, _, _ = plan.attn_axes
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
        q, k, v = jnp.split(qkv, [nq, nq + nk], axis=2)
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


def _from_attention(o, plan: _Plan, ops: Ops):
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


def _in_projections(h: jax.Array, w: dict[str, Any]) -> dict[str, jax.Array]:
    """The fused input matmuls (W_Q, W_K, W_V with the MLP's W and V) of one normalised h [B, T, E_loc]."""
    return {name: einsum(sub, h, w[name]) for name, sub in _IN.items() if name in w}


def _slice(w: Any, dim: int, start: jax.Array, size: int, scale_too: bool) -> Any:
    """A chunk of a weight along `dim` (an int8 scale is sliced too when `dim` is an output dim)."""
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=dim)  # noqa: E731
    if isinstance(w, QuantizedArray):
        return QuantizedArray(cut(w.values), cut(w.scale) if scale_too else w.scale)
    return cut(w)


def _looped_in(x: jax.Array, p: dict[str, Any], plan: _Plan, ops: Ops) -> dict[str, jax.Array]:
    """ws2d with overlap: norm on BLE_xyz, then the input matmuls as a looped all-gather(yz) einsum."""
    h = _norm_split_x(x, p["attn_norm"], plan.config, ops, XYZ)  # statistics: all-reduce(xyz)
    n = x.shape[2]

    def matmul(chunk, c):
        rows = {name: _slice(p[name], 0, c * n, n, False) for name in _IN if name in p}
        return {k: v.astype(jnp.float32) for k, v in _in_projections(chunk, rows).items()}

    with jax.named_scope("looped_input"):
        # BLE_xyz --all-gather(yz)--> BLE_x as ring steps, each overlapped with the matmul of the chunk at hand
        out = all_gather_matmul(h, matmul, ("y", "z"), ops)
    return {k: v.astype(x.dtype) for k, v in out.items()}


def layer_fn(x: jax.Array, p: dict[str, Any], plan: _Plan, ops: Ops, attn) -> jax.Array:
    """One parallel block on local shards. x: the residual in the layout's split; attn(q, k, v) -> o runs
    attention (and the cache) on the attention split, q/k not yet rotated."""
    c, ffn = plan.config, plan.layout.ffn
    rest = plan.rules.residual["embed"]
    w = _gather_weights(p, plan, ops) if plan.rules.gathered else p
    if plan.layout.overlap:
        mm = _looped_in(x, p, plan, ops)
    else:
        with jax.named_scope("gather_input"):
            if ffn == "ws1d":
                # BLE_xyz --all-gather(xyz)--> BLE
                h = layers.norm(ops.all_gather(x, XYZ, 2), p["attn_norm"], c)
            elif ffn == "ws2d":
                # BLE_xyz --all-gather(yz)--> BLE_x
                h = _norm_split_x(ops.all_gather(x, ("y", "z"), 2), p["attn_norm"], c, ops, ("x",))
            else:
                # B_xLE_yz --all-gather(yz)--> B_xLE  (weight-gathered: the batch stays split)
                h = layers.norm(ops.all_gather(x, rest, 2), p["attn_norm"], c)
        mm = _in_projections(h, w)
    o = _from_attention(attn(*_to_attention(mm["wq"], mm["wk"], mm["wv"], plan, ops)), plan, ops)
    up, gate = mm["w_up"], mm.get("w_gate")
    if ffn == "ws2d":
        with jax.named_scope("ffn_reduce_scatter"):
            # BLF_yz{partialsum-x} --reduce-scatter(x)--> BLF_xyz
            both = ops.reduce_scatter(jnp.stack([up] if gate is None else [up, gate], 2), ("x",), 3)
            up, gate = both[:, :, 0], (None if gate is None else both[:, :, 1])
    act = jax.nn.silu(gate) * up if gate is not None else jax.nn.gelu(up, approximate=False)
    if ffn == "ws2d":
        with jax.named_scope("ffn_all_gather"):
            # BLF_xyz --all-gather(x)--> BLF_yz
            act = ops.all_gather(act, ("x",), 2)
    if plan.layout.overlap:
        n = x.shape[2]

        def matmul(chunk):
            down, wo = _slice(w["w_down"], 1, chunk * n, n, True), _slice(w["wo"], 2, chunk * n, n, True)
            return einsum("BTF,FE->BTE", act, down) + einsum("BTHQ,HQE->BTE", o, wo)

        with jax.named_scope("looped_output"):
            # BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz as ring steps overlapped with the matmuls
            return x + matmul_reduce_scatter(matmul, ("y", "z"), ops)
    y = einsum("BTF,FE->BTE", act, w["w_down"]) + einsum("BTHQ,HQE->BTE", o, w["wo"])
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
    return x + y


# --------------------------------------------------------------------------------- embedding and logits


def _embed(tokens: jax.Array, params: Params, plan: _Plan, ops: Ops) -> jax.Array:
    """tokens [B, T] (whole on every chip) -> the residual [B, T, E] in the layout's split."""
    table = params["embed"]  # [V_xyz, E]
    rows = table.shape[0]
    ids = tokens - ops.index(XYZ) * rows
    here = (ids >= 0) & (ids < rows)
    x = jnp.where(here[..., None], table[jnp.clip(ids, 0, rows - 1)], jnp.zeros((), table.dtype))
    with jax.named_scope("embed_all_reduce"):
        # BLE{partialsum-xyz} --all-reduce(xyz)--> BLE  (each token's row lives on one chip)
        x = ops.all_reduce(x, XYZ)
    r = plan.rules.residual
    return ops.local(ops.local(x, r["batch"], 0), r["embed"], 2).astype(compute_dtype(params))


def _logits(x: jax.Array, params: Params, plan: _Plan, ops: Ops) -> jax.Array:
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


# ------------------------------------------------------------------------------------------ the steps


def _prefill_body(params, tokens, lengths, *, plan: _Plan, all_logits: bool):
    ops, c = Ops(plan.shape), plan.config
    B, T = tokens.shape
    batch_axes = plan.attn_axes[0]
    pos = ops.local(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), batch_axes, 0)
    mask = layers.attention_scores_mask(pos, pos, pos < ops.local(lengths, batch_axes, 0)[:, None])

    def layer(x, p):
        kv = {}

        def attn(q, k, v):
            q, k = layers.rope(q, pos, c.rope_base), layers.rope(k, pos, c.rope_base)
            kv["k"], kv["v"] = k, v
            return layers.attend(q, k, v, mask)

        x = layer_fn(x, p, plan, ops, attn)
        return x, (kv["k"], kv["v"])

    x, (k, v) = jax.lax.scan(layer, _embed(tokens, params, plan, ops), params["layers"])
    if not all_logits:
        last = ops.local(lengths, plan.rules.residual["batch"], 0) - 1
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B, 1, E]
    logits = _logits(x, params, plan, ops)
    return (logits if all_logits else logits[:, 0]), k, v


def _decode_body(params, tokens, ck, cv, lengths, *, plan: _Plan):
    ops, c = Ops(plan.shape), plan.config
    S = ck.shape[2]
    batch_axes = plan.attn_axes[0]
    pos = ops.local(jnp.minimum(lengths, S - 1), batch_axes, 0)  # [b] this chip's attention rows
    rows = jnp.arange(pos.shape[0])
    keys = jnp.broadcast_to(jnp.arange(S), (pos.shape[0], S))
    mask = layers.attention_scores_mask(pos[:, None], keys, jnp.ones_like(keys, bool))  # [b, 1, S]

    def layer(carry, p_and_index):
        x, ck, cv = carry
        p, i = p_and_index

        def attn(q, k, v):
            nonlocal ck, cv
            q, k = layers.rope(q, pos[:, None], c.rope_base), layers.rope(k, pos[:, None], c.rope_base)
            ck = ck.at[i, rows, pos].set(k[:, 0].astype(ck.dtype))
            cv = cv.at[i, rows, pos].set(v[:, 0].astype(cv.dtype))
            return layers.attend(q, ck[i].astype(q.dtype), cv[i].astype(q.dtype), mask)

        return (layer_fn(x, p, plan, ops, attn), ck, cv), None

    x = _embed(tokens[:, None], params, plan, ops)
    (x, ck, cv), _ = jax.lax.scan(layer, (x, ck, cv), (params["layers"], jnp.arange(c.n_layers)))
    return _logits(x, params, plan, ops)[:, 0], ck, cv


def _insert_body(ck, cv, lengths, k, v, new_lengths, slots, *, prefill_plan: _Plan, decode_plan: _Plan):
    ops = Ops(decode_plan.shape)
    p_batch, _, p_kv = prefill_plan.attn_axes
    d_batch, _, d_kv = decode_plan.attn_axes
    kv = jnp.stack([k, v])  # [2, N, b, T, K, Q] in the prefill split
    with jax.named_scope("reshard_kv"):
        # B_xyzSKQ --all-gather(xyz)--> BSKQ : every chip then keeps the rows whose cache slots it holds
        kv = ops.all_gather(kv, p_batch, 2)
        if set(ops.live(p_kv)) != set(ops.live(d_kv)):
            # BSKQ_yz --all-gather(yz)--> BSKQ, then this chip's kv heads of the decode split
            kv = ops.local(ops.all_gather(kv, p_kv, 4), d_kv, 4)
    rows, T = ck.shape[1], kv.shape[3]
    local = slots - ops.index(d_batch) * rows
    local = jnp.where((local >= 0) & (local < rows), local, rows)  # rows held elsewhere are dropped
    ck = ck.at[:, local, :T].set(kv[0].astype(ck.dtype), mode="drop")
    cv = cv.at[:, local, :T].set(kv[1].astype(cv.dtype), mode="drop")
    return ck, cv, lengths.at[slots].set(new_lengths.astype(jnp.int32))


@partial(jax.jit, static_argnames=("config", "mesh", "layout", "all_logits"))
def _prefill(params, config, tokens, lengths, *, mesh, layout, all_logits):
    plan = _Plan(config, layout, mesh_shape(mesh), tokens.shape[0])
    kv = kv_spec(config, mesh, layout, tokens.shape[0])
    body = partial(_prefill_body, plan=plan, all_logits=all_logits)
    specs = (param_specs(config, layout.ffn, params), P(), P())
    return _shard_map(body, mesh, specs, (P(), kv, kv))(params, tokens, lengths)


def prefill(params, config, tokens, lengths, *, mesh: Mesh, layout: Layout, all_logits: bool = False):
    """`transformer.prefill` under `layout`: tokens [B, T], lengths [B] -> (logits [B, V] or [B, T, V], k, v).

    k, v [N, B, T, K, Q] come back in the layout's KV split (`kv_spec`), ready for `insert`.
    """
    check_model(config, mesh, layout, tokens.shape[0])
    return _prefill(params, config, tokens, lengths, mesh=mesh, layout=layout, all_logits=all_logits)


@partial(jax.jit, static_argnames=("config", "mesh", "layout"))
def _decode(params, config, tokens, cache, *, mesh, layout):
    plan = _Plan(config, layout, mesh_shape(mesh), tokens.shape[0])
    kv = kv_spec(config, mesh, layout, tokens.shape[0])
    specs = (param_specs(config, layout.ffn, params), P(), kv, kv, P())
    body = partial(_decode_body, plan=plan)
    logits, k, v = _shard_map(body, mesh, specs, (P(), kv, kv))(params, tokens, cache.k, cache.v, cache.lengths)
    S = cache.max_len
    return logits, KVCache(k=k, v=v, lengths=jnp.minimum(cache.lengths + 1, S))


def decode_step(params, config, tokens, cache: KVCache, *, mesh: Mesh, layout: Layout):
    """`transformer.decode_step` under `layout`: tokens [B] and a cache in the layout's KV split."""
    check_model(config, mesh, layout, tokens.shape[0])
    return _decode(params, config, tokens, cache, mesh=mesh, layout=layout)


@partial(jax.jit, static_argnames=("config", "mesh", "prefill_layout", "decode_layout"))
def _insert(cache, k, v, lengths, slots, *, config, mesh, prefill_layout, decode_layout):
    shape = mesh_shape(mesh)
    p_plan = _Plan(config, prefill_layout, shape, k.shape[1])
    d_plan = _Plan(config, decode_layout, shape, cache.batch)
    p_kv, d_kv = kv_spec(config, mesh, prefill_layout, k.shape[1]), kv_spec(config, mesh, decode_layout, cache.batch)
    body = partial(_insert_body, prefill_plan=p_plan, decode_plan=d_plan)
    specs = (d_kv, d_kv, P(), p_kv, p_kv, P(), P())
    ck, cv, n = _shard_map(body, mesh, specs, (d_kv, d_kv, P()))(cache.k, cache.v, cache.lengths, k, v, lengths, slots)
    return KVCache(k=ck, v=cv, lengths=n)


def insert(cache: KVCache, k, v, lengths, slots, *, config, mesh: Mesh, prefill_layout: Layout, decode_layout: Layout):
    """The phase switch: prefill k, v [N, b, T, K, Q] (prefill split) into cache rows `slots` (decode split)."""
    check_model(config, mesh, prefill_layout, k.shape[1])
    check_model(config, mesh, decode_layout, cache.batch)
    return _insert(
        cache,
        k,
        v,
        lengths,
        slots,
        config=config,
        mesh=mesh,
        prefill_layout=prefill_layout,
        decode_layout=decode_layout,
    )


def layer_hlo(
    params: Params,
    config: ModelConfig,
    mesh: Mesh,
    layout: Layout,
    batch: int,
    tokens: int,
    context: int = 0,
    compiled: bool = True,
) -> str:
    """HLO text of ONE decoder layer under `layout` (for counting its collectives): compiled by XLA, or
    as lowered (compiled=False: the program as written, before XLA's passes; exact dtypes).

    context 0: a prefill layer (attention over its own `tokens`); else a decode layer over a cache of
    `context` positions in the layout's KV split.
    """  # fmt: skip
    check_model(config, mesh, layout, batch)
    plan = _Plan(config, layout, mesh_shape(mesh), batch)
    r = plan.rules.residual
    x_spec = P(r["batch"] or None, None, r["embed"] or None)
    b, _, kv = plan.attn_axes
    cache_spec = P(b or None, None, kv or None, None)
    dtype = compute_dtype(params)

    def body(layer_params, x, ck, cv):
        ops = Ops(plan.shape)
        p = jax.tree_util.tree_map(lambda a: a[0], layer_params)
        pos = jnp.zeros((ck.shape[0], x.shape[1]), jnp.int32) + jnp.arange(x.shape[1])

        def attn(q, k, v):
            q, k = layers.rope(q, pos, config.rope_base), layers.rope(k, pos, config.rope_base)
            if context:
                k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), 0, axis=1).astype(q.dtype)
                v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), 0, axis=1).astype(q.dtype)
            mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
            return layers.attend(q, k, v, mask)

        return layer_fn(x, p, plan, ops, attn)

    specs = (param_specs(config, layout.ffn, params)["layers"], x_spec, cache_spec, cache_spec)
    fn = jax.jit(_shard_map(body, mesh, specs, x_spec))
    S = max(context, 1)
    args = (
        params["layers"],
        jax.ShapeDtypeStruct((batch, tokens, config.d_model), dtype),
        jax.ShapeDtypeStruct((batch, S, config.n_kv_heads, config.d_head), dtype),
        jax.ShapeDtypeStruct((batch, S, config.n_kv_heads, config.d_head), dtype),
    )
    lowered = fn.lower(*args)
    return lowered.compile().as_text() if compiled else lowered.as_text(dialect="hlo")
