"""A fused weight-only int8 matmul for decode-sized token batches on GPUs (Pallas, Triton backend).

XLA lowers `x @ w_int8.astype(bf16)` by first writing the converted bf16 weights to memory and then running a bf16
GEMM, so an int8 weight costs 1 + 2 + 2 bytes of traffic per parameter instead of 1: at decode batch sizes, where
the step is bound by reading weights, int8 ran slower than bf16 (measured on an H100: BENCHMARKS.md). This kernel
reads each int8 weight once, converts it in registers and accumulates in float32:

  out[M, N] = (x[M, K] @ w[K, N]) * scale[N]      x bf16, w int8, scale bf16; M <= 64 (padded to 16)

One program per block of bn output columns streams its [K, bn] slice of w in chunks of bk rows; bn is chosen so the
grid has at least ~one program per SM. Used by `quant.einsum` when MESHSERVE_INT8_MATMUL=pallas (see there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["int8_matmul", "MAX_TOKENS"]

MAX_TOKENS = 64  # above this many rows a matmul is compute-bound and XLA's GEMM is the better choice
_MIN_PROGRAMS = 128  # about one program per SM on an H100 (132 SMs)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _block_n(n: int) -> int:
    """Largest power-of-two column block (16..256) dividing n that still leaves >= _MIN_PROGRAMS programs."""
    bn = _largest_pow2_divisor(n, 256)
    while bn > 16 and n // bn < _MIN_PROGRAMS:
        bn //= 2
    return bn


@functools.partial(jax.jit, static_argnames=("interpret",))
def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, interpret: bool = False) -> jax.Array:
    """x [M, K] (16-bit), w int8 [K, N], scale [N] -> [M, N] in x's dtype (float32 accumulation)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    M, K = x.shape
    N = w.shape[1]
    bn, bk = _block_n(N), _largest_pow2_divisor(K, 256)
    if bn < 16 or bk < 16:
        raise ValueError(f"int8_matmul needs N and K divisible by 16, got K={K}, N={N}")
    m_pad = max(16, 1 << (M - 1).bit_length())
    xp = jnp.pad(x, ((0, m_pad - M), (0, 0)))
    n_k = K // bk

    def kernel(x_ref, w_ref, s_ref, o_ref):
        def body(i, acc):
            xk = x_ref[:, pl.ds(i * bk, bk)]  # [m_pad, bk]
            wk = w_ref[pl.ds(i * bk, bk), :].astype(xk.dtype)  # [bk, bn]: int8 read once, converted in registers
            return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((m_pad, bn), jnp.float32))
        o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, N), x.dtype),
        grid=(N // bn,),
        in_specs=[
            pl.BlockSpec((m_pad, K), lambda j: (0, 0)),
            pl.BlockSpec((K, bn), lambda j: (0, j)),
            pl.BlockSpec((1, bn), lambda j: (0, j)),
        ],
        out_specs=pl.BlockSpec((m_pad, bn), lambda j: (0, j)),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(xp, w, scale.reshape(1, N))
    return out[:M]
