"""What a layout splits, and whether it can: mesh shapes, one layer's dims, the batch and kv-head splits.

Pure Python (no JAX import), shared by the collective lists (partition/comm.py per layer, partition/comm_step.py
once per pass and at the phase switch), partition/rules.py and analytics/. Axes of size 1 are "dead": they split
nothing, and a collective over no live axis is not run. `Collective.axes` names live mesh axes in x, y, z order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.model.config import ConfigError, kv_replication

__all__ = [
    "MESH_AXES",
    "FFN_LAYOUTS",
    "ATTENTION_LAYOUTS",
    "NORM_STAT_BYTES",
    "MeshShape",
    "Collective",
    "LayerDims",
    "LayoutError",
    "attention_batch_axes",
    "gathered_axes",
    "check_layout",
    "kv_axes",
    "heads_split",
]

MESH_AXES = ("x", "y", "z")
FFN_LAYOUTS = ("ws1d", "ws2d", "wg-x", "wg-xy", "wg-xyz")
ATTENTION_LAYOUTS = ("heads", "batch")
NORM_STAT_BYTES = 2 * 4  # 2D norm statistics: sum and sum of squares per token, float32

_GATHERED = {"wg-x": ("x",), "wg-xy": ("x", "y"), "wg-xyz": ("x", "y", "z")}


class LayoutError(UserError):
    """A mesh or layout that cannot split the model's dims; the message names the dims and the split."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the x, y, z mesh axes (X·Y·Z = n chips)."""

    x: int
    y: int
    z: int

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"mesh axis {axis} must be a positive integer, got {value!r}")

    @property
    def n(self) -> int:
        return self.x * self.y * self.z

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """'2x2x2' -> MeshShape(2, 2, 2)."""
        if not re.fullmatch(r"\s*\d+\s*x\s*\d+\s*x\s*\d+\s*", str(text)):
            raise LayoutError(f"mesh must be XxYxZ with three positive integers (e.g. 2x2x2), got {text!r}")
        x, y, z = (int(part) for part in str(text).split("x"))
        return cls(x, y, z)

    def size(self, axes: tuple[str, ...]) -> int:
        """Product of the named axes' sizes (1 for no axes)."""
        return math.prod(getattr(self, a) for a in axes)

    def __str__(self) -> str:
        return f"{self.x}x{self.y}x{self.z}"


@dataclass(frozen=True)
class Collective:
    kind: str  # "all-gather" | "reduce-scatter" | "all-reduce" | "all-to-all" (| "collective-permute": overlap)
    axes: tuple[str, ...]  # mesh axes it runs over, in x, y, z order
    bytes_per_chip: int  # all-gather: per-chip OUTPUT; reduce-scatter: per-chip INPUT; others: per-chip buffer
    tensor: str  # the paper's notation
    block: str  # "ffn" | "attention" | "weights"


@dataclass(frozen=True)
class LayerDims:
    """What one layer's pass sees."""

    batch: int  # B
    tokens: int  # L: tokens per sequence in this pass (prefill: prompt length; decode: 1)
    context: int  # S: KV length attended over
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    act_bytes: int = 2  # activation dtype bytes (bf16)
    weight_bytes: int = 2  # 2 bf16, 1 int8 (weight-gathered layouts gather int8, plus their bf16 scales)
    gated: bool = True  # SwiGLU (two input matmuls, W and V) or a plain GELU MLP (one)
    # Serial block (Llama: x += attn(norm1(x)); x += mlp(norm2(x))): a second input gather (and norm statistics)
    # and a second output reduce-scatter per layer; False: the paper's parallel block.
    serial: bool = False
    # Gemma 3's post norms (serial block only): each sublayer's output is normed after its reduce-scatter, on the
    # residual's E split, so its statistics are summed over that split: one more small all-reduce per half.
    post_norms: bool = False


def _live(mesh: MeshShape, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes that have more than one chip, in x, y, z order."""
    return tuple(a for a in MESH_AXES if a in axes and getattr(mesh, a) > 1)


def _name(axes: tuple[str, ...]) -> str:
    return "".join(a for a in MESH_AXES if a in axes)


def gathered_axes(ffn_layout: str) -> tuple[str, ...]:
    """The axes a weight-gathered layout gathers weights over (and splits the batch over); () for WS."""
    return _GATHERED.get(ffn_layout, ())


def _kv_split(dims: LayerDims) -> bool:
    """Multi-query K/V (one kv head) stay whole; several kv heads split like the query heads."""
    return dims.n_kv_heads > 1


def heads_split(ffn_layout: str, mesh: MeshShape) -> int:
    """How many chips the stored weights split (kv) heads over: ws1d all n (H_xyz), every other layout y·z (the 2D
    storage, H_yz). A grouped-query model's kv heads must divide it (or be replicated until they do)."""
    return mesh.n if ffn_layout == "ws1d" else mesh.y * mesh.z


def _kv_advice(dims: LayerDims, split: int) -> str:
    """What to do about kv heads the split does not divide: the replication that fixes it, or why none does."""
    try:
        r = kv_replication(dims.n_heads, dims.n_kv_heads, split)
    except ConfigError as e:
        return f"; {e}"
    return (
        f"; replicate each kv head {r} times (K = {dims.n_kv_heads * r}: ModelConfig.replicate_kv_heads, which "
        "meshserve's mesh entry points apply when they load a model for a mesh)"
    )


def attention_batch_axes(ffn_layout: str, attention: str, mesh: MeshShape, batch: int) -> tuple[str, ...]:
    """The mesh axes the batch is split over inside attention (the KV cache's batch split), in split order.

    Weight-gathered layouts: their gathered axes. Weight-stationary with `heads`: none. With `batch`: the
    largest split that divides the batch among (ws1d) z, yz, xyz or (ws2d) x, xy, xzy, so a batch smaller
    than the mesh is split over a subset of axes (PAPER.md); a batch no axis can split is refused.
    """
    if ffn_layout in _GATHERED:
        return _GATHERED[ffn_layout]
    if attention == "heads":
        return ()
    candidates = (
        [("x", "y", "z"), ("y", "z"), ("z",)] if ffn_layout == "ws1d" else [("x", "z", "y"), ("x", "y"), ("x",)]
    )
    for axes in candidates:
        size = mesh.size(axes)
        if batch % size == 0 and (size > 1 or mesh.n == 1):
            return axes
    splits = sorted({(mesh.size(axes), _name(_live(mesh, axes))) for axes in candidates if mesh.size(axes) > 1})
    smallest, axes_name = splits[0]
    options = ", ".join(f"{size} over {name}" for size, name in splits)
    raise LayoutError(
        f"attention 'batch' under {ffn_layout} on mesh {mesh} splits the batch at least {smallest} ways "
        f"(axes {axes_name}); batch {batch} cannot be split: use a batch that is a multiple of {smallest} "
        f"(possible splits: {options}) or attention 'heads'"
    )


def check_layout(ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims) -> None:
    """Raise LayoutError naming the dim and the split when this layout cannot split the model's dims."""
    if ffn_layout not in FFN_LAYOUTS:
        raise LayoutError(f"layout must be one of {', '.join(FFN_LAYOUTS)}, got {ffn_layout!r}")
    if attention not in ATTENTION_LAYOUTS:
        raise LayoutError(f"attention must be one of {', '.join(ATTENTION_LAYOUTS)}, got {attention!r}")
    if ffn_layout in _GATHERED and attention != "batch":
        raise LayoutError(
            f"attention '{attention}' means nothing under {ffn_layout}: a weight-gathered layout always splits "
            f"attention's batch over its gathered axes ({_name(_GATHERED[ffn_layout])}) and heads over the rest; "
            "use attention 'batch'"
        )
    n, X, YZ = mesh.n, mesh.x, mesh.y * mesh.z
    if ffn_layout == "ws1d":
        need = [("d_model E", dims.d_model, n), ("d_ff F", dims.d_ff, n), ("n_heads H", dims.n_heads, n)]
        need += [("n_kv_heads K", dims.n_kv_heads, n)] if _kv_split(dims) else []
    else:
        R = mesh.size(tuple(a for a in ("y", "z") if a not in gathered_axes(ffn_layout)))
        # 2D storage: E over x, F and heads over yz; ws2d also splits E and F over all n chips.
        need = [("d_model E", dims.d_model, X), ("d_ff F", dims.d_ff, YZ), ("n_heads H", dims.n_heads, YZ)]
        need += [("n_kv_heads K", dims.n_kv_heads, YZ)] if _kv_split(dims) else []
        need += [("d_model E", dims.d_model, n), ("d_ff F", dims.d_ff, n)] if ffn_layout == "ws2d" else []
        need += [("d_model E", dims.d_model, R)]
    for label, value, split in need:
        if value % split:
            advice = _kv_advice(dims, split) if label.startswith("n_kv_heads") else ""
            raise LayoutError(
                f"{label} = {value} is not divisible by the {ffn_layout} split {split} (mesh {mesh}){advice}"
            )
    batch_axes = attention_batch_axes(ffn_layout, attention, mesh, dims.batch)
    split = mesh.size(batch_axes)
    if dims.batch % split:
        raise LayoutError(
            f"batch B = {dims.batch} is smaller than or not divisible by the {ffn_layout} batch split {split} "
            f"(axes {_name(batch_axes)}, mesh {mesh})"
        )


def kv_axes(
    ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes, kv-head axes) the KV cache is split over under this layout (live axes, x, y, z order)."""
    batch = attention_batch_axes(ffn_layout, attention, mesh, dims.batch)
    if not _kv_split(dims):
        heads: tuple[str, ...] = ()
    elif ffn_layout == "ws1d":
        heads = MESH_AXES
    elif ffn_layout == "ws2d":
        heads = ("y", "z")
    else:
        heads = tuple(a for a in ("y", "z") if a not in gathered_axes(ffn_layout))
    heads = tuple(a for a in heads if a not in batch)
    return _live(mesh, batch), _live(mesh, heads)


def _kv_split_order(ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims) -> tuple[str, ...]:
    """The live mesh axes the KV cache's kv heads are split over, in split order (partition/rules.py's
    attention_axes: ws1d heads over x, y, z; the 2D storage over z, y, z-major), minus the batch axes."""
    if not _kv_split(dims):
        return ()
    batch = attention_batch_axes(ffn_layout, attention, mesh, dims.batch)
    order = MESH_AXES if ffn_layout == "ws1d" else ("z", "y")
    return tuple(a for a in order if a not in batch and getattr(mesh, a) > 1)
