"""Which collectives each layout runs per decoder layer: the one list the cost model and the compiled code share.

Pure Python (no JAX import), so analytics/ prices it without devices and tests compare it with compiled HLO.
Notation after PAPER.md: `BLE_xyz` is a [B, L, E] tensor whose E is split over mesh axes x, y, z;
`{partialsum-x}` still needs a sum over x. Axes of size 1 are dropped; a collective left with no axes is
not run (and not listed). `Collective.axes` names a set of mesh axes, always in x, y, z order.

Dataflows (parallel block: attention and MLP read one normalised h; their outputs are summed before the
one reduce-scatter). Weight storage: ws1d stores W_in E·F_xyz, heads H_xyz; every other layout reads the 2D
storage W_in E_x·F_yz, heads H_yz (so prefill can run weight-gathered and decode weight-stationary on the
same arrays). Multi-query K/V weights (one kv head) are never split over heads; multi-head ones split like
the query heads.

  ws1d:  BLE_xyz -AG(xyz)-> BLE; q BLH_xyzQ; [batch: all-to-all(A) q(+kv) -> B_A; back]; out -RS(xyz)-> BLE_xyz
  ws2d:  BLE_xyz -AG(yz)-> BLE_x; norm statistics -AR(x)-; BLF_yz -RS(x)-> BLF_xyz; qkv BLHQ_yz{partialsum-x}
         heads: -AR(x)-> BLHQ_yz (attention repeated over x); batch: -RS(x)-> B_x, all-to-all(A - x) -> B_A, back,
         -AG(x)->; SwiGLU; BLF_xyz -AG(x)-> BLF_yz; out BLE_x{partialsum-yz} -RS(yz)-> BLE_xyz
  wg-*:  activations B_G·L·E_R (G gathered axes, R the rest); -AG(R)-> B_G·L·E; each weight -AG(G ∩ its split)->;
         attention runs locally (batch over G, heads over R: attention 'batch' only, 'heads' is refused);
         out -RS(R)-> B_G·L·E_R.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from meshserve.errors import UserError

__all__ = [
    "MESH_AXES",
    "FFN_LAYOUTS",
    "ATTENTION_LAYOUTS",
    "MeshShape",
    "Collective",
    "LayerDims",
    "LayoutError",
    "layer_collectives",
    "reshard_collectives",
    "reshard_plan",
    "step_collectives",
    "attention_batch_axes",
    "gathered_axes",
    "check_layout",
    "kv_axes",
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
            raise LayoutError(f"{label} = {value} is not divisible by the {ffn_layout} split {split} (mesh {mesh})")
    batch_axes = attention_batch_axes(ffn_layout, attention, mesh, dims.batch)
    split = mesh.size(batch_axes)
    if dims.batch % split:
        raise LayoutError(
            f"batch B = {dims.batch} is smaller than or not divisible by the {ffn_layout} batch split {split} "
            f"(axes {_name(batch_axes)}, mesh {mesh})"
        )


def _ws1d(mesh: MeshShape, attention: str, d: LayerDims) -> list[Collective]:
    B, L, E, H, K, Q, a, n = d.batch, d.tokens, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d.act_bytes, mesh.n
    xyz = _live(mesh, MESH_AXES)
    out: list[Collective] = []
    if xyz:
        out.append(Collective("all-gather", xyz, B * L * E * a, "BLE_xyz --all-gather(xyz)--> BLE", "ffn"))
    A = _live(mesh, attention_batch_axes("ws1d", attention, mesh, B))
    if A:
        kv = 2 * K // n if _kv_split(d) else 0
        a2a = f"all-to-all({_name(A)})"
        out.append(
            Collective(
                "all-to-all", A, B * L * (H // n + kv) * Q * a, f"BLHQ_xyz --{a2a}--> B_{_name(A)}LHQ", "attention"
            )
        )
        out.append(
            Collective("all-to-all", A, B * L * (H // n) * Q * a, f"B_{_name(A)}LHQ --{a2a}--> BLHQ_xyz", "attention")
        )
    if xyz:
        out.append(
            Collective(
                "reduce-scatter", xyz, B * L * E * a, "BLE{partialsum-xyz} --reduce-scatter(xyz)--> BLE_xyz", "ffn"
            )
        )
    return out


def _ws2d(mesh: MeshShape, attention: str, d: LayerDims) -> list[Collective]:
    B, L, E, F, H, K, Q, a = d.batch, d.tokens, d.d_model, d.d_ff, d.n_heads, d.n_kv_heads, d.d_head, d.act_bytes
    X, YZ = mesh.x, mesh.y * mesh.z
    x, yz = _live(mesh, ("x",)), _live(mesh, ("y", "z"))
    g = 2 if d.gated else 1
    kv_local = 2 * (K // YZ if _kv_split(d) else K)  # k and v heads on one chip before attention
    qkv = B * L * (H // YZ + kv_local) * Q * a
    out: list[Collective] = []
    if yz:
        out.append(Collective("all-gather", yz, B * L * (E // X) * a, "BLE_xyz --all-gather(yz)--> BLE_x", "ffn"))
    if x:
        out.append(
            Collective("all-reduce", x, B * L * NORM_STAT_BYTES, "BL2{partialsum-x} --all-reduce(x)--> BL2", "ffn")
        )
        out.append(
            Collective(
                "reduce-scatter",
                x,
                B * L * g * (F // YZ) * a,
                "BLF_yz{partialsum-x} --reduce-scatter(x)--> BLF_xyz",
                "ffn",
            )
        )
    A = attention_batch_axes("ws2d", attention, mesh, B)
    if not A:
        if x:
            out.append(
                Collective("all-reduce", x, qkv, "BLHQ_yz{partialsum-x} --all-reduce(x)--> BLHQ_yz", "attention")
            )
    else:
        inner = _live(mesh, tuple(ax for ax in A if ax != "x"))
        if x:
            out.append(
                Collective(
                    "reduce-scatter", x, qkv, "BLHQ_yz{partialsum-x} --reduce-scatter(x)--> B_xLHQ_yz", "attention"
                )
            )
        if inner:
            kv = 2 * K // YZ if _kv_split(d) else 0
            a2a, bx = f"all-to-all({_name(inner)})", f"B_{_name(A)}"
            size = (B // X) * L * Q * a
            out.append(
                Collective("all-to-all", inner, size * (H // YZ + kv), f"B_xLHQ_yz --{a2a}--> {bx}LHQ", "attention")
            )
            out.append(Collective("all-to-all", inner, size * (H // YZ), f"{bx}LHQ --{a2a}--> B_xLHQ_yz", "attention"))
        if x:
            out.append(
                Collective(
                    "all-gather", x, B * L * (H // YZ) * Q * a, "B_xLHQ_yz --all-gather(x)--> BLHQ_yz", "attention"
                )
            )
    if x:
        out.append(Collective("all-gather", x, B * L * (F // YZ) * a, "BLF_xyz --all-gather(x)--> BLF_yz", "ffn"))
    if yz:
        out.append(
            Collective(
                "reduce-scatter",
                yz,
                B * L * (E // X) * a,
                "BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz",
                "ffn",
            )
        )
    return out


def _weight_gathers(mesh: MeshShape, layout: str, d: LayerDims) -> list[Collective]:
    """All-gathers of one layer's 2D-stored weights (and int8 scales) over the layout's gathered axes."""
    G = gathered_axes(layout)
    E, F, H, K, Q, w = d.d_model, d.d_ff, d.n_heads, d.n_kv_heads, d.d_head, d.weight_bytes
    R = tuple(a for a in ("y", "z") if a not in G)
    keep = mesh.size(R)  # what stays split (over the heads/mlp axes) after the gather
    kv_keep = keep if _kv_split(d) else 1
    kv_axes = ("x", "y", "z") if _kv_split(d) else ("x",)
    # (name, elements per chip after the gather, axes the weight is split over, scale elements, scale axes)
    weights = [("W_up", E * F // keep, ("x", "y", "z"), F // keep, ("y", "z"))]
    if d.gated:
        weights.append(("W_gate", E * F // keep, ("x", "y", "z"), F // keep, ("y", "z")))
    weights += [
        ("W_q", E * H * Q // keep, ("x", "y", "z"), H * Q // keep, ("y", "z")),
        ("W_k", E * K * Q // kv_keep, kv_axes, K * Q // kv_keep, kv_axes[1:]),
        ("W_v", E * K * Q // kv_keep, kv_axes, K * Q // kv_keep, kv_axes[1:]),
        ("W_o", H * Q * E // keep, ("x", "y", "z"), E, ("x",)),
        ("W_down", F * E // keep, ("x", "y", "z"), E, ("x",)),
    ]
    r_name = _name(R)
    out = []
    for name, elements, split, scale_elements, scale_split in weights:
        axes = _live(mesh, tuple(a for a in G if a in split))
        if axes:
            out.append(
                Collective(
                    "all-gather",
                    axes,
                    elements * w,
                    f"{name} --all-gather({_name(axes)})--> {name}_{r_name}",
                    "weights",
                )
            )
        scale_axes = _live(mesh, tuple(a for a in G if a in scale_split))
        if w == 1 and scale_axes:  # int8: the bf16 per-channel scales follow their values
            out.append(
                Collective(
                    "all-gather",
                    scale_axes,
                    scale_elements * 2,
                    f"scale({name}) --all-gather({_name(scale_axes)})-->",
                    "weights",
                )
            )
    return out


def _wg(mesh: MeshShape, layout: str, d: LayerDims) -> list[Collective]:
    B, L, E, a = d.batch, d.tokens, d.d_model, d.act_bytes
    G = gathered_axes(layout)
    R = _live(mesh, tuple(a_ for a_ in ("y", "z") if a_ not in G))
    b = B // mesh.size(G)
    g, r = _name(G), _name(R)
    out: list[Collective] = []
    if R:
        out.append(Collective("all-gather", R, b * L * E * a, f"B_{g}LE_{r} --all-gather({r})--> B_{g}LE", "ffn"))
    out += _weight_gathers(mesh, layout, d)
    if R:
        out.append(
            Collective(
                "reduce-scatter",
                R,
                b * L * E * a,
                f"B_{g}LE{{partialsum-{r}}} --reduce-scatter({r})--> B_{g}LE_{r}",
                "ffn",
            )
        )
    return out


def layer_collectives(
    ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims, overlap: bool = False
) -> list[Collective]:
    """Every collective one decoder layer runs under this layout, in program order.

    overlap (ws2d only): the looped collective einsum. Its input all-gather(yz) and output reduce-scatter(yz)
    become YZ-1 "collective-permute" steps each (bytes_per_chip: the chunk one chip sends per step, so a
    permute costs bytes/bw with no (K-1)/K factor), and the norm statistics are summed over xyz.
    Raises LayoutError when the layout cannot split these dims (see `check_layout`).
    """
    check_layout(ffn_layout, attention, mesh, dims)
    if overlap and ffn_layout != "ws2d":
        raise LayoutError(f"collective matmul overlap is a ws2d option, not {ffn_layout}")
    if ffn_layout == "ws1d":
        return _ws1d(mesh, attention, dims)
    if ffn_layout == "ws2d":
        return _overlapped(mesh, dims, _ws2d(mesh, attention, dims)) if overlap else _ws2d(mesh, attention, dims)
    return _wg(mesh, ffn_layout, dims)


def _overlapped(mesh: MeshShape, d: LayerDims, plain: list[Collective]) -> list[Collective]:
    """ws2d's list with the looped collective einsum's ring steps in place of AG(yz) and RS(yz).

    The norm runs on BLE_xyz before the looped gather, so its statistics are summed over every live axis
    (whatever Y·Z is), replacing the plain layout's all-reduce(x) of them.
    """
    yz = _live(mesh, ("y", "z"))
    chunk = d.batch * d.tokens * (d.d_model // mesh.n) * d.act_bytes
    steps = mesh.size(yz) - 1
    stats = _live(mesh, MESH_AXES)
    out: list[Collective] = []
    if stats:
        text = "BL2{partialsum-xyz} --all-reduce(xyz)--> BL2"
        out.append(Collective("all-reduce", stats, d.batch * d.tokens * NORM_STAT_BYTES, text, "ffn"))
    for c in plain:
        if c.axes == yz and c.kind == "all-gather":
            text = "BLE_xyz --collective-permute(yz)--> next chip (looped all-gather(yz))"
            out += [Collective("collective-permute", yz, chunk, text, "ffn")] * steps
        elif c.axes == yz and c.kind == "reduce-scatter":
            text = "BLE_x{partialsum-yz} --collective-permute(yz)--> next chip (looped reduce-scatter(yz))"
            out += [Collective("collective-permute", yz, chunk, text, "ffn")] * steps
        elif not c.tensor.startswith("BL2{"):  # the plain norm statistics: replaced by the xyz ones above
            out.append(c)
    return out


def step_collectives(
    ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims, vocab_size: int, logits_tokens: int = 1
) -> list[Collective]:
    """The collectives one pass runs once (not per layer): embedding, final gather and logits, in program order.

    The embedding table is split over V_xyz, so each token's row comes from one chip: one reduce-scatter(xyz) of
    BLE into the residual's split (BLE_xyz, or B_G·L·E_R weight-gathered), which the first layer reads. After the
    last layer the residual (B_G·L·E_R) is gathered whole for the final norm, then the float32
    logits BLV_xyz are all-gathered so every chip holds [B, logits_tokens, V] (prefill keeps one token per row).
    """
    check_layout(ffn_layout, attention, mesh, dims)
    B, L, E, a, T = dims.batch, dims.tokens, dims.d_model, dims.act_bytes, logits_tokens
    xyz = _live(mesh, MESH_AXES)
    G = gathered_axes(ffn_layout)
    g, r = _live(mesh, G), _live(mesh, tuple(ax for ax in MESH_AXES if ax not in G))
    out: list[Collective] = []
    b = f"B_{_name(g)}" if g else "B"
    if xyz:
        text = f"BLE{{partialsum-xyz}} --reduce-scatter(xyz)--> {b}LE" + (f"_{_name(r)}" if r else "")
        out.append(Collective("reduce-scatter", xyz, B * L * E * a, text, "step"))
    if r:
        text = f"{b}LE_{_name(r)} --all-gather({_name(r)})--> {b}LE"
        out.append(Collective("all-gather", r, B // mesh.size(G) * T * E * a, text, "step"))
    if g:
        text = f"B_{_name(g)}LE --all-gather({_name(g)})--> BLE"
        out.append(Collective("all-gather", g, B * T * E * a, text, "step"))
    if xyz:
        out.append(Collective("all-gather", xyz, B * T * vocab_size * 4, "BLV_xyz --all-gather(xyz)--> BLV", "step"))
    return out


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


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def reshard_plan(
    prefill_layout: str,
    prefill_attention: str,
    decode_layout: str,
    decode_attention: str,
    mesh: MeshShape,
    dims: LayerDims,
    decode_batch: int | None = None,
) -> dict[str, tuple[str, ...] | int]:
    """What the phase switch moves (model/sharded.py's insert follows it; `reshard_collectives` prices it).

    Returns live axes in split order: `p_batch` / `d_batch` (the prefill / decode batch split), `heads_kept`
    (the part of the prefill kv-head split the decode split starts with), `heads_gather` (the rest: gathered),
    and `cap` (rows one chip can send another: min(prefill rows per chip, decode slots per chip)).
    """
    check_layout(prefill_layout, prefill_attention, mesh, dims)
    decode_dims = dims if decode_batch is None else replace(dims, batch=decode_batch, tokens=1)
    check_layout(decode_layout, decode_attention, mesh, decode_dims)
    live = lambda axes: tuple(a for a in axes if getattr(mesh, a) > 1)  # noqa: E731  (split order kept)
    p_batch = live(attention_batch_axes(prefill_layout, prefill_attention, mesh, dims.batch))
    d_batch = live(attention_batch_axes(decode_layout, decode_attention, mesh, decode_dims.batch))
    p_kv = _kv_split_order(prefill_layout, prefill_attention, mesh, dims)
    d_kv = _kv_split_order(decode_layout, decode_attention, mesh, decode_dims)
    kept = _common_prefix(p_kv, d_kv)
    cap = min(dims.batch // mesh.size(p_batch), decode_dims.batch // mesh.size(d_batch))
    return {"p_batch": p_batch, "d_batch": d_batch, "p_kv": p_kv, "d_kv": d_kv, "heads_kept": kept,
            "heads_gather": p_kv[len(kept):], "cap": cap}  # fmt: skip


def reshard_collectives(
    prefill_layout: str,
    prefill_attention: str,
    decode_layout: str,
    decode_attention: str,
    mesh: MeshShape,
    dims: LayerDims,
    n_layers: int = 1,
    cache_bytes: int = 2,
    decode_batch: int | None = None,
) -> list[Collective]:
    """The prefill -> decode KV-cache reshard (phase switch): the per-layer list, `n_layers` times (default 1).

    dims.batch rows of dims.tokens prefilled tokens each go to arbitrary cache slots (the caller's `slots`), one
    layer at a time (model/sharded.py loops over the layers). Per layer, K and V stacked in one collective:
    1. kv heads (multi-head only): the prefill's kv-head split is all-gathered over its axes that the decode
       split does not start with (`reshard_plan`'s heads_gather), on this chip's own rows only; the decode
       split's finer part is a local slice.
    2. rows: when the prefill splits the batch, one all-to-all over the prefill's batch axes sends each chip
       the rows whose slots it holds. The slots are data, so each (sender, receiver) chunk has room for the most
       rows that can meet there: cap = min(prefill rows per chip, decode slots per chip). Per-chip buffer
       P·cap rows (P chips in the group) against the all-gather's B rows: less whenever a decode chip holds
       fewer slots than a prefill chip holds rows; equal otherwise (any slot pattern may send all of one chip's
       rows to one chip). A prefill that splits no batch moves no rows: each chip keeps the rows of its slots.
    Nothing moves when the prefill splits no batch and its kv-head split is where the decode's starts.
    decode_batch: the decode cache's rows (slots), which pick its batch split; default dims.batch.
    """
    plan = reshard_plan(prefill_layout, prefill_attention, decode_layout, decode_attention, mesh, dims,
                        decode_batch)  # fmt: skip
    p_batch, gather, cap = plan["p_batch"], plan["heads_gather"], plan["cap"]
    B, T, K, Q = dims.batch, dims.tokens, dims.n_kv_heads, dims.d_head
    rows = B // mesh.size(p_batch)  # prefill rows on one chip
    per_row = 2 * T * Q * cache_bytes  # k and v of one row, one kv head, one layer
    out = []
    if gather:
        heads = K // mesh.size(plan["heads_kept"])
        text = f"b SKQ_{_name(plan['p_kv'])} --all-gather({_name(gather)})--> b SKQ_{_name(plan['heads_kept'])}"
        out.append(Collective("all-gather", _live(mesh, gather), per_row * rows * heads, text + " (one layer)",
                              "attention"))  # fmt: skip
    if p_batch:
        heads = K // mesh.size(plan["d_kv"])
        size = mesh.size(p_batch) * cap
        text = f"B_{_name(p_batch)}SKQ --all-to-all({_name(p_batch)}, {cap} rows per chip pair)--> slots' chips"
        out.append(Collective("all-to-all", _live(mesh, p_batch), per_row * size * heads, text + " (one layer)",
                              "attention"))  # fmt: skip
    return out * n_layers
