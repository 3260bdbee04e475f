"""Which launch config of the decode attention kernel runs fastest on this device? (a minute on a GPU)

The H200 profile of 2026-11-28 (BENCHMARKS.md) put falcon-7b's kernel at 8.1 µs per layer at batch 1 over ~200
cached positions, where it reads 64 KiB: latency, not bytes. This times the kernel alone (model/decode_attention.py,
`_decode_attention`) per config, at the shapes decode runs, so the next change to its defaults rests on a number.
Each timed call runs the kernel once per layer of an N-layer cache (as a decode step does, inside one jitted call,
so XLA may put them in one CUDA graph) and reports µs per layer; XLA's attention (`layers.attend_cached`) is timed
the same way beside it. Outputs are checked against XLA's before a config is timed: a wrong config is reported, not
ranked.

The sweep is staged to stay short: block x num_warps at the defaults' stages and splits, then num_stages for the
best, then splits for that (splits > 1 adds XLA's combine of the partial softmaxes, timed with it).

    python benchmarks/attn_sweep.py --json > attn_sweep.json      # on the GPU (gpu_bench.sh step `attnsweep`)
    python benchmarks/attn_sweep.py --small                         # a CPU dry run (interpreted kernel, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

# (name, B, H, K, Q, S = context, filled length): falcon-7b at the bench's 128 + 128 (mean ~192 filled) at batch 1 and
# 64, falcon-7b at 2k, a GQA model (llama-2-7b's heads with 8 kv heads) at 1k and batch 8.
SHAPES = [
    ("falcon b1 ctx256", 1, 71, 1, 64, 256, 192),
    ("falcon b64 ctx256", 64, 71, 1, 64, 256, 192),
    ("falcon b1 ctx2048", 1, 71, 1, 64, 2048, 1500),
    ("gqa b8 ctx1024", 8, 32, 8, 128, 1024, 900),
]
SMALL_SHAPES = [("tiny b1", 1, 4, 1, 16, 64, 40), ("tiny b2 gqa", 2, 4, 2, 16, 64, 50)]
# Each config compiles one Triton kernel per layer index (the layer is static), so the sweep stays near 50 configs.
BLOCKS, WARPS, STAGES, SPLITS = (32, 64, 128), (4, 8), (1, 2, 3), (1, 2, 4, 8)


def _inputs(B: int, H: int, K: int, Q: int, S: int, length: int, layers: int) -> tuple[Any, ...]:
    """qkv [B, 1, H + 2K, Q], caches [N, B, S, K, Q], pos [B] (every row `length` positions filled)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(B * S + H), 3)
    qkv = jax.random.normal(keys[0], (B, 1, H + 2 * K, Q), jnp.bfloat16)
    k_cache, v_cache = (jax.random.normal(keys[i], (layers, B, S, K, Q), jnp.bfloat16) for i in (1, 2))
    return qkv, k_cache, v_cache, jnp.full((B,), length, jnp.int32)


def _timed(fn: Any, args: tuple[Any, ...], repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` runs after one warm-up (which also compiles)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_shape(shape: tuple, layers: int, repeats: int, small: bool) -> list[dict[str, Any]]:
    """Every staged config at one shape: rows of {config, us_per_layer, max_error vs XLA, ok}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from meshserve.model import layers as model_layers
    from meshserve.model.decode_attention import _decode_attention, splits_for
    from meshserve.model.quant import on_cuda

    name, B, H, K, Q, S, length = shape
    qkv, k_cache, v_cache, pos = _inputs(B, H, K, Q, S, length, layers)
    scale, interpret = 1.0 / Q**0.5, not on_cuda()

    def kernel_fn(config: dict[str, int]) -> Any:
        def run(qkv, k_cache, v_cache, pos):  # one call per layer, as a decode step makes them
            outs = [_decode_attention(qkv, k_cache, v_cache, pos, layer=i, context=S, scale=scale,
                                      interpret=interpret, **config) for i in range(layers)]  # fmt: skip
            return jnp.stack(outs)

        return jax.jit(run)

    def xla_fn(qkv, k_cache, v_cache, pos):
        q, k_new, v_new = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
        visible = jnp.arange(S)[None, :] < pos[:, None]
        outs = [model_layers.attend_cached(q, k_cache[i], v_cache[i], visible, k_new, v_new) for i in range(layers)]
        return jnp.stack(outs)  # [N, B, 1, H, Q]

    xla = jax.jit(xla_fn)
    reference = np.asarray(xla(qkv, k_cache, v_cache, pos), np.float32).reshape(layers, B, K, H // K, Q)
    rows = [{"shape": name, "config": "xla", "us_per_layer": _timed(xla, (qkv, k_cache, v_cache, pos), repeats)
             / layers * 1e6, "max_error": 0.0, "ok": True}]  # fmt: skip

    def measure(config: dict[str, int]) -> dict[str, Any]:
        row: dict[str, Any] = {"shape": name, "config": dict(config)}
        try:
            fn = kernel_fn(config)
            got = np.asarray(fn(qkv, k_cache, v_cache, pos), np.float32)
            row["max_error"] = float(np.abs(got - reference).max())
            row["ok"] = bool(np.isfinite(got).all() and row["max_error"] < 2e-2)  # bf16 outputs of |x| ~ 1
            if row["ok"]:
                row["us_per_layer"] = _timed(fn, (qkv, k_cache, v_cache, pos), repeats) / layers * 1e6
        except Exception as e:  # a config Triton rejects (too much shared memory, ...) is a row, not the end
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        return row

    def best(candidates: list[dict[str, Any]]) -> dict[str, int]:
        timed = [r for r in candidates if r.get("us_per_layer") is not None]
        return min(timed, key=lambda r: r["us_per_layer"])["config"] if timed else candidates[0]["config"]

    default = {"block": 64, "num_warps": 4, "num_stages": 2, "splits": splits_for(B, K, S)}
    blocks, warps = ((16, 32), (4,)) if small else (BLOCKS, WARPS)
    stage1 = [measure({**default, "block": b, "num_warps": w}) for b in blocks for w in warps]
    chosen = best(stage1)
    stage2 = [measure({**chosen, "num_stages": s}) for s in ((1,) if small else STAGES) if s != chosen["num_stages"]]
    chosen = best(stage1 + stage2)
    max_splits = max(1, S // chosen["block"])
    for s in (2,) if small else SPLITS:
        if s != chosen["splits"] and s <= max_splits:
            measure({**chosen, "splits": s})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="kernel calls per timed run, one per layer (default 4)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per config; the median (default 20)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and few configs: a CPU dry run")
    parser.add_argument("--json", action="store_true", help="print every row as one JSON array")
    args = parser.parse_args(argv)
    for field in ("layers", "repeats"):
        if getattr(args, field) < 1:
            parser.error(f"--{field} must be at least 1, got {getattr(args, field)}")
    import jax

    rows: list[dict[str, Any]] = []
    for shape in SMALL_SHAPES if args.small else SHAPES:
        shape_rows = sweep_shape(shape, args.layers, args.repeats, args.small)
        rows += shape_rows
        if not args.json:
            timed = sorted((r for r in shape_rows if r.get("us_per_layer")), key=lambda r: r["us_per_layer"])
            print(f"== {shape[0]} on {jax.devices()[0].device_kind}: fastest first, µs per layer")
            for r in timed[:6]:
                print(f"  {r['us_per_layer']:8.2f}  {r['config']}")
            for r in shape_rows:
                if not r["ok"]:
                    why = r.get("error") or f"max error {r['max_error']:.3g} against XLA's"
                    print(f"  !! {r['config']}: {why}")
    if args.json:
        print(json.dumps([{**r, "device": jax.devices()[0].device_kind} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
