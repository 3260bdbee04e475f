"""Will the decode state fit on the devices? Checked before it is allocated, where the devices report their memory.

The decode state (engine_steps.DecodeState: the KV cache [N, B, S, K, Q] of max_batch slots x max_context tokens,
and per slot the token history and the last step's logits [B, V]) is allocated once, when the engine starts, after the weights were placed.
Too many slots for the device's memory used to fail there with XLA's RESOURCE_EXHAUSTED traceback; now it is a
one-line error naming --max-batch / --max-context, with the largest max_batch that would fit.

GPUs and TPUs report their memory (`Device.memory_stats()`: bytes_limit, bytes_in_use); the CPU does not, so
there nothing is checked (host memory is the operating system's). A share of the device's memory is kept free
for the steps' own buffers (activations, logits, XLA's workspace), which are not part of the state.

When max_batch is left to its default, `serve` and the offline jobs size it to the memory instead (`slots_that_fit`,
as vLLM sizes its KV cache to gpu_memory_utilization): the default number of slots, or fewer when fewer fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from meshserve.analytics.device_fit import free_bytes
from meshserve.errors import UserError
from meshserve.model.kv_quant import Int8KV

__all__ = [
    "MemoryFitError",
    "STEP_RESERVE",
    "state_bytes_per_device",
    "free_bytes",
    "check_state_fits",
    "check_decode_state",
    "slots_that_fit",
]

# Kept free for the compiled steps' temporaries: a decode step's are small, a prefill's logits and activations
# ([b, T, E] per layer, [b, V] logits) and XLA's workspace are not; 10% of the device is vLLM's default too
# (gpu_memory_utilization 0.9).
STEP_RESERVE = 0.10


class MemoryFitError(UserError):
    """The decode state for these slots and this context does not fit the device memory left after the weights."""


def state_bytes_per_device(abstract_state: Any) -> int:
    """Bytes one device holds of a state given as a tree of jax.ShapeDtypeStruct (its shard where the leaf has a
    sharding, else the whole array)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract_state):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _budget(memory: tuple[int, int, Any]) -> float:
    free, limit, _ = memory
    return free - STEP_RESERVE * limit


def check_state_fits(
    need: int, per_slot: int, max_batch: int, max_context: int, memory: tuple[int, int, Any], hint_int8: bool = False
):
    """Raise MemoryFitError unless `need` bytes of state (per device; `per_slot` of them per decode slot) fit in
    the free memory of `memory` (free_bytes' answer) less STEP_RESERVE of its limit. hint_int8: the cache is in the
    compute dtype, and the message says an int8 cache would take half of it."""
    free, limit, device = memory
    budget = _budget(memory)
    if need <= budget:
        return
    slots = max(int((budget - (need - per_slot * max_batch)) // per_slot), 0) if per_slot else 0
    fit = f"at most {slots} slots fit at this context" if slots else "not one slot fits at this context"
    raise MemoryFitError(
        f"max_batch: the decode state for {max_batch} slots x {max_context} tokens needs {_gib(need)} per device, "
        f"but {device} has {_gib(free)} free after the weights, less {STEP_RESERVE:.0%} of its "
        f"{_gib(limit)} kept for the steps' buffers ({_gib(max(budget, 0))}): {fit}; lower --max-batch or "
        f"--max-context{', or store the cache in int8 (--kv-cache-dtype int8: half the bytes)' if hint_int8 else ''}"
    )


def slots_that_fit(state_bytes: Callable[[int], int], wanted: int, memory: tuple[int, int, Any]) -> int:
    """The most decode slots, up to `wanted`, whose state fits `memory` (free_bytes' answer) less STEP_RESERVE;
    0 when not one does. state_bytes(B): the state's bytes per device for B slots (linear in B)."""
    one = state_bytes(1)
    per_slot = state_bytes(2) - one
    fixed = one - per_slot
    if per_slot <= 0:
        return wanted
    return max(0, min(wanted, int((_budget(memory) - fixed) // per_slot)))


def check_decode_state(abstract_state: Any, max_batch: int, max_context: int, params: Any) -> None:
    """check_state_fits for an engine's decode state (its abstract shapes and shardings) on the devices its
    weights sit on; nothing where they do not report their memory."""
    devices = {d for leaf in jax.tree_util.tree_leaves(params) for d in getattr(leaf, "devices", lambda: ())()}
    memory = free_bytes(sorted(devices, key=lambda d: d.id)) if devices else None
    if memory is None:
        return
    need = state_bytes_per_device(abstract_state)
    float_kv = not isinstance(getattr(getattr(abstract_state, "cache", None), "k", None), Int8KV)
    # The per-slot share: everything with the batch as its axis (cache, history, sampling); lengths and the like too.
    check_state_fits(need, need // max_batch, max_batch, max_context, memory, hint_int8=float_kv)
