"""What-if sweeps: the rows of `meshserve analyze`, Pareto frontiers and prefill switch points.

Every function here is pure arithmetic over the cost model (milliseconds per call, no devices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshserve.analytics.chips import Chip
from meshserve.analytics.cost import Estimate
from meshserve.analytics.plan import analysis_config, best_of, choose_plan, evaluate_layouts
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.partition.comm import ATTENTION_LAYOUTS, FFN_LAYOUTS, LayoutError, MeshShape

__all__ = ["analysis_config", "default_mesh", "analyze", "pareto_points", "pareto_frontier", "prefill_mfu_curve"]


def default_mesh(
    config: ModelConfig,
    chip: Chip,
    chips: int,
    batches: Sequence[int],
    weights: str,
    kv_dtype: str = "bf16",
    *,
    prompt_len: int = 2048,
    gen_len: int = 64,
    overlap: bool = False,
) -> MeshShape:
    """The mesh the latency-objective plan picks for these batches, prompt and generation lengths (with the KV cache
    stored as kv_dtype): the question's own lengths, since the best mesh moves with them (PaLM 540B on 64 TPU v4
    chips: 2x4x8 for 2048-token prompts, 4x4x4 for 128-token prompts and 2048 generated tokens)."""
    plan = choose_plan(config, chip, n_chips=chips, objective="latency", batch_buckets=list(batches), weights=weights,
                       kv_dtype=kv_dtype, prompt_len=prompt_len, gen_len=gen_len, overlap=overlap)  # fmt: skip
    return MeshShape.parse(plan.mesh)


def analyze(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    *,
    batches: Sequence[int],
    prompt_len: int,
    gen_len: int,
    weights: str,
    phases: Sequence[str] = ("prefill", "decode"),
    layout: str | None = None,
    attention: str | None = None,
    overlap: bool = False,
    kv_dtype: str = "bf16",
) -> list[dict[str, Any]]:
    """One row per (phase, batch, layout); in each (phase, batch) group the fitting row of lowest latency is chosen.
    kv_dtype: the KV cache's storage, bf16 or int8 (each row's kv_cache_dtype).

    A layout named explicitly that cannot split the dims is an error; unnamed ones that cannot are skipped.
    """
    rows: list[dict[str, Any]] = []
    for phase in phases:
        for batch in batches:
            reasons: list[str] = []
            estimates: list[Estimate] = evaluate_layouts(
                config, chip, mesh, phase=phase, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                weights=weights, ffn_layouts=[layout] if layout else FFN_LAYOUTS,
                attentions=[attention] if attention else ("batch", "heads"), overlap=overlap, reasons=reasons,
                kv_dtype=kv_dtype,
            )  # fmt: skip
            if not estimates:
                what = f"layout {layout or 'any'} with attention {attention or 'any'}"
                by_reason: dict[str, list[str]] = {}  # the same reason for several layouts is said once
                for r in reasons:
                    label, _, why = r.partition(": ")
                    by_reason.setdefault(why, []).append(label)
                said = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in by_reason.items())
                raise LayoutError(f"{what} cannot split {config.name} at batch {batch} on mesh {mesh}: {said}")
            best = best_of(estimates)
            for e in estimates:
                row = e.row()
                row["chosen"] = e is best and e.fits
                row["model"] = config.name
                run = analysis_config(config, mesh, e.ffn_layout)  # the model as this layout runs it
                row["n_heads"] = run.n_heads  # query heads as charged (multi-query: padded)
                row["n_kv_heads"] = run.n_kv_heads  # kv heads as charged (grouped query: replicated)
                row["kv_replication"] = run.n_kv_heads // config.n_kv_heads
                rows.append(row)
    return rows


def pareto_points(
    config: ModelConfig,
    chip: Chip,
    *,
    chip_counts: Sequence[int],
    batches: Sequence[int],
    prompt_len: int,
    gen_len: int,
    weights: str,
    kv_dtype: str = "bf16",
) -> list[dict[str, Any]]:
    """Decode (latency per token, chip-ms per token) of the best fitting layout for every (chips, batch)."""
    points = []
    for n in chip_counts:
        for b in batches:
            try:
                plan = choose_plan(config, chip, n_chips=n, objective="latency", batch_buckets=[b], weights=weights,
                                   prompt_len=prompt_len, gen_len=gen_len, kv_dtype=kv_dtype)  # fmt: skip
            except (LayoutError, UserError):
                continue
            entry = plan.lookup("decode", b)
            if entry.fits:
                points.append({"chips": n, "batch": b, "mesh": plan.mesh, "latency_per_token_s": entry.step_s,
                               "cost_chip_ms_per_token": entry.cost_chip_ms_per_token, "mfu": entry.mfu})  # fmt: skip
    return points


def pareto_frontier(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both latency per token and cost, sorted by latency."""
    frontier: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["latency_per_token_s"], p["cost_chip_ms_per_token"])):
        if not frontier or p["cost_chip_ms_per_token"] < frontier[-1]["cost_chip_ms_per_token"]:
            frontier.append(p)
    return frontier


def prefill_mfu_curve(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    *,
    token_batches: Sequence[int],
    prompt_len: int,
    weights: str,
    kv_dtype: str = "bf16",
) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str, str]]]:
    """Prefill MFU per FFN layout against tokens per batch (B·prompt_len), and where the best layout switches.

    A prefill batch is whole prompts, so each requested token count runs B = tokens // prompt_len rows and is
    reported at B·prompt_len tokens: counts below one prompt are skipped, and counts that round to the same B
    are priced and reported once (at the first of them), so every point on a curve is a distinct batch.
    Returns ({layout: [(tokens, mfu)]}, [(tokens, from_layout, to_layout)]).
    """
    curves: dict[str, list[tuple[int, float]]] = {f: [] for f in FFN_LAYOUTS}
    switches: list[tuple[int, str, str]] = []
    previous = None
    batches = list(dict.fromkeys(tokens // prompt_len for tokens in token_batches if tokens >= prompt_len))
    for batch in batches:
        rows = evaluate_layouts(config, chip, mesh, phase="prefill", batch=batch, prompt_len=prompt_len, gen_len=1,
                                weights=weights, attentions=ATTENTION_LAYOUTS, kv_dtype=kv_dtype)  # fmt: skip
        per_layout: dict[str, Estimate] = {}
        for r in rows:
            if r.ffn_layout not in per_layout or r.latency_s < per_layout[r.ffn_layout].latency_s:
                per_layout[r.ffn_layout] = r
        for f, r in per_layout.items():
            curves[f].append((batch * prompt_len, r.mfu))
        best = best_of(rows)
        if best is not None:
            if previous is not None and best.ffn_layout != previous:
                switches.append((batch * prompt_len, previous, best.ffn_layout))
            previous = best.ffn_layout
    return {f: c for f, c in curves.items() if c}, switches
