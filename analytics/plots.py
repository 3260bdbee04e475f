"""Plots for `meshserve analyze --plot` (the Pareto frontier, paper Figure 1, and prefill MFU with switch points) and
`meshserve speculate --plot` (speedup against the draft acceptance rate).

matplotlib is imported here only, with the Agg backend, so nothing else in analytics/ needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshserve.analytics.output import save_figure

__all__ = ["plot_analysis", "plot_speculation"]


def plot_analysis(
    path: str | Path,
    frontiers: dict[str, Sequence[dict[str, Any]]],
    points: dict[str, Sequence[dict[str, Any]]],
    mfu_curves: dict[str, list[tuple[int, float]]],
    switches: Sequence[tuple[int, str, str]],
    title: str,
) -> Path:
    """Two panels: decode latency per token vs chip-ms per token (one curve per model), prefill MFU vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for model, frontier in frontiers.items():
        pts = points.get(model, [])
        left.scatter([p["latency_per_token_s"] * 1e3 for p in pts], [p["cost_chip_ms_per_token"] for p in pts],
                     s=8, alpha=0.3)  # fmt: skip
        xs = [p["latency_per_token_s"] * 1e3 for p in frontier]
        ys = [p["cost_chip_ms_per_token"] for p in frontier]
        left.plot(xs, ys, marker="o", label=model)
        for p, x, y in zip(frontier, xs, ys, strict=True):
            left.annotate(f"{p['chips']}c b{p['batch']}", (x, y), fontsize=6, alpha=0.7)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("decode latency per token (ms)")
    left.set_ylabel("cost (chip-ms per token)")
    left.set_title("Pareto frontier over chips and batch (decode)")
    left.legend()
    left.grid(True, which="both", alpha=0.3)

    for layout, curve in mfu_curves.items():
        right.plot([t for t, _ in curve], [m * 100 for _, m in curve], marker=".", label=layout)
    for tokens, before, after in switches:
        right.axvline(tokens, color="gray", linestyle="--", alpha=0.6)
        right.annotate(f"{before}->{after}", (tokens, 2), rotation=90, fontsize=7, va="bottom")
    right.set_xscale("log", base=2)
    right.set_xlabel("tokens per batch (B·L)")
    right.set_ylabel("prefill MFU (%)")
    right.set_title("Prefill MFU by layout; dashed: chosen-layout switch points")
    right.legend()
    right.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_speculation(path: str | Path, curves: dict[str, list[tuple[float, float]]], k: int, title: str) -> Path:
    """Speedup of speculative decoding over plain decoding against the draft acceptance rate, one curve per batch
    (curves: label -> [(acceptance, speedup)]); the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in curves.items():
        ax.plot([a for a, _ in points], [s for _, s in points], label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("acceptance rate per draft token")
    ax.set_ylabel(f"speedup over plain decoding (k = {k} drafts)")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
