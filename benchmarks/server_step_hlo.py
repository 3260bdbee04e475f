"""What one step of the server launches and writes: the engine's compiled decode step (serving/engine_steps.py
`decode_rows`, as `meshserve serve` compiles it per bucket) for b rows of B slots over a context bucket, compiled,
never run, from abstract weights and state, and counted by benchmarks/hlo_tally.py like decode_hlo.py's loop.

    python benchmarks/server_step_hlo.py --model falcon-7b --target h100 --slots 64 --rows 1,8,64
    python benchmarks/server_step_hlo.py --model tiny-falcon --slots 16 --rows 4 --json   # XLA:CPU, a dry run

Where decode_hlo.py counts a step inside the bench's G-step loop, this is the server's whole step: one compiled call
per token, so what XLA does once per call (the entry computation: layout changes of the cache, copies of state)
is paid every step here. Each row: kernels per step, and the kernels whose output is 4 MiB or more, in-place
updates aside (a copy of the cache, a transpose of a weight): at decode nothing that size should be written.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_hlo import GPU_TARGETS, deviceless_environment, target_sharding, weights_arg  # noqa: E402
from hlo_tally import LARGE_BYTES, count_step  # noqa: E402


def server_step_report(config: Any, weights: str, rows: int, slots: int, context: int, cache_len: int,
                       kv_cache_dtype: str = "auto", sharding: Any = None,
                       dump: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One row: `decode_rows` for `rows` of `slots` slots over [0, context) of a cache_len-position cache, with the
    unrolled weights `meshserve serve` runs on one device, compiled for this host's device or `sharding`'s (dump:
    a folder to write the optimized HLO text into)."""
    import jax
    import jax.numpy as jnp
    from meshserve.model.decode_attention import decode_attention_label
    from meshserve.serving.bench import bench_params
    from meshserve.serving.engine_steps import ModelSteps, decode_rows, fresh_state

    params = jax.eval_shape(lambda: bench_params(config, weights, "unrolled"))
    dtype = jnp.int8 if kv_cache_dtype == "int8" else params["embed"].dtype
    state = jax.eval_shape(lambda: fresh_state(config, slots, cache_len, dtype))
    args = (params, state)
    if sharding is not None:
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    step = jax.jit(functools.partial(decode_rows, ModelSteps(), config, rows, context), donate_argnums=1)
    text = step.lower(*args).compile().as_text()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"server_step.{config.name}.{weights}.{kv_cache_dtype}.b{rows}of{slots}.txt").write_text(text)
    device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
    row = {"model": config.name, "weights": weights, "kv_cache_dtype": kv_cache_dtype, "rows": rows, "slots": slots,
           "context": context, "cache_len": cache_len, "platform": device.platform, "device": device.device_kind,
           "jax": jax.__version__, "decode_attention": decode_attention_label(
               config, True, dtype, context, cuda=True if sharding is not None else None)}  # fmt: skip
    counts = count_step(text, 1, config.n_layers, whole=True)  # the whole call is the step
    row |= {k: counts[k] for k in ("kernels_per_step", "by_kind", "large_outputs_per_step",
                                   "large_output_bytes_per_step")}  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="falcon-7b", help="a preset name (default falcon-7b)")
    p.add_argument("--weights", type=weights_arg, default=["bf16"], help="comma list of bf16, int8, f32 (default bf16)")
    p.add_argument("--slots", type=int, default=64, help="decode slots B of the server's state (default 64)")
    p.add_argument("--rows", default="1,8", help="comma list of step sizes b <= slots (default 1,8)")
    p.add_argument("--context", type=int, default=None, help="the step's context bucket (default 256, or the cache "
                   "length when less)")  # fmt: skip
    p.add_argument("--cache-len", type=int, default=None, help="cache positions S (default the model's max_seq_len)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help="as serve (default auto)")
    p.add_argument("--target", choices=sorted(t.stem for t in GPU_TARGETS.glob("*.txtpb")),
                   help="compile for this GPU without one (deviceless, as decode_hlo.py --target)")  # fmt: skip
    p.add_argument("--dump", type=Path, help="also write each compiled step's HLO text into this folder")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    p.add_argument("--out", type=Path, help="also write the rows as a JSON array to this file")
    args = p.parse_args(argv)
    if args.target and not deviceless_environment("server_step_hlo"):
        return 2
    from meshserve.errors import UserError
    from meshserve.model.config import ConfigError, get_config

    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
        config = get_config(args.model)
        for flag, value in (("--slots", args.slots), ("--cache-len", args.cache_len), ("--context", args.context)):
            if value is not None and value < 1:  # 0 is not "unset": it would quietly take the default
                raise UserError(f"{flag} must be at least 1, got {value}")
        cache_len = config.max_seq_len if args.cache_len is None else args.cache_len
        args.context = min(256, cache_len) if args.context is None else args.context
        if not rows or not all(1 <= r <= args.slots for r in rows) or not 1 <= args.context <= cache_len:
            raise UserError(f"--rows must be in [1, --slots={args.slots}] and --context in [1, --cache-len="
                            f"{cache_len}]; got --rows {args.rows} and --context {args.context}")  # fmt: skip
        sharding = target_sharding(args.target) if args.target else None
        out = []
        for weights in args.weights:
            for b in rows:
                out.append(server_step_report(config, weights, b, args.slots, args.context, cache_len,
                                              args.kv_cache_dtype, sharding, args.dump))  # fmt: skip
                if not args.json:
                    _print(out[-1])
    except (UserError, ConfigError, ValueError) as e:
        print(f"server_step_hlo: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def _print(r: dict[str, Any]) -> None:
    large = ", ".join(f"{k} x{n:g}" for k, n in r["large_outputs_per_step"].items()) or "none"
    written = f" ({r['large_output_bytes_per_step'] / 2**20:.0f} MiB)" if r["large_outputs_per_step"] else ""
    print(f"{r['model']} {r['weights']}, {r['rows']} of {r['slots']} slots, context {r['context']} of "
          f"{r['cache_len']}, {r['decode_attention']} decode attention, on {r['device']} ({r['platform']}): "
          f"{r['kernels_per_step']:.0f} kernels per step; "
          f"outputs of {LARGE_BYTES >> 20} MiB or more{written}: {large}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
