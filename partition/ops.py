"""Collectives inside `jax.shard_map`, with the mesh's sizes known, so axes of size 1 are skipped.

A collective over no live axes is not emitted at all; partition/comm.py lists collectives by the same
rule, which keeps the compiled HLO and the cost model's list equal on any mesh shape (1x1x1 included).
Callers wrap each call in a `jax.named_scope` with the paper-notation comment beside it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from meshserve.partition.comm import MeshShape

__all__ = ["Ops"]


class Ops:
    """Collectives bound to one mesh shape. `axes` are mesh axis names, in the order the data is split."""

    def __init__(self, mesh: MeshShape) -> None:
        self.mesh = mesh

    def live(self, axes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a for a in axes if getattr(self.mesh, a) > 1)

    def size(self, axes: tuple[str, ...]) -> int:
        return self.mesh.size(axes)

    def index(self, axes: tuple[str, ...]) -> jax.Array:
        """This chip's linear index over `axes` (first axis major): its block of a dim split over them."""
        idx = jnp.int32(0)
        for a in self.live(axes):
            idx = idx * getattr(self.mesh, a) + jax.lax.axis_index(a)
        return idx

    def local(self, x: jax.Array, axes: tuple[str, ...], dim: int) -> jax.Array:
        """This chip's block of a dim that is whole here, split over `axes` (no communication)."""
        k = self.size(axes)
        if k == 1:
            return x
        n = x.shape[dim] // k
        return jax.lax.dynamic_slice_in_dim(x, self.index(axes) * n, n, axis=dim)

    def all_gather(self, x: jax.Array, axes: tuple[str, ...], dim: int) -> jax.Array:
        axes = self.live(axes)
        return jax.lax.all_gather(x, axes, axis=dim, tiled=True) if axes else x

    def reduce_scatter(self, x: jax.Array, axes: tuple[str, ...], dim: int) -> jax.Array:
        axes = self.live(axes)
        return jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True) if axes else x

    def reduce_scatter_dims(self, x: jax.Array, split: dict[int, tuple[str, ...]]) -> jax.Array:
        """One reduce-scatter that leaves each dim d split over split[d] (axes in split order, first major).

        The dims' blocks are moved to one leading dim, ordered as the concatenated axes (dims in increasing
        order), so a single psum_scatter over those axes hands every chip its block of each dim.
        """
        split = {d: self.live(axes) for d, axes in sorted(split.items()) if self.live(axes)}
        if not split:
            return x
        shape: list[int] = []  # each split dim d of size n becomes (blocks, n / blocks)
        lead: list[int] = []  # positions of the block dims in `shape`
        rest: list[int] = []  # positions of everything else
        for d, n in enumerate(x.shape):
            if d in split:
                lead.append(len(shape))
                shape += [self.size(split[d]), n // self.size(split[d])]
                rest.append(len(shape) - 1)
            else:
                rest.append(len(shape))
                shape.append(n)
        y = jnp.transpose(x.reshape(shape), lead + rest).reshape((-1,) + tuple(shape[i] for i in rest))
        axes = tuple(a for d in split for a in split[d])
        return jax.lax.psum_scatter(y, axes, scatter_dimension=0, tiled=True)[0]

    def all_reduce(self, x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        axes = self.live(axes)
        return jax.lax.psum(x, axes) if axes else x

    def all_to_all(self, x: jax.Array, axes: tuple[str, ...], split: int, concat: int) -> jax.Array:
        """Move the split over `axes` from dim `concat` to dim `split`."""
        axes = self.live(axes)
        return jax.lax.all_to_all(x, axes, split, concat, tiled=True) if axes else x

    def gather_dims(self, x: jax.Array, split: dict[int, tuple[str, ...]], axes: tuple[str, ...]) -> jax.Array:
        """One all-gather over `axes` that makes whole the parts of several dims split over them.

        split: dim -> the axes that dim is split over, in storage order; the gathered axes must be the
        minor end of each dim's order so every gathered dim stays contiguous. `axes` order sets the order
        of the stacked blocks (x, y, z order).
        """
        axes = self.live(axes)
        if not axes:
            return x
        stacked = jax.lax.all_gather(x, axes, axis=0, tiled=False)  # [prod(axes), *x.shape]
        stacked = stacked.reshape(tuple(getattr(self.mesh, a) for a in axes) + x.shape)
        k = len(axes)
        order: list[int] = []
        shape: list[int] = []
        for d, n in enumerate(x.shape):
            mine = [a for a in split.get(d, ()) if a in axes]
            order += [axes.index(a) for a in mine] + [k + d]
            shape.append(n * math.prod(getattr(self.mesh, a) for a in mine))
        if len(order) != len(stacked.shape):
            raise ValueError(f"gather over {axes} does not match the dims' splits {split}")
        return jnp.transpose(stacked, order).reshape(shape)

    def ring_permute(self, x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        """Send x to the next chip along the ring of `axes` (linear index i -> i + 1)."""
        axes = self.live(axes)
        k = self.size(axes)
        if not axes:
            return x
        return jax.lax.ppermute(x, axes, perm=[(i, (i + 1) % k) for i in range(k)])
