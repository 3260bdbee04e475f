"""Probe: how fast does XLA run a weight-only int8 matmul at decode batch sizes, against bf16 and the byte floor?

For W [E, F] (falcon-7b's MLP input, 4544 x 18176) and x [M, E], times three forms at M = 1, 8, 64:
  bf16      x @ W_bf16
  int8-dot  (x @ W_int8.astype(bf16)) * scale      (what model/quant.einsum does)
  int8-mul  sum(x[:, :, None] * W_int8, axis=1) * scale  (a reduction XLA may fuse with the int8 read)
  int8-pal  model/int8_kernel.py's fused Pallas kernel (int8 read once, converted in registers)
and reports GB/s of weight bytes read. Also checks that cuDNN fused attention works for the prefill shapes.
Usage: python benchmarks/int8_probe.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import os

    from meshserve.model.int8_kernel import int8_matmul

    small = os.environ.get("PROBE_SMALL") == "1"  # CPU dry run: small shapes, Pallas in interpret mode
    E, F = (256, 512) if small else (4544, 18176)
    key = jax.random.key(0)
    # Several weight copies so repeated runs do not read from L2.
    w = jax.random.normal(key, (4, E, F), jnp.bfloat16)
    wq = jnp.clip(jnp.round(w.astype(jnp.float32) * 40), -127, 127).astype(jnp.int8)
    scale = jnp.full((1, F), 0.025, jnp.bfloat16)
    scale1 = scale.reshape(-1)
    scale1 = scale.reshape(-1)
    forms = {
        "bf16": (lambda x, w: jnp.stack([x @ w[i] for i in range(4)]), w, 2),
        "int8-dot": (lambda x, w: jnp.stack([(x @ w[i].astype(x.dtype)) * scale for i in range(4)]), wq, 1),
        "int8-mul": (
            lambda x, w: jnp.stack(
                [jnp.sum(x[:, :, None].astype(jnp.float32) * w[i], axis=1).astype(x.dtype) * scale for i in range(4)]
            ),
            wq,
            1,
        ),
        "int8-pal": (lambda x, w: jnp.stack([int8_matmul(x, w[i], scale1, interpret=small) for i in range(4)]), wq, 1),
    }
    print(f"{'form':>9} {'M':>4} {'us/matmul':>10} {'GB/s':>8}")
    for M in (1, 8, 64):
        x = jax.random.normal(jax.random.key(M), (M, E), jnp.bfloat16)
        ref = forms["int8-dot"][0](x, wq).astype(jnp.float32)
        for name, (fn, weights, nbytes) in forms.items():
            if name == "int8-mul" and M > 8:
                continue  # the broadcast form materialises M x E x F at large M
            try:
                err = ""
                if name.startswith("int8"):
                    got = jax.jit(fn)(x, weights).astype(jnp.float32)
                    err = f"rel err {float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)):.1e}"
                seconds = timed(jax.jit(fn), x, weights, repeats=3 if small else 20) / 4
                print(f"{name:>9} {M:>4} {seconds * 1e6:>10.1f} {E * F * nbytes / seconds / 1e9:>8.0f} {err}")
            except Exception as e:  # a kernel that fails to compile is reported, not fatal
                print(f"{name:>9} {M:>4} FAILED {type(e).__name__}: {str(e)[:400]}")
    try:
        q = jnp.ones((1, 2048, 71, 64), jnp.bfloat16)
        kv = jnp.ones((1, 2048, 1, 64), jnp.bfloat16)
        f = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", key_value_seq_lengths=jnp.array([2048], jnp.int32)
            )
        )
        print(f"cudnn attention ok: {timed(f, q, kv, kv) * 1e3:.3f} ms for T=2048, H=71, K=1, Q=64")
    except Exception as e:  # report and let the caller fall back to XLA attention
        print(f"cudnn attention FAILED: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
