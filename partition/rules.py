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
]

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
