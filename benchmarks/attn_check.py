"""Do the decode step's kernels compute what XLA computes, on this device? (seconds)

CPU tests check the kernels' bodies interpreted; only a GPU runs the compiled Triton kernels. gpu_bench.sh runs this
before timing them, so a fast but wrong kernel is caught in the same call (and its switch turned off). Each case draws
random bf16 queries, caches and own keys, runs `decode_attention` (the kernel on CUDA; interpreted elsewhere) and
`layers.attend_cached` (XLA), and compares them to float64 attention of the same numbers; then the same with the
rotation in the kernel (`decode_attention_rotating`, over a projection with up-projection heads after q, k, v),
against XLA's `layers.rotate` + float64 attention, and its rotated own k against XLA's, once as is and once with an
int8 wqkv's channel scale applied in the kernel. Last, the norm kernel
(model/decode_norm.py) against `layers.norm` and float64 at falcon-7b's LayerNorm and llama's RMSNorm, and a
post-norm block's seam in one kernel (`decode_add_norm`) at gemma3-1b's.

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
        failed += not _check_rotating(q, k_cache, v_cache, k_new, v_new, lengths, context, out_heads)
        # int8 wqkv: the projection unscaled and its channel scale applied in the kernel
        failed += not _check_rotating(q, k_cache, v_cache, k_new, v_new, lengths, context, out_heads, scaled=True)
        if K > 1:  # Qwen3's shape: q and k head norms in the kernel
            failed += not _check_rotating(
                q, k_cache, v_cache, k_new, v_new, lengths, context, out_heads, head_norm=True
            )
    failed += sum(not _check_norm(*case) for case in NORM_CASES)
    failed += not _check_add_norm("gemma3-1b")
    print("decode step kernels: " + ("all cases match" if not failed else f"{failed} case(s) OFF"))
    return 1 if failed else 0


def _check_rotating(
    q, k_cache, v_cache, k_new, v_new, lengths, context, out_heads, scaled: bool = False, head_norm: bool = False
) -> bool:
    """`decode_attention_rotating` over [q, k_new, v_new, 5 more heads] taken as unrotated, against float64
    attention of XLA's rotation of q and k_new (both rounded to bf16, as the kernel's are); its rotated own k
    against XLA's within one bf16 rounding. scaled: the projection handed over divided by a channel scale in
    [0.5, 2) (an int8 wqkv's GEMM product) and the scale as projection_scale, the reference over the product
    scaled back as XLA's int8 path rounds it; the own v the kernel then writes within one rounding of it too.
    head_norm: q_norm and k_norm scales (Qwen3, Gemma 3; 1 + scale) for the kernel, the reference's q and k_new
    normed by `layers.head_norm` before the rotation. Prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from meshserve.model import layers, quant
    from meshserve.model.decode_attention import decode_attention_rotating

    B, _, H, Q = q.shape
    extra = jnp.zeros((B, 1, 5, Q), q.dtype)  # a parallel block's up projection follows: never read
    K = k_new.shape[2]
    channel = jax.random.uniform(jax.random.key(H + K), (H + 2 * K, Q), jnp.float32, 0.5, 2.0).astype(q.dtype)
    projection = jnp.concatenate([q, k_new, v_new], axis=2)
    if scaled:  # the kernel's operand: the GEMM's unscaled product; q, k_new, v_new: what XLA's scaling makes of it
        projection = (projection.astype(jnp.float32) / channel.astype(jnp.float32)).astype(q.dtype)
        q, k_new, v_new = jnp.split(quant.scaled_output(projection, channel), [H, H + K], axis=2)
    projection = jnp.concatenate([projection, extra], axis=2)
    norm_scales = tuple(0.3 * jax.random.normal(jax.random.key(Q + i), (Q,)).astype(q.dtype) for i in (0, 1))
    if head_norm:  # the reference's q and own k: normed before the rotation, as XLA's path does
        q, k_new = (layers.head_norm(a, s, 1e-6, True) for a, s in zip((q, k_new), norm_scales, strict=True))
    pos = jnp.asarray(lengths, jnp.int32)
    inv_freq = layers.rope_frequencies(Q // 2, 10000.0)
    cos, sin = layers.rotary_tables(pos, inv_freq)
    kernel = jax.jit(lambda proj, kc, vc, pos, cos, sin, channel, qs, ks: decode_attention_rotating(
        proj, H, kc, vc, 1, pos, cos, sin, context, out_heads=out_heads,
        projection_scale=channel if scaled else None, head_norm=(qs, ks, 1e-6, True) if head_norm else None))  # fmt: skip
    outs = kernel(projection, k_cache, v_cache, pos, cos, sin, channel, *norm_scales)
    o, k, v = (np.asarray(a, np.float64) for a in outs)
    v_new64 = np.asarray(v_new, np.float64)
    v_err = np.abs(v - v_new64).max()
    q_r, k_r = (layers.rotate(a, pos[:, None], inv_freq) for a in (q, k_new))
    exact = _reference(q_r, k_cache, v_cache, k_r, v_new, lengths, 1, 1.0 / Q**0.5)
    visible = jnp.arange(context)[None, :] < pos[:, None]
    xla = layers.attend_cached(q_r, k_cache[1, :, :context], v_cache[1, :, :context], visible, k_r, v_new)
    err, err_xla = np.abs(o[:, :, :H] - exact).max(), np.abs(np.asarray(xla, np.float64) - exact).max()
    k_r = np.asarray(k_r, np.float64)
    k_err = np.abs(k - k_r).max()
    ok = bool(np.isfinite(o).all() and err <= max(2 * err_xla, 1e-2) and not o[:, :, H:].any())
    ok = ok and bool(k_err <= 2**-7 * np.abs(k_r).max())  # one bf16 rounding apart at most
    ok = ok and bool(v_err <= 2**-7 * np.abs(v_new64).max())
    print(
        json.dumps(
            {
                "rotating": True,
                "scaled": scaled,
                "head_norm": head_norm,
                "B": B,
                "H": H,
                "context": context,
                "max_error": round(float(err), 5),
                "xla_max_error": round(float(err_xla), 5),
                "k_max_error": round(float(k_err), 5),
                "v_max_error": round(float(v_err), 5),
                "ok": ok,
            }
        )
    )
    return ok


# (preset, rows): the norm kernel at falcon-7b's LayerNorm (E = 4544, with bias) and llama-2-7b's RMSNorm (4096).
NORM_CASES = [("falcon-7b", 1), ("falcon-7b", 64), ("llama-2-7b", 1)]


def _check_norm(preset: str, rows: int) -> bool:
    """`decode_norm` against `layers.norm` and float64 of the same bf16 rows (a common offset of 3 and a spread of
    2, a random scale and bias): at most twice XLA's error, or 1e-2. Prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from meshserve.model import layers
    from meshserve.model.config import get_config
    from meshserve.model.decode_norm import decode_norm

    config = get_config(preset)
    E = config.d_model
    keys = jax.random.split(jax.random.key(rows + E), 3)
    x = (3.0 + 2.0 * jax.random.normal(keys[0], (rows, 1, E))).astype(jnp.bfloat16)
    p = {"scale": (1.0 + 0.1 * jax.random.normal(keys[1], (E,))).astype(jnp.bfloat16)}
    if config.norm == "layernorm":
        p["bias"] = (0.1 * jax.random.normal(keys[2], (E,))).astype(jnp.bfloat16)
    kernel = jax.jit(lambda x, p: decode_norm(x, p["scale"], p.get("bias"), kind=config.norm, eps=config.norm_eps,
                                              scale_offset=config.norm_scale_offset))  # fmt: skip
    got = np.asarray(kernel(x, p), np.float64)
    xla = np.asarray(jax.jit(lambda x, p: layers.norm(x, p, config))(x, p), np.float64)
    y = _norm64(np.asarray(x, np.float64), p, config)
    err, err_xla = np.abs(got - y).max(), np.abs(xla - y).max()
    ok = bool(np.isfinite(got).all() and err <= max(2 * err_xla, 1e-2))
    print(json.dumps({"norm": config.norm, "E": E, "rows": rows, "max_error": round(float(err), 5),
                      "xla_max_error": round(float(err_xla), 5), "ok": ok}))  # fmt: skip
    return ok


def _norm64(x64, p: dict, config):
    """`layers.norm` in float64 (two-pass statistics) of x64 [..., E]: the checks' reference."""
    import numpy as np

    if config.norm == "layernorm":
        y = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + config.norm_eps)
    else:
        y = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + config.norm_eps)
    s = np.asarray(p["scale"], np.float64)
    return y * (1.0 + s if config.norm_scale_offset else s) + (
        np.asarray(p["bias"], np.float64) if "bias" in p else 0.0
    )


def _check_add_norm(preset: str) -> bool:
    """`decode_add_norm` (a post-norm block's seam: y = x + norm(a), h = norm(y)) for one row of the preset's E
    against `layers.norm` composed so and float64 of the same bf16 numbers: y and h each within twice XLA's error, or
    1e-2. Prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from meshserve.model import layers
    from meshserve.model.config import get_config
    from meshserve.model.decode_norm import decode_add_norm

    config = get_config(preset)
    E = config.d_model
    keys = jax.random.split(jax.random.key(E), 4)
    a = (3.0 * jax.random.normal(keys[0], (1, 1, E))).astype(jnp.bfloat16)
    x = jax.random.normal(keys[1], (1, 1, E)).astype(jnp.bfloat16)
    post, pre = ({"scale": (0.2 * jax.random.normal(k, (E,))).astype(jnp.bfloat16)} for k in keys[2:])
    kernel = jax.jit(lambda a, x, s1, s2: decode_add_norm(a, x, s1, s2, kind=config.norm, eps=config.norm_eps,
                                                          scale_offset=config.norm_scale_offset))  # fmt: skip
    y, h = (np.asarray(t, np.float64) for t in kernel(a, x, post["scale"], pre["scale"]))

    def composed(a, x):
        y = x + layers.norm(a, post, config)
        return y, layers.norm(y, pre, config)

    y_xla, h_xla = (np.asarray(t, np.float64) for t in jax.jit(composed)(a, x))

    y64 = np.asarray(x, np.float64) + _norm64(np.asarray(a, np.float64), post, config)
    h64 = _norm64(y64, pre, config)
    errors = {name: (np.abs(got - want).max(), np.abs(ref - want).max())
              for name, got, ref, want in (("y", y, y_xla, y64), ("h", h, h_xla, h64))}  # fmt: skip
    ok = bool(np.isfinite(y).all() and np.isfinite(h).all())
    ok = ok and all(err <= max(2 * err_xla, 1e-2) for err, err_xla in errors.values())
    print(json.dumps({"add_norm": config.norm, "E": E, "rows": 1,
                      **{f"{n}_max_error": round(float(e), 5) for n, (e, _) in errors.items()},
                      **{f"{n}_xla_max_error": round(float(x), 5) for n, (_, x) in errors.items()}, "ok": ok}))  # fmt: skip
    return ok


if __name__ == "__main__":
    sys.exit(main())
