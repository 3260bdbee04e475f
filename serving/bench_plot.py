"""Plot for `meshserve bench --plot` and benchmarks/report.py: measured decode speed against the weight-read floor.

Left: decode ms per step vs batch, one line per weights dtype, its floor (bytes a step must move / measured copy
bandwidth) dashed, and the transformers peer where it ran. Right: the fraction of copy bandwidth each step reached.
matplotlib is imported here only, with the Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshserve.analytics.output import save_figure

__all__ = ["plot_bench"]


def plot_bench(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """rows: `meshserve bench` JSON rows (decode rows only are drawn); writes the figure to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r.get("decode_step_ms")]
    if not decode:
        raise ValueError("no decode rows to plot (every row has gen_len 0)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in decode:
        key = (r["model"], r["weights"], r.get("int8_matmul", "xla"), r.get("kv_cache_dtype", "auto"), r["layers"],
               r["prompt_len"], r["gen_len"], r.get("decode_attention", "xla"))  # fmt: skip
        groups.setdefault(key, []).append(r)
    for (model, weights, matmul, kv, layers, prompt, gen, attention), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["batch"])
        label = f"{model} {weights}" + (f" ({matmul})" if weights == "int8" else "") + (" int8 KV" if kv == "int8"
                                                                                         else "")  # fmt: skip
        label += f" {layers} {prompt}+{gen}" + {
            "pallas": " attn kernel",
            "pallas-interpret": " attn kernel (interpreted)",
        }.get(attention, "")
        batches = [r["batch"] for r in group]
        (line,) = left.plot(batches, [r["decode_step_ms"] for r in group], marker="o", label=label)
        floor = [r["hbm_bytes_per_step"] / (r["copy_gbps"] * 1e9) * 1e3 for r in group]
        left.plot(batches, floor, linestyle="--", color=line.get_color(), alpha=0.6)
        right.plot(batches, [100 * r["hbm_fraction"] for r in group], marker="o", color=line.get_color(), label=label)
    peers: dict[tuple[str, int], float] = {}
    for r in decode:
        if r.get("peer_decode_step_ms"):
            peers.setdefault((r["model"], r["batch"]), r["peer_decode_step_ms"])  # one peer run per shape
    for model in sorted({m for m, _ in peers}):
        points = sorted((b, ms) for (m, b), ms in peers.items() if m == model)
        left.plot([b for b, _ in points], [ms for _, ms in points], marker="s", color="gray",
                  label=f"{model} transformers")  # fmt: skip
    left.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode ms / step (dashed: byte floor)",
             title="Decode step time")  # fmt: skip
    right.set(xscale="log", xlabel="batch", ylabel="% of measured copy bandwidth", title="Bandwidth reached")
    right.axhline(100, color="gray", linewidth=0.8)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(f"meshserve bench on {decode[0]['device']}")
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
