"""int8 weights stored contracted-axes-last, for decode matmuls of a few rows (MESHSERVE_INT8_MATMUL=rowsum).

At batch 1 a decode step is one pass over the weights, and the int8 forms that keep the declared [K, N] layout read
them slowly: on an H200 (benchmarks/results/h200-2026-11-27/int8_probe.txt, falcon-7b's shapes at M = 1) XLA's
convert + GEMM read 494-545 GB/s of int8 bytes and the tuned Pallas kernel 544-681, both slower than the bf16 GEMM
reading twice the bytes. Stored transposed, [N, K], the same matmul written as a multiply and a sum over the minor
axis K is a row reduction that XLA fuses with the int8 convert and streamed at 1022-1529 GB/s: 1.25-1.5x faster
than bf16 (the probe's "rowsum" form; one run: a second pass under other XLA flags read w_down at 736 GB/s). So,
once the layers are unrolled on one device (`params.unstack_layers(..., int8_rows=True)`), each int8 weight is
stored with its contracted axes last (`rows_first`) and

  rows <= ROWSUM_MAX_ROWS:  out[m, n] = (sum over k of float32(x[m, k]) * float32(w_t[n, k])) * scale[n]
  otherwise (prefill, and decode batches of more rows):
                            the einsum over the stored letters (XLA's convert + GEMM; the GEMM takes the transposed
                            operand as it is)

Both compute the declared layout's sums (float32 accumulation) and scale after them, rounding once to the output
dtype. (`quant._convert_einsum` on the declared layout rounds its product to the compute dtype before the scale;
here the GEMM keeps a float32 output: rounded first, XLA:GPU left the scale in a kernel of its own per layer at
batch 8, +32 kernels per falcon-7b step, against 178 MiB fewer bytes written at batch 64.) Stacked
layers and meshes keep the declared layout (their slicing and sharding index it), and so the ordinary paths.

MESHSERVE_INT8_MATMUL=w8a8 stores the weights so too (`quant.int8_rows_layout`) and runs its int8 x int8 einsum over
the stored letters at every row count: the integer GEMM takes both operands with K minor, and over the declared
[K, N] layout XLA made a transposed copy of every int8 weight in each compiled call (deviceless H100 compile of
falcon-7b: outside the decode loop, so once per `meshserve bench` call but once per token in a server, whose steps
are one call each; a second copy of the weights in memory besides).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from meshserve.model.quant import QuantizedArray, _scale_for_output, _split, int8_matmul_mode, w8a8_values_einsum

__all__ = ["ROWSUM_MAX_ROWS", "rows_first", "rows_einsum", "rowsum_matmul"]

ROWSUM_MAX_ROWS = 4  # the reduction re-reads a weight row per row of x (from cache); past a few rows a GEMM wins


def rows_first(w: QuantizedArray) -> QuantizedArray:
    """w with its values stored contracted axes last: [free..., contracted...], each group in declared order.

    The contracted axes are those where the scale (1 on contracted axes) is 1 and the values are not; an axis of
    size 1 in both has no memory order to choose and stays with the free axes. A weight already stored so is
    returned as is. values [declared] -> [free..., contracted...]; scale unchanged.
    """
    if w.perm is not None:
        return w
    shape, scale_shape = w.values.shape, w.scale.shape
    contracted = [a for a in range(len(shape)) if scale_shape[a] == 1 and shape[a] > 1]
    perm = tuple([a for a in range(len(shape)) if a not in contracted] + contracted)
    return QuantizedArray(values=jnp.transpose(w.values, perm), scale=w.scale, perm=perm)


def rowsum_matmul(x: jax.Array, w_t: jax.Array, scale: jax.Array, out_dtype: jax.typing.DTypeLike) -> jax.Array:
    """x [M, K], w_t int8 [N, K], scale [N] -> [M, N] in out_dtype: a float32 multiply and a sum over K (the minor
    axis of w_t), which XLA fuses with the int8 convert into one row reduction reading each weight byte once."""
    prod = x[:, None, :].astype(jnp.float32) * w_t.astype(jnp.float32)[None]  # [M, N, K]: inside the fusion
    return (jnp.sum(prod, axis=-1) * scale.astype(jnp.float32)[None, :]).astype(out_dtype)


def rows_einsum(subscripts: str, x: jax.Array, w: QuantizedArray, out_dtype) -> jax.Array:
    """quant.einsum for a weight stored by `rows_first`: the same result as on the declared layout."""
    x_letters, w_letters, out, c = _split(subscripts)
    stored = "".join(w_letters[a] for a in w.perm)
    n_free_x = len(x_letters) - len(c)
    rows = math.prod(x.shape[:n_free_x])
    free_w = stored[: len(stored) - len(c)]
    plain = x_letters.endswith(c) and stored.endswith(c) and out == x_letters[:n_free_x] + free_w
    if plain and int8_matmul_mode() == "w8a8":  # int8 x int8 with K minor in both operands: no transposed copy
        out_scale = _scale_for_output(subscripts, w.scale)
        return w8a8_values_einsum(f"{x_letters},{stored}->{out}", x, w.values, out_scale).astype(out_dtype)
    if plain and rows <= ROWSUM_MAX_ROWS:
        k = math.prod(x.shape[n_free_x:])
        free_w_shape = w.values.shape[: len(free_w)]
        scale = w.scale.reshape(-1)  # [N]: the declared free axes, in order; the contracted ones are 1
        y = rowsum_matmul(x.reshape(rows, k), w.values.reshape(-1, k), scale, out_dtype)
        return y.reshape(*x.shape[:n_free_x], *free_w_shape)
    y = jnp.einsum(f"{x_letters},{stored}->{out}", x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * _scale_for_output(subscripts, w.scale).astype(jnp.float32)).astype(out_dtype)
