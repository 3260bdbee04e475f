"""One-kernel decode attention for GPUs (Pallas, Triton backend): the default on CUDA GPUs of compute capability 9.0
or more (MESHSERVE_DECODE_ATTENTION=xla turns it off, =pallas turns it on elsewhere, interpreted off CUDA).

XLA compiles `layers.attend_cached` for one decode token into about ten kernels per layer on a GPU (deviceless
compile for an H100, benchmarks/decode_hlo.py --target h100: the score GEMM, a concatenation with the own key's
score, two softmax reductions, two pads for the probability GEMM, that GEMM, a combine and a transpose). A falcon-7b
batch-1 step launched 688 kernels (commit dec0953), and on an H200 it took ~1.6 ms beyond its ~3.2 ms of weight
streaming: about 2.3 us per kernel, if all of it is per-kernel cost. This kernel does one layer's attention in one
launch, flash-decoding style:

  program (b, kh, s) holds the G = H / K query heads of kv head kh of row b, padded to a power of two Gp, and
  walks the cached keys of its split s in blocks of `block` positions with an online softmax; only the filled
  part of the cache is read (positions [0, pos_b), pos_b = that row's length), not the whole context.

The own key of the step (position pos_b, always visible) seeds split 0's running softmax: m = q·k_new, l = 1,
acc = v_new; the cache is only read, as in `attend_cached` (the caller writes all layers' new k, v after the layer
loop). With one split the kernel writes the normalised output; with several (long contexts at small batch, where
B * K programs would leave the SMs idle) it writes each split's (acc, m, l) and XLA adds them.

The cache is passed whole, [N, B, S, K, Q], with the layer picked by the BlockSpec: a sliced layer would be copied
into its own buffer for the custom call. So the layer index must be a Python int (unrolled layers). q and the own
k, v go in as one [B, 1, H + 2K, Q] operand for the same reason (see `decode_attention`). A falcon-7b bf16 batch-1
step was 277 kernels with it, 468 with XLA's attention (H100 target; BENCHMARKS.md).

`decode_attention_rotating` also applies the rotary embedding, to q and the own k, from cos / sin tables of each
row's position, and writes the rotated own k for the cache: XLA's rotation was a kernel per layer of its own. With
it and model/decode_norm.py the falcon-7b step is 213 kernels (BENCHMARKS.md, deviceless counts of 2026-11-28c).

Why it is CUDA's default: on an H200 (2026-11-28, benchmarks/results/h200-2026-11-28/) it passed
benchmarks/attn_check.py and took falcon-7b's bf16 decode step (bench, prompt 128, 128 steps) from XLA's attention's
4.171 to 3.969 ms at batch 1 and from 5.364 to 4.698 ms at batch 64. Only Hopper parts (H100, H200) have run it,
so older CUDA GPUs keep XLA's attention by default (`_hopper_or_newer`: less shared memory per SM). Off CUDA it only
runs interpreted (its body as XLA ops, slowly), so there the default stays "xla".
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "DECODE_ATTENTIONS",
    "decode_attention",
    "decode_attention_label",
    "decode_attention_rotating",
    "decode_attention_mode",
    "default_decode_attention",
    "kernel_enabled",
    "run_kernel",
    "splits_for",
]

DECODE_ATTENTIONS = ("xla", "pallas")
_NEG = -1e30  # finite: exp(_NEG - m) is 0 and a split with no visible key gives no NaN
_SPLIT_POSITIONS = 512  # a split walks at least this many positions before another split pays off
_TARGET_PROGRAMS = 128  # about one program per SM (H100: 132)


def decode_attention_mode() -> str:
    """MESHSERVE_DECODE_ATTENTION, else `default_decode_attention()` (set but empty: unset, as a shell user means
    it); a value outside DECODE_ATTENTIONS is a UserError naming the variable. Read when a decode step is traced
    (`kernel_enabled`) and by the CLIs before a model loads: the default asks for this process's devices."""
    mode = os.environ.get("MESHSERVE_DECODE_ATTENTION")
    if not mode:
        return default_decode_attention()
    if mode not in DECODE_ATTENTIONS:
        from meshserve.errors import UserError

        raise UserError(f"MESHSERVE_DECODE_ATTENTION must be one of {', '.join(DECODE_ATTENTIONS)}, got {mode!r}")
    return mode


def default_decode_attention(cuda: bool | None = None) -> str:
    """The decode attention when MESHSERVE_DECODE_ATTENTION is unset: "pallas" where the steps are lowered for a
    CUDA GPU of compute capability 9.0 or more (see the module docstring for why), else "xla" (elsewhere the kernel
    would run interpreted). cuda: whether they are lowered for such a GPU (None: this process's first device; a
    deviceless compile for an H100 or H200 passes True)."""
    from meshserve.model.quant import lowered_for_cuda

    if cuda is None:
        cuda = lowered_for_cuda(None) and _hopper_or_newer()
    return "pallas" if cuda else "xla"


def _hopper_or_newer() -> bool:
    """Whether this process's first device reports compute capability 9.0 or more (H100, H200: where the kernel was
    checked and timed). Older parts have less shared memory per SM (about 99 KiB on sm_86 and sm_89, 227 on sm_90),
    which a large head group's kernel exceeds (48 query heads of 256 per kv head, palm-540b's: 160 KiB in a PTX
    compile), so they keep XLA's attention unless MESHSERVE_DECODE_ATTENTION=pallas asks."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", "")) >= 9.0
    except ValueError:
        return False


def kernel_enabled(head_dim: int, cache_dtype: jnp.dtype) -> bool:
    """Whether decode steps take the kernel for a model's whole-context layers: `decode_attention_mode()` is "pallas"
    (CUDA's default, or MESHSERVE_DECODE_ATTENTION=pallas), a 16-bit cache (an int8 cache's scales are XLA's) and a
    power-of-two head dim of at least 16 (Triton's block shapes and dot sizes). `transformer.decode_step` adds the
    per-layer conditions (unrolled, not windowed)."""
    if decode_attention_mode() != "pallas":
        return False
    return jnp.dtype(cache_dtype).itemsize == 2 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention_label(
    config: Any, unrolled_layers: bool, cache_dtype: Any, context: int | None = None, cuda: bool | None = None
) -> str:
    """How this process's decode steps attend, as bench rows and serve's start line name it: "pallas" where the
    kernel runs on CUDA, "pallas-interpret" where it runs elsewhere (its body as XLA ops), else "xla". The rules are
    `transformer.decode_step`'s: unrolled layers, `kernel_enabled` for a cache of cache_dtype (the compute dtype,
    or int8), and some layer reading its whole context (a window below the context is gathered by XLA). context:
    the decode steps' (None: a server's, which varies; its short contexts read whole). cuda: whether the step is
    lowered for CUDA (None: this process's first device, `quant.on_cuda`)."""
    from meshserve.model.quant import lowered_for_cuda

    if not unrolled_layers or not kernel_enabled(config.d_head, cache_dtype):
        return "xla"
    windows = config.layer_windows
    if context is not None and all(windows) and min(windows) < context:
        return "xla"
    return "pallas" if lowered_for_cuda(cuda) else "pallas-interpret"


def splits_for(batch: int, kv_heads: int, context: int) -> int:
    """How many splits each (row, kv head) walks its positions in: enough programs to fill the SMs, but no split
    shorter than _SPLIT_POSITIONS positions."""
    by_length = max(1, context // _SPLIT_POSITIONS)
    by_programs = max(1, _TARGET_PROGRAMS // (batch * kv_heads))
    return min(by_length, by_programs)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    pos: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    context: int,
    scale: float | None = None,
    *,
    block: int = 64,
    interpret: bool | None = None,
    out_heads: int | None = None,
    head_block: int | None = None,
) -> jax.Array:
    """Attention of one new token per row over its cached keys and its own key. Equals `layers.attend_cached` with
    visible = (cached position < pos).

    q [B, 1, H, Q] (rotated); k_cache / v_cache [N, B, S, K, Q] (every layer's cache; `layer` picks one); pos int32
    [B]: each row's own position (cached positions [0, pos) are visible; the caller promises pos < context <= S);
    k_new / v_new [B, 1, K, Q]: this step's own key and value; scale: the logits' (None: 1 / sqrt(Q)).
    Returns [B, 1, H, Q] in q's dtype. interpret: run the kernel body as XLA ops (None: on every platform but
    CUDA, chosen when the step is lowered, so a deviceless compile for a GPU gets the kernel). out_heads (K = 1
    only, >= H): return [B, 1, out_heads, Q], heads from H on zeros, written by the kernel itself: the zero rows an
    output projection's padded weight meets (`params.unstack_layers`' wo_padded), where XLA would pad o in a kernel
    of its own (falcon-7b int8, deviceless H100 compile: one per layer). head_block (K = 1 only): query heads per
    program, a power of two >= 16 (None: all G in one program per row; see `_decode_attention`).
    """
    H = q.shape[2]
    # One operand [B, 1, H + 2K, Q] for q and the own k, v, each found by its BlockSpec: when they are slices of one
    # fused projection (params.unstack_layers' wqkv) XLA folds the concatenation back into that array, where
    # separate operands would each be copied out of it by a kernel of their own.
    qkv = jnp.concatenate([q, k_new.astype(q.dtype), v_new.astype(q.dtype)], axis=2)
    out, _ = _launch(qkv, H, k_cache, v_cache, layer, pos, context, scale, None, block=block, interpret=interpret,
                     out_heads=out_heads, head_block=head_block)  # fmt: skip
    return out


def decode_attention_rotating(
    projection: jax.Array,
    n_heads: int,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    pos: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    context: int,
    scale: float | None = None,
    *,
    block: int = 64,
    interpret: bool | None = None,
    out_heads: int | None = None,
    head_block: int | None = None,
    projection_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`decode_attention` over an unrotated projection, the rotary embedding applied inside the kernel.

    projection [B, 1, Hs, Q]: heads [0, H) are q, [H, H + K) the own k, [H + K, H + 2K) the own v, all before
    rotation (H = n_heads); heads past H + 2K are not read. cos / sin [B, Q/2] float32: each row's rotation at its
    own position (`layers.rotary_tables`), rotate-half convention as `layers.rotate`. projection_scale [H + 2K, Q]
    (or None): an int8 wqkv's per-channel scale, which the kernel applies to q, k and v as it loads them, rounding
    to projection's dtype as XLA's int8 path does (`quant.einsum_unscaled`); XLA applied it in a kernel of its own
    per layer (falcon-7b int8, deviceless H100 compile). Returns (o [B, 1, out_heads or H, Q], k [B, 1, K, Q]: the
    own key rotated, v [B, 1, K, Q]: the own value, scaled), all in projection's dtype: k and v for the cache.

    Why: rotated by XLA, q and k took a kernel of their own per layer and step, between the input projection and
    this one (falcon-7b bf16 batch 1 on an H200: 1.6 us of ~125 us per layer). The projection may be the whole
    output of the layer's input GEMM (q, k, v and, in a parallel block, the MLP's input projections after them:
    `transformer._attend_rotating`): a slice of it for q, k, v alone would be copied into its own buffer for the
    custom call.
    """
    H, K = n_heads, k_cache.shape[3]
    if projection_scale is not None and projection_scale.shape != (H + 2 * K, projection.shape[3]):
        raise ValueError(f"projection_scale must be [H + 2K, Q] = {[H + 2 * K, projection.shape[3]]}, "
                         f"got {list(projection_scale.shape)}")  # fmt: skip
    out, own = _launch(projection, H, k_cache, v_cache, layer, pos, context, scale, (cos, sin), block=block,
                       interpret=interpret, out_heads=out_heads, head_block=head_block,
                       projection_scale=projection_scale)  # fmt: skip
    v = own[1][:, None] if projection_scale is not None else projection[:, :, H + K : H + 2 * K]
    return out, own[0][:, None], v


def run_kernel(kernel_fn, *args, interpret: bool | None, **static):
    """kernel_fn(*args, **static, interpret=...) (this module's and model/decode_norm.py's): interpret None compiles
    it where the step is lowered for CUDA (a deviceless compile too) and interprets it elsewhere."""
    if interpret is not None:
        return kernel_fn(*args, **static, interpret=interpret)
    return jax.lax.platform_dependent(
        *args,
        cuda=functools.partial(kernel_fn, **static, interpret=False),
        default=functools.partial(kernel_fn, **static, interpret=True),
    )


def _launch(qkv, H, k_cache, v_cache, layer, pos, context, scale, rotary, *, block, interpret, out_heads, head_block,
            projection_scale=None):  # fmt: skip
    """`decode_attention` / `decode_attention_rotating`'s checks and platform choice -> (o [B, 1, Go, Q], () or
    with `rotary` (rotated own k [B, K, Q],) and with a projection_scale also (scaled own v [B, K, Q],))."""
    B, _, _, Q = qkv.shape
    K = k_cache.shape[3]
    out_heads = H if out_heads is None else out_heads
    if out_heads < H or (out_heads > H and K != 1):
        raise ValueError(f"out_heads must be at least H = {H}, and above it only with one kv head (K = {K})")
    if qkv.shape[2] < H + 2 * K:
        raise ValueError(f"the projection has {qkv.shape[2]} heads, fewer than H + 2K = {H + 2 * K}")
    if rotary is not None and Q < 32:
        raise ValueError(f"rotating in the kernel needs a head dim of at least 32 (two dots of Q/2), got {Q}")
    scale = 1.0 / float(Q) ** 0.5 if scale is None else float(scale)
    static = dict(n_heads=H, layer=layer, context=context, scale=scale, splits=splits_for(B, K, context),
                  block=block, out_groups=out_heads // K, head_block=head_block)  # fmt: skip
    tables = () if rotary is None else tuple(t.astype(jnp.float32) for t in rotary)
    scaled = projection_scale is not None
    if scaled and rotary is None:
        raise ValueError("projection_scale is taken by the rotating kernel only")
    extras = (*tables, projection_scale) if scaled else tables
    args = (qkv, k_cache, v_cache, pos.astype(jnp.int32), *extras)
    outs = run_kernel(_decode_attention, *args, interpret=interpret, scaled=scaled, **static)
    out, *own = outs if rotary is not None else (outs,)
    return out.reshape(B, 1, out_heads, Q), tuple(own)


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
)


@functools.partial(jax.jit, static_argnames=_STATIC, inline=True)
def _decode_attention(qkv, k_cache, v_cache, pos, *tables, n_heads, layer, context, scale, splits, block, interpret,
                      num_warps=4, num_stages=2, out_groups=None, head_block=None, scaled=False):  # fmt: skip
    """qkv [B, 1, Hs, Q] (q's H = n_heads heads, then the own k's K, then v's K; heads past H + 2K unread); caches
    [N, B, S, K, Q]; pos [B]; tables: () (q and the own k arrive rotated) or (cos, sin) [B, Q/2] float32 (the kernel
    rotates them), and with `scaled` then qkv's channel scale [H + 2K, Q] (applied to q, k, v as loaded) -> [B, K,
    Go, Q] (G = H / K query heads per kv head, then zeros up to Go = out_groups, default G), with rotation also the
    rotated own k [B, K, Q], and scaled also the scaled own v [B, K, Q]. num_warps, num_stages: Triton's launch config
    (benchmarks/attn_sweep.py times others). head_block (one kv head only, a power of two >= 16): each program takes
    that many of the query heads, not all G, so a batch-1 step runs cdiv(Go, head_block) programs where it ran one
    (each reads the same keys; an option for attn_sweep to time)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, K, Q, H = qkv.shape[0], k_cache.shape[3], qkv.shape[3], n_heads
    G = H // K
    Go = G if out_groups is None else out_groups
    S = k_cache.shape[2]
    rotary, half = bool(tables), Q // 2
    if scaled and len(tables) != 3:
        raise ValueError("scaled takes (cos, sin, scale) after the caches")
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
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B, K * n_blocks, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(pos, qkv, k_cache, v_cache, qkv, qkv, *tables[:2], *([tables[2]] * 3 if scaled else []))
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
