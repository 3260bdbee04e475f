"""Memory estimator for inference and fine-tuning (`meshserve memory`).

Parameters come from the model's declared shapes; optimizer state is counted exactly with `jax.eval_shape` on the
optax optimizer's `init` (no allocation). Gradients and optimizer state are kept in the weights' precision, as in
the arithmetic this project follows (7B with AdamW: weights 28 + gradients 28 + moments 56 = 112 GB in f32).
KV cache per chip follows PAPER.md: multi-query heads-sharded keeps the one kv head on every chip; batch-sharded
splits rows over the chips; multi-head splits kv heads over the chips (at least one head per chip: a grouped-query
model with fewer kv heads than chips runs them replicated, model.config.kv_replication, one whole head per chip).
The KV cache is stored in bf16 (2 bytes per element) or, with kv_dtype="int8" (serve --kv-cache-dtype int8), as int8
values with one int8 exponent per (token, kv head) vector of Q elements: 1 + 1/Q bytes per element.
"""

from __future__ import annotations

import math
from typing import Any

from meshserve.analytics.chips import Chip
from meshserve.analytics.sizes import WEIGHT_BYTES, kv_bytes_per_element, model_sizes, weight_bytes_per_param
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig

__all__ = ["memory_estimate", "kv_bytes_per_token_per_chip", "max_context_tokens", "OPTIMIZERS", "MODES"]

OPTIMIZERS = ("adamw", "sgd", "adafactor")
MODES = ("inference", "finetune")
ACT_BYTES = 2  # bf16 activations (the KV cache: kv_bytes_per_element)
RULE_OF_THUMB = {"inference": 2.0, "finetune": 16.0}  # bytes per parameter: bf16 weights; Adam mixed precision


def kv_bytes_per_token_per_chip(
    config: ModelConfig, batch: int, chips: int, attention: str, kv_dtype: str = "bf16"
) -> float:
    """KV-cache bytes one chip holds per context position, for the whole batch (2 for K and V; each element 2
    bytes in bf16, 1 + 1/Q in int8)."""
    c = config
    per_element = kv_bytes_per_element(kv_dtype, c.d_head)
    if attention == "batch":
        rows, width = math.ceil(batch / chips), c.n_kv_heads * c.d_head
    elif attention == "heads":
        rows, width = batch, max(c.n_kv_heads * c.d_head / chips, c.d_head)
    else:
        raise UserError(f"attention must be 'heads' or 'batch', got {attention!r}")
    return 2 * c.n_layers * rows * width * per_element


def max_context_tokens(
    config: ModelConfig,
    chip: Chip,
    chips: int,
    batch: int,
    attention: str,
    kv_fraction: float,
    kv_dtype: str = "bf16",
) -> int:
    """Longest context whose KV cache (stored as kv_dtype) fits in kv_fraction of each chip's HBM."""
    if not 0 < kv_fraction <= 1:
        raise UserError(f"kv-fraction must be in (0, 1], got {kv_fraction}")
    per_token = kv_bytes_per_token_per_chip(config, batch, chips, attention, kv_dtype)
    return int(kv_fraction * chip.hbm_bytes // per_token)


def _optimizer(name: str):
    import optax

    if name == "adamw":
        return optax.adamw(1e-4)
    if name == "sgd":
        return optax.sgd(1e-3)  # plain SGD: no state
    if name == "adafactor":
        return optax.adafactor(1e-3)
    raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _trainable_shapes(config: ModelConfig, lora_rank: int) -> Any:
    """ShapeDtypeStructs of what is trained: every weight, or rank-R adapters A [in, R] and B [R, out] per matmul."""
    import jax
    import jax.numpy as jnp
    from meshserve.model.params import ParamSpec, abstract_params, declare

    if not lora_rank:
        return abstract_params(config, jnp.float32)
    adapters = {}
    leaves = jax.tree_util.tree_leaves_with_path(declare(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    for path, spec in leaves:
        if not spec.quantizable:
            continue
        stacked = spec.axes[0] == "layers"
        lead = spec.shape[:1] if stacked else ()
        inner = [(a, d) for a, d in zip(spec.axes, spec.shape, strict=True) if a != "layers"]
        fan_in = math.prod(d for a, d in inner if a in spec.contract)
        fan_out = math.prod(d for a, d in inner if a not in spec.contract)
        name = jax.tree_util.keystr(path)
        adapters[name] = {
            "a": jax.ShapeDtypeStruct(lead + (fan_in, lora_rank), jnp.float32),
            "b": jax.ShapeDtypeStruct(lead + (lora_rank, fan_out), jnp.float32),
        }
    return adapters


def _state_bytes(state: Any, per_param: float) -> float:
    """Float leaves in the weights' precision; integer leaves (step counts) at their own size."""
    import jax
    import numpy as np

    total = 0.0
    for leaf in jax.tree_util.tree_leaves(state):
        size = math.prod(leaf.shape)
        total += size * (per_param if np.issubdtype(leaf.dtype, np.floating) else np.dtype(leaf.dtype).itemsize)
    return total


def memory_estimate(
    config: ModelConfig,
    mode: str = "inference",
    weights: str = "bf16",
    batch: int = 1,
    context: int | None = None,
    chips: int = 1,
    chip: Chip | None = None,
    attention: str = "heads",
    optimizer: str = "adamw",
    lora_rank: int = 0,
    kv_fraction: float | None = None,
    kv_dtype: str = "bf16",
) -> dict[str, Any]:
    """Bytes for weights, KV cache, activations (and gradients, optimizer state when fine-tuning), total and per chip.

    context defaults to the model's max_seq_len. Per chip: weights, gradients, optimizer state and activations are
    split over the chips; the KV cache as `attention` splits it, stored as kv_dtype ("bf16" or "int8"; inference
    only: fine-tuning holds no KV cache).
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    weight_bytes_per_param(weights)
    context = config.max_seq_len if context is None else context
    for name, value in (("batch", batch), ("context", context), ("chips", chips)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise UserError(f"lora-rank must be a non-negative integer, got {lora_rank!r}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    kv_element = kv_bytes_per_element(kv_dtype, config.d_head)  # a UserError naming the field for a bad value
    if mode == "finetune" and kv_dtype != "bf16":
        raise UserError(f"kv-cache-dtype {kv_dtype} applies to --mode inference only (fine-tuning holds no KV cache)")
    sizes = model_sizes(config)
    c, per = config, WEIGHT_BYTES[weights]
    weights_b = sizes.weight_bytes(weights)
    inference = mode == "inference"
    kv_chip = kv_bytes_per_token_per_chip(c, batch, chips, attention, kv_dtype) * context if inference else 0.0
    kv_total = 2 * c.n_layers * batch * context * c.n_kv_heads * c.d_head * kv_element if inference else 0
    grads_b = opt_b = 0.0
    trainable = 0
    if mode == "inference":
        # The widest live tensors of one prefill pass: residual + fused input projection output.
        mlp_in = 2 * c.d_ff if c.gated_mlp else c.d_ff  # w_up, plus w_gate for SwiGLU and GeGLU
        fused = mlp_in + c.n_heads * c.d_head + 2 * c.n_kv_heads * c.d_head
        act_b = ACT_BYTES * batch * context * (c.d_model + fused)
    else:
        import jax

        shapes = _trainable_shapes(c, lora_rank)
        trainable = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
        grads_b = trainable * per
        opt_b = _state_bytes(jax.eval_shape(_optimizer(optimizer).init, shapes), per)
        if lora_rank:
            weights_b += trainable * per
        # Korthikanti et al. 2022 (eq. 2): s·b·h·(34 + 5·a·s/h) bytes per layer, 16-bit, no recomputation.
        act_b = c.n_layers * context * batch * c.d_model * (34 + 5 * c.n_heads * context / c.d_model)
    total = weights_b + kv_total + act_b + grads_b + opt_b
    per_chip = (weights_b + act_b + grads_b + opt_b) / chips + kv_chip
    out: dict[str, Any] = {
        "model": c.name,
        "mode": mode,
        "weights": weights,
        "kv_cache_dtype": kv_dtype,
        "chips": chips,
        "params": sizes.params,
        "trainable_params": trainable if mode == "finetune" else 0,
        "weights_bytes": weights_b,
        "kv_cache_bytes": float(kv_total),
        "activations_bytes": float(act_b),
        "gradients_bytes": float(grads_b),
        "optimizer_bytes": float(opt_b),
        "total_bytes": float(total),
        "per_chip_bytes": float(per_chip),
        "rule_of_thumb_bytes": RULE_OF_THUMB[mode] * sizes.params,
        "max_context_tokens": None,
    }
    if chip is not None:
        out["hardware"] = chip.name
        out["hbm_bytes"] = chip.hbm_bytes
        out["fits"] = per_chip <= chip.hbm_bytes
    if kv_fraction is not None:
        if chip is None:
            raise UserError("--kv-fraction needs --hardware (the chip's memory size)")
        out["max_context_tokens"] = max_context_tokens(c, chip, chips, batch, attention, kv_fraction, kv_dtype)
    return out
