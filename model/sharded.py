"""The decoder's steps under a layout on a device mesh: prefill, insert (the phase switch) and decode.

Each step is one `jax.shard_map` over the (x, y, z) mesh whose body (model/sharded_layer.py) reads like PAPER.md: the
dataflow of every layout written out with explicit collectives (partition/ops.py), each with its paper-notation
comment and a `jax.named_scope`; the math (norm, rope, attend, int8 einsum) is model/layers.py's.
partition/comm.py lists the same collectives per layer for the cost model; tests compare the two in HLO.

Weight and cache placement with the checks before compiling live in model/sharded_specs.py, the HLO helpers tests
count collectives with in model/sharded_hlo.py; every name is re-exported here (`from meshserve.model import sharded`).

Axis alphabet (model/config.py): B batch, T tokens, S cache, E, F, H, K, Q, V, N layers. Local shapes in
comments are per chip. Supported models: the parallel block (PaLM, Falcon, demo) and the serial block (Llama,
Mistral, Qwen2, Qwen3, Gemma 3), with or without linear / q-k-v biases, rope scaling and per-layer sliding windows
(the same mask builder as one device, `layers.attention_scores_mask`, with the scanned layer's window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.model import kv_quant, layers
from meshserve.model.config import ModelConfig
from meshserve.model.generate import Batch, GenerationResult, decode_loop
from meshserve.model.kv_quant import check_kv_cache_dtype
from meshserve.model.params import Params
from meshserve.model.sampling import SamplingParams, TokenHistory
from meshserve.model.sharded_hlo import decode_hlo, insert_hlo, layer_hlo
from meshserve.model.sharded_layer import Plan, embed, layer_fn, logits, rope_qk, shard_map
from meshserve.model.sharded_specs import (
    check_model,
    check_params,
    init_cache,
    kv_spec,
    mesh_config,
    param_shardings,
    param_specs,
    replicate_for_mesh,
    shard_params,
    step_dims,
)
from meshserve.model.transformer import KVCache
from meshserve.partition.comm import MESH_AXES, LayoutError, MeshShape, reshard_plan
from meshserve.partition.mesh import mesh_shape
from meshserve.partition.ops import Ops
from meshserve.partition.rules import Layout, rules_for, storage_of

__all__ = [
    "Layout",
    "param_specs",
    "param_shardings",
    "shard_params",
    "check_model",
    "check_params",
    "kv_spec",
    "init_cache",
    "prefill",
    "insert",
    "decode_step",
    "layer_hlo",
    "insert_hlo",
    "decode_hlo",
    "generate_sharded",
    "min_batch",
    "check_phases",
    "mesh_config",
    "replicate_for_mesh",
]

# ------------------------------------------------------------------------------------------ the steps


def _prefill_body(params, tokens, lengths, *, plan: Plan, all_logits: bool, int8_kv: bool):
    ops, c = Ops(plan.shape), plan.config
    B, T = tokens.shape
    batch_axes = plan.attn_axes[0]
    pos = ops.local(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), batch_axes, 0)
    valid = pos < ops.local(lengths, batch_axes, 0)[:, None]
    scale = layers.attention_scale(c)

    def layer(x, p_and_index):
        p, i = p_and_index
        kv = {}

        def attn(q, k, v):
            q, k = rope_qk(q, k, pos, c, i)
            if int8_kv:  # rounded to the int8 cache's grid first, as transformer.prefill
                k, v = kv_quant.round_to_int8(k), kv_quant.round_to_int8(v)
            kv["k"], kv["v"] = k, v
            mask = layers.attention_scores_mask(pos, pos, valid, layers.layer_window(c, i))  # causal, windowed
            return layers.attend(q, k, v, mask, scale)

        x = layer_fn(x, p, plan, ops, attn)
        return x, (kv["k"], kv["v"])

    x, (k, v) = jax.lax.scan(layer, embed(tokens, params, plan, ops), (params["layers"], jnp.arange(c.n_layers)))
    if not all_logits:
        last = ops.local(lengths, plan.rules.residual["batch"], 0) - 1
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B, 1, E]
    out = logits(x, params, plan, ops)
    return (out if all_logits else out[:, 0]), k, v


def _decode_body(params, tokens, ck, cv, lengths, *, plan: Plan):
    ops, c = Ops(plan.shape), plan.config
    S = ck.shape[2]
    batch_axes = plan.attn_axes[0]
    pos = ops.local(jnp.minimum(lengths, S - 1), batch_axes, 0)  # [b] this chip's attention rows
    rows = jnp.arange(pos.shape[0])
    cached = jnp.arange(S)[None, :]  # [1, S]
    scale = layers.attention_scale(c)

    def layer(x, p_and_index):
        p, i = p_and_index
        new = {}
        # [b, S]: cached positions before this step's own, within the layer's window (as transformer.decode_step)
        window = layers.layer_window(c, i)
        visible = layers.attention_scores_mask(pos[:, None], cached, cached < pos[:, None], window)[:, 0]

        def attn(q, k, v):
            # The cache is only read here; all layers' new k, v go in with one scatter after the loop (as in
            # transformer.decode_step).
            q, k = rope_qk(q, k, pos[:, None], c, i)
            new["k"], new["v"] = kv_quant.storable(k, ck), kv_quant.storable(v, cv)
            (kc, ks), (vc, vs) = kv_quant.operands(ck[i], q.dtype), kv_quant.operands(cv[i], q.dtype)
            own_k, own_v = new["k"].astype(q.dtype), new["v"].astype(q.dtype)
            return layers.attend_cached(q, kc, vc, visible, own_k, own_v, ks, vs, scale)

        return layer_fn(x, p, plan, ops, attn), (new["k"], new["v"])

    x = embed(tokens[:, None], params, plan, ops)
    x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], jnp.arange(c.n_layers)))  # [N, b, 1, K, Q]
    ck = ck.at[:, rows, pos].set(k_new[:, :, 0])
    cv = cv.at[:, rows, pos].set(v_new[:, :, 0])
    return logits(x, params, plan, ops)[:, 0], ck, cv


def _insert_body(ck, cv, lengths, k, v, new_lengths, slots, *, shape: MeshShape, switch: dict):
    """ck, cv [N, R, S, K_d, Q] (decode split; arrays or `Int8KV`), k, v [N, b, T, K_p, Q] (prefill split, the
    compute dtype: the switch moves them as prefill made them, and the write rounds them into an int8 cache),
    slots [b] (any order)."""
    ops = Ops(shape)
    p_batch, d_batch, kept, gather, cap = (switch[key] for key in ("p_batch", "d_batch", "heads_kept",
                                                                   "heads_gather", "cap"))  # fmt: skip
    finer = switch["d_kv"][len(kept) :]  # the decode's kv-head split inside the block kept after the gather
    R, b, T, group = ck.shape[1], k.shape[1], k.shape[2], ops.size(p_batch)
    K_d = ck.shape[3]
    mine = ops.index(d_batch)  # this chip's block of decode slots

    def picked(block, src):
        """[cap] indices of prefill block `src`'s rows whose slots lie in decode block `block` (first), and
        their slots local to that block (R: none, dropped). Sender and receiver compute it alike from slots."""
        s = jax.lax.dynamic_slice_in_dim(slots, src * b, b)
        hit = s // R == block
        order = jnp.argsort(~hit, stable=True)[:cap]
        return order, jnp.where(hit[order], s[order] - block * R, R)

    def coords(member: int) -> dict[str, Any]:
        """Mesh coordinates of `member` (linear over p_batch) of this chip's p_batch group."""
        out = {a: jax.lax.axis_index(a) for a in ops.live(MESH_AXES)}
        for a in reversed(p_batch):
            out[a], member = member % getattr(shape, a), member // getattr(shape, a)
        return out

    def ravel(c: dict[str, Any], axes: tuple[str, ...]):
        idx = jnp.int32(0)
        for a in axes:
            idx = idx * getattr(shape, a) + c[a]
        return idx

    def layer(i, caches):
        # One layer at a time: a chip holds one layer's moving rows, not all N layers' (peak memory / N).
        ck, cv = caches
        kv = jnp.stack([k[i], v[i]])  # [2, b, T, K_p, Q] in the prefill split
        with jax.named_scope("reshard_kv"):
            # bSKQ_yz --all-gather(y)--> bSKQ_z : kv heads the decode split does not start with (own rows only)
            kv = ops.all_gather(kv, gather, 3)
            if not p_batch:  # every chip holds every row: keep its kv heads and (below) the rows of its slots
                kv, local = ops.local(kv, finer, 3), slots - mine * R
            else:
                # B_xyzSKQ --all-to-all(xyz)--> B_slotsSKQ : each chip gets, from each chip of its prefill-batch
                # group, the (at most cap) rows whose slots it holds, in the decode's kv-head split
                send = []
                for member in range(group):
                    c = coords(member)
                    rows = jnp.take(kv, picked(ravel(c, d_batch), ops.index(p_batch))[0], axis=1)
                    send.append(jax.lax.dynamic_slice_in_dim(rows, ravel(c, finer) * K_d, K_d, axis=3))
                got = ops.all_to_all(jnp.stack(send), p_batch, 0, 0)  # [group, 2, cap, T, K_d, Q]: m from block m
                kv = jnp.moveaxis(got, 0, 1).reshape((2, group * cap) + got.shape[3:])
                local = jnp.concatenate([picked(mine, m)[1] for m in range(group)])
            local = jnp.where((local >= 0) & (local < R), local, R)  # rows held elsewhere are dropped
        ck = ck.at[i, local, :T].set(kv_quant.storable(kv[0], ck), mode="drop")
        cv = cv.at[i, local, :T].set(kv_quant.storable(kv[1], cv), mode="drop")
        return ck, cv

    ck, cv = jax.lax.fori_loop(0, k.shape[0], layer, (ck, cv))
    return ck, cv, lengths.at[slots].set(new_lengths.astype(jnp.int32))


@partial(jax.jit, static_argnames=("config", "mesh", "layout", "all_logits", "int8_kv"))
def _prefill(params, config, tokens, lengths, *, mesh, layout, all_logits, int8_kv=False):
    plan = Plan(config, layout, mesh_shape(mesh), tokens.shape[0])
    kv = kv_spec(config, mesh, layout, tokens.shape[0])
    body = partial(_prefill_body, plan=plan, all_logits=all_logits, int8_kv=int8_kv)
    specs = (param_specs(config, layout.ffn, params), P(), P())
    return shard_map(body, mesh, specs, (P(), kv, kv))(params, tokens, lengths)


def prefill(
    params, config, tokens, lengths, *, mesh: Mesh, layout: Layout, all_logits: bool = False, int8_kv: bool = False
):
    """`transformer.prefill` under `layout`: tokens [B, T], lengths [B] -> (logits [B, V] or [B, T, V], k, v).

    k, v [N, B, T, K, Q] come back in the layout's KV split (`kv_spec`), ready for `insert` (int8_kv: rounded to
    an int8 cache's grid, as transformer.prefill).
    """
    check_model(config, mesh, layout, tokens.shape[0])
    check_params(params, config, mesh, layout)
    return _prefill(params, config, tokens, lengths, mesh=mesh, layout=layout, all_logits=all_logits, int8_kv=int8_kv)


@partial(jax.jit, static_argnames=("config", "mesh", "layout"))
def _decode(params, config, tokens, cache, *, mesh, layout):
    plan = Plan(config, layout, mesh_shape(mesh), tokens.shape[0])
    kv = kv_quant.spec_of(cache.k, kv_spec(config, mesh, layout, tokens.shape[0]))  # [N, B, S, K, Q]
    specs = (param_specs(config, layout.ffn, params), P(), kv, kv, P())
    body = partial(_decode_body, plan=plan)
    logits, k, v = shard_map(body, mesh, specs, (P(), kv, kv))(params, tokens, cache.k, cache.v, cache.lengths)
    S = cache.max_len
    return logits, KVCache(k=k, v=v, lengths=jnp.minimum(cache.lengths + 1, S))


def decode_step(params, config, tokens, cache: KVCache, *, mesh: Mesh, layout: Layout):
    """`transformer.decode_step` under `layout`: tokens [B] and a cache in the layout's KV split."""
    if tokens.shape != (cache.batch,):
        raise LayoutError(f"decode tokens have shape {tuple(tokens.shape)}; the cache has batch B = {cache.batch} rows")
    check_model(config, mesh, layout, tokens.shape[0])
    check_params(params, config, mesh, layout)
    return _decode(params, config, tokens, cache, mesh=mesh, layout=layout)


@partial(jax.jit, static_argnames=("config", "mesh", "prefill_layout", "decode_layout"))
def _insert(cache, k, v, lengths, slots, *, config, mesh, prefill_layout, decode_layout):
    shape = mesh_shape(mesh)
    switch = reshard_plan(prefill_layout.ffn, prefill_layout.attention, decode_layout.ffn, decode_layout.attention,
                          shape, step_dims(config, k.shape[1], k.shape[2]), decode_batch=cache.batch)  # fmt: skip
    p_kv = kv_spec(config, mesh, prefill_layout, k.shape[1])
    d_kv = kv_quant.spec_of(cache.k, kv_spec(config, mesh, decode_layout, cache.batch))
    body = partial(_insert_body, shape=shape, switch=switch)
    specs = (d_kv, d_kv, P(), p_kv, p_kv, P(), P())
    ck, cv, n = shard_map(body, mesh, specs, (d_kv, d_kv, P()))(cache.k, cache.v, cache.lengths, k, v, lengths, slots)
    return KVCache(k=ck, v=cv, lengths=n)


def insert(cache: KVCache, k, v, lengths, slots, *, config, mesh: Mesh, prefill_layout: Layout, decode_layout: Layout):
    """The phase switch: prefill k, v [N, b, T, K, Q] (prefill split) into cache rows `slots` (decode split)."""
    layers_in, b, t_len = k.shape[:3]
    if k.shape != v.shape or layers_in != config.n_layers or k.shape[3:] != (config.n_kv_heads, config.d_head):
        raise LayoutError(
            f"prefill k, v must both be [N, b, T, K, Q] = [{config.n_layers}, b, T, {config.n_kv_heads}, "
            f"{config.d_head}]; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if t_len > cache.max_len:
        raise LayoutError(f"prefill length T = {t_len} exceeds the cache length S = {cache.max_len}")
    if tuple(lengths.shape) != (b,) or tuple(slots.shape) != (b,):
        raise LayoutError(f"lengths {tuple(lengths.shape)} and slots {tuple(slots.shape)} must both be [{b}]")
    if b > cache.batch:
        raise LayoutError(f"{b} prefilled rows do not fit a cache of batch B = {cache.batch} slots")
    check_model(config, mesh, prefill_layout, b)
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


# ------------------------------------------------------------------------------------------ generation


def min_batch(layout: Layout, mesh: Mesh) -> int:
    """The smallest batch that uses `layout`'s whole batch split (1 when it splits no batch)."""
    shape = mesh_shape(mesh)
    if rules_for(layout.ffn).gathered:
        return shape.size(rules_for(layout.ffn).gathered)
    return shape.n if layout.attention == "batch" else 1


def check_phases(prefill_layout: Layout, decode_layout: Layout) -> None:
    """Both phases must read one weight storage (weights never move between phases)."""
    if storage_of(prefill_layout.ffn) != storage_of(decode_layout.ffn):
        raise LayoutError(
            f"prefill layout {prefill_layout.ffn} and decode layout {decode_layout.ffn} store weights differently "
            "(ws1d: E·F_xyz; ws2d and wg-*: E_x·F_yz); use ws1d for both phases or for neither"
        )


@partial(jax.jit, static_argnames=("config", "mesh", "prefill_layout", "decode_layout", "context", "steps",
                                   "with_top", "int8_kv"))  # fmt: skip
def _generate(params, config, tokens, lengths, sampling, stop_ids, max_new, *, mesh, prefill_layout, decode_layout,
              context, steps, with_top, int8_kv):  # fmt: skip
    """model.generate's loop with sharded steps: prefill layout, phase switch, decode layout.

    tokens [b, T]: the real rows padded to the prefill split only; the decode cache has B = max_new.shape[0]
    slots (the decode split's padding); rows b.. of the cache are padding (results dropped).
    """
    b, B = tokens.shape[0], max_new.shape[0]
    logits, k, v = _prefill(params, config, tokens, lengths, mesh=mesh, layout=prefill_layout, all_logits=False,
                            int8_kv=int8_kv)  # fmt: skip
    shape = (config.n_layers, B, context, config.n_kv_heads, config.d_head)
    empty = kv_quant.zeros(shape, jnp.int8 if int8_kv else k.dtype)
    kv = kv_quant.sharding_of(empty, NamedSharding(mesh, kv_spec(config, mesh, decode_layout, B)))
    empty = jax.tree_util.tree_map(jax.lax.with_sharding_constraint, empty, kv)
    cache = KVCache(k=empty, v=empty, lengths=jnp.zeros((B,), jnp.int32))
    cache = _insert(cache, k, v, lengths, jnp.arange(b), config=config, mesh=mesh, prefill_layout=prefill_layout,
                    decode_layout=decode_layout)  # fmt: skip
    logits = jnp.zeros((B, logits.shape[1]), logits.dtype).at[:b].set(logits)  # padding slots: never read back
    step = lambda last, cache: _decode(params, config, last, cache, mesh=mesh, layout=decode_layout)
    prompts = TokenHistory.of_prompts(tokens, lengths, config.vocab_size)
    history = TokenHistory(jnp.zeros((B, config.vocab_size), bool).at[:b].set(prompts.in_prompt),
                           jnp.zeros((B, config.vocab_size), jnp.int32))  # fmt: skip
    return decode_loop(step, logits, cache, sampling, stop_ids, max_new, steps, history, with_top)


def generate_sharded(
    params: Params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    mesh: Mesh,
    prefill_layout: Layout,
    decode_layout: Layout,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_ids: Sequence[int] = (),
    kv_cache_dtype: str = "auto",
) -> list[GenerationResult]:
    """`model.generate.generate` on a mesh: the same results list, prefill and decode each in its layout.

    Prefill runs only the real prompts, padded to a multiple of the prefill layout's batch split; the decode
    cache has the request batch padded to the decode split (padding rows' results are dropped). A grouped-query
    model whose kv heads the heads split does not divide runs with them replicated (`replicate_for_mesh`: the same
    tokens, more KV cache per chip); `config` and `params` are the model as loaded.
    """
    check_phases(prefill_layout, decode_layout)
    config, params = replicate_for_mesh(config, params, mesh, prefill_layout.ffn)
    p_split, d_split = min_batch(prefill_layout, mesh), min_batch(decode_layout, mesh)
    prefill_rows = -(-len(prompts) // p_split) * p_split
    b = Batch.pack(config, prompts, max_new_tokens, sampling, stop_ids, batch_multiple=d_split)
    if b.tokens.shape[0] < prefill_rows:  # the decode cache must hold every prefilled row
        b = Batch.pack(config, prompts, max_new_tokens, sampling, stop_ids, math.lcm(p_split, d_split))
    tokens, lengths = b.tokens[:prefill_rows], b.lengths[:prefill_rows]
    check_model(config, mesh, prefill_layout, prefill_rows)
    check_model(config, mesh, decode_layout, b.tokens.shape[0])
    params = jax.device_put(params, param_shardings(config, mesh, prefill_layout.ffn)(params))
    out = _generate(params, config, jnp.asarray(tokens), jnp.asarray(lengths), b.sampling,
                    jnp.asarray(b.stop_ids), jnp.asarray(b.max_new), mesh=mesh, prefill_layout=prefill_layout,
                    decode_layout=decode_layout, context=b.context, steps=b.steps, with_top=b.with_top,
                    int8_kv=check_kv_cache_dtype(kv_cache_dtype) == "int8")  # fmt: skip
    return b.results(jax.device_get(out))
