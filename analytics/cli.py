"""`meshserve analyze | memory | plan | calibrate`: the analytics commands (JAX only where calibrate/memory need it)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from meshserve.analytics.cli_helpers import (
    chip_from_args,
    count,
    fmt_s,
    gib,
    ints,
    kv_cache_dtype_arg,
    model_args,
    model_from_args,
    positive,
    say_unfit,
    table,
)
from meshserve.analytics.output import check_image_path, check_output_path, quiet_broken_pipe, write_atomic
from meshserve.errors import UserError

__all__ = ["COMMANDS"]


def _common(p: argparse.ArgumentParser, batch_default: str = "1,64,512") -> None:
    model_args(p, "palm-540b")
    p.add_argument("--hardware", default="tpu-v4", help="chip: tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, a100-80g, h100-sxm, "
                   "h200 or local (after `meshserve calibrate`)")  # fmt: skip
    p.add_argument("--chips", type=int, default=None, help="number of chips (default: the mesh's, else 64)")
    p.add_argument("--mesh", default=None, help="mesh XxYxZ (default: chosen for --chips)")
    p.add_argument("--batch", type=ints, default=ints(batch_default), help=f"batch sizes (default {batch_default})")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per sequence (default 2048)")
    p.add_argument("--gen-len", type=int, default=64, help="generated tokens per sequence (default 64)")
    p.add_argument("--overlap", action="store_true", help="price ws2d with the looped collective einsum: its ring "
                   "steps run under the matmuls, which pays for large token batches (prefill), but its one-hop steps' "
                   "latency makes small decode steps slower; other layouts are unchanged")  # fmt: skip
    kv_cache_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from meshserve.partition.comm import MeshShape

    chip = chip_from_args("--hardware", args.hardware)
    config = model_from_args(args)
    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    if mesh is not None and args.chips is not None and mesh.n != args.chips:
        raise UserError(f"mesh {mesh} has {mesh.n} chips but --chips is {args.chips}")
    chips = mesh.n if mesh is not None else (args.chips if args.chips is not None else 64)
    positive("--chips", chips)
    positive("--batch", args.batch)
    positive("--prompt-len", args.prompt_len)
    positive("--gen-len", args.gen_len)
    return config, chip, mesh or chips  # multi-query heads are padded per mesh and layout (plan.analysis_config)


def _warn_context(config: Any, prompt_len: int, gen_len: int, what: str = "prompt") -> None:
    """One stderr line when the prompt alone (memory: the context) is longer than the model's context: a what-if
    question can be legitimate (the rows are kept), but a default --prompt-len 2048 on tiny (128) should not pass
    silently. Tokens generated past the context are not warned about: the paper's own setting, 2048 + 64 on PaLM
    (2048), does it."""
    if prompt_len > config.max_seq_len:
        print(f"warning: {what} {prompt_len} tokens is beyond {config.name}'s max_seq_len {config.max_seq_len}; "
              "the numbers price a context the model does not have", file=sys.stderr)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- analyze
def _analyze_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "f32"], help="weight storage (default bf16)")
    p.add_argument("--phase", choices=["prefill", "decode"], default=None, help="one phase (default both)")
    p.add_argument("--layout", default=None, help="feed-forward layout: ws1d, ws2d, wg-x, wg-xy, wg-xyz (default all)")
    p.add_argument("--attention", choices=["heads", "batch"], default=None, help="attention layout (default both)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the rows as CSV")
    p.add_argument("--chip-hour-usd", type=float, default=None, metavar="PRICE",
                   help="what one chip costs per hour (your cloud's price): adds the cost in USD per million tokens "
                   "(usd_per_million_tokens in --json and --csv)")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the Pareto frontier and prefill MFU")
    p.add_argument(
        "--plot-models",
        default=None,
        metavar="M1,M2",
        help="more models for the Pareto panel, one curve each, as in the paper's Figure 1 (e.g. palm-8b,palm-62b): "
        "presets, checkpoint directories or config.json files (--set applies to --model only)",
    )


def _analyze(args: argparse.Namespace) -> int:
    from meshserve.analytics.sweep import analyze, default_mesh
    from meshserve.partition.comm import FFN_LAYOUTS

    if args.layout is not None and args.layout not in FFN_LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(FFN_LAYOUTS)}, got {args.layout!r}")
    # Before the sweep, so a bad path costs nothing and writes nothing.
    check_output_path("--csv", args.csv)
    check_image_path("--plot", args.plot)
    if args.chip_hour_usd is not None and not 0 < args.chip_hour_usd < math.inf:  # NaN too
        raise UserError(f"--chip-hour-usd must be a positive price, got {args.chip_hour_usd}")
    from meshserve.model.model_spec import resolve_model

    # Resolved before any work: an unknown name or a bad config.json is a one-line error that costs nothing.
    plot_models = [resolve_model(m) for m in (args.plot_models or "").split(",") if m.strip()]
    config, chip, mesh = _setup(args)
    if isinstance(mesh, int):
        mesh = default_mesh(config, chip, mesh, args.batch, args.weights, args.kv_cache_dtype,
                            prompt_len=args.prompt_len, gen_len=args.gen_len, overlap=args.overlap)  # fmt: skip
    rows = analyze(
        config, chip, mesh, batches=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
        weights=args.weights, phases=[args.phase] if args.phase else ["prefill", "decode"], layout=args.layout,
        attention=args.attention, overlap=args.overlap, kv_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    _warn_context(config, args.prompt_len, args.gen_len)  # after the sweep: an error there stays one line
    if args.chip_hour_usd is not None:  # chip-ms per token x USD per chip-ms x 1e6 tokens
        for r in rows:
            r["usd_per_million_tokens"] = r["cost_chip_ms_per_token"] * args.chip_hour_usd / 3.6e6 * 1e6
    if args.csv:
        _write_csv(args.csv, rows)
    if args.plot:
        _plot(args, config, chip, mesh, plot_models)
    if args.json:
        print(json.dumps(rows))
        return 0
    padded = sorted({(r["ffn_layout"], r["n_heads"]) for r in rows if r["n_heads"] != config.n_heads})
    heads = f" (query heads padded: {', '.join(f'{f} {h}' for f, h in padded)})" if padded else ""
    copies = sorted({(r["ffn_layout"], r["kv_replication"], r["n_kv_heads"]) for r in rows if r["kv_replication"] > 1})
    if copies:  # priced as the mesh entry points run it: each kv head repeated so every chip holds whole ones
        heads += (f" (kv heads replicated: {', '.join(f'{f} {r}x to {k}' for f, r, k in copies)}; "
                  f"{config.n_kv_heads} do not divide the heads split)")  # fmt: skip
    print(f"{config.name}{heads} on {mesh.n} x {chip.name}, mesh {mesh}, weights {args.weights}, "
          f"kv cache {args.kv_cache_dtype}, prompt {args.prompt_len}, generate {args.gen_len}; * = chosen (lowest latency that fits)")  # fmt: skip
    columns = [
        ("", "chosen", lambda v: "*" if v else ""),
        ("phase", "phase", str),
        ("batch", "batch", str),
        ("ffn", "ffn_layout", str),
        ("attn", "attention", str),
        ("latency", "latency_s", fmt_s),
        ("step", "step_s", fmt_s),
        ("MFU", "mfu", lambda v: f"{v:.1%}"),
        ("chip-ms/tok", "cost_chip_ms_per_token", lambda v: f"{v:.3f}"),
        *([("$/1M tok", "usd_per_million_tokens", lambda v: f"{v:.2f}")] if args.chip_hour_usd is not None else []),
        ("GiB/chip", "memory_per_chip_bytes", lambda v: f"{v / 2**30:.1f}"),
        ("fits", "fits", lambda v: "yes" if v else "NO"),
    ]
    print(table(rows, columns))
    for r in rows:
        if not r["fits"] and r["chosen"] is False and r["overflow"] and args.layout:
            print(f"{r['phase']} b{r['batch']} {r['ffn_layout']}/{r['attention']}: {r['overflow']}")
    if not args.layout:  # with --layout each unfit row says its own overflow above
        say_unfit(rows, chip, args.weights)
    return 0


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    flat = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("breakdown", "memory")}
        row.update({f"breakdown_{k}": v for k, v in r["breakdown"].items()})
        row.update({f"memory_{k}": v for k, v in r["memory"].items()})
        flat.append(row)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    try:
        write_atomic(path, text.getvalue())
    except OSError as e:
        raise UserError(f"--csv {path}: cannot write: {e.strerror or e}") from None


def _plot(args: argparse.Namespace, config: Any, chip: Any, mesh: Any, plot_models: list[Any]) -> None:
    from meshserve.analytics.plots import plot_analysis
    from meshserve.analytics.sweep import pareto_frontier, pareto_points, prefill_mfu_curve
    from meshserve.progress import progress

    chip_counts = [n for n in (8, 16, 32, 64, 128, 256) if n <= max(256, mesh.n)]
    batches = [1, 4, 16, 64, 128, 256, 512, 1024]
    points, frontiers = {}, {}
    models = list(dict.fromkeys([config, *plot_models]))  # a model named twice is drawn once (configs hash)
    with progress("pareto sweep", "model", len(models), disable=args.json) as bar:
        for model in models:
            name = model.name if model.name not in points else f"{model.name} #{len(points) + 1}"  # two config.json
            pts = pareto_points(model, chip, chip_counts=chip_counts, batches=batches,
                                prompt_len=args.prompt_len, gen_len=args.gen_len, weights=args.weights,
                                kv_dtype=args.kv_cache_dtype)  # fmt: skip
            points[name], frontiers[name] = pts, pareto_frontier(pts)
            bar.update()
    tokens = [2**k for k in range(8, 21)]
    curves, switches = prefill_mfu_curve(config, chip, mesh, token_batches=tokens, prompt_len=args.prompt_len,
                                         weights=args.weights, kv_dtype=args.kv_cache_dtype)  # fmt: skip
    title = f"{config.name} on {chip.name} (prefill panel: mesh {mesh}, prompt {args.prompt_len})"
    try:
        path = plot_analysis(args.plot, frontiers, points, curves, switches, title)
    except OSError as e:
        raise UserError(f"--plot {args.plot}: cannot write: {e.strerror or e}") from None
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- plan
def _plan_args(p: argparse.ArgumentParser) -> None:
    from meshserve.analytics.plan import INT8_GAIN

    _common(p, batch_default="1,8,64")
    p.add_argument("--prefill-batch", type=ints, default=None, help="prefill buckets (default: --batch)")
    p.add_argument("--objective", choices=["latency", "throughput", "cost"], default="latency",
                   help="what the plan minimises: latency (prefill at the smallest bucket + decode at the smallest), "
                   "throughput (chip-ms per token at the largest buckets), or cost (the lowest chip-ms per token "
                   "among decode buckets whose step meets --latency-bound); default latency")  # fmt: skip
    p.add_argument("--weights", choices=["bf16", "int8", "f32"], default=None,
                   help="fix the weight storage (default: both tried; latency takes the faster, the other objectives "
                   "keep "
                   f"bf16 unless int8 is needed to fit or gains over {round(INT8_GAIN * 100)}%%)")  # fmt: skip
    p.add_argument("--latency-bound", type=float, default=None, help="objective cost: max decode step seconds")


def _plan(args: argparse.Namespace) -> int:
    from meshserve.analytics.plan import choose_plan

    config, chip, mesh = _setup(args)
    if args.prefill_batch:
        positive("--prefill-batch", args.prefill_batch)
    if args.latency_bound is not None and args.objective != "cost":  # the other objectives would ignore it unseen
        raise UserError(f"--latency-bound applies to --objective cost only (got --objective {args.objective})")
    if args.latency_bound is not None and not 0 < args.latency_bound < math.inf:  # NaN too
        raise UserError(f"--latency-bound must be a positive number of seconds, got {args.latency_bound}")
    plan = choose_plan(
        config, chip, n_chips=mesh if isinstance(mesh, int) else None, mesh=None if isinstance(mesh, int) else mesh,
        objective=args.objective, batch_buckets=args.batch, prefill_buckets=args.prefill_batch,
        prompt_len=args.prompt_len, gen_len=args.gen_len, weights=args.weights, latency_bound_s=args.latency_bound,
        overlap=args.overlap, kv_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    _warn_context(config, args.prompt_len, args.gen_len)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    print(f"plan for {plan.model} on {plan.chips} x {plan.hardware}: mesh {plan.mesh}, weights {plan.weights} "
          f"stored {plan.storage.upper()}, kv cache {plan.kv_cache_dtype}, "
          f"objective {plan.objective}{'' if plan.fits else '  (DOES NOT FIT)'}")  # fmt: skip
    if plan.kv_replication > 1:
        print(f"kv heads replicated {plan.kv_replication}x ({config.n_kv_heads} -> {plan.n_kv_heads}) so each chip "
              f"of the heads split holds whole kv heads; priced with the larger KV cache and K/V weights")  # fmt: skip
    rows = [p.__dict__ for p in plan.phases]
    print(table(rows, [
        ("phase", "phase", str), ("batch<=", "batch", str), ("ffn", "ffn_layout", str), ("attn", "attention", str),
        ("step", "step_s", fmt_s), ("latency", "latency_s", fmt_s), ("MFU", "mfu", lambda v: f"{v:.1%}"),
        ("chip-ms/tok", "cost_chip_ms_per_token", lambda v: f"{v:.3f}"),
        ("GiB/chip", "memory_per_chip_bytes", lambda v: f"{v / 2**30:.1f}"), ("fits", "fits", lambda v: "yes" if v else "NO"),
    ]))  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------------- memory
def _memory_args(p: argparse.ArgumentParser) -> None:
    model_args(p, "palm-8b")
    p.add_argument("--mode", choices=["inference", "finetune"], default="inference",
                   help="inference (weights, KV cache, activations of a prefill) or finetune (adds gradients and "
                   "optimizer state; training activations) (default inference)")  # fmt: skip
    p.add_argument("--weights", choices=["f32", "bf16", "int8", "int4"], default="bf16",
                   help="weight storage; fine-tuning keeps gradients and optimizer state in it too "
                   "(default bf16)")  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    p.add_argument("--context", type=int, default=None, help="context tokens (default: the model's max_seq_len)")
    p.add_argument("--chips", type=int, default=1, help="chips the model is split over (default 1)")
    p.add_argument("--hardware", default=None, help="chip, to check the fit and for --kv-fraction (default none)")
    p.add_argument("--attention", choices=["heads", "batch"], default="heads",
                   help="how the KV cache is split over the chips: by kv heads or by batch rows "
                   "(default heads)")  # fmt: skip
    p.add_argument("--optimizer", choices=["adamw", "sgd", "adafactor"], default=None,
                   help="--mode finetune only: optimizer whose state is counted (default adamw)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=None,
                   help="--mode finetune only: train rank-R adapters instead of every weight "
                   "(default 0: all)")  # fmt: skip
    p.add_argument("--kv-fraction", type=float, default=None, help="report the longest context whose KV fits in F")
    kv_cache_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _memory(args: argparse.Namespace) -> int:
    from meshserve.analytics.memory import memory_estimate

    if args.mode == "inference":
        given = [flag for flag, value in (("--optimizer", args.optimizer), ("--lora-rank", args.lora_rank)) if value]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UserError(f"{' and '.join(given)} {verb} to --mode finetune only (inference has no optimizer "
                            "state or adapters)")  # fmt: skip
    elif args.kv_cache_dtype != "bf16":
        raise UserError(f"--kv-cache-dtype {args.kv_cache_dtype} applies to --mode inference only (fine-tuning holds "
                        "no KV cache)")  # fmt: skip
    # Checked here too, so each message names its flag (memory_estimate's name the Python arguments).
    positive("--chips", args.chips)
    positive("--batch", args.batch)
    if args.context is not None:
        positive("--context", args.context)
    if args.lora_rank is not None and args.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (every weight) or a positive rank, got {args.lora_rank}")
    if args.kv_fraction is not None and not 0 < args.kv_fraction <= 1:  # NaN too
        raise UserError(f"--kv-fraction must be in (0, 1] (a share of each chip's HBM), got {args.kv_fraction}")
    config = model_from_args(args)
    chip = chip_from_args("--hardware", args.hardware) if args.hardware else None
    if args.context is not None:
        _warn_context(config, args.context, 0, "context")
    out = memory_estimate(
        config, mode=args.mode, weights=args.weights, batch=args.batch, context=args.context,
        chips=args.chips, chip=chip, attention=args.attention, optimizer=args.optimizer or "adamw",
        lora_rank=args.lora_rank or 0, kv_fraction=args.kv_fraction, kv_dtype=args.kv_cache_dtype,
    )  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return 0
    kv = f", kv cache {out['kv_cache_dtype']}" if out["mode"] == "inference" else ""
    print(f"{out['model']} {out['mode']}, weights {out['weights']}{kv}, {count(out['params'])} parameters, "
          f"{out['chips']} chip(s)")  # fmt: skip
    for key in ("weights_bytes", "kv_cache_bytes", "activations_bytes", "gradients_bytes", "optimizer_bytes",
                "total_bytes", "per_chip_bytes", "rule_of_thumb_bytes"):  # fmt: skip
        print(f"  {key[:-6].replace('_', ' '):<16} {gib(out[key])}")
    if "fits" in out:
        print(f"  fits in {out['hbm_bytes'] / 2**30:.0f} GiB {out['hardware']}: {'yes' if out['fits'] else 'NO'}")
    if out["max_context_tokens"] is not None:
        print(f"  max context with {args.kv_fraction:.0%} of HBM for the KV cache ({out['kv_cache_dtype']}): "
              f"{out['max_context_tokens']} tokens")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------------- calibrate
def _calibrate_args(p: argparse.ArgumentParser) -> None:
    model_args(p, "demo")  # timed with random weights of that shape
    p.add_argument("--batch", type=ints, default=ints("1,4,16"), help="batch sizes (default 1,4,16)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds; the fastest counts (default 10)")
    p.add_argument(
        "--held-out",
        type=ints,
        default=ints("8"),
        help="batch sizes measured but kept out of the fit, to test the model out of sample (default 8)",
    )
    p.add_argument("--out", default=None, help="where to store the local chip (default ~/.cache/meshserve/"
                   "local_chip.json or $MESHSERVE_LOCAL_CHIP)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")


def _calibrate(args: argparse.Namespace) -> int:
    from meshserve.analytics.calibrate import calibrate, calibration_warnings, check_sizes
    from meshserve.analytics.chips import local_chip_path, save_local_chip
    from meshserve.progress import progress

    config = model_from_args(args)
    positive("--batch", args.batch)
    positive("--held-out", args.held_out)
    positive("--prompt-len", args.prompt_len)
    positive("--rounds", args.rounds)
    if args.prompt_len >= config.max_seq_len:
        # The decode points run one step after the prompt; far beyond the context the cache alone exhausts memory.
        raise UserError(f"--prompt-len {args.prompt_len} is beyond {config.name}'s context: calibrate times a decode "
                        f"step after the prompt, so it must be below max_seq_len {config.max_seq_len}")  # fmt: skip
    check_sizes(args.batch, args.held_out)
    # Only the default location's directories are made; a named --out in a missing directory is a typo.
    out_path = Path(args.out) if args.out else local_chip_path()
    check_output_path("--out", out_path, create_parent=args.out is None)
    from meshserve.analytics.device_fit import available_bytes, check_rows_fit

    # f32 weights and a cache of prompt + 1 tokens, as calibrate.measure times them; before any compile.
    flag = "--held-out" if max(args.held_out) > max(args.batch) else "--batch"
    check_rows_fit(config, [*args.batch, *args.held_out], ["f32"], ["auto"], args.prompt_len, 1, available_bytes(),
                   lengths=f"--prompt-len {args.prompt_len}", flag=flag)  # fmt: skip
    with progress(f"calibrating on {config.name}", "run", 1, disable=args.json) as bar:
        chip, points = calibrate(config, args.batch, args.prompt_len, args.rounds, held_out=args.held_out)
        bar.update()
    warnings = calibration_warnings(chip, config.name)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    path = save_local_chip(chip, out_path, warnings=warnings)
    rows = [{"phase": p.phase, "batch": p.batch, "prompt_len": p.prompt_len, "measured_s": p.measured_s,
             "predicted_s": p.predicted_s, "error": p.error, "held_out": p.held_out} for p in points]  # fmt: skip
    if args.json:
        print(json.dumps({"chip": chip.to_dict(), "path": str(path), "points": rows, "warnings": warnings}))
        return 0
    print(f"local chip: matmul {chip.peak_flops_bf16 / 1e9:.1f} GFLOP/s, bandwidth {chip.hbm_bandwidth / 1e9:.1f} GB/s,"
          f" per-layer overhead {chip.step_overhead_s * 1e6:.1f} us -> {path}")  # fmt: skip
    print(table(rows, [("phase", "phase", str), ("batch", "batch", str), ("measured", "measured_s", fmt_s),
                        ("predicted", "predicted_s", fmt_s), ("error", "error", lambda v: f"{v:+.1%}"),
                        ("held out", "held_out", lambda v: "yes" if v else "")]))  # fmt: skip
    return 0


COMMANDS = {
    "analyze": (_analyze_args, quiet_broken_pipe(_analyze)),
    "memory": (_memory_args, quiet_broken_pipe(_memory)),
    "plan": (_plan_args, quiet_broken_pipe(_plan)),
    "calibrate": (_calibrate_args, quiet_broken_pipe(_calibrate)),
}
