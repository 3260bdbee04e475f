"""A layout is data: which mesh axes each logical axis is split over, one constructor per paper layout.

Weight storage (`Rules.weights`, logical axis -> mesh axes, in split order):
  ws1d:  W_in E·F_xyz, heads H_xyz (PAPER.md 1D weight-stationary).
  2D:    W_in E_x·F_yz, heads H_yz: ws2d and every weight-gathered layout read these same arrays, so a server
         switches between WS and WG per pass with no weight movement. The yz split is stored z-major
         (mesh axes ("z", "y")) so that a weight-gather over y (wg-xy) leaves contiguous z blocks.
Activations (`Rules.residual`): the residual stream [B, L, E] between layers.
The embedding table splits its vocabulary over every axis in all layouts (`TABLE_RULES`); norms are replicated.
Multi-query K/V weights (one kv head) are never split over heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.partition.comm import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    MESH_AXES,
    LayoutError,
    MeshShape,
    attention_batch_axes,
    gathered_axes,
)

__all__ = [
    "Layout",
    "Rules",
    "TABLE_RULES",
    "make_rules_one_d",
    "make_rules_two_d",
    "make_rules_weight_gathered",
    "rules_for",
    "check_rules",
    "attention_axes",
    "storage_of",
    "weight_split",
    "weight_bytes_per_chip",
]

# Bytes per element of each stored leaf in a weights mode: int8 quantises matmul weights (bf16 scales, one per
# output channel); every other leaf (norms, the embedding) stays bf16, as model.params.quantize_params stores them.
_MATMUL_BYTES = {"f32": 4, "bf16": 2, "int8": 1}
_OTHER_BYTES = {"f32": 4, "bf16": 2, "int8": 2}

YZ = ("z", "y")  # the model-parallel split of the 2D storage, z-major (see module docstring)
TABLE_RULES = {"vocab": MESH_AXES, "embed": ()}


@dataclass(frozen=True)
class Layout:
    """One phase's layout: the feed-forward layout and the attention layout (heads or batch)."""

    ffn: str = "ws2d"
    attention: str = "heads"
    overlap: bool = False  # ws2d only: looped collective einsum for the input and output projections

    def __post_init__(self) -> None:
        if self.ffn not in FFN_LAYOUTS:
            raise LayoutError(f"layout must be one of {', '.join(FFN_LAYOUTS)}, got {self.ffn!r}")
        if self.attention not in ATTENTION_LAYOUTS:
            raise LayoutError(f"attention must be one of {', '.join(ATTENTION_LAYOUTS)}, got {self.attention!r}")
        if self.overlap and self.ffn != "ws2d":
            raise LayoutError(f"collective matmul overlap is a ws2d option, not {self.ffn}")


@dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axes (split order) for the stored weights and for the residual stream."""

    name: str
    weights: dict[str, tuple[str, ...]]
    residual: dict[str, tuple[str, ...]]
    gathered: tuple[str, ...] = ()  # weight-gathered: axes the weights are all-gathered over before use
    storage: str = field(default="2d")


def check_rules(table: dict[str, tuple[str, ...]], what: str = "rules") -> dict[str, tuple[str, ...]]:
    """Refuse a table that puts two logical axes on one mesh axis (their splits would collide)."""
    seen: dict[str, str] = {}
    for logical, axes in table.items():
        for axis in axes:
            if axis not in MESH_AXES:
                raise LayoutError(f"{what}: {logical} -> unknown mesh axis {axis!r}")
            if axis in seen:
                raise LayoutError(f"{what}: mesh axis {axis} holds both {seen[axis]} and {logical}")
            seen[axis] = logical
    return table


def _weights_one_d() -> dict[str, tuple[str, ...]]:
    # heads and kv_heads, and mlp, never meet in one weight, so they share the axes
    return {"embed": (), "mlp": MESH_AXES, "heads": MESH_AXES, "kv_heads": MESH_AXES}


def _weights_two_d() -> dict[str, tuple[str, ...]]:
    return {"embed": ("x",), "mlp": YZ, "heads": YZ, "kv_heads": YZ}


def make_rules_one_d() -> Rules:
    """1D weight-stationary: W_in E·F_xyz, activations BLE_xyz."""
    for logical in ("mlp", "heads", "kv_heads"):
        check_rules({"embed": (), logical: MESH_AXES}, "ws1d weights")
    return Rules("ws1d", _weights_one_d(), check_rules({"batch": (), "embed": MESH_AXES}), storage="1d")


def make_rules_two_d() -> Rules:
    """2D weight-stationary: W_in E_x·F_yz, activations BLE_xyz."""
    check_rules({"embed": ("x",), "mlp": YZ}, "ws2d weights")
    return Rules("ws2d", _weights_two_d(), check_rules({"batch": (), "embed": MESH_AXES}))


def make_rules_weight_gathered(axes: tuple[str, ...]) -> Rules:
    """Weight-gathered over `axes` (x, xy or xyz): 2D-stored weights, activations B_axes·L·E_rest."""
    rest = tuple(a for a in YZ if a not in axes)
    name = "wg-" + "".join(axes)
    return Rules(name, _weights_two_d(), check_rules({"batch": axes, "embed": rest}, name), gathered=axes)


def rules_for(ffn_layout: str) -> Rules:
    if ffn_layout == "ws1d":
        return make_rules_one_d()
    if ffn_layout == "ws2d":
        return make_rules_two_d()
    if ffn_layout in FFN_LAYOUTS:
        return make_rules_weight_gathered(gathered_axes(ffn_layout))
    raise LayoutError(f"layout must be one of {', '.join(FFN_LAYOUTS)}, got {ffn_layout!r}")


def storage_of(ffn_layout: str) -> str:
    """'1d' (ws1d) or '2d' (every other layout): how the weights are stored."""
    return rules_for(ffn_layout).storage


def attention_axes(
    layout: Layout, mesh: MeshShape, batch: int, multi_query: bool
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes, kv-head axes) inside attention, each in split order; also the KV cache's split.

    ws1d: heads over xyz; ws2d: heads over yz (repeated over x); batch-sharded attention moves the minor
    head axes to the batch (comm.attention_batch_axes). Weight-gathered: batch over the gathered axes,
    heads over the rest. Multi-query K/V are not split over heads.
    """
    batch_axes = attention_batch_axes(layout.ffn, layout.attention, mesh, batch)
    head_order = MESH_AXES if layout.ffn == "ws1d" else YZ
    heads = tuple(a for a in head_order if a not in batch_axes)
    return batch_axes, heads, () if multi_query else heads


def weight_split(
    top: str, axes: tuple[str, ...], contract: tuple[str, ...], ffn_layout: str, multi_query: bool
) -> tuple[tuple[str, ...], ...]:
    """The mesh axes each dim of one stored weight is split over (the source of model/sharded.py's specs).

    top: the weight's top-level name (embed / unembed use TABLE_RULES); matmul weights (a non-empty `contract`)
    follow the layout's storage rules, multi-query kv_heads never split; norms are whole on every chip.
    """
    if top in ("embed", "unembed"):
        table = TABLE_RULES
    elif contract:
        table = rules_for(ffn_layout).weights
    else:
        return tuple(() for _ in axes)
    return tuple(() if (a == "kv_heads" and multi_query) else tuple(table.get(a, ())) for a in axes)


def weight_bytes_per_chip(declared: dict, ffn_layout: str, mesh: MeshShape, weights: str, multi_query: bool) -> int:
    """Bytes one chip stores of the weights `declared` (model.params.declare's tree) under `ffn_layout`.

    Each leaf: its shape divided by the sizes of the axes `weight_split` gives each dim; int8 matmul weights
    add their bf16 scale (contracted dims kept as 1, never split over: model/sharded.py's scale specs).
    """
    if weights not in _MATMUL_BYTES:
        raise LayoutError(f"weights must be one of {', '.join(_MATMUL_BYTES)}, got {weights!r}")
    total = 0

    def local(shape, split) -> int:
        out = 1
        for n, axes in zip(shape, split, strict=True):
            out *= n // mesh.size(axes)
        return out

    def walk(tree: dict, top: str | None) -> None:
        nonlocal total
        for name, spec in tree.items():
            if isinstance(spec, dict):
                walk(spec, top or name)
                continue
            split = weight_split(top or name, spec.axes, spec.contract, ffn_layout, multi_query)
            if spec.contract and weights == "int8":
                total += local(spec.shape, split)
                scale_shape = tuple(1 if a in spec.contract else n for a, n in zip(spec.axes, spec.shape, strict=True))
                scale_split = tuple(() if a in spec.contract else s for a, s in zip(spec.axes, split, strict=True))
                total += 2 * local(scale_shape, scale_split)
            else:
                total += local(spec.shape, split) * (_MATMUL_BYTES if spec.contract else _OTHER_BYTES)[weights]

    walk(declared, None)
    return total
