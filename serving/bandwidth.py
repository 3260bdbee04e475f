"""The device's memory bandwidth, measured: the ceilings `meshserve bench` compares a decode step with.

Both measurements run all their passes in one jitted call, an on-device loop, so the call's dispatch and the wait
for its result are paid once per `passes` passes and no output is allocated per pass. Timed as one pass per call,
each allocating a fresh 2 GiB output, an H200 read 2.6-2.7 TB/s (2026-11-27): less than the model's own decode loop
moved in the same run (2.9 TB/s), so that figure was no ceiling. Each pass's result goes through
`lax.optimization_barrier`, so that XLA cannot merge passes should it unroll the loop. A figure above the chip
table's datasheet bandwidth is reported on stderr as a measurement that cannot be right.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["measure_copy_bandwidth", "measure_read_bandwidth"]


def _stream_buffer(n_bytes: int | None) -> tuple[jax.Array, int, int]:
    """(a bf16 buffer of n_bytes (2 GiB; 128 MiB on a CPU) holding varied values, its size in bytes, passes per call).

    One pass per call on a CPU: XLA:CPU sums a slice of a buffer, as the loop's passes do, at ~1.7 GB/s against ~60
    for the whole buffer, and a CPU's figure is no ceiling anyway (serving/bench.py's module doc)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n_bytes = n_bytes or (1 << 27 if on_cpu else 1 << 31)
    # Varied values, not a constant: a memory-bound kernel must not be timed on constant data.
    buffer = (jax.lax.iota(jnp.int32, n_bytes // 2) % 251 - 125).astype(jnp.bfloat16)
    return buffer, n_bytes, 1 if on_cpu else 20


def _median_threaded(call: Callable[[Any], Any], state: Any, repeats: int) -> float:
    """Median wall seconds of state = call(state) (blocked on), after one untimed call that also compiles."""
    state = jax.block_until_ready(call(state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(call(state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _checked(bytes_per_s: float, what: str) -> float:
    """bytes_per_s, with a stderr line when it exceeds the device's datasheet bandwidth (analytics' chip table)."""
    from meshserve.analytics.chips import chip_for_device, get_chip

    name = chip_for_device(jax.devices()[0].device_kind)
    datasheet = get_chip(name).hbm_bandwidth if name else None
    if datasheet and bytes_per_s > datasheet:
        print(f"meshserve bench: warning: the {what} bandwidth measured {bytes_per_s / 1e9:.0f} GB/s, above the "
              f"{name} datasheet's {datasheet / 1e9:.0f}: the measurement is wrong", file=sys.stderr)  # fmt: skip
    return bytes_per_s


def measure_copy_bandwidth(n_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large on-device copy (read + write), the practical ceiling for a memory-bound step: each pass
    negates the whole buffer in place (donated, so the loop's carry aliases it)."""
    buffer, n_bytes, passes = _stream_buffer(n_bytes)

    def one_pass(_: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.optimization_barrier(-b)

    loop = jax.jit(lambda b: jax.lax.fori_loop(0, passes, one_pass, b), donate_argnums=0)
    return _checked(2 * n_bytes * passes / _median_threaded(loop, buffer, repeats), "copy")


def measure_read_bandwidth(n_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a read-only stream: what a weight-reading decode step mostly does, often above the copy figure (no
    writes); reported beside it, not used in hbm_fraction. Pass i sums half i % 2 of the buffer into a float32
    carry: the index makes each pass differ, so XLA cannot hoist the sum out of the loop as invariant."""
    buffer, n_bytes, passes = _stream_buffer(n_bytes)
    halves = buffer.reshape(2, -1)  # an argument, not a closed-over constant: jit would embed 2 GiB in the program

    @jax.jit
    def loop(halves: jax.Array, total: jax.Array) -> jax.Array:
        def one_pass(i: jax.Array, total: jax.Array) -> jax.Array:
            half = jax.lax.dynamic_index_in_dim(halves, i % 2, keepdims=False)
            return jax.lax.optimization_barrier(total + jnp.sum(half, dtype=jnp.float32))

        if passes == 1:  # a CPU: the whole buffer (see _stream_buffer)
            return total + jnp.sum(halves, dtype=jnp.float32)
        return jax.lax.fori_loop(0, passes, one_pass, total)

    seconds = _median_threaded(lambda total: loop(halves, total), jnp.zeros((), jnp.float32), repeats)
    return _checked((n_bytes if passes == 1 else n_bytes // 2 * passes) / seconds, "read")
