"""Which launch config of the decode attention kernel runs fastest on this device? (a minute on a GPU)

The H200 profile of 2026-11-28 (BENCHMARKS.md) put falcon-7b's kernel at 8.1 µs per layer at batch 1 over ~200
cached positions, where it reads 64 KiB: latency, not bytes. This times the kernel alone (model/decode_attention.py,
`decode_attention_kernel`) per config, at the shapes decode runs, so the next change to its defaults rests on a number.
Each timed call runs the kernel once per layer over N layers' caches (as a decode step does, inside one jitted
call, so XLA may put them in one CUDA graph) and reports the call's wall time / N: one dispatch per call is in it,
spread over N (32) kernels, the same for every config. XLA's attention (`layers.attend_cached`) is timed the same way
beside it. Each config's first layer is checked against float64 attention first, to attn_check.py's bound (twice
XLA's own error, at least 1e-2): a wrong config is reported, not ranked.

The sweep is staged to stay short: block x num_warps at the defaults' stages and splits, then num_stages for the
best, then splits for that (splits > 1 adds XLA's combine of the partial softmaxes, timed with it), then, with one
kv head, head_block (the query heads spread over several programs per row) for the best so far; last, the default and
the best config again with the rotation in the kernel ("rotary": 1, the form decode steps take).

    python benchmarks/attn_sweep.py --json > attn_sweep.jsonl     # on the GPU (gpu_bench.sh step `attnsweep`)
    python benchmarks/attn_sweep.py --small                         # a CPU dry run (interpreted kernel, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attn_check (its float64 reference) and timing beside it

# (name, B, H, K, Q, S = context, filled length): falcon-7b at the bench's 128 + 128 (mean ~192 filled) at batch 1 and
# 64, falcon-7b at 2k, a GQA model (llama-2-7b's heads with 8 kv heads) at 1k and batch 8.
SHAPES = [
    ("falcon b1 ctx256", 1, 71, 1, 64, 256, 192),
    ("falcon b64 ctx256", 64, 71, 1, 64, 256, 192),
    ("falcon b1 ctx2048", 1, 71, 1, 64, 2048, 1500),
    ("gqa b8 ctx1024", 8, 32, 8, 128, 1024, 900),
]
SMALL_SHAPES = [("tiny b1", 1, 4, 1, 16, 64, 40), ("tiny b2 gqa", 2, 4, 2, 16, 64, 50)]
# Staged (below), so each shape times about a dozen configs, one Triton compile each.
BLOCKS, WARPS, STAGES, SPLITS, HEAD_BLOCKS = (32, 64, 128), (4, 8), (1, 2, 3), (1, 2, 4, 8), (16, 32, 64)


def _inputs(B: int, H: int, K: int, Q: int, S: int, length: int, layers: int) -> tuple[Any, ...]:
    """qkv [B, 1, H + 2K, Q]; `layers` caches each [1, B, S, K, Q] (their own arrays, so every call is the kernel
    at layer 0: one Triton compile per config, where a layer index per call compiled one kernel per layer); pos [B]
    (every row `length` positions filled)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(B * S + H), 2 * layers + 1)
    qkv = jax.random.normal(keys[0], (B, 1, H + 2 * K, Q), jnp.bfloat16)
    k_caches = [jax.random.normal(keys[1 + i], (1, B, S, K, Q), jnp.bfloat16) for i in range(layers)]
    v_caches = [jax.random.normal(keys[1 + layers + i], (1, B, S, K, Q), jnp.bfloat16) for i in range(layers)]
    return qkv, k_caches, v_caches, jnp.full((B,), length, jnp.int32)


def _timed(fn: Any, args: tuple[Any, ...], repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` runs after one warm-up (which also compiles)."""
    import jax
    from timing import median_ms

    return median_ms(lambda: jax.block_until_ready(fn(*args)), repeats) / 1e3


def sweep_shape(shape: tuple, layers: int, repeats: int, small: bool, emit: Any) -> list[dict[str, Any]]:
    """Every staged config at one shape: rows of {config, us_per_layer, max_error, ok}, each passed to emit(row) as
    it is measured (so a sweep cut off by a timeout keeps what it measured)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from attn_check import _reference
    from meshserve.model import layers as model_layers
    from meshserve.model.decode_attention import splits_for
    from meshserve.model.decode_attention_kernel import decode_attention_kernel
    from meshserve.model.quant import on_cuda

    name, B, H, K, Q, S, length = shape
    qkv, k_caches, v_caches, pos = _inputs(B, H, K, Q, S, length, layers)
    args = (qkv, k_caches, v_caches, pos)
    scale, interpret = 1.0 / Q**0.5, not on_cuda()

    def kernel_fn(config: dict[str, int]) -> Any:
        launch = {k: v for k, v in config.items() if k != "rotary"}
        # rotary: the kernel rotating q and the own k itself (decode_attention_rotating's form), by cos 1 and sin 0:
        # the same attention as without, so the same reference, at the cost of the rotation's extra work.
        tables = (
            (jnp.ones((B, Q // 2), jnp.float32), jnp.zeros((B, Q // 2), jnp.float32)) if config.get("rotary") else ()
        )

        def run(qkv, k_caches, v_caches, pos):  # one call per layer, as a decode step makes them
            outs = [decode_attention_kernel(qkv, kc, vc, pos, *tables, n_heads=H, layer=0, context=S, scale=scale,
                                      interpret=interpret, **launch)
                    for kc, vc in zip(k_caches, v_caches, strict=True)]  # fmt: skip
            return jnp.stack([o[0] if tables else o for o in outs])  # [N, B, K, G, Q]

        return jax.jit(run)

    def xla_fn(qkv, k_caches, v_caches, pos):
        q, k_new, v_new = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
        visible = jnp.arange(S)[None, :] < pos[:, None]
        outs = [model_layers.attend_cached(q, kc[0], vc[0], visible, k_new, v_new)
                for kc, vc in zip(k_caches, v_caches, strict=True)]  # fmt: skip
        return jnp.stack(outs)  # [N, B, 1, H, Q]

    # The first layer's attention in float64 (benchmarks/attn_check.py's), and the bound a config must keep to:
    # attn_check's, twice XLA's own error or 1e-2 (a bf16 output of |x| ~ 1 rounds by ~4e-3).
    lengths = [length] * B
    q, k_new, v_new = qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]
    exact = _reference(q, k_caches[0], v_caches[0], k_new, v_new, lengths, 0, scale).reshape(B, K, H // K, Q)
    xla = jax.jit(xla_fn)
    xla_first = np.asarray(xla(*args)[0], np.float64).reshape(B, K, H // K, Q)
    bound = max(2 * float(np.abs(xla_first - exact).max()), 1e-2)
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> dict[str, Any]:
        rows.append(row)
        emit(row)
        return row

    record({"shape": name, "config": "xla", "us_per_layer": _timed(xla, args, repeats) / layers * 1e6,
            "max_error": float(np.abs(xla_first - exact).max()), "ok": True})  # fmt: skip

    def measure(config: dict[str, int]) -> dict[str, Any]:
        row: dict[str, Any] = {"shape": name, "config": dict(config)}
        try:
            fn = kernel_fn(config)
            got = np.asarray(fn(*args)[0], np.float64)  # the first layer's [B, K, G, Q]
            row["max_error"] = float(np.abs(got - exact).max())
            row["ok"] = bool(np.isfinite(got).all() and row["max_error"] <= bound)
            if row["ok"]:
                row["us_per_layer"] = _timed(fn, args, repeats) / layers * 1e6
        except Exception as e:  # a config Triton rejects (too much shared memory, ...) is a row, not the end
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return record(row)

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
    stage3 = [measure({**chosen, "splits": s}) for s in ((2,) if small else SPLITS)
              if s != chosen["splits"] and s <= max_splits]  # fmt: skip
    stage4 = []
    if K == 1:  # one kv head: the query heads over several programs per row too
        chosen = best(stage1 + stage2 + stage3)
        stage4 = [measure({**chosen, "head_block": head_block}) for head_block in ((16,) if small else HEAD_BLOCKS)]
    # What rotating q and k in the kernel costs (decode steps take that form: transformer._attend_rotating), at the
    # defaults and at the best config so far.
    for config in dict.fromkeys(
        json.dumps(c, sort_keys=True) for c in (default, best(stage1 + stage2 + stage3 + stage4))
    ):
        measure({**json.loads(config), "rotary": 1})
    return rows


def _rotary(row: dict[str, Any]) -> bool:
    """Whether a row times the kernel rotating q and k itself (not a launch config to rank with the others)."""
    return isinstance(row["config"], dict) and bool(row["config"].get("rotary"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="kernel calls per timed run, one per layer (default 32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per config; the median (default 20)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and few configs: a CPU dry run")
    parser.add_argument("--json", action="store_true", help="print each row as a line of JSON as it is measured")
    args = parser.parse_args(argv)
    for field in ("layers", "repeats"):
        if getattr(args, field) < 1:
            parser.error(f"--{field} must be at least 1, got {getattr(args, field)}")
    import jax

    device = jax.devices()[0].device_kind

    def emit(row: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({**row, "device": device}), flush=True)

    for shape in SMALL_SHAPES if args.small else SHAPES:
        shape_rows = sweep_shape(shape, args.layers, args.repeats, args.small, emit)
        if not args.json:
            # the launch configs ranked; the rotary rows (the same kernel rotating q and k) apart, after them
            timed = sorted((r for r in shape_rows if r.get("us_per_layer") and not _rotary(r)),
                           key=lambda r: r["us_per_layer"])  # fmt: skip
            print(f"== {shape[0]} on {device}: fastest first, µs per layer")
            for r in timed[:6] + [r for r in shape_rows if r.get("us_per_layer") and _rotary(r)]:
                print(f"  {r['us_per_layer']:8.2f}  {r['config']}")
            for r in shape_rows:
                if not r["ok"]:
                    why = r.get("error") or f"max error {r['max_error']:.3g} against float64"
                    print(f"  !! {r['config']}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
