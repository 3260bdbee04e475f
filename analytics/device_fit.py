"""Will a measured run fit this machine's first device? `meshserve bench` and `calibrate` ask before any compile.

A timed row holds the weights (one storage at a time), a KV cache of B x (P + G) tokens, and while it prefills the
widest activations of the prompt batch. Their sum is a lower bound of what the row needs (XLA's temporaries, the
attention scores and the logits come on top), so a row refused here could never run; one that passes may still
run out of memory, which XLA then reports. Without the check, `meshserve bench --batch 100000000` on tiny sat in
compilation and allocation for minutes, and `meshserve calibrate --batch 100000000` ended in XLA's
RESOURCE_EXHAUSTED traceback.

Memory: a GPU or TPU reports it (`Device.memory_stats()`, read by `free_bytes`, which serving/memory_fit.py uses
too); on the CPU the host's MemAvailable (/proc/meminfo) is the budget; where neither is known nothing is checked.
JAX is imported only in `available_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshserve.analytics.sizes import kv_bytes_per_element, model_sizes
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig

__all__ = ["RowBytes", "row_bytes", "available_bytes", "free_bytes", "check_rows_fit"]

# Bytes per activation element by weight storage: the compute dtype is f32 for f32 weights, bf16 otherwise.
_COMPUTE_BYTES = {"f32": 4, "bf16": 2, "int8": 2}


@dataclass(frozen=True)
class RowBytes:
    """Lower bound of one timed row's device bytes: weights + KV cache + prefill activations."""

    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations


def row_bytes(config: ModelConfig, weights: str, kv_cache_dtype: str, batch: int, prompt_len: int,
              gen_len: int) -> RowBytes:  # fmt: skip
    """What a (weights, KV cache dtype, batch) row must hold at least. kv_cache_dtype: "auto" (the compute dtype)
    or "int8" (1 + 1/Q bytes per element). The cache holds P + max(G, 1) tokens, as serving/bench.py allocates."""
    c = config
    compute = _COMPUTE_BYTES[weights]
    kv_element = kv_bytes_per_element("int8", c.d_head) if kv_cache_dtype == "int8" else compute
    context = prompt_len + max(gen_len, 1)
    kv = 2.0 * c.n_layers * batch * context * c.n_kv_heads * c.d_head * kv_element
    # The prefill's widest live tensors: the residual [B, P, E] and the fused input projection's output
    # (analytics/memory.py prices inference activations the same way).
    fused = (2 * c.d_ff if c.gated_mlp else c.d_ff) + c.n_heads * c.d_head + 2 * c.n_kv_heads * c.d_head
    act = float(compute * batch * prompt_len * (c.d_model + fused))
    return RowBytes(model_sizes(c).weight_bytes(weights), kv, act)


def _mem_available() -> int | None:
    """The host's MemAvailable in bytes (Linux), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> tuple[int, str] | None:
    """(bytes free, who has them) on JAX's first device, or None when unknown."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        host = _mem_available()
        return None if host is None else (host, "this host has")
    memory = free_bytes([device])
    return None if memory is None else (memory[0], f"{device.device_kind} has")


def free_bytes(devices: Sequence[Any]) -> tuple[int, int, Any] | None:
    """(free bytes, bytes_limit, device) of the device with the least memory free, or None when a device does not
    report its memory (the CPU)."""
    worst = None
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if worst is None or free < worst[0]:
            worst = (free, stats["bytes_limit"], d)
    return worst


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_rows_fit(
    config: ModelConfig,
    batches: Sequence[int],
    weights_list: Sequence[str],
    kv_cache_dtypes: Sequence[str],
    prompt_len: int,
    gen_len: int,
    memory: tuple[int, str] | None,
    lengths: str | None = None,
    flag: str = "--batch",
) -> None:
    """Raise a UserError naming --batch when the largest row's lower bound exceeds `memory` (available_bytes'
    answer; None checks nothing), with the largest batch that could fit. lengths: how the message names the
    lengths (default "--prompt-len P + --gen-len G"); flag: the flag the largest batch came from."""
    if memory is None:
        return
    free, where = memory
    batch = max(batches)
    lengths = lengths or f"--prompt-len {prompt_len} + --gen-len {gen_len}"
    for weights in weights_list:
        for kv in kv_cache_dtypes:
            need = row_bytes(config, weights, kv, batch, prompt_len, gen_len)
            if need.total <= free:
                continue
            one = row_bytes(config, weights, kv, 1, prompt_len, gen_len)
            per_row = one.kv_cache + one.activations
            fit = int((free - one.weights) // per_row) if per_row else 0
            if fit >= 1:
                hint = f"at most {flag} {fit} fits at these lengths"
            elif one.weights > free:
                hint = "the weights alone do not fit" + ("" if weights != "bf16" else " (try --weights int8)")
            else:
                hint = "not one sequence fits: shorten --prompt-len"
            raise UserError(
                f"{flag} {batch} with {lengths} needs at least {_size(need.total)} ({weights} weights "
                f"{_size(need.weights)} + KV cache {_size(need.kv_cache)} + prefill activations "
                f"{_size(need.activations)}) but {where} {_size(free)} free; {hint}"
            )
