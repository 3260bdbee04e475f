"""Does the decode attention kernel compute what XLA's attention computes, on this device? (seconds)

CPU tests check the kernel's body interpreted; only a GPU runs the compiled Triton kernel. gpu_bench.sh's `attn`
step runs this before timing the kernel, so a fast but wrong kernel is caught in the same call. Each case draws
random bf16 queries, caches and own keys, runs `decode_attention` (the kernel on CUDA; interpreted elsewhere) and
`layers.attend_cached` (XLA), and compares them to float64 attention of the same numbers.

    python benchmarks/attn_check.py            # exit 1 if any case is off by more than XLA's own error allows
"""

from __future__ import annotations

import json
import sys
from functools import partial

# (B, H, K, Q, S, context, lengths, out_heads): falcon-7b at the bench's 128 + 128 and at 2k with splits; batch 64;
# falcon-7b writing 72 heads, the last zero (what an int8 wo_padded meets: transformer._padded_heads); a GQA model at
# 4k; rows with no cached key and full rows (length S - 1).
CASES = [
    (1, 71, 1, 64, 256, 256, [200], None),
    (1, 71, 1, 64, 2048, 2048, [1500], None),
    (64, 71, 1, 64, 256, 256, "spread", None),
    (64, 71, 1, 64, 256, 256, "spread", 72),
    (4, 32, 8, 128, 4096, 4096, [0, 17, 4000, 4095], None),
]


def _reference(q, k_cache, v_cache, k_new, v_new, lengths, layer, scale):
    """float64 attention over cached positions [0, length) and the own key: [B, 1, H, Q]."""
    import numpy as np

    q64, kc, vc = (np.asarray(a, np.float64) for a in (q, k_cache[layer], v_cache[layer]))
    kn, vn = np.asarray(k_new, np.float64), np.asarray(v_new, np.float64)
    B, _, H, Q = q64.shape
    K = kc.shape[2]
    out = np.zeros((B, 1, H, Q))
    for b in range(B):
        n = int(lengths[b])
        for h in range(H):
            g = h // (H // K)
            keys = np.concatenate([kc[b, :n, g], kn[b, :, g]])
            values = np.concatenate([vc[b, :n, g], vn[b, :, g]])
            s = keys @ q64[b, 0, h] * scale
            p = np.exp(s - s.max())
            out[b, 0, h] = p @ values / p.sum()
    return out


def main() -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from meshserve.model import layers
    from meshserve.model.decode_attention import decode_attention, splits_for

    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax {jax.__version__}")
    failed = 0
    for B, H, K, Q, S, context, lengths, out_heads in CASES:
        keys = jax.random.split(jax.random.key(B * S + H), 5)
        q = jax.random.normal(keys[0], (B, 1, H, Q), jnp.bfloat16)
        k_cache, v_cache = (jax.random.normal(keys[i], (2, B, S, K, Q), jnp.bfloat16) for i in (1, 2))
        k_new, v_new = (jax.random.normal(keys[i], (B, 1, K, Q), jnp.bfloat16) for i in (3, 4))
        if lengths == "spread":
            lengths = np.linspace(0, S - 1, B).astype(int).tolist()
        pos = jnp.asarray(lengths, jnp.int32)
        scale = 1.0 / Q**0.5
        kernel = jax.jit(partial(decode_attention, layer=1, context=context, out_heads=out_heads))
        visible = jnp.arange(context)[None, :] < pos[:, None]
        xla = jax.jit(lambda q, kc, vc, vis, kn, vn, c=context: layers.attend_cached(q, kc[1, :, :c], vc[1, :, :c],
                                                                                     vis, kn, vn))  # fmt: skip
        got = np.asarray(kernel(q, k_cache, v_cache, pos=pos, k_new=k_new, v_new=v_new), np.float64)
        padding = got[:, :, H:]  # out_heads: the zero heads after the H real ones
        got = got[:, :, :H]
        ref_xla = np.asarray(xla(q, k_cache, v_cache, visible, k_new, v_new), np.float64)
        exact = _reference(q, k_cache, v_cache, k_new, v_new, lengths, 1, scale)
        err, err_xla = np.abs(got - exact).max(), np.abs(ref_xla - exact).max()
        ok = bool(np.isfinite(got).all() and err <= max(2 * err_xla, 1e-2))  # bf16 output: ~4e-3 at |x| ~ 1
        ok = ok and padding.shape[2] == (out_heads or H) - H and not padding.any()
        failed += not ok
        print(json.dumps({"B": B, "H": H, "K": K, "Q": Q, "S": S, "context": context, "out_heads": out_heads or H,
                          "splits": splits_for(B, K, context), "max_error": round(float(err), 5),
                          "xla_max_error": round(float(err_xla), 5), "ok": ok}))  # fmt: skip
    print("decode attention kernel: " + ("all cases match" if not failed else f"{failed} case(s) OFF"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
