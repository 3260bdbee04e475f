"""Turn `meshserve bench --out` JSON files into the BENCHMARKS.md tables, with analytics' predictions beside them.

Usage: python benchmarks/report.py out/*.json > table.md    (add --plot decode.png for the figure)
The prediction is analytics.cost.estimate on one chip (mesh 1x1x1) of the chip the device maps to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meshserve.analytics.chips import chip_for_device, get_chip
from meshserve.analytics.cost import estimate
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape


def _chip(device: str):
    name = chip_for_device(device)
    return get_chip(name) if name else None


def _predict(row: dict) -> tuple[float | None, float | None]:
    """(predicted prefill ms, predicted decode step ms) for the row's shapes, or None off the chip table."""
    chip = _chip(row["device"])
    if chip is None:
        return None, None
    config = get_config(row["model"])
    config = config.replace(max_seq_len=max(config.max_seq_len, row["prompt_len"] + row["gen_len"]))
    kw = dict(batch=row["batch"], prompt_len=row["prompt_len"], gen_len=max(row["gen_len"], 1), weights=row["weights"])
    one = MeshShape(1, 1, 1)
    prefill = estimate(config, chip, one, phase="prefill", **kw).latency_s * 1e3
    decode = estimate(config, chip, one, phase="decode", **kw).step_s * 1e3 if row["gen_len"] else None
    return prefill, decode


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _layers(row: dict) -> str:
    """The layers cell: the layer loop, and the decode attention kernel where the row ran it (rows from before
    bench recorded decode_attention ran XLA's attention)."""
    attn = {"pallas": ", attn kernel", "pallas-interpret": ", attn kernel (interpreted)"}
    return row["layers"] + attn.get(row.get("decode_attention", "xla"), "")


def main(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    # gpu_bench.sh's flags step tags its rows with the XLA_FLAGS variant they ran under: a column only then.
    flags = any("xla_flags" in r for r in rows)
    print(
        "| model | weights | int8 matmul | layers | " + ("XLA flags | " if flags else "") + "batch | prompt+gen "
        "| prefill ms (pred.) | TTFT ms | decode ms/step (pred.) | tok/s | HBM GB/s | of copy bw | prefill MFU "
        "| peak mem GiB | peer ms/step | speedup |"
    )
    print("|---" * (17 if flags else 16) + "|")
    for r in rows:
        pred_prefill, pred_step = _predict(r)
        mem = r["peak_memory_bytes"]
        flags_cell = f"| {r.get('xla_flags', '–')} " if flags else ""
        print(
            f"| {r['model']} | {r['weights']} | {r.get('int8_matmul', 'xla') if r['weights'] == 'int8' else '–'} "
            f"| {_layers(r)} {flags_cell}| {r['batch']} | {r['prompt_len']}+{r['gen_len']} "
            f"| {r['prefill_ms']:.2f} ({_f(pred_prefill, '.2f')}) | {r['ttft_ms']:.2f} "
            f"| {_f(r['decode_step_ms'], '.3f')} ({_f(pred_step, '.3f')}) | {_f(r['tokens_per_s'], '.0f')} "
            f"| {_f(r['hbm_gbps'], '.0f')} | {_f(r['hbm_fraction'], '.1%')} | {_f(r['prefill_mfu'], '.1%')} "
            f"| {_f(mem and mem / 2**30, '.2f')} | {_f(r['peer_decode_step_ms'], '.2f')} "
            f"| {_f(r['speedup_vs_peer'], '.1f')}{'×' if r['speedup_vs_peer'] else ''} |"
        )
    if rows:
        read = rows[0].get("read_gbps")
        read_text = f", read-only stream {read:.0f} GB/s" if read else ""
        print(f"\nDevice: {rows[0]['device']}; measured copy bandwidth {rows[0]['copy_gbps']:.0f} GB/s (read + write)"
              f"{read_text}.")  # fmt: skip


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--plot" in args:
        i = args.index("--plot")
        plot_path, args = args[i + 1], args[:i] + args[i + 2 :]
        from meshserve.serving.bench_plot import plot_bench

        try:
            plot_bench([r for p in args for r in json.loads(Path(p).read_text())], plot_path)
        except ValueError as e:  # e.g. only prefill rows: the tables still print
            print(f"no plot: {e}", file=sys.stderr)
    main(args)
