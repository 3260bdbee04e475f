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

Serial block (Llama, Mistral, Qwen2: x += attn(norm1(x)); x += mlp(norm2(x))): the same collectives, but the
attention half and the MLP half each gather the residual (ws2d: with its norm statistics) and reduce-scatter
their own output, because the MLP's input is the residual after the attention's add: per layer one more input
gather and one more output reduce-scatter (ws2d overlap: one more ring each) than the parallel block.
Post norms (Gemma 3: x += post_attn_norm(attn(norm1(x))); x += post_ffn_norm(mlp(norm2(x)))): each half's output
is normed after its reduce-scatter, on the residual's split, so its statistics are summed over the E split:
  ws1d, ws2d (also overlapped):  BL2{partialsum-xyz} -AR(xyz)-> BL2 after each half's output
  wg-*:                          B_GL2{partialsum-R} -AR(R)-> B_GL2 (wg-xyz: E is whole, nothing runs)

partition/comm_step.py lists what runs once per pass (embedding, logits) and at the phase switch; partition/dims.py
holds the shared types and splits. Both are re-exported here: `from meshserve.partition.comm import ...` is the
one import path for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from meshserve.partition.comm_step import reshard_collectives, reshard_plan, step_collectives
from meshserve.partition.dims import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    MESH_AXES,
    NORM_STAT_BYTES,
    Collective,
    LayerDims,
    LayoutError,
    MeshShape,
    _kv_split,
    _live,
    _name,
    attention_batch_axes,
    check_layout,
    gathered_axes,
    kv_axes,
)

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


@dataclass(frozen=True)
class _Parts:
    """One layer's collectives by where they run: the two blocks read and write the residual alike, so the
    serial block repeats `input` and `output` (and keeps the rest) where the parallel block runs each once."""

    input: list[Collective]  # the residual's gather (+ ws2d's norm statistics), before the input matmuls
    weights: list[Collective]  # weight-gathered layouts: each weight's all-gather
    attention: list[Collective]  # between q/k/v and W_O (the attention split and back)
    ffn_in: list[Collective]  # ws2d: into the activation, BLF_yz{partialsum-x} -> BLF_xyz
    ffn_out: list[Collective]  # ws2d: out of it, BLF_xyz -> BLF_yz
    output: list[Collective]  # the output reduce-scatter back into the residual's split
    # post norms (serial only): the output norm's statistics, after `output`
    post: list[Collective] = field(default_factory=list)

    def layer(self, serial: bool) -> list[Collective]:
        """Program order. Parallel: one gather, the fused input matmuls, attention and the MLP, one
        reduce-scatter of their summed outputs. Serial: the attention half, then the MLP half, each with its
        own gather and reduce-scatter (and, with post norms, its output norm's statistics)."""
        if not serial:
            return self.input + self.weights + self.ffn_in + self.attention + self.ffn_out + self.output
        out = self.output + self.post
        attention_half = self.input + self.weights + self.attention + out
        return attention_half + self.input + self.ffn_in + self.ffn_out + out


def _ws1d(mesh: MeshShape, attention: str, d: LayerDims) -> _Parts:
    B, L, E, H, K, Q, a, n = d.batch, d.tokens, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d.act_bytes, mesh.n
    xyz = _live(mesh, MESH_AXES)
    gather: list[Collective] = []
    scatter: list[Collective] = []
    if xyz:
        gather.append(Collective("all-gather", xyz, B * L * E * a, "BLE_xyz --all-gather(xyz)--> BLE", "ffn"))
        text = "BLE{partialsum-xyz} --reduce-scatter(xyz)--> BLE_xyz"
        scatter.append(Collective("reduce-scatter", xyz, B * L * E * a, text, "ffn"))
    attn: list[Collective] = []
    A = _live(mesh, attention_batch_axes("ws1d", attention, mesh, B))
    if A:
        kv = 2 * K // n if _kv_split(d) else 0
        a2a = f"all-to-all({_name(A)})"
        attn.append(
            Collective(
                "all-to-all", A, B * L * (H // n + kv) * Q * a, f"BLHQ_xyz --{a2a}--> B_{_name(A)}LHQ", "attention"
            )
        )
        attn.append(
            Collective("all-to-all", A, B * L * (H // n) * Q * a, f"B_{_name(A)}LHQ --{a2a}--> BLHQ_xyz", "attention")
        )
    return _Parts(gather, [], attn, [], [], scatter)


def _ws2d(mesh: MeshShape, attention: str, d: LayerDims) -> _Parts:
    B, L, E, F, H, K, Q, a = d.batch, d.tokens, d.d_model, d.d_ff, d.n_heads, d.n_kv_heads, d.d_head, d.act_bytes
    X, YZ = mesh.x, mesh.y * mesh.z
    x, yz = _live(mesh, ("x",)), _live(mesh, ("y", "z"))
    g = 2 if d.gated else 1
    kv_local = 2 * (K // YZ if _kv_split(d) else K)  # k and v heads on one chip before attention
    qkv = B * L * (H // YZ + kv_local) * Q * a
    gather: list[Collective] = []
    scatter: list[Collective] = []
    ffn_in: list[Collective] = []
    ffn_out: list[Collective] = []
    if yz:
        gather.append(Collective("all-gather", yz, B * L * (E // X) * a, "BLE_xyz --all-gather(yz)--> BLE_x", "ffn"))
        text = "BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz"
        scatter.append(Collective("reduce-scatter", yz, B * L * (E // X) * a, text, "ffn"))
    if x:
        text = "BL2{partialsum-x} --all-reduce(x)--> BL2"
        gather.append(Collective("all-reduce", x, B * L * NORM_STAT_BYTES, text, "ffn"))
        text = "BLF_yz{partialsum-x} --reduce-scatter(x)--> BLF_xyz"
        ffn_in.append(Collective("reduce-scatter", x, B * L * g * (F // YZ) * a, text, "ffn"))
        text = "BLF_xyz --all-gather(x)--> BLF_yz"
        ffn_out.append(Collective("all-gather", x, B * L * (F // YZ) * a, text, "ffn"))
    attn: list[Collective] = []
    A = attention_batch_axes("ws2d", attention, mesh, B)
    if not A:
        if x:
            attn.append(
                Collective("all-reduce", x, qkv, "BLHQ_yz{partialsum-x} --all-reduce(x)--> BLHQ_yz", "attention")
            )
    else:
        inner = _live(mesh, tuple(ax for ax in A if ax != "x"))
        if x:
            attn.append(
                Collective(
                    "reduce-scatter", x, qkv, "BLHQ_yz{partialsum-x} --reduce-scatter(x)--> B_xLHQ_yz", "attention"
                )
            )
        if inner:
            kv = 2 * K // YZ if _kv_split(d) else 0
            a2a, bx = f"all-to-all({_name(inner)})", f"B_{_name(A)}"
            size = (B // X) * L * Q * a
            attn.append(
                Collective("all-to-all", inner, size * (H // YZ + kv), f"B_xLHQ_yz --{a2a}--> {bx}LHQ", "attention")
            )
            attn.append(Collective("all-to-all", inner, size * (H // YZ), f"{bx}LHQ --{a2a}--> B_xLHQ_yz", "attention"))
        if x:
            attn.append(
                Collective(
                    "all-gather", x, B * L * (H // YZ) * Q * a, "B_xLHQ_yz --all-gather(x)--> BLHQ_yz", "attention"
                )
            )
    return _Parts(gather, [], attn, ffn_in, ffn_out, scatter)


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


def _wg(mesh: MeshShape, layout: str, d: LayerDims) -> _Parts:
    B, L, E, a = d.batch, d.tokens, d.d_model, d.act_bytes
    G = gathered_axes(layout)
    R = _live(mesh, tuple(a_ for a_ in ("y", "z") if a_ not in G))
    b = B // mesh.size(G)
    g, r = _name(G), _name(R)
    gather: list[Collective] = []
    scatter: list[Collective] = []
    if R:
        gather.append(Collective("all-gather", R, b * L * E * a, f"B_{g}LE_{r} --all-gather({r})--> B_{g}LE", "ffn"))
        text = f"B_{g}LE{{partialsum-{r}}} --reduce-scatter({r})--> B_{g}LE_{r}"
        scatter.append(Collective("reduce-scatter", R, b * L * E * a, text, "ffn"))
    return _Parts(gather, _weight_gathers(mesh, layout, d), [], [], [], scatter)


def layer_collectives(
    ffn_layout: str, attention: str, mesh: MeshShape, dims: LayerDims, overlap: bool = False
) -> list[Collective]:
    """Every collective one decoder layer runs under this layout, in program order.

    dims.serial (Llama's serial block): the attention half and the MLP half each gather the residual (ws2d: and
    all-reduce their norm statistics) and reduce-scatter their output, so `input` and `output` run twice.
    dims.post_norms (Gemma 3, serial only): after each half's output, its post norm's statistics all-reduce.
    overlap (ws2d only): the looped collective einsum. Its input all-gather(yz) and output reduce-scatter(yz)
    become YZ-1 "collective-permute" steps each (bytes_per_chip: the chunk one chip sends per step, so a
    permute costs bytes/bw with no (K-1)/K factor), and the norm statistics are summed over xyz.
    Raises LayoutError when the layout cannot split these dims (see `check_layout`).
    """
    check_layout(ffn_layout, attention, mesh, dims)
    if overlap and ffn_layout != "ws2d":
        raise LayoutError(f"collective matmul overlap is a ws2d option, not {ffn_layout}")
    if dims.post_norms and not dims.serial:
        raise LayoutError("post_norms needs the serial block (serial=True): it norms each sublayer's own output")
    if ffn_layout == "ws1d":
        parts = _ws1d(mesh, attention, dims)
    elif ffn_layout == "ws2d":
        parts = _overlapped(mesh, dims, _ws2d(mesh, attention, dims)) if overlap else _ws2d(mesh, attention, dims)
    else:
        parts = _wg(mesh, ffn_layout, dims)
    if dims.post_norms:
        parts = replace(parts, post=_post_norm_stats(mesh, ffn_layout, dims))
    return parts.layer(dims.serial)


def _post_norm_stats(mesh: MeshShape, ffn_layout: str, d: LayerDims) -> list[Collective]:
    """The post norm's statistics all-reduce: each half's output is normed on the residual's split after its
    reduce-scatter (ws1d, ws2d: BLE_xyz; wg-*: B_G·L·E_R), so its per-token sum and sum of squares (float32) are
    summed over the E split. Weight-gathered layouts keep the batch split over G: B/G rows per chip."""
    G = gathered_axes(ffn_layout)
    R = _live(mesh, tuple(a for a in MESH_AXES if a not in G))
    if not R:  # wg-xyz (or a mesh with no live E axis): each chip holds whole tokens, the norm is local
        return []
    rows = d.batch // mesh.size(G) * d.tokens
    b = f"B_{_name(G)}" if _live(mesh, G) else "B"
    # B_GL2{partialsum-R} --all-reduce(R)--> B_GL2  (ws1d, ws2d: BL2{partialsum-xyz} --all-reduce(xyz)--> BL2)
    text = f"{b}L2{{partialsum-{_name(R)}}} --all-reduce({_name(R)})--> {b}L2 (post norm)"
    return [Collective("all-reduce", R, rows * NORM_STAT_BYTES, text, "ffn")]


def _overlapped(mesh: MeshShape, d: LayerDims, plain: _Parts) -> _Parts:
    """ws2d's parts with the looped collective einsum's ring steps in place of AG(yz) and RS(yz).

    The norm runs on BLE_xyz before the looped gather, so its statistics are summed over every live axis
    (whatever Y·Z is), replacing the plain layout's all-reduce(x) of them.
    """
    yz = _live(mesh, ("y", "z"))
    chunk = d.batch * d.tokens * (d.d_model // mesh.n) * d.act_bytes
    steps = mesh.size(yz) - 1
    stats = _live(mesh, MESH_AXES)
    gather: list[Collective] = []
    if stats:
        text = "BL2{partialsum-xyz} --all-reduce(xyz)--> BL2"
        gather.append(Collective("all-reduce", stats, d.batch * d.tokens * NORM_STAT_BYTES, text, "ffn"))
    text = "BLE_xyz --collective-permute(yz)--> next chip (looped all-gather(yz))"
    gather += [Collective("collective-permute", yz, chunk, text, "ffn")] * steps
    text = "BLE_x{partialsum-yz} --collective-permute(yz)--> next chip (looped reduce-scatter(yz))"
    scatter = [Collective("collective-permute", yz, chunk, text, "ffn")] * steps
    return _Parts(gather, plain.weights, plain.attention, plain.ffn_in, plain.ffn_out, scatter)
