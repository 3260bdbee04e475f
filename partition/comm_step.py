"""The collectives a pass runs once, not per layer: embedding, final gather and logits, and the phase switch.

Pure Python (no JAX import), like partition/comm.py's per-layer lists (which re-export these): model/sharded.py
and model/sharded_layer.py run them, analytics/ prices them (`Breakdown.step_comm_s`, `Breakdown.reshard_s`),
tests compare them with compiled HLO. Notation as in partition/comm.py.
"""

from __future__ import annotations

from dataclasses import replace

from meshserve.partition.dims import (
    MESH_AXES,
    Collective,
    LayerDims,
    MeshShape,
    _kv_split_order,
    _live,
    _name,
    attention_batch_axes,
    check_layout,
    gathered_axes,
)

__all__ = ["step_collectives", "reshard_plan", "reshard_collectives"]


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
