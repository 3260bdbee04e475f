"""The decoder layer: norms, rotary embeddings, (multi-query) attention and the MLP.

Shapes use the alphabet of model/config.py: B batch, T query tokens, S keys, E d_model, F d_ff,
H query heads, K kv heads, G = H/K heads per kv head, Q head dim.
Every matmul goes through `quant.einsum`, so bf16/f32 and int8 weights share one path.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from meshserve.model.config import ModelConfig
from meshserve.model.quant import einsum

__all__ = [
    "norm",
    "rope",
    "rope_frequencies",
    "attention_scores_mask",
    "attend",
    "attend_cached",
    "head_norm",
    "qkv_projection",
    "attention_output",
    "mlp",
    "layer_residual",
]

NEG_INF = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax instead of NaN


def norm(x: jax.Array, p: dict[str, jax.Array], config: ModelConfig) -> jax.Array:
    """LayerNorm (optional bias) or RMSNorm over E, computed in float32. x: [..., E]."""
    x32 = x.astype(jnp.float32)
    if config.norm == "layernorm":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.norm_eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def head_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over each head's Q (Qwen3's q_norm / k_norm), in float32. x: [..., h, Q]; scale: [Q]."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(half: int, base: float, scaling: tuple[float, ...] = ()) -> jax.Array:
    """Inverse frequencies [Q/2] of the rotary embedding: base^(-i / (Q/2)).

    scaling: Llama 3.1's (factor, low_freq_factor, high_freq_factor, original_max_len), as transformers'
    `_compute_llama3_parameters`: wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor` (slower rotation, for contexts past the trained length), those shorter than original_max_len /
    high_freq_factor are kept, and those between are blended linearly in original_max_len / wavelength.
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    if not scaling:
        return inv_freq
    factor, low, high, original = scaling
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, blended, scaled)


def rope(x: jax.Array, positions: jax.Array, base: float, scaling: tuple[float, ...] = ()) -> jax.Array:
    """Rotary embedding, rotate-half convention (GPT-NeoX / Falcon / HF Llama). x: [B, T, h, Q]; positions: [B, T].
    scaling: see `rope_frequencies` (config.rope_scaling)."""
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(half, base, scaling)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, Q/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def qkv_projection(
    h: jax.Array, p: dict[str, Any], positions: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h: [B, T, E] -> q [B, T, H, Q] (rotated), k [B, T, K, Q] (rotated), v [B, T, K, Q]."""
    q = einsum("BTE,EHQ->BTHQ", h, p["wq"])
    k = einsum("BTE,EKQ->BTKQ", h, p["wk"])
    v = einsum("BTE,EKQ->BTKQ", h, p["wv"])
    if "bq" in p:
        q, k, v = q + p["bq"].astype(q.dtype), k + p["bk"].astype(k.dtype), v + p["bv"].astype(v.dtype)
    if "q_norm" in p:  # Qwen3: before the rotation, as Qwen3Attention does
        q = head_norm(q, p["q_norm"]["scale"], config.norm_eps)
        k = head_norm(k, p["k_norm"]["scale"], config.norm_eps)
    base, scaling = config.rope_base, config.rope_scaling
    return rope(q, positions, base, scaling), rope(k, positions, base, scaling), v


def attention_scores_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array) -> jax.Array:
    """Causal mask [B, T, S]: key s is visible to query t iff valid and k_pos <= q_pos."""
    return (k_positions[:, None, :] <= q_positions[:, :, None]) & k_valid[:, None, :]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention (K = 1 is multi-query). q [B,T,H,Q], k/v [B,S,K,Q], mask [B,T,S] -> [B,T,H,Q]."""
    B, T, H, Q = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Q)
    scores = jnp.einsum("BTKGQ,BSKQ->BKGTS", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(Q)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKQ->BTKGQ", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, Q).astype(q.dtype)


def attend_cached(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    visible: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Decode attention over cached keys plus this step's own key, without writing or concatenating the cache.

    q [B,1,H,Q]; k_cache/v_cache [B,C,K,Q]; visible bool [B,C] (cached positions this row may see); k_new/v_new
    [B,1,K,Q] (always visible) -> [B,1,H,Q]. Equals `attend` over the keys [cache; new]: one softmax over C + 1
    scores, the new key's part added separately, so the cache is only read.
    k_scale / v_scale: float32 [B,C,K], an int8 cache's scales (model/kv_quant.py `operands`): key s is
    k_cache[s] * k_scale[s], applied to its score after the Q contraction, and value s's probability is scaled
    before the value contraction, so the cache is read as stored, with no scaled copy of it.
    """
    B, T, H, Q = q.shape
    K = k_cache.shape[2]
    qg = q.reshape(B, T, K, H // K, Q)
    scale = 1.0 / jnp.sqrt(jnp.float32(Q))
    old = jnp.einsum("BTKGQ,BSKQ->BKGTS", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if k_scale is not None:
        old = old * jnp.transpose(k_scale, (0, 2, 1))[:, :, None, None, :]  # [B, K, 1, 1, C]
    old = jnp.where(visible[:, None, None, None, :], old, NEG_INF)
    own = jnp.einsum("BTKGQ,BTKQ->BKGT", qg, k_new, preferred_element_type=jnp.float32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([old, own], axis=-1), axis=-1)  # [B,K,G,T,C+1] float32
    cached = probs[..., :-1]
    if v_scale is not None:
        cached = cached * jnp.transpose(v_scale, (0, 2, 1))[:, :, None, None, :]
    out = jnp.einsum("BKGTS,BSKQ->BTKGQ", cached.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    own_p = probs[..., -1].astype(v_new.dtype)
    out = out + jnp.einsum("BKGT,BTKQ->BTKGQ", own_p, v_new, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, Q).astype(q.dtype)


def prefill_attention_implementation(dtype) -> str:
    """'cudnn' (fused flash attention) on GPUs for 16-bit activations, else 'xla'.

    The XLA form materialises the [B, H, T, T] scores, which at long prompts costs as much HBM traffic as the
    matmuls; cuDNN's fused kernel never writes them. MESHSERVE_ATTENTION=xla|cudnn overrides the choice.
    """
    forced = os.environ.get("MESHSERVE_ATTENTION")
    if forced:
        return forced
    return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def attend_prefill(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal self-attention over right-padded prompts. q [B,T,H,Q], k/v [B,T,K,Q] -> [B,T,H,Q].

    No padding mask is needed: with right padding a real query (t < length) sees only keys s <= t < length, so
    the causal mask alone hides the padding from every output that is used. Padded query rows compute finite
    values nobody reads, and their keys reach the decode cache only at positions >= length, which decode
    overwrites before its mask lets them be read. Plain causal is also the fused kernels' fastest path (cuDNN
    otherwise switches to its padding-mask variant).
    """
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=prefill_attention_implementation(q.dtype)
    )


def attention_output(o: jax.Array, p: dict[str, Any]) -> jax.Array:
    """o: [B, T, H, Q] -> [B, T, E]."""
    y = einsum("BTHQ,HQE->BTE", o, p["wo"])
    return y + p["bo"].astype(y.dtype) if "bo" in p else y


def mlp(h: jax.Array, p: dict[str, Any], config: ModelConfig) -> jax.Array:
    """SwiGLU (Swish(hW)·hV) or GELU MLP. h: [B, T, E] -> [B, T, E]."""
    up = einsum("BTE,EF->BTF", h, p["w_up"])
    if "b_up" in p:
        up = up + p["b_up"].astype(up.dtype)
    if config.mlp == "swiglu":
        gate = einsum("BTE,EF->BTF", h, p["w_gate"])
        if "b_gate" in p:
            gate = gate + p["b_gate"].astype(gate.dtype)
        act = jax.nn.silu(gate) * up
    else:
        act = jax.nn.gelu(up, approximate=False)
    y = einsum("BTF,FE->BTE", act, p["w_down"])
    return y + p["b_down"].astype(y.dtype) if "b_down" in p else y


def layer_residual(x: jax.Array, p: dict[str, Any], attn_fn, config: ModelConfig) -> jax.Array:
    """One block. attn_fn(h) -> [B, T, E] runs attention (and updates the cache) on normalised h.

    Parallel (PaLM): x + attn(h) + mlp(h) over the one h = norm(x). Serial: two norms, two residuals.
    """
    if config.parallel_block:
        h = norm(x, p["attn_norm"], config)
        return x + attn_fn(h) + mlp(h, p, config)
    x = x + attn_fn(norm(x, p["attn_norm"], config))
    return x + mlp(norm(x, p["mlp_norm"], config), p, config)
