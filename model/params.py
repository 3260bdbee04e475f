"""Every weight declared once: shape, logical axes, which axes a matmul contracts, and its init.

Init, abstract shapes (`jax.eval_shape`), shardings (partition/ maps the logical axes to mesh axes),
byte counts (analytics/) and int8 quantisation all derive from `declare(config)`.
Layer weights are stacked on a leading `layers` axis so the decoder scans over them.

Logical axis names: layers, vocab, embed (E), mlp (F), heads (H), kv_heads (K), head_dim (Q).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.model.config import ModelConfig
from meshserve.model.quant import QuantizedArray, dequantize, int8_matmul_mode, quantize

__all__ = [
    "ParamSpec",
    "declare",
    "init_params",
    "abstract_params",
    "param_count",
    "logical_axes",
    "quantize_params",
    "cast_params",
    "params_nbytes",
    "replicate_kv_params",
    "unstack_layers",
    "FUSED_WEIGHTS",
    "Params",
    "WEIGHT_DTYPES",
]

# A params tree: nested dicts whose leaves are arrays or QuantizedArray.
Params = dict[str, Any]

WEIGHT_DTYPES = ("f32", "bf16", "int8")


@dataclass(frozen=True)
class ParamSpec:
    """One weight: shape, logical axes (one name per dim), contracted axes (for int8 scales), init."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # normal (std = init_std), ones, zeros
    init_std: float = 0.02
    contract: tuple[str, ...] = ()  # the axes a matmul sums over; () = not a matmul weight

    @property
    def quantizable(self) -> bool:
        return bool(self.contract)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def declare(config: ModelConfig) -> dict[str, Any]:
    """The model's weights as a tree of ParamSpec. Shapes in the axis alphabet of model/config.py."""
    c = config
    N, E, F, H, K, Q, V = c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.d_head, c.vocab_size
    std_in = 1.0 / math.sqrt(E)
    # Output projections get a depth-scaled init so the residual stream stays O(1) (GPT-2 style).
    std_out = 1.0 / math.sqrt(2 * N * max(F, H * Q))

    # A (1 + w) norm (Gemma) starts at w = 0: the same identity scale.
    unit = "zeros" if c.norm_scale_offset else "ones"

    def norm(prefix: tuple[int, ...] = (N,), prefix_axes: tuple[str, ...] = ("layers",)) -> dict:
        spec = {"scale": ParamSpec(prefix + (E,), prefix_axes + ("embed",), init=unit)}
        if c.norm == "layernorm" and c.norm_bias:
            spec["bias"] = ParamSpec(prefix + (E,), prefix_axes + ("embed",), init="zeros")
        return spec

    def bias(shape: tuple[int, ...], axes: tuple[str, ...]) -> ParamSpec:
        return ParamSpec((N,) + shape, ("layers",) + axes, init="zeros")

    layer: dict[str, Any] = {
        "attn_norm": norm(),
        "wq": ParamSpec((N, E, H, Q), ("layers", "embed", "heads", "head_dim"), init_std=std_in, contract=("embed",)),
        "wk": ParamSpec(
            (N, E, K, Q), ("layers", "embed", "kv_heads", "head_dim"), init_std=std_in, contract=("embed",)
        ),
        "wv": ParamSpec(
            (N, E, K, Q), ("layers", "embed", "kv_heads", "head_dim"), init_std=std_in, contract=("embed",)
        ),
        "wo": ParamSpec(
            (N, H, Q, E),
            ("layers", "heads", "head_dim", "embed"),
            init_std=std_out,
            contract=("heads", "head_dim"),
        ),
        "w_up": ParamSpec((N, E, F), ("layers", "embed", "mlp"), init_std=std_in, contract=("embed",)),
        "w_down": ParamSpec((N, F, E), ("layers", "mlp", "embed"), init_std=std_out, contract=("mlp",)),
    }
    if c.gated_mlp:  # SwiGLU, GeGLU
        layer["w_gate"] = ParamSpec((N, E, F), ("layers", "embed", "mlp"), init_std=std_in, contract=("embed",))
    if not c.parallel_block:
        layer["mlp_norm"] = norm()
    if c.post_norms:  # Gemma 3: norms of the attention and MLP outputs before their residual adds
        layer["attn_out_norm"], layer["mlp_out_norm"] = norm(), norm()
    if c.qk_norm:  # Qwen3: one RMSNorm scale over Q, shared by every head (replicated: head_dim is never split)
        layer["q_norm"] = {"scale": ParamSpec((N, Q), ("layers", "head_dim"), init=unit)}
        layer["k_norm"] = {"scale": ParamSpec((N, Q), ("layers", "head_dim"), init=unit)}
    if c.linear_bias or c.qkv_bias:  # qkv_bias alone: Qwen2's q, k and v biases, none on o or the MLP
        layer.update(
            bq=bias((H, Q), ("heads", "head_dim")),
            bk=bias((K, Q), ("kv_heads", "head_dim")),
            bv=bias((K, Q), ("kv_heads", "head_dim")),
        )
    if c.linear_bias:
        layer.update(
            bo=bias((E,), ("embed",)),
            b_up=bias((F,), ("mlp",)),
            b_down=bias((E,), ("embed",)),
        )
        if c.gated_mlp:
            layer["b_gate"] = bias((F,), ("mlp",))
    tree: dict[str, Any] = {
        "embed": ParamSpec((V, E), ("vocab", "embed"), init_std=0.02),
        "layers": layer,
        "final_norm": norm((), ()),
    }
    if not c.shared_embedding:
        tree["unembed"] = ParamSpec((E, V), ("embed", "vocab"), init_std=std_in, contract=("embed",))
    return tree


def _is_spec(x: object) -> bool:
    return isinstance(x, ParamSpec)


def _init_one(spec: ParamSpec, key: jax.Array, dtype) -> jax.Array:
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (spec.init_std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights from the declaration (padded heads, if any, are zero)."""
    specs = declare(config)
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [_init_one(s, k, dtype) for s, k in zip(leaves, keys, strict=True)])
    if config.true_heads and config.true_heads < config.n_heads:
        layer = params["layers"]
        layer["wq"] = layer["wq"].at[:, :, config.true_heads :].set(0)
        layer["wo"] = layer["wo"].at[:, config.true_heads :].set(0)
    return params


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> Params:
    """ShapeDtypeStructs of every weight, with no allocation."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, from the declared shapes via `jax.eval_shape` (no allocation)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(config))))


def logical_axes(config: ModelConfig) -> dict[str, Any]:
    """Tree of logical-axis tuples with the structure of the params tree (before quantisation)."""
    return jax.tree_util.tree_map(lambda s: s.axes, declare(config), is_leaf=_is_spec)


def map_with_specs(fn: Callable[[ParamSpec, Any], Any], config: ModelConfig, params: Params) -> Params:
    """Apply fn(spec, leaf) over params, where QuantizedArray leaves count as one leaf."""
    specs = declare(config)
    return jax.tree_util.tree_map(fn, specs, params, is_leaf=lambda x: _is_spec(x) or isinstance(x, QuantizedArray))


def quantize_params(config: ModelConfig, params: Params) -> Params:
    """int8 for every matmul weight (per output channel); embedding, norms and biases stay bf16."""

    def one(spec: ParamSpec, w: Any) -> Any:
        if isinstance(w, QuantizedArray):
            return w
        if spec.quantizable:
            return quantize(w, [spec.axes.index(a) for a in spec.contract])
        return w.astype(jnp.bfloat16)

    return map_with_specs(one, config, params)


def cast_params(config: ModelConfig, params: Params, weights: str) -> Params:
    """Params in one of WEIGHT_DTYPES: f32 and bf16 cast every leaf, int8 quantises matmul weights."""
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
    if weights == "int8":
        return quantize_params(config, params)
    dtype = jnp.float32 if weights == "f32" else jnp.bfloat16

    def one(spec: ParamSpec, w: Any) -> Any:
        if isinstance(w, QuantizedArray):
            return dequantize(w, dtype)
        return w.astype(dtype)

    return map_with_specs(one, config, params)


_QKV = ("wq", "wk", "wv")  # fused by unstack_layers, in this order on the heads axis, into "wqkv"
_OUT = ("wo", "w_down")  # a parallel block's output projections: fused on the contracted axis into "wo_down"
_PADDED_WO = "wo_padded"  # an int8 wo [H, Q, E] stored as [H·Q + zero rows, E] by unstack_layers (`_pad_wo`)
FUSED_WEIGHTS = ("wqkv", "wo_down", _PADDED_WO)  # the per-layer weights unstack_layers makes: not in the declared tree


def unstack_layers(params: Params, *, consume: bool = False, int8_rows: bool = False) -> Params:
    """The same weights with `layers` as a list of per-layer trees (the decoder then unrolls its layer loop).

    Each layer's wq [E, H, Q], wk and wv [E, K, Q] become one "wqkv" [E, H + 2K, Q] (concatenated on the heads
    axis; int8: values and scales alike), which `layers.qkv_projection` runs as one matmul: fewer kernels per decode
    step on a GPU (falcon-7b bf16, deviceless H100 compile: wk and wv were 3 reduction kernels beside wq's GEMM;
    21 -> 18 kernels per layer). Fused here, once: a concatenation inside the step was copied on every step
    (`transformer._attend_rotating` concatenates wqkv with w_gate and w_up in the step: XLA reads that one inside
    its GEMM fusion, in the deviceless compile).

    consume: delete each stacked array once its N per-layer slices exist, so the weights never sit in device memory
    twice: the peak is the weights plus one stacked leaf (a 7B model's w_up: 5 GiB of its 14), not twice the
    weights; each layer's q, k, v slices are deleted once fused (one layer's q, k, v held twice at a time). The
    caller must not use `params` afterwards.
    int8_rows: store every int8 layer weight with its contracted axes last (model/int8_rows.py, for
    MESHSERVE_INT8_MATMUL=rowsum), one per-layer leaf at a time.

    A parallel block's wo [H, Q, E] and w_down [F, E] (16- or 32-bit) become one "wo_down" [H·Q + F, E], stacked
    on the contracted axis (plus zero rows: `_out_padding`), which `layers.parallel_output` runs as one matmul
    (falcon-7b bf16 with the decode attention kernel, deviceless H100 compile: 309 -> 277 kernels per step). int8
    keeps them apart: each has its own scale per output channel, and one matmul can apply only one.

    An int8 wo in the declared layout (not int8_rows, which pads nothing, nor "pallas", whose tuning file keys the
    declared shape) becomes "wo_padded" [H·Q + `_out_padding` zero rows, E] (scale [1, E]; `layers.attention_output`):
    XLA's split-K GEMM otherwise wrote a padded bf16 copy of every layer's wo per decode step (falcon-7b int8 at batch
    1: 1278 MiB per step, deviceless H100 compile; 26 us per layer on an H200).
    """
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    fused = {"wqkv": (_QKV, _fuse_qkv)} if _fusable(layers, _QKV, int8=True) else {}
    # One norm per layer (no mlp_norm: `declare`) is the parallel block, whose two projections add up.
    if "mlp_norm" not in layers and _fusable(layers, _OUT, int8=False):
        fused["wo_down"] = (_OUT, _fuse_out)
    parts_of = {part for names, _ in fused.values() for part in names}
    per_layer = _unstack({name: leaf for name, leaf in layers.items() if name not in parts_of}, consume, int8_rows)
    for name, (names, fuse) in fused.items():  # sliced in the declared layout: rows_first applies to the fused one
        sliced = [_unstack(layers[part], consume, False) for part in names]
        for i, layer in enumerate(per_layer):
            parts = [s[i] for s in sliced]
            layer[name] = fuse(*parts, int8_rows=int8_rows)
            if consume:
                _delete(parts, ready=layer[name])
            for s in sliced:
                s[i] = None  # no reference left: a slice goes as soon as its layer is fused
    for layer in per_layer:
        if (wo := _paddable_wo(layer.get("wo"))) is not None:
            layer[_PADDED_WO] = _pad_wo(wo)
            del layer["wo"]
            if consume:
                _delete([wo], ready=layer[_PADDED_WO])
    return dict(params, layers=per_layer)


def _paddable_wo(wo: Any) -> QuantizedArray | None:
    """wo [H, Q, E] if it is int8 in the declared layout, H·Q takes zero rows (`_out_padding`) and the int8 matmul
    is not "pallas" (its tuning file keys the kernel by the declared shape), else None."""
    if not isinstance(wo, QuantizedArray) or wo.perm is not None:
        return None
    H, Q, _ = wo.shape
    return wo if _out_padding(H * Q) and int8_matmul_mode() != "pallas" else None


def _pad_wo(wo: QuantizedArray) -> QuantizedArray:
    """int8 wo [H, Q, E] (scale [1, 1, E]) -> wo_padded: values [H·Q + `_out_padding` zero rows, E], scale [1, E].
    Exact: a zero row meets a zero of the activation (`layers.attention_output`), and the per-output-channel scale
    over E does not depend on the contracted axis."""
    H, Q, E = wo.shape
    return QuantizedArray(values=_stack_rows(wo.values, zero_rows=_out_padding(H * Q)), scale=wo.scale.reshape(1, E))


def _fusable(layers: dict[str, Any], names: tuple[str, ...], int8: bool) -> bool:
    """Whether the weights `names` are all there and of one kind (plain arrays of one dtype, or, if int8, int8 in
    the declared layout), so that their concatenation is one weight of that kind."""
    ws = [layers.get(name) for name in names]
    if any(w is None for w in ws):
        return False
    if int8 and all(isinstance(w, QuantizedArray) for w in ws):
        return all(w.perm is None for w in ws)
    return not any(isinstance(w, QuantizedArray) for w in ws) and len({w.dtype for w in ws}) == 1


@partial(jax.jit, static_argnames="int8_rows")
def _fuse_qkv(wq: Any, wk: Any, wv: Any, int8_rows: bool = False) -> Any:
    """wq [E, H, Q], wk, wv [E, K, Q] -> wqkv [E, H + 2K, Q]; int8: values, and scales [1, h, Q], concatenated on
    the same (heads) axis, since each scale is per output channel. int8_rows: stored contracted-axes-last."""
    if isinstance(wq, QuantizedArray):
        from meshserve.model.int8_rows import rows_first

        fused = QuantizedArray(
            values=jnp.concatenate([wq.values, wk.values, wv.values], axis=1),
            scale=jnp.concatenate([wq.scale, wk.scale, wv.scale], axis=1),
        )
        return rows_first(fused) if int8_rows else fused
    return jnp.concatenate([wq, wk, wv], axis=1)


def _fuse_out(wo: jax.Array, w_down: jax.Array, int8_rows: bool = False) -> jax.Array:
    """wo [H, Q, E], w_down [F, E] -> wo_down [H·Q + F + `_out_padding` zero rows, E] (plain arrays: int8_rows does
    not apply)."""
    H, Q, _ = wo.shape
    return _stack_rows(wo, w_down, zero_rows=_out_padding(H * Q + w_down.shape[0]))


@partial(jax.jit, static_argnames="zero_rows")
def _stack_rows(*parts: jax.Array, zero_rows: int) -> jax.Array:
    """Weights [..., E] of one dtype (wo [H, Q, E], w_down [F, E]) as rows [rows + zero_rows, E], in order."""
    E = parts[0].shape[-1]
    return jnp.concatenate([w.reshape(-1, E) for w in parts] + [jnp.zeros((zero_rows, E), parts[0].dtype)])


def _out_padding(rows: int) -> int:
    """Zero rows that bring an output projection's contracted axis (wo_down's, an int8 wo's) to a multiple of 256,
    for a large weight. A batch-1 GEMM runs split-K on a GPU, and XLA pads its K to a multiple of splits x 8 on every
    call, copying the weight too: falcon-7b's 22720 rows were copied into a [22784, 4544] buffer every step
    (deviceless H100 compile, 16 splits), and its int8 wo's 4544 into a bf16 [4608, 4544] one. A multiple of 256
    serves up to 32 splits, for at most 255 rows of zeros (0.3% of falcon-7b's); a small weight is not split."""
    return -rows % 256 if rows >= 4096 else 0


def _unstack(tree: Any, consume: bool, int8_rows: bool) -> list[Any]:
    """The N per-layer trees of a tree of stacked leaves [N, ...] (QuantizedArray leaves count as one leaf);
    consume: each stacked leaf deleted once sliced."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, QuantizedArray))
    n = leaves[0].shape[0]
    per_layer: list[list[Any]] = [[] for _ in range(n)]
    for leaf in leaves:
        slices = [leaf[i] if not isinstance(leaf, QuantizedArray) else _layer_of(leaf, i, int8_rows) for i in range(n)]
        if consume:
            _delete([leaf], ready=slices)
        for layer, piece in zip(per_layer, slices, strict=True):
            layer.append(piece)
    return [jax.tree_util.tree_unflatten(treedef, layer) for layer in per_layer]


def _delete(trees: list[Any], ready: Any) -> None:
    """Delete every device array of `trees` once `ready` (computed from them) is done reading them."""
    jax.block_until_ready(ready)
    for tree in trees:
        for array in [tree.values, tree.scale] if isinstance(tree, QuantizedArray) else [tree]:
            if isinstance(array, jax.Array):
                array.delete()


def _layer_of(w: QuantizedArray, i: int, int8_rows: bool) -> QuantizedArray:
    """Layer i of a stacked int8 weight, stored contracted-axes-last when int8_rows."""
    from meshserve.model.int8_rows import rows_first

    layer = QuantizedArray(values=w.values[i], scale=w.scale[i])
    return rows_first(layer) if int8_rows else layer


def replicate_kv_params(
    config: ModelConfig, params: Params, r: int, shardings: Any = None, *, consume: bool = False
) -> Params:
    """`params` of `config` with every kv head repeated `r` times in a row, for `config.replicate_kv_heads(r)`.

    wk, wv [N, E, K, Q] -> [N, E, K·r, Q] and bk, bv [N, K, Q] -> [N, K·r, Q] (when declared) by repeat-interleave
    along the kv_heads axis: new head j' is old head j' // r, as query head h's group index h // (H/K) needs. int8
    weights (QuantizedArray) repeat values and scales alike (the scale keeps the kv axis). Other leaves are the same
    objects. Only the kv weights are copied (K/H of wq's size each, before the repeat).

    shardings: a tree like the result's (e.g. `sharded.param_shardings(config.replicate_kv_heads(r), mesh, ...)`)
    or None: each repeated leaf is produced directly in its sharding, so no chip holds more than its shard of it.
    consume: delete each original kv leaf once its repeat exists (the caller must not use `params` afterwards).
    """
    if r == 1:
        return params
    if isinstance(params["layers"], list):
        raise ValueError("replicate_kv_params needs the stacked layers (before unstack_layers)")
    declared = declare(config)["layers"]
    layer = dict(params["layers"])
    targets = None if shardings is None else shardings["layers"]
    for name, spec in declared.items():
        if not isinstance(spec, ParamSpec) or "kv_heads" not in spec.axes:
            continue
        axis = spec.axes.index("kv_heads")
        repeat = jax.jit(lambda a, axis=axis: jax.tree_util.tree_map(lambda x: jnp.repeat(x, r, axis=axis), a),
                         out_shardings=None if targets is None else targets[name])  # fmt: skip
        old = layer[name]
        layer[name] = repeat(old)
        if consume:
            jax.block_until_ready(layer[name])
            for leaf in jax.tree_util.tree_leaves(old):
                if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                    leaf.delete()
    return dict(params, layers=layer)


def params_nbytes(params: Params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))
