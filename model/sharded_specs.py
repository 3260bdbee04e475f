"""Where a layout puts the weights and the KV cache on a mesh, and the checks run before anything compiles.

Split out of model/sharded.py (which re-exports every name): the PartitionSpecs of the stored weights (from
partition/rules.py's split tables, which the cost model reads too; norms, mlp_norm and every bias are whole on
every chip, where each chip slices the block its activations need), placing params, the KV cache's split, and the
refusals (LayoutError / UserError naming the dim and the split) for a model, mesh, layout or batch that cannot work,
and the model as a mesh runs it: a grouped-query model whose kv heads the heads split does not divide gets each kv
head repeated (`mesh_config`, `replicate_for_mesh`; exact, at the cost of r times the KV cache and K/V weights).
Axis alphabet (model/config.py): B batch, S cache, K kv heads, Q head dim, N layers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.errors import UserError
from meshserve.model import kv_quant
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params, ParamSpec, declare, replicate_kv_params
from meshserve.model.quant import QuantizedArray
from meshserve.model.transformer import KVCache
from meshserve.partition.comm import LayerDims, LayoutError, MeshShape, check_layout
from meshserve.partition.dims import heads_split
from meshserve.partition.mesh import mesh_shape
from meshserve.partition.rules import Layout, Rules, attention_axes, rules_for, storage_of, weight_split

__all__ = [
    "param_specs",
    "param_shardings",
    "shard_params",
    "check_model",
    "check_supported",
    "check_params",
    "kv_spec",
    "init_cache",
    "step_dims",
    "mesh_config",
    "replicate_for_mesh",
]


def _leaf_specs(config: ModelConfig, rules: Rules) -> dict[str, Any]:
    """PartitionSpec per declared weight, as partition.rules.weight_split says (the cost model reads the same)."""

    def one(path, spec: ParamSpec) -> P:
        split = weight_split(path[0].key, spec.axes, spec.contract, rules.name, config.multi_query)
        return P(*(axes or None for axes in split))

    return jax.tree_util.tree_map_with_path(one, declare(config), is_leaf=lambda s: isinstance(s, ParamSpec))


def param_specs(config: ModelConfig, ffn_layout: str, params: Params | None = None) -> Any:
    """PartitionSpecs matching `params` (QuantizedArray leaves get values and scale specs; a scale is
    not split on its contracted, size-1 dims). Without params: the specs of plain (unquantised) weights."""
    specs = _leaf_specs(config, rules_for(ffn_layout))
    if params is None:
        return specs
    if isinstance(params["layers"], list):  # every mesh step scans the declared stacked weights, wq/wk/wv apart
        raise ValueError("a mesh runs the stacked layers: these are unrolled (unstack_layers, q/k/v fused as wqkv)")
    declared = declare(config)

    def one(spec: P, decl: ParamSpec, leaf: Any) -> Any:
        if isinstance(leaf, QuantizedArray):
            scale = P(*(None if a in decl.contract else s for a, s in zip(decl.axes, spec, strict=True)))
            return QuantizedArray(values=spec, scale=scale)
        return spec

    is_leaf = lambda x: isinstance(x, (P, ParamSpec, QuantizedArray))  # noqa: E731
    return jax.tree_util.tree_map(one, specs, declared, params, is_leaf=is_leaf)


def param_shardings(config: ModelConfig, mesh: Mesh, ffn_layout: str = "ws2d"):
    """A function abstract params -> NamedSharding tree, for `load_checkpoint(path, shardings=fn)`.

    A kv_heads dim the mesh axes do not divide (a grouped-query checkpoint's true kv heads, before
    `replicate_for_mesh` repeats them for this split) is stored whole on those axes, so the checkpoint still loads
    straight onto the mesh; every other dim splits as `param_specs` says (check_model refuses what cannot).
    """

    def whole_kv(spec: P, decl: ParamSpec, leaf: Any) -> P:
        dims = list(spec) + [None] * (len(decl.axes) - len(spec))
        for d, (axis, split) in enumerate(zip(decl.axes, dims, strict=True)):
            names = (split,) if isinstance(split, str) else split or ()
            if axis == "kv_heads" and names and leaf.shape[d] % math.prod(mesh.shape[a] for a in names):
                dims[d] = None
        return P(*dims)

    def fn(abstract: Params) -> Any:
        specs = param_specs(config, ffn_layout, abstract)
        declared = declare(config)
        is_leaf = lambda x: isinstance(x, (P, ParamSpec, QuantizedArray))  # noqa: E731

        def one(spec: Any, decl: ParamSpec, leaf: Any) -> Any:
            if isinstance(leaf, QuantizedArray):
                return QuantizedArray(NamedSharding(mesh, whole_kv(spec.values, decl, leaf.values)),
                                      NamedSharding(mesh, whole_kv(spec.scale, decl, leaf.scale)))  # fmt: skip
            return NamedSharding(mesh, whole_kv(spec, decl, leaf))

        return jax.tree_util.tree_map(one, specs, declared, abstract, is_leaf=is_leaf)

    return fn


def mesh_config(config: ModelConfig, mesh: Mesh | MeshShape, ffn_layout: str) -> ModelConfig:
    """`config` as it runs under `ffn_layout`'s weight storage on `mesh`: a grouped-query model's kv heads
    replicated the fewest times that the heads split (ws1d: all n chips; 2D storage: y·z) gives each chip whole kv
    heads (ModelConfig.for_kv_split). Unchanged when they already divide, for multi-query and multi-head models,
    and when no replication can work (check_model then refuses, naming H, K and the split)."""
    shape = mesh if isinstance(mesh, MeshShape) else mesh_shape(mesh)
    try:
        return config.for_kv_split(heads_split(ffn_layout, shape))
    except UserError:
        return config


def replicate_for_mesh(
    config: ModelConfig, params: Params, mesh: Mesh | MeshShape, ffn_layout: str, *, consume: bool = False
) -> tuple[ModelConfig, Params]:
    """(mesh_config, params with the kv weights repeated to match): what the mesh entry points run.

    With a Mesh, the repeated kv weights are produced straight in `ffn_layout`'s storage on it (each chip computes
    only its shard); with a MeshShape they stay where the originals were. Other weights are untouched. consume:
    delete each original kv weight once repeated. A model that needs no replication comes back as given.
    """
    target = mesh_config(config, mesh, ffn_layout)
    r = target.n_kv_heads // config.n_kv_heads
    if r == 1:
        return config, params
    shardings = None
    if isinstance(mesh, Mesh):
        abstract = jax.eval_shape(lambda p: replicate_kv_params(config, p, r), params)
        shardings = param_shardings(target, mesh, ffn_layout)(abstract)
    return target, replicate_kv_params(config, params, r, shardings, consume=consume)


def shard_params(params: Params, config: ModelConfig, mesh: Mesh, ffn_layout: str = "ws2d") -> Params:
    """Place params in the layout's storage (2D for every layout but ws1d) on `mesh`."""
    gathered = not ffn_layout.startswith("ws")
    check_model(config, mesh, Layout(ffn_layout, "batch" if gathered else "heads"), mesh.size if gathered else 1)
    return jax.device_put(params, param_shardings(config, mesh, ffn_layout)(params))


def step_dims(config: ModelConfig, batch: int, tokens: int) -> LayerDims:
    """partition.comm's LayerDims of one step of `batch` rows and `tokens` tokens (context = tokens)."""
    return LayerDims(
        batch, tokens, tokens, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads, config.d_head,
        gated=config.gated_mlp, serial=not config.parallel_block,
    )  # fmt: skip


def check_supported(config: ModelConfig) -> None:
    """Refuse a model the sharded steps cannot run at all, whatever the mesh and layout.

    Every architecture ModelConfig describes runs sharded: the parallel block (PaLM, Falcon) and the serial block
    (Llama, Mistral, Qwen2, Qwen3, Gemma 3 with its post norms and sliding windows), q/k/v and linear biases (stored whole on every chip, each chip adds its slice) and
    rope scaling. What a given mesh cannot split (heads, d_ff, vocab, batch) is refused by `check_model`. Kept as
    the one place the serving paths ask (serve, generate --mesh) before choosing a plan.
    """
    if not isinstance(config, ModelConfig):
        raise UserError(f"sharded steps need a ModelConfig, got {type(config).__name__}")


def check_model(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int) -> None:
    """Refuse (before any compile) a model, mesh, layout and batch that do not fit; messages name the dims."""
    check_supported(config)
    shape = mesh_shape(mesh)
    if config.vocab_size % shape.n:
        raise LayoutError(f"vocab_size V = {config.vocab_size} is not divisible by the {shape.n} chips of mesh {shape}")
    check_layout(layout.ffn, layout.attention, shape, step_dims(config, batch, 1))


def check_params(params: Params, config: ModelConfig, mesh: Mesh, layout: Layout) -> None:
    """Refuse params already placed on `mesh` in another storage (e.g. ws1d's for a ws2d step): jit would
    silently re-shard every weight on every call. Params not yet on this mesh (host / one device) pass."""
    specs = param_specs(config, layout.ffn, params)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    for (path, spec), leaf in zip(
        jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0], jax.tree_util.tree_leaves(params), strict=True
    ):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding) or sharding.mesh.devices.shape != mesh.devices.shape:
            continue
        if not sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim):
            name = jax.tree_util.keystr(path)
            raise LayoutError(
                f"params{name} is stored as {sharding.spec}, not as the {layout.ffn} layout's {spec} "
                f"({storage_of(layout.ffn)} storage); place them with shard_params(..., ffn_layout={layout.ffn!r})"
            )


def kv_spec(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int) -> P:
    """The KV cache's split [N, B, S, K, Q] under `layout` for `batch` rows."""
    b, _, kv = attention_axes(layout, mesh_shape(mesh), batch, config.multi_query)
    return P(None, b or None, None, kv or None, None)


def init_cache(config: ModelConfig, mesh: Mesh, layout: Layout, batch: int, max_len: int, dtype=jnp.bfloat16):
    """An empty KV cache placed in the decode layout's split (int8: `kv_quant.Int8KV`, exponents split alike)."""
    check_model(config, mesh, layout, batch)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    empty = lambda: kv_quant.zeros(shape, dtype)  # noqa: E731
    kv = kv_quant.sharding_of(jax.eval_shape(empty), NamedSharding(mesh, kv_spec(config, mesh, layout, batch)))
    zeros = jax.jit(empty, out_shardings=kv)
    lengths = jax.device_put(jnp.zeros((batch,), jnp.int32), NamedSharding(mesh, P()))
    return KVCache(k=zeros(), v=zeros(), lengths=lengths)
