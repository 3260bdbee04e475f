"""The decode attention kernel itself (Pallas, Triton backend): model/decode_attention.py's public functions check
their operands, pick the launch and call it (`decode_attention_kernel`); benchmarks/attn_sweep.py times it per launch
config. Its design is model/decode_attention.py's docstring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["decode_attention_kernel"]

_NEG = -1e30  # finite: exp(_NEG - m) is 0 and a split with no visible key gives no NaN

_STATIC = (
    "n_heads",
    "layer",
    "context",
    "scale",
    "splits",
    "block",
    "interpret",
    "num_warps",
    "num_stages",
    "out_groups",
    "head_block",
    "scaled",
    "head_norm_eps",
    "head_norm_offset",
)


@functools.partial(jax.jit, static_argnames=_STATIC, inline=True)
def decode_attention_kernel(qkv, k_cache, v_cache, pos, *tables, n_heads, layer, context, scale, splits, block,
                            interpret, num_warps=4, num_stages=2, out_groups=None, head_block=None, scaled=False,
                            head_norm_eps=None, head_norm_offset=False):  # fmt: skip
    """qkv [B, 1, Hs, Q] (q's H = n_heads heads, then the own k's K, then v's K; heads past H + 2K unread); caches [N,
    B, S, K, Q]; pos [B]; tables: () (q and the own k arrive rotated) or (cos, sin) [B, Q/2] float32 (the kernel rotates
    them), and with `scaled` then qkv's channel scale [H + 2K, Q] (applied to q, k, v as loaded) -> [B, K, Go, Q] (G = H
    / K query heads per kv head, then zeros up to Go = out_groups, default G), with rotation also the rotated own k [B,
    K, Q], and scaled also the scaled own v [B, K, Q]. head_norm_eps (not None): last in tables the head norms' scales,
    q's and k's [Q] (Qwen3's and Gemma 3's q_norm, k_norm), applied to q and the own k before the rotation as
    `layers.head_norm` does (RMS over Q, this eps, 1 + scale with head_norm_offset). num_warps, num_stages: Triton's
    launch config (benchmarks/attn_sweep.py times others). head_block (one kv head only, a power of two >= 16): each
    program takes that many of the query heads, not all G, so a batch-1 step runs cdiv(Go, head_block) programs where it
    ran one (each reads the same keys; an option for attn_sweep to time)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, K, Q, H = qkv.shape[0], k_cache.shape[3], qkv.shape[3], n_heads
    G = H // K
    Go = G if out_groups is None else out_groups
    S = k_cache.shape[2]
    rotary, half = bool(tables), Q // 2
    normed = head_norm_eps is not None
    if rotary and len(tables) != 2 + scaled + 2 * normed:
        raise ValueError("the tables are (cos, sin), then the projection's scale if scaled, the head norms' if normed")
    if head_block is not None and (K != 1 or head_block < 16 or head_block & (head_block - 1)):
        raise ValueError(f"head_block must be a power of two >= 16 with one kv head, got {head_block} with K = {K}")
    # A program's heads: all of its group (Gq rows of q, Gw rows written), or head_block of them (n_blocks programs).
    Gq, Gw, n_blocks = (G, Go, 1) if head_block is None else (head_block, head_block, pl.cdiv(Go, head_block))
    Gp = max(16, pl.next_power_of_2(Gw))  # Triton's dot wants >= 16 rows; the padding rows are masked off
    block = min(block, max(16, pl.next_power_of_2(context)))
    per_split = pl.cdiv(pl.cdiv(context, block), splits)  # blocks each split walks at most

    def halves(ref, rows=None, mask=None):
        """A [rows, Q] (or [Q]) block as its two halves [rows, Q/2], loaded apart: Triton has no register slicing."""
        lead = () if rows is None else (rows,)
        fill = {} if mask is None else dict(mask=mask, other=0.0)
        return tuple(plgpu.load(ref.at[(*lead, pl.ds(i * half, half))], **fill) for i in (0, 1))

    def rotate(x1, x2, cos, sin):
        """`layers.rotate` on one row's halves: float32 arithmetic, rounded to the operand's dtype as XLA's is."""
        a, b = x1.astype(jnp.float32), x2.astype(jnp.float32)
        return (a * cos - b * sin).astype(x1.dtype), (b * cos + a * sin).astype(x1.dtype)

    def scaled_by(x, channel_scale):
        """x * channel_scale in float32, rounded to x's dtype: XLA's int8 path (quant.einsum) on x, its GEMM's
        rounded output."""
        return (x.astype(jnp.float32) * channel_scale.astype(jnp.float32)).astype(x.dtype)

    def head_normed(x_halves, scale_halves):
        """`layers.head_norm` over Q of rows given as halves (2 x [rows, Q/2], or 2 x [Q/2] for one row)."""
        x32 = [x.astype(jnp.float32) for x in x_halves]
        axis = x32[0].ndim - 1
        mean_square = (jnp.sum(x32[0] * x32[0], axis=axis) + jnp.sum(x32[1] * x32[1], axis=axis)) / Q
        r = jax.lax.rsqrt(mean_square + head_norm_eps)
        r = r[:, None] if axis else r
        return tuple((x * r * ((1.0 + s.astype(jnp.float32)) if head_norm_offset else s.astype(jnp.float32)))
                     .astype(h.dtype) for x, s, h in zip(x32, scale_halves, x_halves, strict=True))  # fmt: skip

    def kernel(pos_ref, q_ref, k_ref, v_ref, kn_ref, vn_ref, *refs):
        s = pl.program_id(2)
        heads = pl.program_id(1) % n_blocks * Gq + jnp.arange(Gp)  # the rows' query heads within the group
        head_mask = (heads < G)[:, None]
        length = pos_ref[()]  # cached positions [0, length) are visible
        vn = vn_ref[...]  # [Q]
        if rotary:  # q and the own k as halves [., Q/2], rotated here; every score is two dots of Q/2
            cos_ref, sin_ref, *out_refs = refs
            q_halves, k_halves = halves(q_ref, pl.ds(0, Gp), head_mask), halves(kn_ref)
            # The first program of each (row, kv head) writes the own k (and scaled, v) for the cache.
            first_program = (s == 0) & (pl.program_id(1) % n_blocks == 0)
            if scaled:  # an int8 wqkv's channel scale [H + 2K, Q]: its rows for q, the own k, the own v
                qs_ref, ks_ref, vs_ref, *out_refs = out_refs
                q_halves = tuple(map(scaled_by, q_halves, halves(qs_ref, pl.ds(0, Gp), head_mask)))
                k_halves = tuple(map(scaled_by, k_halves, halves(ks_ref)))
                vn = scaled_by(vn, vs_ref[...])
                plgpu.store(out_refs.pop().at[pl.ds(0, Q)], vn, mask=jnp.full((Q,), first_program))
            if normed:  # Qwen3's, Gemma 3's q_norm and k_norm, before the rotation
                qn_ref, kn_norm_ref, *out_refs = out_refs
                q_halves = head_normed(q_halves, halves(qn_ref))
                k_halves = head_normed(k_halves, halves(kn_norm_ref))
            cos, sin = cos_ref[...], sin_ref[...]  # [Q/2] float32
            qv = rotate(*q_halves, cos[None, :], sin[None, :])  # 2 x [Gp, Q/2]
            kn = rotate(*k_halves, cos, sin)  # 2 x [Q/2]: the own key as the cache will hold it
            k_out = out_refs.pop()
            for i in (0, 1):
                plgpu.store(k_out.at[pl.ds(i * half, half)], kn[i], mask=jnp.full((half,), first_program))
        else:
            out_refs = list(refs)
            qv = (plgpu.load(q_ref.at[pl.ds(0, Gp), :], mask=head_mask, other=0.0),)  # [Gp, Q]
            kn = (kn_ref[...],)
        own = scale * sum(  # [Gp]
            jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32)[None, :], axis=1) for a, b in zip(qv, kn, strict=True)
        )
        # Split 0 starts from the own key (m = its score, l = 1, acc = its value), the others from nothing.
        first = jnp.full((Gp,), s == 0)  # a vector: Triton's select takes no scalar condition here
        m0 = jnp.where(first, own, _NEG)
        l0 = jnp.where(first, 1.0, 0.0)
        acc0 = jnp.where(first[:, None], vn.astype(jnp.float32)[None, :], 0.0)  # [Gp, Q]
        offsets = jnp.arange(block)

        def body(j, carry):
            acc, m, l = carry
            idx = j * block + offsets  # [block] cache positions
            in_cache = (idx < S)[:, None]
            rows = pl.ds(j * block, block)
            # 2 x [block, Q/2] rotating, else [block, Q]
            kb = halves(k_ref, rows, in_cache) if rotary else (plgpu.load(k_ref.at[rows, :], mask=in_cache, other=0.0),)
            scores = sum(plgpu.dot(a, b.T) for a, b in zip(qv, kb, strict=True)) * scale  # [Gp, block] float32
            scores = jnp.where((idx < length)[None, :], scores, _NEG)
            m_next = jnp.maximum(m, scores.max(axis=1))
            correction = jnp.exp(m - m_next)
            p = jnp.exp(scores - m_next[:, None])
            vb = plgpu.load(v_ref.at[rows, :], mask=in_cache, other=0.0)  # [block, Q]
            acc = acc * correction[:, None] + plgpu.dot(p.astype(vb.dtype), vb)
            return acc, m_next, l * correction + p.sum(axis=1)

        start = s * per_split
        stop = jnp.minimum(start + per_split, pl.cdiv(length, block))  # only the filled part of the cache
        acc, m, l = jax.lax.fori_loop(start, jnp.maximum(start, stop), body, (acc0, m0, l0))
        if splits == 1:
            (o_ref,) = out_refs  # rows [G, Go) are written as zeros: the output's padding heads
            out = jnp.where(head_mask, acc / l[:, None], 0.0).astype(o_ref.dtype)
            plgpu.store(o_ref.at[pl.ds(0, Gp), :], out, mask=(heads < Go)[:, None])
        else:
            o_ref, m_ref, l_ref = out_refs
            plgpu.store(o_ref.at[pl.ds(0, Gp), :], acc, mask=head_mask)
            plgpu.store(m_ref.at[pl.ds(0, Gp)], m, mask=head_mask[:, 0])
            plgpu.store(l_ref.at[pl.ds(0, Gp)], l, mask=head_mask[:, 0])

    # Grid axis 1 is (kv head, head block): hg = h n_blocks + g (Triton's grid has three axes).
    cache_spec = pl.BlockSpec((None, None, S, None, Q), lambda b, hg, s: (layer, b, 0, hg // n_blocks, 0))
    in_specs = [
        pl.BlockSpec((None,), lambda b, hg, s: (b,)),  # pos
        # q: heads [h G, h G + G), or with head blocks (K = 1) [g head_block, (g + 1) head_block)
        pl.BlockSpec((None, None, Gq, Q), lambda b, hg, s: (b, 0, hg, 0)),
        cache_spec,
        cache_spec,
        pl.BlockSpec((None, None, None, Q), lambda b, hg, s: (b, 0, H + hg // n_blocks, 0)),  # the own k: H + h
        pl.BlockSpec((None, None, None, Q), lambda b, hg, s: (b, 0, H + K + hg // n_blocks, 0)),  # own v: H + K + h
    ]
    Gs = G if head_block is None else head_block  # a split's partial rows per program
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((B, K, Go, Q), qkv.dtype)]
        out_specs = [pl.BlockSpec((None, None, Gw, Q), lambda b, hg, s: (b, hg // n_blocks, hg % n_blocks, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, B, K, G, Q), jnp.float32),
                     *[jax.ShapeDtypeStruct((splits, B, K, G), jnp.float32)] * 2]  # fmt: skip
        out_specs = [pl.BlockSpec((None, None, None, Gs, Q), lambda b, hg, s: (s, b, hg // n_blocks, hg % n_blocks, 0)),
                     *[pl.BlockSpec((None, None, None, Gs),
                                    lambda b, hg, s: (s, b, hg // n_blocks, hg % n_blocks))] * 2]  # fmt: skip
    own_spec = pl.BlockSpec((None, None, Q), lambda b, hg, s: (b, hg // n_blocks, 0))  # [B, K, Q]: (b, h)
    if rotary:  # each row's cos and sin [Q/2]; out: the rotated own k [B, K, Q], after the attention's
        in_specs += [pl.BlockSpec((None, half), lambda b, hg, s: (b, 0))] * 2
        out_shape.append(jax.ShapeDtypeStruct((B, K, Q), qkv.dtype))
        out_specs.append(own_spec)
    if scaled:  # the scale's rows as q's, the own k's and v's; out: the scaled own v [B, K, Q], last
        in_specs += [pl.BlockSpec((Gq, Q), lambda b, hg, s: (hg, 0)),
                     pl.BlockSpec((None, Q), lambda b, hg, s: (H + hg // n_blocks, 0)),
                     pl.BlockSpec((None, Q), lambda b, hg, s: (H + K + hg // n_blocks, 0))]  # fmt: skip
        out_shape.append(jax.ShapeDtypeStruct((B, K, Q), qkv.dtype))
        out_specs.append(own_spec)
    if normed:  # the head norms' scales [Q], q's and k's
        in_specs += [pl.BlockSpec((Q,), lambda b, hg, s: (0,))] * 2
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B, K * n_blocks, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(pos, qkv, k_cache, v_cache, qkv, qkv, *tables[:2], *([tables[2]] * 3 if scaled else []),
      *(tables[-2:] if normed else []))  # fmt: skip
    outs = list(outs)
    own = [outs.pop() for _ in range(int(rotary) + int(scaled))][::-1]  # [k rotated (, v scaled)]
    if splits == 1:
        out = outs[0]
    else:  # splits' partial softmaxes [splits, B, K, G(, Q)] -> one: rescale each to the largest running max, add
        acc, m, l = outs
        top = m.max(axis=0)
        weight = jnp.exp(m - top[None])
        out = (acc * weight[..., None]).sum(axis=0) / (l * weight).sum(axis=0)[..., None]
        out = jnp.pad(out.astype(qkv.dtype), ((0, 0), (0, 0), (0, Go - G), (0, 0)))  # [B, K, Go, Q]: XLA's combine
    return (out, *own) if rotary else out
