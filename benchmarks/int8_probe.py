"""Probe and tune the weight-only int8 matmul for a model's shapes on this GPU; write a tuning file.

For each int8 weight matmul of the model (x [M, K] @ w [K, N] from the config: E x F, F x E, E x HQ, HQ x E,
E x KQ, and E x V when the unembedding is its own weight), MLP first, and each row count M (decode batch sizes),
times
  bf16      x @ w_bf16                                  (the byte floor's reference: 2 bytes per weight)
  xla       (x @ w_int8.astype(bf16)) * scale           (what model/quant.einsum does by default)
  w8a8      int8(x / row scale) @ w_int8 -> int32, rescaled (MESHSERVE_INT8_MATMUL=w8a8: int8 activations too, so
            an integer GEMM reads the weights with no conversion; changes the numerics, never a tuning choice)
  xla-rows, w8a8-rows  the same two over int8 stored [N, K], K minor (what unrolled layers store under w8a8 and
            rowsum; the integer GEMM's TN layout): is XLA's GEMM faster K-major? (experiments, not tuning choices)
  rowsum    sum(x[:, None, :] * w_int8[N, K], -1)        (M <= 4; int8 stored transposed: XLA's row reduction,
            what MESHSERVE_INT8_MATMUL=rowsum runs (model/int8_rows.py); a layout, not a tuning choice)
  bf16-rows the same row reduction over bf16 weights stored [N, K] (M <= 4; an experiment: faster than the bf16
            GEMM at batch 1?)
  colsum    sum(x[:, :, None] * w_int8[K, N], 1) * scale (M <= 4; int8 as stored: int8_kernel.colsum_matmul, XLA's
            column reduction reading each weight once; a tuning choice)
  pallas    model/int8_kernel.py, each candidate config  (int8 read once, converted in registers)
and reports GB/s of weight bytes read. The fastest correct int8 form per (M, K, N) among xla, colsum and the Pallas
configs goes into the tuning file ({"form": "xla"}, {"form": "colsum"} or the config; shapes the budget did not
reach are left out and so run XLA), rewritten after every shape. Run the
model with MESHSERVE_INT8_MATMUL=pallas MESHSERVE_INT8_TUNING=<file> to use it. Weights are replicated into up to
16 copies (~256 MiB) so repeated calls do not hit L2 (the small E x KQ weight still may). First it checks cuDNN's
fused attention at the bench's prefill shapes (`--attention-only`: just that).

  python benchmarks/int8_probe.py --model falcon-7b --rows 1,8,64 --tune out/int8_tuning.json --budget-s 150
  python benchmarks/int8_probe.py --model tiny --rows 1,8 --small        # CPU dry run (Pallas interpret mode)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from meshserve.model.quant import QuantizedArray, w8a8_einsum, w8a8_values_einsum


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of one call (after a warm-up call that also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_form(shape: dict, form: str, fn, x, weights, nbytes: int, config, repeats: int, ref_weights=None) -> dict:
    """Time fn(x, weights) (a stack of `copies` matmuls), check it against float32, print and return one row.
    ref_weights: the [copies, K, N] weights to check against when `weights` are stored otherwise (transposed)."""
    ref_weights = weights if ref_weights is None else ref_weights
    copies, k, n = ref_weights.shape
    label = f"{shape['weight']:>8} {shape['m']:>3} {k:>6} {n:>6} {form:>9}"
    row = dict(shape, form=form, config=None if config is None else vars(config), us=None, gbps=None, ok=False)
    try:
        got = jax.jit(fn)(x, weights)[0].astype(jnp.float32)
        ref = x.astype(jnp.float32) @ ref_weights[0].astype(jnp.float32) * (0.025 if nbytes == 1 else 1.0)
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
    """(weight name, K, N) of every int8 weight matmul the model runs, the MLP's first (most of a layer's bytes)."""
    from meshserve.model.config import get_config

    c = get_config(name)
    shapes = {
        "w_up": (c.d_model, c.d_ff),
        "w_down": (c.d_ff, c.d_model),
        "wq": (c.d_model, c.n_heads * c.d_head),
        "wo": (c.n_heads * c.d_head, c.d_model),
        "wk": (c.d_model, c.n_kv_heads * c.d_head),
        "wqkv": (c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.d_head),  # unrolled layers fuse q, k, v (unstack_layers)
    }
    if not c.shared_embedding:
        shapes["unembed"] = (c.d_model, c.vocab_size)  # a shared embedding is never quantized (params.py)
    seen, out = set(), []
    for label, (k, n) in shapes.items():
        if (k, n) not in seen:
            seen.add((k, n))
            out.append((label, k, n))
    return out


def main(argv: list[str] | None = None) -> int:
    from meshserve.model.int8_kernel import (
        COLSUM,
        COLSUM_MAX_ROWS,
        candidate_configs,
        colsum_matmul,
        int8_matmul,
        tuning_key,
    )
    from meshserve.model.int8_rows import rowsum_matmul

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="falcon-7b", help="preset whose matmul shapes to probe (default falcon-7b)")
    ap.add_argument("--rows", default="1,8,64", help="token rows M per matmul, comma-separated (default 1,8,64)")
    ap.add_argument("--tune", default=None, help="write the fastest int8 form per (M, K, N) to this JSON file")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop trying candidates after this many seconds")
    ap.add_argument("--candidates", type=int, default=8, help="Pallas configs tried per shape (default 8)")
    ap.add_argument("--attention-only", action="store_true", help="only check cuDNN attention (a few seconds)")
    ap.add_argument(
        "--xla-only",
        action="store_true",
        help="time only bf16 and XLA int8 on the MLP shapes (to compare XLA_FLAGS settings; writes no tuning)",
    )
    ap.add_argument("--small", action="store_true", help="CPU dry run: interpret mode, 3 candidates, 2 repeats")
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    interpret, repeats = args.small, (2 if args.small else 20)
    n_candidates = min(3, args.candidates) if args.small else args.candidates
    start, results = time.perf_counter(), []
    if not args.xla_only:
        check_cudnn_attention(args.model)
    if args.attention_only:
        return 0
    if args.xla_only:
        n_candidates, args.tune = 0, None
    tuning = {"model": args.model, "device": jax.devices()[0].device_kind, "configs": {}}
    print(f"{'weight':>8} {'M':>3} {'K':>6} {'N':>6} {'form':>9} {'us':>8} {'GB/s':>6}  config")
    for label, k, n in model_shapes(args.model)[: 2 if args.xla_only else None]:
        if time.perf_counter() - start > args.budget_s:
            break  # (said once below)
        copies = 1 if args.small else min(16, max(1, -(-(256 << 20) // (k * n))))  # small weights may sit in L2
        w = jax.random.normal(jax.random.key(k * 7 + n), (copies, k, n), jnp.bfloat16)
        wq = jnp.clip(jnp.round(w.astype(jnp.float32) * 40), -127, 127).astype(jnp.int8)
        scale = jnp.full((n,), 0.025, jnp.bfloat16)
        wq_t, w_t = jnp.swapaxes(wq, 1, 2), jnp.swapaxes(w, 1, 2)  # stored [N, K]: K minor (int8_rows' layout)
        forms = {
            "bf16": (lambda x, w: jnp.stack([x @ w[i] for i in range(w.shape[0])]), w, 2),
            "xla": (lambda x, w, s=scale: jnp.stack([(x @ w[i].astype(x.dtype)) * s for i in range(w.shape[0])]), wq, 1),
            # int8 activations too (MESHSERVE_INT8_MATMUL=w8a8): an int8 x int8 -> int32 GEMM, no weight conversion
            "w8a8": (lambda x, w, s=scale: jnp.stack([w8a8_einsum("mk,kn->mn", x, QuantizedArray(w[i], s[None]))
                                                      for i in range(w.shape[0])]), wq, 1),
            # The same two over weights stored [N, K] (K minor: the integer GEMM's TN layout, and what unrolled
            # layers store under w8a8 and rowsum): does XLA's convert + GEMM stream int8 faster K-major?
            "xla-rows": (lambda x, w, s=scale: jnp.stack([jnp.einsum("mk,nk->mn", x, w[i].astype(x.dtype)) * s
                                                          for i in range(w.shape[0])]), wq_t, 1),
            "w8a8-rows": (lambda x, w, s=scale: jnp.stack([w8a8_values_einsum("mk,nk->mn", x, w[i], s[None])
                                                           for i in range(w.shape[0])]), wq_t, 1),
        }  # fmt: skip
        for m in rows_list:
            if time.perf_counter() - start > args.budget_s:
                print(f"!! budget of {args.budget_s:.0f} s spent: {label} M={m} and later shapes not tuned (XLA)")
                break
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            shape = dict(weight=label, m=m, k=k, n=n)
            timed_here = []
            for form, (fn, weights, nbytes) in forms.items():
                if args.xla_only and form not in ("bf16", "xla"):
                    continue
                ref = wq if form.endswith("-rows") else None  # the declared [K, N] weights for the check
                timed_here.append(time_form(shape, form, fn, x, weights, nbytes, None, repeats, ref_weights=ref))
            results += timed_here
            xla = next(r for r in timed_here if r["form"] == "xla")
            best, best_config = (xla["us"] if xla["ok"] else None), {"form": "xla"}
            if m <= COLSUM_MAX_ROWS and not args.xla_only:  # --xla-only: what its help says, and quick

                def rowsum(x, w, s=scale):  # MESHSERVE_INT8_MATMUL=rowsum's matmul (int8_rows.py): stored [N, K]
                    return jnp.stack([rowsum_matmul(x, w[i], s, x.dtype) for i in range(w.shape[0])])

                results.append(time_form(shape, "rowsum", rowsum, x, wq_t, 1, None, repeats, ref_weights=wq))
                # The same row reduction over bf16 weights stored [N, K]: does it stream faster than the bf16 GEMM?
                # (an experiment for bf16 decode at batch 1, where the GEMM read 1.6-2.0 TB/s on an H200)
                ones = jnp.ones((n,), jnp.bfloat16)
                results.append(time_form(shape, "bf16-rows", lambda x, w, s=ones: rowsum(x, w, s), x, w_t, 2, None,
                                         repeats, ref_weights=w))  # fmt: skip

                def colsum(x, w, s=scale):  # what quant.einsum runs for {"form": "colsum"}: int8 as stored, [K, N]
                    return jnp.stack([colsum_matmul(x, w[i], s) for i in range(w.shape[0])])

                row = time_form(shape, "colsum", colsum, x, wq, 1, None, repeats)
                results.append(row)
                if row["ok"] and (best is None or row["us"] < best):
                    best, best_config = row["us"], vars(COLSUM)
            for cfg in candidate_configs(m, k, n, limit=n_candidates):
                if time.perf_counter() - start > args.budget_s:
                    break

                def pallas(x, w, cfg=cfg, s=scale):
                    return jnp.stack(
                        [int8_matmul(x, w[i], s, config=cfg, interpret=interpret) for i in range(w.shape[0])]
                    )

                row = time_form(shape, "pallas", pallas, x, wq, 1, cfg, repeats)
                results.append(row)
                if row["ok"] and (best is None or row["us"] < best):
                    best, best_config = row["us"], vars(cfg)
            tuning["configs"][tuning_key(m, k, n)] = best_config
            if args.tune:  # after every shape, so a run cut short keeps what it measured
                _write_json(args.tune, tuning)
                _write_json(args.tune.removesuffix(".json") + ".results.json", results)
    if args.tune:
        won = [v["form"] for v in tuning["configs"].values()]
        pallas_won = sum(f not in ("xla", "colsum") for f in won)
        print(f"wrote {args.tune} ({pallas_won} of {len(won)} shapes Pallas, {won.count('colsum')} colsum)")
    return 0


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def check_cudnn_attention(model: str) -> None:
    """cuDNN fused causal attention at the bench's prefill shapes (prints 'cudnn attention FAILED (causal)' if any
    fails, so the caller can fall back to XLA attention), and at 2048 tokens with and without a padding mask."""
    if jax.default_backend() != "gpu":
        return
    from meshserve.model.config import get_config

    c = get_config(model)
    cases = [(1, 2048, "causal"), (64, 128, "causal"), (256, 128, "causal"), (1, 2048, "causal + seq lengths")]
    for batch, t, label in cases:
        q = jnp.ones((batch, t, c.n_heads, c.d_head), jnp.bfloat16)
        kv = jnp.ones((batch, t, c.n_kv_heads, c.d_head), jnp.bfloat16)
        lengths = jnp.full((batch,), t, jnp.int32) if "lengths" in label else None
        try:
            f = jax.jit(
                lambda q, k, v, n=lengths: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn", key_value_seq_lengths=n
                )
            )
            ms = timed(f, q, kv, kv, repeats=20) * 1e3
            print(f"cudnn attention ok: {ms:.3f} ms for B={batch}, T={t}, H={c.n_heads}, K={c.n_kv_heads} ({label})")
        except Exception as e:  # report and let the caller fall back to XLA attention
            print(f"cudnn attention FAILED ({label}) B={batch} T={t}: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    sys.exit(main())
