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
from meshserve.model.decode_attention_kernel import decode_attention_kernel

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
    program, a power of two >= 16 (None: all G in one program per row; see `decode_attention_kernel`).
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
    head_norm: tuple[jax.Array, jax.Array, float, bool] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`decode_attention` over an unrotated projection, the rotary embedding applied inside the kernel.

    projection [B, 1, Hs, Q]: heads [0, H) are q, [H, H + K) the own k, [H + K, H + 2K) the own v, all before
    rotation (H = n_heads); heads past H + 2K are not read. cos / sin [B, Q/2] float32: each row's rotation at its
    own position (`layers.rotary_tables`), rotate-half convention as `layers.rotate`. projection_scale [H + 2K, Q] (or
    None): an int8 wqkv's per-channel scale, which the kernel applies to q, k and v as it loads them, rounding to
    projection's dtype as XLA's int8 path does (the projection from `quant.concat_einsum`); XLA applied it in a kernel
    of its own per layer (falcon-7b int8, deviceless H100 compile). Returns (o [B, 1, out_heads or H, Q], k [B, 1, K,
    Q]: the own key rotated, v [B, 1, K, Q]: the own value, scaled), all in projection's dtype: k and v for the cache.
    head_norm (or None): (q_norm's scale [Q], k_norm's [Q], eps, offset: 1 + scale), Qwen3's and Gemma 3's RMSNorm of
    each q and k head, applied after the projection's scale and before the rotation, as `layers.head_norm`; XLA spent a
    kernel per layer on the norms and rotation and one on concatenating q, k, v for the kernel (qwen3-8b).

    Why: rotated by XLA, q and k took a kernel of their own per layer and step, between the input projection and
    this one (falcon-7b bf16 batch 1 on an H200: 1.6 us of ~125 us per layer). The projection may be the whole
    output of the layer's input GEMM (q, k, v and, in a parallel block, the MLP's input projections after them:
    `transformer._attend_rotating`): a slice of it for q, k, v alone would be copied into its own buffer for the
    custom call.
    """
    H, K = n_heads, k_cache.shape[3]
    if head_norm is not None and not head_norm[0].shape == head_norm[1].shape == (projection.shape[3],):
        raise ValueError(f"head_norm's scales must be [Q] each, got {list(head_norm[0].shape)}, "
                         f"{list(head_norm[1].shape)}")  # fmt: skip
    if projection_scale is not None and projection_scale.shape != (H + 2 * K, projection.shape[3]):
        raise ValueError(f"projection_scale must be [H + 2K, Q] = {[H + 2 * K, projection.shape[3]]}, "
                         f"got {list(projection_scale.shape)}")  # fmt: skip
    out, own = _launch(projection, H, k_cache, v_cache, layer, pos, context, scale, (cos, sin), block=block,
                       interpret=interpret, out_heads=out_heads, head_block=head_block,
                       projection_scale=projection_scale, head_norm=head_norm)  # fmt: skip
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
            projection_scale=None, head_norm=None):  # fmt: skip
    """`decode_attention` / `decode_attention_rotating`'s checks and platform choice -> (o [B, 1, Go, Q], () or
    with `rotary` (rotated own k [B, K, Q],) and with a projection_scale also (scaled own v [B, K, Q],)). head_norm:
    `decode_attention_rotating`'s (q's scale, k's scale, eps, offset), or None."""
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
    scaled = projection_scale is not None  # given by decode_attention_rotating only, with rotary
    extras = (*tables, projection_scale) if scaled else tables
    if head_norm is not None:  # (q's scale [Q], k's [Q], eps, offset)
        extras += tuple(head_norm[:2])
        static.update(head_norm_eps=float(head_norm[2]), head_norm_offset=bool(head_norm[3]))
    args = (qkv, k_cache, v_cache, pos.astype(jnp.int32), *extras)
    outs = run_kernel(decode_attention_kernel, *args, interpret=interpret, scaled=scaled, **static)
    out, *own = outs if rotary is not None else (outs,)
    return out.reshape(B, 1, out_heads, Q), tuple(own)
