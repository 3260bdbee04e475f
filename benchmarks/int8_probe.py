"""Probe and tune the weight-only int8 matmul for a model's shapes on this GPU; write a tuning file.

For each weight matmul of the model (x [M, K] @ w [K, N], K and N from the config: E x HQ, E x KQ, HQ x E, E x F,
F x E, E x V) and each row count M (decode batch sizes), times
  bf16      x @ w_bf16                                  (the byte floor's reference: 2 bytes per weight)
  xla       (x @ w_int8.astype(bf16)) * scale           (what model/quant.einsum does by default)
  pallas    model/int8_kernel.py, each candidate config  (int8 read once, converted in registers)
and reports GB/s of weight bytes read. The fastest int8 form per (M, K, N) goes into the tuning file ("xla" where
XLA won); run the model with MESHSERVE_INT8_MATMUL=pallas MESHSERVE_INT8_TUNING=<file> to use it. Weights are
replicated into enough copies (>= 256 MiB) that repeated calls do not hit L2. Also checks cuDNN fused attention.

  python benchmarks/int8_probe.py --model falcon-7b --rows 1,8,64 --tune out/int8_tuning.json --budget-s 150
  python benchmarks/int8_probe.py --model tiny --rows 1,8 --small        # CPU dry run (Pallas interpret mode)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of one call (after a warm-up call that also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_form(shape: dict, form: str, fn, x, weights, nbytes: int, config, repeats: int) -> dict:
    """Time fn(x, weights) (a stack of `copies` matmuls), check it against float32, print and return one row."""
    copies, k, n = weights.shape
    label = f"{shape['weight']:>8} {shape['m']:>3} {k:>6} {n:>6} {form:>7}"
    row = dict(shape, form=form, config=None if config is None else vars(config), us=None, gbps=None, ok=False)
    try:
        got = jax.jit(fn)(x, weights)[0].astype(jnp.float32)
        ref = x.astype(jnp.float32) @ weights[0].astype(jnp.float32) * (0.025 if nbytes == 1 else 1.0)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        seconds = timed(jax.jit(fn), x, weights, repeats=repeats) / copies
    except Exception as e:  # a config that fails to compile is reported, not fatal
        print(f"{label} FAILED {type(e).__name__}: {str(e)[:200]}")
        return row
    row.update(us=seconds * 1e6, gbps=k * n * nbytes / seconds / 1e9, ok=err < 2e-2)
    bad = "" if row["ok"] else f"  WRONG (rel err {err:.1e})"
    print(f"{label} {row['us']:>8.1f} {row['gbps']:>6.0f}  {config or ''}{bad}")
    return row


def model_shapes(name: str) -> list[tuple[str, int, int]]:
    """(weight name, K, N) of every weight matmul, largest first (the ones worth tuning first)."""
    from meshserve.model.config import get_config

    c = get_config(name)
    shapes = {
        "w_up": (c.d_model, c.d_ff),
        "w_down": (c.d_ff, c.d_model),
        "wq": (c.d_model, c.n_heads * c.d_head),
        "wo": (c.n_heads * c.d_head, c.d_model),
        "wk": (c.d_model, c.n_kv_heads * c.d_head),
        "unembed": (c.d_model, c.vocab_size),
    }
    seen, out = set(), []
    for label, (k, n) in sorted(shapes.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        if (k, n) not in seen:
            seen.add((k, n))
            out.append((label, k, n))
    return out


def main(argv: list[str] | None = None) -> int:
    from meshserve.model.int8_kernel import candidate_configs, int8_matmul, tuning_key

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="falcon-7b", help="preset whose matmul shapes to probe (default falcon-7b)")
    ap.add_argument("--rows", default="1,8,64", help="token rows M per matmul, comma-separated (default 1,8,64)")
    ap.add_argument("--tune", default=None, help="write the fastest int8 form per (M, K, N) to this JSON file")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop trying candidates after this many seconds")
    ap.add_argument("--candidates", type=int, default=10, help="Pallas configs tried per shape (default 10)")
    ap.add_argument("--small", action="store_true", help="CPU dry run: interpret mode, 3 candidates, 2 repeats")
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    interpret, repeats = args.small, (2 if args.small else 20)
    n_candidates = 3 if args.small else args.candidates
    start, table, results = time.perf_counter(), {}, []
    print(f"{'weight':>8} {'M':>3} {'K':>6} {'N':>6} {'form':>7} {'us':>8} {'GB/s':>6}  config")
    for label, k, n in model_shapes(args.model):
        copies = 1 if args.small else min(16, max(1, -(-(256 << 20) // (k * n))))  # small weights may sit in L2
        w = jax.random.normal(jax.random.key(k * 7 + n), (copies, k, n), jnp.bfloat16)
        wq = jnp.clip(jnp.round(w.astype(jnp.float32) * 40), -127, 127).astype(jnp.int8)
        scale = jnp.full((n,), 0.025, jnp.bfloat16)
        forms = {
            "bf16": (lambda x, w: jnp.stack([x @ w[i] for i in range(w.shape[0])]), w, 2),
            "xla": (lambda x, w, s=scale: jnp.stack([(x @ w[i].astype(x.dtype)) * s for i in range(w.shape[0])]), wq, 1),
        }  # fmt: skip
        for m in rows_list:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            shape = dict(weight=label, m=m, k=k, n=n)
            for form, (fn, weights, nbytes) in forms.items():
                results.append(time_form(shape, form, fn, x, weights, nbytes, None, repeats))
            xla = results[-1]
            best, best_config = (xla["us"], {"form": "xla"}) if xla["ok"] else (None, {"form": "xla"})
            for cfg in candidate_configs(m, k, n, limit=n_candidates):
                if time.perf_counter() - start > args.budget_s:
                    print(f"!! tuning budget of {args.budget_s:.0f} s spent; later shapes keep their defaults")
                    break

                def pallas(x, w, cfg=cfg, s=scale):
                    return jnp.stack(
                        [int8_matmul(x, w[i], s, config=cfg, interpret=interpret) for i in range(w.shape[0])]
                    )

                row = time_form(shape, "pallas", pallas, x, wq, 1, cfg, repeats)
                results.append(row)
                if row["ok"] and (best is None or row["us"] < best):
                    best, best_config = row["us"], vars(cfg)
            table[tuning_key(m, k, n)] = best_config
    if args.tune:
        with open(args.tune, "w") as f:
            json.dump(table, f, indent=1)
        with open(args.tune.removesuffix(".json") + ".results.json", "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.tune} ({sum(v['form'] != 'xla' for v in table.values())} of {len(table)} shapes Pallas)")
    check_cudnn_attention()
    return 0


def check_cudnn_attention() -> None:
    """Time cuDNN's fused causal attention at falcon-7b's 2048-token prefill, with and without a padding mask."""
    if jax.default_backend() != "gpu":
        return
    q = jnp.ones((1, 2048, 71, 64), jnp.bfloat16)
    kv = jnp.ones((1, 2048, 1, 64), jnp.bfloat16)
    for label, lengths in (("causal", None), ("causal + seq lengths", jnp.array([2048], jnp.int32))):
        try:
            f = jax.jit(
                lambda q, k, v, n=lengths: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn", key_value_seq_lengths=n
                )
            )
            ms = timed(f, q, kv, kv, repeats=20) * 1e3
            print(f"cudnn attention ok: {ms:.3f} ms for T=2048, H=71, K=1, Q=64 ({label})")
        except Exception as e:  # report and let the caller fall back to XLA attention
            print(f"cudnn attention FAILED ({label}): {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    sys.exit(main())
