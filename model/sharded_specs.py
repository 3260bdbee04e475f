"""Where a layout puts the weights and the KV cache on a mesh, and the checks run before anything compiles.

Split out of model/sharded.py (which re-exports every name): the PartitionSpecs of the stored weights (from
partition/rules.py's split tables, which the cost model reads too; norms, mlp_norm and every bias are whole on
every chip, where each chip slices the block its activations need), placing params, the KV cache's split, and the
refusals (LayoutError / UserError naming the dim and the split) for a model, mesh, layout or batch that cannot work.
Axis alphabet (model/config.py): B batch, S cache, K kv heads, Q head dim, N layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params, ParamSpec, declare
from meshserve.model.quant import QuantizedArray
from meshserve.model.transformer import KVCache
from meshserve.partition.comm import LayerDims, LayoutError, check_layout
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
    gathered = not ffn_layout.startswith("ws")
    check_model(config, mesh, Layout(ffn_layout, "batch" if gathered else "heads"), mesh.size if gathered else 1)
    return jax.device_put(params, param_shardings(config, mesh, ffn_layout)(params))


def step_dims(config: ModelConfig, batch: int, tokens: int) -> LayerDims:
    """partition.comm's LayerDims of one step of `batch` rows and `tokens` tokens (context = tokens)."""
    return LayerDims(
        batch, tokens, tokens, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads, config.d_head,
        gated=config.mlp == "swiglu", serial=not config.parallel_block,
    )  # fmt: skip


def check_supported(config: ModelConfig) -> None:
    """Refuse a model the sharded steps cannot run at all, whatever the mesh and layout.

    Every architecture ModelConfig describes runs sharded: the parallel block (PaLM, Falcon) and the serial block
    (Llama, Mistral, Qwen2), q/k/v and linear biases (stored whole on every chip, each chip adds its slice) and
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
    """An empty KV cache placed in the decode layout's split."""
    check_model(config, mesh, layout, batch)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    kv = NamedSharding(mesh, kv_spec(config, mesh, layout, batch))
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv)
    lengths = jax.device_put(jnp.zeros((batch,), jnp.int32), NamedSharding(mesh, P()))
    return KVCache(k=zeros(), v=zeros(), lengths=lengths)
