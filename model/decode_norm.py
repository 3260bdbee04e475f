"""One-kernel LayerNorm / RMSNorm for decode rows on GPUs (Pallas, Triton backend).

XLA compiles `layers.norm` into two kernels per norm on a GPU: a row reduction for the statistics
(input_reduce_fusion, 1.58 us in a falcon-7b bf16 decode step on an H200,
benchmarks/results/h200-2026-11-28/profile_bf16_1_x.json) and an elementwise apply (loop_convert_fusion, 1.47 us),
each costing about a launch at decode's size. This kernel does both in one launch: one program per row loads the
row once, reduces, normalises, scales and stores. At decode the rows are B (1..256) of E (2048..8192) elements, so a
row fits in one program's registers (`default_warps`). Not timed on a GPU yet: the saving is a launch per norm.
That holds for LayerNorm, and for RMSNorm at batch 1; from batch 8 XLA makes an RMSNorm one Triton fusion, so
decode steps use the kernel only where it saves one (`transformer._norms_in_kernel`).

It computes what `layers.norm` computes, in float32 with the same formulas (the shifted one-pass variance for
layernorm), so the two agree to float32 rounding (the sums are added in another order). As in
model/decode_attention.py it runs compiled on CUDA and interpreted (its body as XLA ops) elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from meshserve.model.decode_attention import run_kernel

__all__ = ["NORM_KINDS", "decode_norm", "default_warps", "norm_kernel_supported"]

NORM_KINDS = ("layernorm", "rmsnorm")
# The widest row's block. A program of 32 warps (Triton's most: 1024 threads) may use at most 64 registers a thread
# (65536 per SM); ptxas for sm_90a fits a 32768-lane block's layernorm in those with 8 bytes spilled, and a 65536-lane
# block would spill most of its row. palm-540b's E = 18432 (a 32768-lane block) is the widest preset.
_MAX_LANES = 32768
_MAX_WARPS = 32
_LANES_PER_WARP = 1024  # 32 lanes a thread: see `default_warps`


def norm_kernel_supported(E: int) -> bool:
    """Whether the kernel takes rows of E elements: 1 <= E and next_power_of_2(E) <= 32768 (a wider row's block
    does not fit the registers of one program; see _MAX_LANES)."""
    return E >= 1 and _lanes(E) <= _MAX_LANES


def default_warps(E: int) -> int:
    """Warps per program for rows of E: one per 1024 lanes of the block (32 lanes a thread), at least 4 (Triton's
    default) and at most 32. ptxas (sm_90a, bf16 layernorm with bias) then gives 40 to 80 registers a thread and no
    spill from E = 2048 to 18432: 4096 -> 4 warps, 71 registers; falcon-7b's 4544 (an 8192-lane block) -> 8 warps,
    48 (80 at 4 warps); 8192 -> 8 warps, 80 (168 at 4). Fewer registers let more rows' programs share an SM at
    batch 64 to 256; at batch 1 more warps keep more of the lone row's loads in flight."""
    return min(_MAX_WARPS, max(4, _lanes(E) // _LANES_PER_WARP))


def _lanes(E: int) -> int:
    """Triton's block shapes are powers of two: next_power_of_2(E)."""
    return 1 << max(0, E - 1).bit_length()


def decode_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    *,
    kind: str,
    eps: float,
    scale_offset: bool,
    interpret: bool | None = None,
    num_warps: int | None = None,
) -> jax.Array:
    """`layers.norm` in one kernel. x [..., E] (leading dims flattened to R rows, one program each); scale [E];
    bias [E] or None; kind "layernorm" | "rmsnorm"; eps: added to the variance (or mean square); scale_offset: the
    rows are multiplied by 1 + scale (Gemma). Returns [..., E] in x's dtype. interpret: run the kernel body as XLA
    ops (None: on every platform but CUDA, chosen when lowered, so a deviceless compile for a GPU gets the kernel).
    num_warps: Triton's (None: `default_warps(E)`)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(NORM_KINDS)}, got {kind!r}")
    E = x.shape[-1]
    if not norm_kernel_supported(E):
        raise ValueError(f"decode_norm takes rows of 1 to {_MAX_LANES} elements, got E = {E}")
    if x.size == 0:
        return x
    static = dict(kind=kind, eps=float(eps), offset=bool(scale_offset),
                  num_warps=default_warps(E) if num_warps is None else num_warps)  # fmt: skip
    args = (x.reshape(-1, E), scale) + (() if bias is None else (bias,))
    return run_kernel(_decode_norm, *args, interpret=interpret, **static).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "offset", "interpret", "num_warps"), inline=True)
def _decode_norm(x, scale, bias=None, *, kind, eps, offset, interpret, num_warps):
    """x [R, E], scale [E], bias [E] or None -> [R, E] in x's dtype; grid (R,), one row per program."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, E = x.shape
    lanes = _lanes(E)

    def kernel(x_ref, scale_ref, *refs):
        b_ref, o_ref = refs if bias is not None else (None, refs[0])
        mask = jnp.arange(lanes) < E
        # Lanes [E, lanes) load as 0, and the sums are divided by the true E, so they add nothing to the statistics.
        x32 = plgpu.load(x_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        if kind == "layernorm":
            # layers.norm's shifted one-pass variance: d = x - x_0 keeps a large common offset from cancelling in
            # E[d^2] - E[d]^2. A padding lane's d would be 0 - x_0: masked to 0, or it would enter both sums.
            x0 = x_ref[0].astype(jnp.float32)
            d = jnp.where(mask, x32 - x0, 0.0)
            shift_mean = jnp.sum(d) / E
            variance = jnp.maximum(jnp.sum(d * d) / E - shift_mean * shift_mean, 0.0)
            y = (d - shift_mean) * jax.lax.rsqrt(variance + eps)
        else:
            y = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32) / E + eps)
        s = plgpu.load(scale_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        y = y * (1.0 + s if offset else s)  # layers.norm_scale
        if b_ref is not None:
            y = y + plgpu.load(b_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(o_ref.at[pl.ds(0, lanes)], y.astype(o_ref.dtype), mask=mask)

    row = pl.BlockSpec((None, E), lambda r: (r, 0))
    whole = pl.BlockSpec((E,), lambda r: (0,))  # scale and bias: the same [E] for every row
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((R, E), x.dtype),
        grid=(R,),
        in_specs=[row, whole] + ([] if bias is None else [whole]),
        out_specs=row,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_norm",
    )(x, scale, *(() if bias is None else (bias,)))
