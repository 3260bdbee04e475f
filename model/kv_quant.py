"""An int8 KV cache: `Int8KV`, keys or values stored as int8 with one power-of-two scale per (token, kv head).

The decode step at large batch reads the whole KV cache every step (PAPER.md, "Memory time"); stored in int8 it is
half of bf16's bytes, so a chip holds twice the slots or twice the context and a decode step reads half as much.
Each vector x [Q] of one token and kv head is stored as values = round(x / 2^e) in [-127, 127] with the smallest
exponent e for which max|x| / 2^e <= 127 (an int8 exponent: 1 + 1/Q bytes per element). A power-of-two scale
(as the OCP microscaling formats' shared exponent) costs about half a bit against a free float scale, and buys
exactness: values * 2^e is exact in bf16 and f32, so rounding an already-rounded vector gives it back bit for bit.
That is what lets every path see the same keys: prefill rounds its new k, v to the int8 grid before it attends
over them (`round_to_int8`), a decode step its own k, v, and `insert` / the decode step's write store them without
another rounding; a prompt prefilled whole, in chunks, or over a cached prefix, and a verify step's drafts, read
exactly the keys a decode step reads later.

`Int8KV` reads like the array it stands for where the cache is sliced and written: `kv[i, :, :C]` indexes the
leading axes of values and scales alike, `kv.at[idx].set(x)` rounds a float x (or copies another `Int8KV`), and
`kv.astype(dtype)` dequantises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.errors import UserError

__all__ = [
    "Int8KV",
    "KV_CACHE_DTYPES",
    "quantize",
    "round_to_int8",
    "storable",
    "zeros",
    "spec_of",
    "sharding_of",
    "bytes_per_element",
    "check_kv_cache_dtype",
]

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's compute dtype (bf16, or f32 for f32 weights)
_MIN_EXPONENT = -120  # an all-zero vector's scale (values 0); keeps 2^e a normal float in bf16 and f32


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8KV:
    """values: int8 [..., K, Q]; exponent: int8 [..., K]; the stored vector is values * 2^exponent."""

    values: jax.Array
    exponent: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.size + self.exponent.size)

    def __getitem__(self, index: Any) -> Int8KV:
        """Index the leading axes (never the last, Q): the exponents follow the values."""
        return Int8KV(self.values[index], self.exponent[index])

    @property
    def at(self) -> _IndexedInt8KV:
        return _IndexedInt8KV(self)

    def astype(self, dtype) -> jax.Array:
        """Dequantised [..., K, Q] in `dtype` (exact: an int8 times a power of two)."""
        scale = jnp.exp2(self.exponent.astype(jnp.float32))[..., None]
        return (self.values.astype(jnp.float32) * scale).astype(dtype)


class _IndexedInt8KV:
    def __init__(self, kv: Int8KV, index: Any = None):
        self.kv, self.index = kv, index

    def __getitem__(self, index: Any) -> _IndexedInt8KV:
        return _IndexedInt8KV(self.kv, index)

    def set(self, x: jax.Array | Int8KV, mode: str | None = None) -> Int8KV:
        """`Int8KV` with x written at the index: a float x [..., K, Q] is rounded to the grid, an `Int8KV` copied."""
        new = x if isinstance(x, Int8KV) else quantize(x)
        return Int8KV(
            self.kv.values.at[self.index].set(new.values, mode=mode),
            self.kv.exponent.at[self.index].set(new.exponent, mode=mode),
        )


def quantize(x: jax.Array) -> Int8KV:
    """x [..., Q] (float) -> Int8KV: per vector over the last axis, the smallest e with max|x| / 2^e <= 127."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    exponent = jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / 127.0))
    # log2 of a float is not exact: step the exponent down while the next smaller power still holds max|x|.
    exponent = jnp.where(amax <= 127.0 * jnp.exp2(exponent - 1), exponent - 1, exponent)
    exponent = jnp.clip(exponent, _MIN_EXPONENT, 127)
    values = jnp.clip(jnp.round(x32 / jnp.exp2(exponent)[..., None]), -127, 127)
    return Int8KV(values.astype(jnp.int8), exponent.astype(jnp.int8))


def round_to_int8(x: jax.Array) -> jax.Array:
    """x rounded to the int8 cache's grid, in x's dtype: what a read of x from an int8 cache gives back."""
    return quantize(x).astype(x.dtype)


def storable(x: jax.Array | Int8KV, stored: jax.Array | Int8KV) -> jax.Array | Int8KV:
    """x as the cache `stored` keeps it: cast to its dtype, or for an `Int8KV` rounded to its grid (in x's dtype, so
    writing it in stores it exactly and attending over it equals attending over what is stored). An `Int8KV` x
    (rows of another int8 cache) is kept as it is for an int8 cache and dequantised for a plain one."""
    if isinstance(x, Int8KV):
        return x if isinstance(stored, Int8KV) else x.astype(stored.dtype)
    return round_to_int8(x) if isinstance(stored, Int8KV) else x.astype(stored.dtype)


def zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array | Int8KV:
    """An empty cache array [..., K, Q]: `dtype` "int8" (or jnp.int8) is an `Int8KV`, anything else a plain array."""
    if jnp.dtype(dtype) == jnp.int8:
        return Int8KV(jnp.zeros(shape, jnp.int8), jnp.full(shape[:-1], _MIN_EXPONENT, jnp.int8))
    return jnp.zeros(shape, dtype)


def spec_of(stored: Any, spec: P) -> P | Int8KV:
    """The partition spec tree for `stored` given its values' spec (the exponents drop the last, unsplit, axis)."""
    return Int8KV(spec, P(*tuple(spec)[:-1])) if isinstance(stored, Int8KV) else spec


def sharding_of(stored: Any, sharding: NamedSharding) -> NamedSharding | Int8KV:
    """The sharding tree for `stored` given its values' NamedSharding."""
    if not isinstance(stored, Int8KV):
        return sharding
    return Int8KV(sharding, NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:-1])))


def bytes_per_element(dtype: Any, d_head: int) -> float:
    """Bytes the cache stores per key or value element: the dtype's, or for int8 1 + 1/Q (one exponent per vector)."""
    return 1.0 + 1.0 / d_head if jnp.dtype(dtype) == jnp.int8 else float(jnp.dtype(dtype).itemsize)


def check_kv_cache_dtype(name: str) -> str:
    """`name` if it is one of KV_CACHE_DTYPES, else a UserError naming the field and the choices."""
    if name not in KV_CACHE_DTYPES:
        raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return name
