"""`meshserve speculate`: would speculative decoding pay for this model, chips and batch? (analytics/speculation.py)"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshserve.analytics.cli_helpers import (
    chip_from_args,
    floats,
    fmt_s,
    ints,
    kv_cache_dtype_arg,
    model_args,
    model_from_args,
    positive,
    table,
)
from meshserve.analytics.output import check_image_path, quiet_broken_pipe
from meshserve.errors import UserError

__all__ = ["COMMANDS"]


def _args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Price a verify step of K drafts against a decode step with the cost model, per batch, and say at which draft "
        "acceptance rate speculative decoding (serve --speculative-tokens K) pays: at small batches a decode step "
        "is bound by reading the weights and the extra tokens are nearly free; at large ones it is bound by compute."
    )
    model_args(p, "palm-540b")
    p.add_argument("--hardware", default="tpu-v4", help="chip: tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, a100-80g, h100-sxm, "
                   "h200 or local (after `meshserve calibrate`)")  # fmt: skip
    p.add_argument("--chips", type=int, default=None, help="number of chips (default: the mesh's, else 64)")
    p.add_argument("--mesh", default=None, help="mesh XxYxZ (default: chosen for --chips)")
    p.add_argument("--batch", type=ints, default=ints("1,8,64,256"), help="batch sizes (default 1,8,64,256)")
    p.add_argument("--context", type=int, default=2048, help="tokens in each row's cache (default 2048)")
    p.add_argument("--tokens", type=int, default=4, metavar="K", help="drafts per verify step, 1 to 16 (default 4)")
    p.add_argument("--acceptance", type=floats, default=floats("0.5,0.7,0.9"),
                   help="draft acceptance rates to price, each in [0, 1] (default 0.5,0.7,0.9)")  # fmt: skip
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "f32"], help="weight storage (default bf16)")
    kv_cache_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw speedup against acceptance, per batch")


def _run(args: argparse.Namespace) -> int:
    from meshserve.analytics.speculation import speculation
    from meshserve.analytics.sweep import default_mesh
    from meshserve.partition.comm import MeshShape

    check_image_path("--plot", args.plot)  # before any work, so a bad path costs nothing
    positive("--batch", args.batch)
    positive("--context", args.context)
    if not 1 <= args.tokens <= 16:
        raise UserError(f"--tokens must be in [1, 16] (drafts per verify step), got {args.tokens}")
    bad = [a for a in args.acceptance if not 0.0 <= a <= 1.0]
    if bad:
        raise UserError(f"--acceptance: each rate must be in [0, 1], got {bad[0]:g}")
    chip, config = chip_from_args("--hardware", args.hardware), model_from_args(args)
    mesh = MeshShape.parse(args.mesh) if args.mesh else None
    if mesh is not None and args.chips is not None and mesh.n != args.chips:
        raise UserError(f"mesh {mesh} has {mesh.n} chips but --chips is {args.chips}")
    if mesh is None:
        chips = args.chips if args.chips is not None else 64
        positive("--chips", chips)
        # The context sizes the KV cache, and with it the mesh the plan picks.
        mesh = default_mesh(config, chip, chips, args.batch, args.weights, args.kv_cache_dtype,
                            prompt_len=args.context)  # fmt: skip
    rows = speculation(config, chip, mesh, batches=args.batch, context=args.context, k=args.tokens,
                       acceptances=args.acceptance, weights=args.weights, kv_dtype=args.kv_cache_dtype)  # fmt: skip
    if args.context > config.max_seq_len:  # priced anyway (a what-if), as analyze does, but said
        print(f"warning: context {args.context} tokens is beyond {config.name}'s max_seq_len {config.max_seq_len}; "
              "the rows price a context the model does not have", file=sys.stderr)  # fmt: skip
    if args.plot:
        _plot(args, config, chip, mesh)
    if args.json:
        print(json.dumps({
            "model": config.name, "hardware": chip.name, "mesh": str(mesh), "weights": args.weights,
            "kv_cache_dtype": args.kv_cache_dtype, "context": args.context, "tokens": args.tokens,
            "rows": [{**r.__dict__, "tokens_per_step": {str(a): v for a, v in r.tokens_per_step.items()},
                      "speedup": {str(a): v for a, v in r.speedup.items()}} for r in rows],
        }))  # fmt: skip
        return 0
    print(f"speculative decoding, {args.tokens} drafts a step: {config.name} on mesh {mesh} of {chip.name}, "
          f"{args.weights} weights, {args.kv_cache_dtype} kv cache, {args.context}-token context")  # fmt: skip
    shown = [{**r.__dict__, **{f"x{a}": r.speedup[a] for a in args.acceptance}} for r in rows]
    print(table(shown, [
        ("batch", "batch", str), ("ffn", "ffn_layout", str), ("attn", "attention", str),
        ("decode step", "decode_step_s", fmt_s), ("verify step", "verify_step_s", fmt_s),
        ("verify/decode", "cost_ratio", lambda v: f"{v:.2f}"),
        ("pays from", "break_even_acceptance", lambda v: "never" if v is None else f"a={v:.2f}"),
        *[(f"speedup a={a:g}", f"x{a}", lambda v: f"{v:.2f}x") for a in args.acceptance],
        ("GiB/chip", "memory_per_chip_bytes", lambda v: f"{v / 2**30:.1f}"), ("fits", "fits", lambda v: "yes" if v else "NO"),
    ]))  # fmt: skip
    return 0


def _plot(args: argparse.Namespace, config: Any, chip: Any, mesh: Any) -> None:
    from meshserve.analytics.plots import plot_speculation
    from meshserve.analytics.speculation import speculation

    grid = [i / 50 for i in range(51)]
    rows = speculation(config, chip, mesh, batches=args.batch, context=args.context, k=args.tokens,
                       acceptances=grid, weights=args.weights, kv_dtype=args.kv_cache_dtype)  # fmt: skip
    curves = {f"batch {r.batch} ({r.ffn_layout}/{r.attention})": list(r.speedup.items()) for r in rows}
    title = f"{config.name} on {mesh} x {chip.name}, {args.weights}, kv {args.kv_cache_dtype}, context {args.context}"
    try:
        path = plot_speculation(args.plot, curves, args.tokens, title)
    except OSError as e:
        raise UserError(f"--plot {args.plot}: cannot write: {e.strerror or e}") from None
    print(f"wrote {path}", file=sys.stderr)


COMMANDS = {"speculate": (_args, quiet_broken_pipe(_run))}
