"""int8 weights as a type: `QuantizedArray` (int8 values + per-output-channel scales) and `einsum`.

Per-output-channel symmetric quantisation (PAPER.md "Other measures"): for a weight whose contracted
(input) axes are `contract_axes`, scale = max|w| over those axes / 127, values = round(w / scale).
The scale keeps the weight's rank, with size 1 on the contracted axes, so it shards with the same
logical axes as the values. Activations stay in the compute dtype; the scale is applied to the
matmul's output, so the int8 values are what moves through memory and collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = ["QuantizedArray", "quantize", "dequantize", "einsum", "is_quantized"]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedArray:
    """values: int8 [...] ; scale: bf16, same rank, 1 on the contracted axes."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def is_quantized(x: object) -> bool:
    return isinstance(x, QuantizedArray)


def quantize(w: jax.Array, contract_axes: Sequence[int], scale_dtype=jnp.bfloat16) -> QuantizedArray:
    """Symmetric int8 with one scale per output channel (max over `contract_axes`)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(contract_axes), keepdims=True)
    # The scale is stored in bf16; quantise against the rounded scale so values * scale round-trips.
    scale = (jnp.maximum(amax, 1e-12) / 127.0).astype(scale_dtype)
    values = jnp.clip(jnp.round(w32 / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
    return QuantizedArray(values=values, scale=scale)


def dequantize(w: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    return (w.values.astype(jnp.float32) * w.scale.astype(jnp.float32)).astype(dtype)


def _scale_for_output(subscripts: str, scale: jax.Array) -> jax.Array:
    """Reshape a keepdims scale of operand 2 so it broadcasts against the einsum's output."""
    inputs, out = subscripts.replace(" ", "").split("->")
    w_letters = inputs.split(",")[1]
    keep = [i for i, letter in enumerate(w_letters) if letter in out]
    squeezed = jnp.squeeze(scale, axis=tuple(i for i in range(scale.ndim) if i not in keep))
    kept_letters = "".join(w_letters[i] for i in keep)
    # Transpose the kept axes into output order, then add size-1 axes for the output's other letters.
    order = sorted(range(len(kept_letters)), key=lambda i: out.index(kept_letters[i]))
    squeezed = jnp.transpose(squeezed, order)
    shape = [squeezed.shape[sorted(kept_letters, key=out.index).index(c)] if c in kept_letters else 1 for c in out]
    return squeezed.reshape(shape)


def einsum(subscripts: str, x: jax.Array, w: jax.Array | QuantizedArray, *, out_dtype=None) -> jax.Array:
    """The one matmul of the model: `jnp.einsum(subscripts, x, w)` for plain or int8 weights.

    Weights are cast to x's dtype (the compute dtype); int8 scales are applied to the output, which
    is exact because each scale is constant along the contracted axes.
    """
    out_dtype = out_dtype or x.dtype
    if isinstance(w, QuantizedArray):
        y = jnp.einsum(subscripts, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
        y = y * _scale_for_output(subscripts, w.scale).astype(jnp.float32)
        return y.astype(out_dtype)
    return jnp.einsum(subscripts, x, w.astype(x.dtype), preferred_element_type=out_dtype)
