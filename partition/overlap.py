"""Looped collective einsum (PAPER.md "Communication overlap"): a collective split into per-chip chunks that
travel around a ring while the matmul of the chunk already here runs, so transfer and compute overlap.

Both functions run inside `jax.shard_map` and take the matmul as a callable, so this module needs no model
code. Each replaces one collective over K chips by K-1 collective-permutes of one chunk each (the same bytes,
(K-1)/K of the full tensor, as the all-gather or reduce-scatter they replace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from meshserve.partition.ops import Ops

__all__ = ["all_gather_matmul", "matmul_reduce_scatter"]


def all_gather_matmul(chunk: jax.Array, matmul: Callable[[jax.Array, jax.Array], Any], axes, ops: Ops) -> Any:
    """sum_c matmul(x_c, c) over the chunks x_c of a contracted dim split over `axes` (this chip holds its own).

    Equals matmul over the all-gathered dim: BLE_xyz --all-gather(yz)--> BLE_x, then BLE_x·W, without the
    all-gather. matmul(x_c, c) gets the chunk and its (traced) index c and returns a pytree of partial sums.
    """
    k, i = ops.size(axes), ops.index(axes)
    total, here = None, chunk
    for step in range(k):
        part = matmul(here, (i - step) % k)  # the chunk that started `step` chips back along the ring
        total = part if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, part)
        if step < k - 1:
            with jax.named_scope("looped_all_gather"):
                # BLE_xyz --collective-permute(yz)--> the next chip (one chunk of all-gather(yz))
                here = ops.ring_permute(here, axes)
    return total


def matmul_reduce_scatter(matmul: Callable[[jax.Array], jax.Array], axes, ops: Ops) -> jax.Array:
    """This chip's chunk of the sum over chips of matmul(c), c the output chunk index (split over `axes`).

    Equals BLE_x{partialsum-yz} --reduce-scatter(yz)--> BLE_xyz: a running sum travels the ring and each chip
    adds its partial product for the chunk the sum is headed to, so chip i ends holding chunk i.
    """
    k, i = ops.size(axes), ops.index(axes)
    total = None
    for step in range(k):
        part = matmul((i - 1 - step) % k)
        total = part if total is None else total + part
        if step < k - 1:
            with jax.named_scope("looped_reduce_scatter"):
                # BLE_x{partialsum-yz} --collective-permute(yz)--> the next chip (one chunk of reduce-scatter(yz))
                total = ops.ring_permute(total, axes)
    return total
