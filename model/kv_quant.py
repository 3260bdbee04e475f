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
exactly the keys a decode step reads later. The exponent comes from the float's own bits (`frexp`) and 2^e is built
from bits too (`pow2`): exp2 / log2 are not exact on every backend (XLA lowers exp2 to exp(x ln 2)).
The decode step reads the int8 values as they are and applies the scales outside the head-dim contraction
(`operands`, layers.attend_cached): q . (v 2^e) = (q . v) 2^e, and p 2^e weighs value v, so no scaled copy of
the cache is made. A NaN or inf in a key or value cannot be stored (it reads back as a finite value); a model that
writes one is broken either way.

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
    "int8_sharding",
    "bytes_per_element",
    "check_kv_cache_dtype",
    "operands",
    "pow2",
]

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's compute dtype (bf16, or f32 for f32 weights)
# Exponents are clipped to [-126, 126], where 2^e and 2^-e are both normal floats (bf16 and f32 share the range): an
# all-zero vector takes the smallest, and |x| up to 127 * 2^126 (past f32's largest) is representable.
_MIN_EXPONENT, _MAX_EXPONENT = -126, 126


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
        _check_leading(index, self.values.ndim)
        return Int8KV(self.values[index], self.exponent[index])

    @property
    def at(self) -> _IndexedInt8KV:
        return _IndexedInt8KV(self)

    def astype(self, dtype) -> jax.Array:
        """Dequantised [..., K, Q] in `dtype` (exact: an int8 times a power of two)."""
        return (self.values.astype(jnp.float32) * pow2(self.exponent)[..., None]).astype(dtype)


def _check_leading(index: Any, ndim: int) -> None:
    """An index of an `Int8KV` must name leading axes only: the exponents have one axis less (no Q)."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > ndim - 1 or any(p is Ellipsis or p is None for p in parts):
        raise IndexError(
            f"Int8KV takes an index of its leading {ndim - 1} axes (no ..., None or Q axis), got {index!r}"
        )


class _IndexedInt8KV:
    def __init__(self, kv: Int8KV, index: Any = None):
        self.kv, self.index = kv, index

    def __getitem__(self, index: Any) -> _IndexedInt8KV:
        _check_leading(index, self.kv.values.ndim)
        return _IndexedInt8KV(self.kv, index)

    def set(self, x: jax.Array | Int8KV, mode: str | None = None) -> Int8KV:
        """`Int8KV` with x written at the index: a float x [..., K, Q] is rounded to the grid, an `Int8KV` copied."""
        new = x if isinstance(x, Int8KV) else quantize(x)
        return Int8KV(
            self.kv.values.at[self.index].set(new.values, mode=mode),
            self.kv.exponent.at[self.index].set(new.exponent, mode=mode),
        )


def pow2(exponent: jax.Array) -> jax.Array:
    """2^e as float32, built from its bits (exact on every backend), for integer e in [-126, 127]."""
    biased = (exponent.astype(jnp.int32) + 127) << 23
    return jax.lax.bitcast_convert_type(biased, jnp.float32)


def quantize(x: jax.Array) -> Int8KV:
    """x [..., Q] (float) -> Int8KV: per vector over the last axis, the smallest e with max|x| / 2^e <= 127."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    # amax = m 2^f with m in [0.5, 1) (exact, from the bits): 127 2^(f-7) >= amax iff 128 m <= 127.
    m, f = jnp.frexp(amax)
    exponent = jnp.where(amax > 0, f - 7 + (m * 128 > 127).astype(f.dtype), _MIN_EXPONENT)
    exponent = jnp.clip(exponent, _MIN_EXPONENT, _MAX_EXPONENT)
    values = jnp.clip(jnp.round(x32 * pow2(-exponent)[..., None]), -127, 127)
    return Int8KV(values.astype(jnp.int8), exponent.astype(jnp.int8))


def round_to_int8(x: jax.Array) -> jax.Array:
    """x rounded to the int8 cache's grid, in x's dtype: what a read of x from an int8 cache gives back."""
    return quantize(x).astype(x.dtype)


def storable(x: jax.Array | Int8KV, stored: jax.Array | Int8KV) -> jax.Array | Int8KV:
    """x as the cache `stored` keeps it, ready to write in: cast to its dtype, or for an `Int8KV` cache quantised
    (once; `.astype` reads back exactly what is stored). An `Int8KV` x (rows of another int8 cache) is kept as it is
    for an int8 cache and dequantised for a plain one."""
    if isinstance(x, Int8KV):
        return x if isinstance(stored, Int8KV) else x.astype(stored.dtype)
    return quantize(x) if isinstance(stored, Int8KV) else x.astype(stored.dtype)


def operands(stored: jax.Array | Int8KV, dtype) -> tuple[jax.Array, jax.Array | None]:
    """What attention reads of cached keys or values [..., K, Q]: (the stored values in `dtype`, the scales float32
    [..., K] to apply outside the Q contraction, or None for a plain cache). int8 values are exact in bf16."""
    if isinstance(stored, Int8KV):
        return stored.values.astype(dtype), pow2(stored.exponent)
    return stored.astype(dtype), None


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
    return int8_sharding(sharding) if isinstance(stored, Int8KV) else sharding


def int8_sharding(sharding: NamedSharding) -> Int8KV:
    """An int8 cache's sharding tree from its values' NamedSharding: the exponents split alike, less the Q axis."""
    return Int8KV(sharding, NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:-1])))


def bytes_per_element(dtype: Any, d_head: int) -> float:
    """Bytes the cache stores per key or value element: the dtype's, or for int8 1 + 1/Q (one exponent per vector)."""
    return 1.0 + 1.0 / d_head if jnp.dtype(dtype) == jnp.int8 else float(jnp.dtype(dtype).itemsize)


def check_kv_cache_dtype(name: str) -> str:
    """`name` if it is one of KV_CACHE_DTYPES, else a UserError naming the field and the choices."""
    if name not in KV_CACHE_DTYPES:
        raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return name
