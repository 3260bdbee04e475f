"""Model sizes the cost model needs, read from the model's own weight declaration (`model.params.declare`).

Counts are pure Python over `ParamSpec` shapes; `declare` lives in a module that imports JAX, so it is imported
lazily (once) and results are cached per config. Axis alphabet as in model/config.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from meshserve.model.config import ModelConfig

__all__ = ["ModelSizes", "model_sizes", "WEIGHT_BYTES", "weight_bytes_per_param", "KV_DTYPES", "kv_bytes_per_element"]

# Bytes per stored element of a matmul weight; norms, biases and (for int8/int4) the embedding stay bf16, as in
# model.params.quantize_params (PAPER.md "Other measures": the embedding stays bf16).
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def weight_bytes_per_param(weights: str) -> float:
    if weights not in WEIGHT_BYTES:
        from meshserve.errors import UserError

        raise UserError(f"weights must be one of {', '.join(WEIGHT_BYTES)}, got {weights!r}")
    return WEIGHT_BYTES[weights]


# The KV cache's storage (meshserve serve --kv-cache-dtype): bf16, or int8 values with one int8 power-of-two exponent
# per (token, kv head) vector of Q elements (model/kv_quant.py), so 1 + 1/Q bytes per element.
KV_DTYPES = ("bf16", "int8")


def kv_bytes_per_element(kv_dtype: str, d_head: int) -> float:
    """Bytes one stored K or V element costs in the cache: bf16 2; int8 1 + 1/d_head (the per-vector exponent)."""
    if kv_dtype == "bf16":
        return 2  # an int, so bf16 byte counts stay the integers they always were (JSON 17301504, not 17301504.0)
    if kv_dtype == "int8":
        return 1.0 + 1.0 / d_head
    from meshserve.errors import UserError

    raise UserError(f"kv-cache-dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of one model, as declared (padded heads included) plus the real (unpadded) count."""

    params: int  # every declared element, padding included
    real_params: int  # without zero-padded heads or kv-head copies: what MFU counts (PaLM 540B: 540.35e9)
    layer_matmul: int  # matmul weights of ONE layer (wq, wk, wv, wo, w_up, w_gate, w_down)
    layer_other: int  # norms and biases of one layer
    layer_scales: int  # per-output-channel int8 scales of one layer's matmul weights
    embed: int  # V·E input embedding (also the output projection when shared)
    unembed: int  # E·V when not shared, else 0
    unembed_scales: int  # V int8 scales of an unshared output projection, else 0
    final_other: int  # final norm
    n_layers: int

    def weight_bytes(self, weights: str) -> float:
        """Bytes of every stored weight in this storage (int8/int4: matmul weights quantised, the rest bf16)."""
        per = weight_bytes_per_param(weights)
        matmul = self.n_layers * self.layer_matmul + self.unembed
        other = self.n_layers * self.layer_other + self.embed + self.final_other
        if weights in ("int8", "int4"):
            scales = self.n_layers * self.layer_scales + self.unembed_scales
            return matmul * per + 2.0 * (other + scales)
        return (matmul + other) * per

    def layer_weight_bytes(self, weights: str) -> float:
        """Bytes of one layer's matmul weights (what a weight-gathered layout moves per layer)."""
        per = weight_bytes_per_param(weights)
        scales = self.layer_scales * 2.0 if weights in ("int8", "int4") else 0.0
        return self.layer_matmul * per + scales


def _spec_counts(config: ModelConfig) -> tuple[int, int, int, int, int, int, int]:
    from meshserve.model.params import declare  # imports JAX: only when sizes are first needed

    tree = declare(config)
    layer_matmul = layer_other = layer_scales = 0
    for spec in tree["layers"].values():
        specs = spec.values() if isinstance(spec, dict) else [spec]
        for s in specs:
            per_layer = s.size // config.n_layers
            if s.quantizable:
                layer_matmul += per_layer
                contracted = math.prod(s.shape[s.axes.index(a)] for a in s.contract)
                layer_scales += per_layer // contracted
            else:
                layer_other += per_layer
    embed = tree["embed"].size
    unembed = tree["unembed"].size if "unembed" in tree else 0
    unembed_scales = config.vocab_size if unembed else 0
    final_other = sum(s.size for s in tree["final_norm"].values())
    return layer_matmul, layer_other, layer_scales, embed, unembed, unembed_scales, final_other


@functools.cache
def model_sizes(config: ModelConfig) -> ModelSizes:
    """Sizes of `config` from its declaration; `real_params` drops zero-padded heads (`true_heads`) and replicated
    kv heads (`true_kv_heads`)."""
    layer_matmul, layer_other, layer_scales, embed, unembed, unembed_scales, final_other = _spec_counts(config)
    total = config.n_layers * (layer_matmul + layer_other) + embed + unembed + final_other
    real = total
    if config.true_kv_heads:  # replicated kv heads are copies: MFU counts the model's own weights once
        real = model_sizes(config.replace(n_kv_heads=config.true_kv_heads, true_kv_heads=0)).real_params
    elif config.true_heads and config.true_heads < config.n_heads:
        real = model_sizes(config.replace(n_heads=config.true_heads, true_heads=0)).params
    return ModelSizes(
        params=total,
        real_params=real,
        layer_matmul=layer_matmul,
        layer_other=layer_other,
        layer_scales=layer_scales,
        embed=embed,
        unembed=unembed,
        unembed_scales=unembed_scales,
        final_other=final_other,
        n_layers=config.n_layers,
    )
