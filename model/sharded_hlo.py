"""HLO text of the sharded steps, for counting their collectives (tests hold them equal to partition/comm.py's lists).

Split out of model/sharded.py (which re-exports these): one decoder layer alone (`layer_hlo`), a whole decode step
(`decode_hlo`) and the phase switch (`insert_hlo`), compiled by XLA or as lowered (the program as written).
Read the collectives with `partition.hlo.collectives_in_hlo(text, mesh)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.model import layers
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params
from meshserve.model.sharded_layer import Plan, layer_fn, rope_qk, shard_map
from meshserve.model.sharded_specs import check_model, init_cache, kv_spec, param_specs
from meshserve.model.transformer import KVCache, compute_dtype
from meshserve.partition.mesh import mesh_shape
from meshserve.partition.ops import Ops
from meshserve.partition.rules import Layout

__all__ = ["layer_hlo", "decode_hlo", "insert_hlo"]


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
    plan = Plan(config, layout, mesh_shape(mesh), batch)
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
            q, k = rope_qk(q, k, pos, config, 0)  # layer 0's rotation: one layer's HLO
            if context:
                k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), 0, axis=1).astype(q.dtype)
                v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), 0, axis=1).astype(q.dtype)
            mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
            return layers.attend(q, k, v, mask)

        return layer_fn(x, p, plan, ops, attn)

    specs = (param_specs(config, layout.ffn, params)["layers"], x_spec, cache_spec, cache_spec)
    fn = jax.jit(shard_map(body, mesh, specs, x_spec))
    S = max(context, 1)
    args = (
        params["layers"],
        jax.ShapeDtypeStruct((batch, tokens, config.d_model), dtype),
        jax.ShapeDtypeStruct((batch, S, config.n_kv_heads, config.d_head), dtype),
        jax.ShapeDtypeStruct((batch, S, config.n_kv_heads, config.d_head), dtype),
    )
    lowered = fn.lower(*args)
    return lowered.compile().as_text() if compiled else lowered.as_text(dialect="hlo")


def decode_hlo(params: Params, config: ModelConfig, mesh: Mesh, layout: Layout, batch: int, context: int) -> str:
    """Compiled HLO text of one whole decode step (embedding, the scanned layers, logits) for `batch` rows
    over a cache of `context` positions; the layers' collectives sit once in the scan's while body."""
    check_model(config, mesh, layout, batch)
    cache = init_cache(config, mesh, layout, batch, context, compute_dtype(params))
    tokens = jnp.zeros((batch,), jnp.int32)
    from meshserve.model.sharded import _decode  # the step itself (sharded.py imports this module)

    return _decode.lower(params, config, tokens, cache, mesh=mesh, layout=layout).compile().as_text()


def insert_hlo(
    config: ModelConfig,
    mesh: Mesh,
    prefill_layout: Layout,
    decode_layout: Layout,
    batch: int,
    tokens: int,
    slots: int,
    context: int,
    dtype=jnp.bfloat16,
    compiled: bool = True,
) -> str:
    """HLO text of the phase switch: `batch` prefilled rows of `tokens` into a cache of `slots` rows."""  # fmt: skip
    check_model(config, mesh, prefill_layout, batch)
    check_model(config, mesh, decode_layout, slots)
    shape = lambda b, t: (config.n_layers, b, t, config.n_kv_heads, config.d_head)  # noqa: E731
    sds = lambda s, spec, dt=dtype: jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, spec))  # noqa: E731
    cache_kv = sds(shape(slots, context), kv_spec(config, mesh, decode_layout, slots))
    new_kv = sds(shape(batch, tokens), kv_spec(config, mesh, prefill_layout, batch))
    cache = KVCache(k=cache_kv, v=cache_kv, lengths=sds((slots,), P(), jnp.int32))
    from meshserve.model.sharded import _insert  # the step itself (sharded.py imports this module)

    lowered = _insert.lower(cache, new_kv, new_kv, sds((batch,), P(), jnp.int32), sds((batch,), P(), jnp.int32),
                            config=config, mesh=mesh, prefill_layout=prefill_layout, decode_layout=decode_layout)  # fmt: skip
    return lowered.compile().as_text() if compiled else lowered.as_text(dialect="hlo")
