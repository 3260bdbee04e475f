"""Sharded serving: the engine's `ModelSteps` on a device mesh, with the layouts the serving plan chose.

On one device the engine runs model/transformer.py's steps; on a mesh of n > 1 devices it runs model/sharded.py's
(each step one shard_map with the paper's explicit collectives). The decode layout is one for the whole server,
because the KV cache lives in its split; each prefill (and score) bucket runs the layout the plan chose for it, as
long as it reads the same weight storage, and `insert` reshards its KV output into the decode split (the phase
switch). Decode runs only the full-batch bucket on a mesh: slicing a batch-sharded cache would reshard it.

Extend steps (prefix caching: a prefill over a cached prefix) run model/transformer.py's plain prefill and insert,
partitioned by XLA's SPMD partitioner (the mesh's axes are Auto) from the placed weights and the decode-split cache,
with sharding constraints that keep the cache in the decode split; their collectives are XLA's, not written out.
Verify steps (speculative decoding) are extends too, of all B slots at once in the decode layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.errors import UserError
from meshserve.model import kv_quant
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params
from meshserve.model.sampling import GUIDE_FIELDS, SAMPLING_FIELDS, TokenHistory
from meshserve.serving.engine_steps import DecodeState, ModelSteps
from meshserve.serving.plan import EnginePlan, StepPlan

__all__ = ["mesh_steps"]


def _valid(config: ModelConfig, mesh: Mesh, layout: Any, batch: int) -> bool:
    from meshserve.model.sharded import check_model

    try:
        check_model(config, mesh, layout, batch)
        return True
    except UserError:
        return False


def _layout_for(config: ModelConfig, mesh: Mesh, step: StepPlan, storage_ffn: str):
    """The plan's layout for a prefill/score bucket, or the nearest one that shares the weights and fits the batch."""
    from meshserve.partition.rules import Layout, storage_of

    ffn = step.ffn_layout if storage_of(step.ffn_layout) == storage_of(storage_ffn) else storage_ffn
    for layout in (Layout(ffn, step.attention_layout), Layout(storage_ffn, "heads"), Layout(storage_ffn, "batch")):
        if _valid(config, mesh, layout, step.batch):
            return layout
    raise UserError(f"no layout of the {storage_ffn} weight storage fits {step.phase} batch {step.batch} on "
                    f"mesh {dict(mesh.shape)} (heads {config.n_heads}, d_ff {config.d_ff})")  # fmt: skip


def _extend_prefill(params, config, tokens, lengths, prefix, all_logits, kv: NamedSharding):
    """`transformer.prefill` over a cached prefix, partitioned by XLA's SPMD partitioner from the placed arrays.

    params sit in the decode layout's weight storage; prefix.k, v [N, b, C, K, Q] (rows gathered from the decode
    cache) and the new k, v [N, b, T, K, Q] are pinned to the bucket's prefill KV split `kv`, and the logits
    ([b, V] or [b, T, V]) replicated, as sharded.prefill returns them.
    """
    from meshserve.model.transformer import Prefix, prefill

    def pin(a):  # an array, or an int8 cache's rows (values and exponents, kv_quant.Int8KV)
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, a, kv_quant.sharding_of(a, kv))

    int8_kv = isinstance(prefix.k, kv_quant.Int8KV)  # rows of an int8 cache: the new k, v go in on its grid
    with jax.named_scope("extend_prefill"):
        prefix = Prefix(pin(prefix.k), pin(prefix.v), prefix.lengths)
        logits, k, v = prefill(params, config, tokens, lengths, all_logits=all_logits, prefix=prefix, int8_kv=int8_kv)
        # Replicated logits, as sharded.prefill returns them: left free, the vocab split of the unembedding spreads
        # through sampling into the decode state's [B, V] history, whose input sharding the engine leaves open.
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(kv.mesh, P()))
        return logits, pin(k), pin(v)


def _extend_insert(cache, k, v, lengths, slots, prefix, decode: Any):
    """`transformer.insert` with a prefix (rows prefix, then the new tokens) into the decode cache, the cache pinned
    to the decode state's sharding `decode` (a KVCache of NamedShardings) on the way in and out: the scatter stays
    in its split, and the prefill's head split cannot spread back into the cache the step reads (the engine compiles
    it from an unplaced abstract state), which would reshard the whole cache every step and void its donation."""
    from meshserve.model.transformer import insert

    with jax.named_scope("extend_insert"):
        cache = jax.tree_util.tree_map(jax.lax.with_sharding_constraint, cache, decode)
        new = insert(cache, k, v, lengths, slots, prefix=prefix)
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, new, decode)


def mesh_steps(config: ModelConfig, params: Params, plan: EnginePlan) -> tuple[Params, ModelSteps, EnginePlan]:
    """(params placed on the mesh, the sharded steps, the plan as it will run) for plan.mesh_axes (n > 1)."""
    from meshserve.model import sharded
    from meshserve.model.sharded_specs import check_supported
    from meshserve.partition.comm import MeshShape
    from meshserve.partition.mesh import make_mesh
    from meshserve.partition.rules import Layout

    check_supported(config)  # named as such, not as "no decode layout fits" below
    shape = MeshShape(plan.mesh_axes["x"], plan.mesh_axes["y"], plan.mesh_axes["z"])
    mesh = make_mesh(shape, jax.devices()[: shape.n])
    B = plan.max_batch
    planned = next(s for s in plan.steps if s.phase == "decode" and s.batch == B)
    decode = Layout(planned.ffn_layout, planned.attention_layout)
    if not _valid(config, mesh, decode, B):
        decode = next((lay for att in ("batch", "heads") if _valid(config, mesh, lay := Layout("ws2d", att), B)), None)
        if decode is None:
            raise UserError(f"no decode layout fits batch {B} on mesh {shape} (heads {config.n_heads})")
    layouts: dict[tuple[int, int], Any] = {}
    steps = []
    for step in plan.steps:
        if step.phase == "decode":
            if step.batch == B:
                steps.append(dataclasses.replace(step, ffn_layout=decode.ffn, attention_layout=decode.attention))
            continue
        layout = layouts.setdefault((step.batch, step.length), _layout_for(config, mesh, step, decode.ffn))
        steps.append(dataclasses.replace(step, ffn_layout=layout.ffn, attention_layout=layout.attention))
    run_plan = dataclasses.replace(
        plan, decode_batches=(B,), decode_contexts=(plan.max_context,), steps=tuple(steps), source=f"{plan.source}+mesh"
    )
    # A verify step (speculative decoding: engine_steps.verify_rows) is an extend of every slot's last token and its
    # drafts [B, k + 1] over the decode cache: it runs in the decode layout itself, so the cache it reads as the
    # prefix and the k, v it writes back keep the decode split (no reshard of the cache).
    for b in run_plan.verify_batches:
        layouts.setdefault((b, plan.speculative_tokens + 1), decode)

    replicated = NamedSharding(mesh, P())
    kv = NamedSharding(mesh, sharded.kv_spec(config, mesh, decode, B))
    if plan.kv_cache_dtype == "int8":  # values [N, B, S, K, Q] and exponents [N, B, S, K], split alike
        kv = kv_quant.int8_sharding(kv)
    from meshserve.model.transformer import KVCache

    state_sharding = DecodeState(
        cache=KVCache(k=kv, v=kv, lengths=replicated), last=replicated, step=replicated,
        sampling={name: replicated for name in (*SAMPLING_FIELDS, *GUIDE_FIELDS)},
        history=TokenHistory(in_prompt=replicated, counts=replicated), logits=replicated,
    )  # fmt: skip

    def prefill(params, config, tokens, lengths, all_logits=False, prefix=None, int8_kv=False):
        layout = layouts[tokens.shape]  # [b, T]: one layout per bucket
        if prefix is not None:
            return _extend_prefill(params, config, tokens, lengths, prefix, all_logits, bucket_kv(layout, tokens))
        return sharded.prefill(params, config, tokens, lengths, mesh=mesh, layout=layout, all_logits=all_logits,
                               int8_kv=int8_kv)  # fmt: skip

    def insert(cache, k, v, lengths, slots, prefix=None):
        layout = layouts[(k.shape[1], k.shape[2])]  # k [N, b, T, K, Q] in that bucket's prefill split
        if prefix is not None:
            return _extend_insert(cache, k, v, lengths, slots, prefix, state_sharding.cache)
        return sharded.insert(cache, k, v, lengths, slots, config=config, mesh=mesh, prefill_layout=layout,
                              decode_layout=decode)  # fmt: skip

    def bucket_kv(layout, tokens) -> NamedSharding:
        return NamedSharding(mesh, sharded.kv_spec(config, mesh, layout, tokens.shape[0]))

    def decode_step(params, config, tokens, cache):
        return sharded.decode_step(params, config, tokens, cache, mesh=mesh, layout=decode)

    placed = jax.device_put(params, sharded.param_shardings(config, mesh, decode.ffn)(params))
    return placed, ModelSteps(prefill, decode_step, insert, state_sharding, decode_reads_rows=False), run_plan
