"""The decoder layer: norms, rotary embeddings, (multi-query) attention and the MLP.

Shapes use the alphabet of model/config.py: B batch, T query tokens, S keys, E d_model, F d_ff,
H query heads, K kv heads, G = H/K heads per kv head, Q head dim.
Every matmul goes through `quant.einsum`, so bf16/f32 and int8 weights share one path.
Sliding windows (Mistral, Gemma 3) are one more term of the one mask builder, `attention_scores_mask`, which
every attention path (prefill, extend over a prefix, decode, verify, score; one device and every mesh layout)
calls with its layer's window (`layer_window`): full-context cache, masked, so a windowed layer still reads the
whole context.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from meshserve.model.config import ModelConfig
from meshserve.model.quant import concat_einsum, einsum, scaled_output

__all__ = [
    "norm",
    "rope",
    "rope_frequencies",
    "rotary_tables",
    "attention_scores_mask",
    "layer_window",
    "layer_frequencies",
    "rotate",
    "attention_scale",
    "embed_scale",
    "attend",
    "attend_cached",
    "head_norm",
    "qkv_projection",
    "attention_output",
    "parallel_output",
    "mlp",
    "mlp_activation",
    "gate_activation",
    "norm_scale",
    "layer_residual",
]

NEG_INF = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax instead of NaN


def norm_scale(scale: jax.Array, offset: bool) -> jax.Array:
    """A norm's float32 multiplier: the stored scale, or 1 + scale (Gemma's RMSNorm, config.norm_scale_offset)."""
    scale = scale.astype(jnp.float32)
    return 1.0 + scale if offset else scale


def norm(x: jax.Array, p: dict[str, jax.Array], config: ModelConfig) -> jax.Array:
    """LayerNorm (optional bias) or RMSNorm over E, computed in float32. x: [..., E]."""
    x32 = x.astype(jnp.float32)
    if config.norm == "layernorm":
        # One pass: both sums side by side (one reduction kernel on a GPU, where mean-then-variance took two, each
        # of them launched per layer per decode step), over x shifted by its first channel so that a large common
        # offset does not cancel in E[d^2] - E[d]^2 (the shifted-data variance). The float32 error then grows with
        # (x_0 - mean)^2 / variance, which is at most E: an outlier channel 0 costs up to ~E * 1.2e-7 of relative
        # precision (5e-4 at E = 4544), below bf16's resolution. A sturdier shift (a median of three channels, a
        # slice's mean) was a kernel of its own per layer at batch 64 (deviceless H100 compile).
        d = x32 - x32[..., :1]
        shift_mean = jnp.mean(d, axis=-1, keepdims=True)
        variance = jnp.maximum(jnp.mean(jnp.square(d), axis=-1, keepdims=True) - jnp.square(shift_mean), 0.0)
        y = (d - shift_mean) * jax.lax.rsqrt(variance + config.norm_eps)
    else:
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.norm_eps)
    y = y * norm_scale(p["scale"], config.norm_scale_offset)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def head_norm(x: jax.Array, scale: jax.Array, eps: float, offset: bool = False) -> jax.Array:
    """RMSNorm over each head's Q (Qwen3's / Gemma 3's q_norm / k_norm), in float32. x: [..., h, Q]; scale: [Q] (or
    [h, Q]: one per head); offset: the scale applies as 1 + scale (config.norm_scale_offset)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * norm_scale(scale, offset)).astype(x.dtype)


def embed_scale(x: jax.Array, config: ModelConfig) -> jax.Array:
    """Embedding rows x [..., E] times sqrt(E) when config.scale_embed (Gemma), the factor cast to x's dtype first
    as transformers' Gemma3TextScaledWordEmbedding does (bf16: sqrt(1152) = 33.94 is multiplied as 34.0)."""
    if not config.scale_embed:
        return x
    return x * jnp.asarray(config.d_model**0.5, x.dtype)


def attention_scale(config: ModelConfig) -> float | None:
    """The attention logits' scale: config.attn_scale, or None for the default d_head ** -0.5."""
    return config.attn_scale or None


def rope_frequencies(half: int, base: float, scaling: tuple[float, ...] = ()) -> jax.Array:
    """Inverse frequencies [Q/2] of the rotary embedding: base^(-i / (Q/2)).

    scaling: (factor,) is transformers' `linear` type (every frequency divided by factor); four numbers are
    Llama 3.1's (factor, low_freq_factor, high_freq_factor, original_max_len), as transformers'
    `_compute_llama3_parameters`: wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor` (slower rotation, for contexts past the trained length), those shorter than original_max_len /
    high_freq_factor are kept, and those between are blended linearly in original_max_len / wavelength.
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    if not scaling:
        return inv_freq
    if len(scaling) == 1:  # linear (Gemma 3's global layers at 4B+): positions / factor, as inv_freq / factor
        return inv_freq / scaling[0]
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
    return rotate(x, positions, rope_frequencies(x.shape[-1] // 2, base, scaling))


def layer_window(config: ModelConfig, layer: Any) -> jax.Array | int:
    """Layer `layer`'s attention window (0 = global): an int for a model without windows (the mask is then the
    plain causal one, unchanged), else int32 read from the per-layer table [N] (`layer` may be traced: a scan)."""
    if not config.windowed:
        return 0
    return jnp.asarray(config.layer_windows, jnp.int32)[layer]


def layer_frequencies(config: ModelConfig, layer: Any) -> jax.Array:
    """Layer `layer`'s rotary inverse frequencies [Q/2]: the windowed layers' own base (config.local_rope_base,
    Gemma 3's rope_local_base_freq, unscaled) where set, else rope_base with rope_scaling (`layer` may be traced)."""
    half = config.d_head // 2
    inv_freq = rope_frequencies(half, config.rope_base, config.rope_scaling)
    if not config.local_rope_base or not config.windowed:
        return inv_freq
    local = rope_frequencies(half, config.local_rope_base)
    return jnp.where(jnp.asarray(config.layer_windows, jnp.int32)[layer] > 0, local, inv_freq)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., Q/2] float32 of the rotation angles positions [...] x inv_freq [Q/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """`rope` with its inverse frequencies [Q/2] given. x: [B, T, h, Q]; positions: [B, T]."""
    cos, sin = (t[:, :, None, :] for t in rotary_tables(positions, inv_freq))  # [B, T, 1, Q/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def qkv_projection(
    h: jax.Array, p: dict[str, Any], positions: jax.Array, config: ModelConfig, layer: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h: [B, T, E] -> q [B, T, H, Q] (rotated), k [B, T, K, Q] (rotated), v [B, T, K, Q]. layer: its index (an
    int, or traced in a scan), for its rotary base (`layer_frequencies`).

    p holds wq [E, H, Q], wk, wv [E, K, Q], or (unrolled layers: `params.unstack_layers`) wqkv [E, H + 2K, Q], their
    concatenation on the heads axis: see `_fused_qkv`."""
    if "wqkv" in p:
        return _fused_qkv(h, p, positions, config, layer)
    q = einsum("BTE,EHQ->BTHQ", h, p["wq"])
    k = einsum("BTE,EKQ->BTKQ", h, p["wk"])
    v = einsum("BTE,EKQ->BTKQ", h, p["wv"])
    if "bq" in p:
        q, k, v = q + p["bq"].astype(q.dtype), k + p["bk"].astype(k.dtype), v + p["bv"].astype(v.dtype)
    if "q_norm" in p:  # Qwen3: before the rotation, as Qwen3Attention does
        q = head_norm(q, p["q_norm"]["scale"], config.norm_eps, config.norm_scale_offset)
        k = head_norm(k, p["k_norm"]["scale"], config.norm_eps, config.norm_scale_offset)
    inv_freq = layer_frequencies(config, layer)
    return rotate(q, positions, inv_freq), rotate(k, positions, inv_freq), v


def _fused_qkv(
    h: jax.Array, p: dict[str, Any], positions: jax.Array, config: ModelConfig, layer: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`qkv_projection` over wqkv [E, H + 2K, Q]: one matmul -> qkv [B, T, H + 2K, Q], then the head norms (Qwen3,
    Gemma 3) and the rotation over all H + 2K heads at once, the v heads passed through (`jnp.where`), and q, k, v
    sliced last. Both are per head, so this is the math of the unfused path. Sliced first, q and k each took their
    own norm and rotation kernels on a GPU (qwen3-8b bf16, deviceless H100 compile: 26 kernels per layer sliced
    first, 22 as here, 23 unfused); the K discarded v heads' arithmetic costs nothing beside that."""
    H, K, Q = config.n_heads, config.n_kv_heads, config.d_head
    qkv = einsum("BTE,EHQ->BTHQ", h, p["wqkv"])
    if "bq" in p:  # a few KiB concatenated in the step, inside the add's fusion
        qkv = qkv + jnp.concatenate([p["bq"], p["bk"], p["bv"]]).astype(qkv.dtype)
    qk_heads = jnp.arange(H + 2 * K)[:, None] < H + K  # [H + 2K, 1]
    if "q_norm" in p:  # before the rotation, as Qwen3Attention does; k's scale on the v heads too (discarded)
        qs, ks = p["q_norm"]["scale"], p["k_norm"]["scale"]
        scale = jnp.concatenate([jnp.broadcast_to(qs, (H, Q)), jnp.broadcast_to(ks, (2 * K, Q))])
        qkv = jnp.where(qk_heads, head_norm(qkv, scale, config.norm_eps, config.norm_scale_offset), qkv)
    qkv = jnp.where(qk_heads, rotate(qkv, positions, layer_frequencies(config, layer)), qkv)
    return qkv[:, :, :H], qkv[:, :, H : H + K], qkv[:, :, H + K :]


def attention_scores_mask(
    q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array, window: jax.Array | int = 0
) -> jax.Array:
    """The one attention mask [B, T, S]: key s is visible to query t iff valid, k_pos <= q_pos (causal) and, for a
    window W > 0, q_pos - W < k_pos (transformers' sliding window: `sliding_window_overlay`'s kv_idx > q_idx - W on
    top of the causal mask, so a query sees itself and the W - 1 positions before it). q_positions [B, T],
    k_positions [B, S] (or [S]), k_valid [B, S]; window: an int, or int32 traced (the layer's, 0 = global)."""
    k_pos = jnp.broadcast_to(k_positions, k_valid.shape)[:, None, :]
    q_pos = q_positions[:, :, None]
    mask = (k_pos <= q_pos) & k_valid[:, None, :]
    if isinstance(window, int) and window == 0:
        return mask
    return mask & ((window == 0) | (k_pos > q_pos - window))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None) -> jax.Array:
    """Grouped-query attention (K = 1 is multi-query). q [B,T,H,Q], k/v [B,S,K,Q], mask [B,T,S] -> [B,T,H,Q].
    scale: the logits' scale (None: 1 / sqrt(Q))."""
    B, T, H, Q = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Q)
    scores = jnp.einsum("BTKGQ,BSKQ->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(Q) if scale is None else scores * scale
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
    scale: float | None = None,
) -> jax.Array:
    """Decode attention over cached keys plus this step's own key, without writing or concatenating the cache.

    q [B,1,H,Q]; k_cache/v_cache [B,C,K,Q]; visible bool [B,C] (cached positions this row may see); k_new/v_new
    [B,1,K,Q] (always visible) -> [B,1,H,Q]. Equals `attend` over the keys [cache; new]: one softmax over C + 1
    scores, the new key's part added separately, so the cache is only read.
    k_scale / v_scale: float32 [B,C,K], an int8 cache's scales (model/kv_quant.py `operands`): key s is
    k_cache[s] * k_scale[s], applied to its score after the Q contraction, and value s's probability is scaled
    before the value contraction, so the cache is read as stored, with no scaled copy of it.
    scale: the logits' scale (None: 1 / sqrt(Q)).
    """
    B, T, H, Q = q.shape
    K = k_cache.shape[2]
    qg = q.reshape(B, T, K, H // K, Q)
    scale = 1.0 / jnp.sqrt(jnp.float32(Q)) if scale is None else jnp.float32(scale)
    old = jnp.einsum("BTKGQ,BSKQ->BKGTS", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if k_scale is not None:
        old = old * jnp.transpose(k_scale, (0, 2, 1))[:, :, None, None, :]  # [B, K, 1, 1, C]
    old = jnp.where(visible[:, None, None, None, :], old, NEG_INF)
    own = jnp.einsum("BTKGQ,BTKQ->BKGT", qg, k_new, preferred_element_type=jnp.float32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([old, own], axis=-1), axis=-1)  # [B,K,G,T,C+1] float32
    cached = probs[..., :-1]
    if v_scale is not None:
        cached = cached * jnp.transpose(v_scale, (0, 2, 1))[:, :, None, None, :]
    # Out as [B, K, G, T, Q], the GEMM's own batch-major order, transposed after: asked for [B, T, K, G, Q] directly,
    # XLA:GPU laid the value cache out transposed ([.., Q, S]) for the GEMM, which at batch 64 copied every layer's
    # values each step and the whole K and V caches twice per call (deviceless H100 compile of falcon-7b bf16 at
    # batch 64, 136 cache positions: 505 -> 472 kernels per step, and no cache-sized copies).
    out = jnp.einsum("BKGTS,BSKQ->BKGTQ", cached.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    own_p = probs[..., -1].astype(v_new.dtype)
    out = out + jnp.einsum("BKGT,BTKQ->BKGTQ", own_p, v_new, preferred_element_type=jnp.float32)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, Q).astype(q.dtype)


def prefill_attention_implementation(dtype) -> str:
    """'cudnn' (fused flash attention) on GPUs for 16-bit activations, else 'xla'.

    The XLA form materialises the [B, H, T, T] scores, which at long prompts costs as much HBM traffic as the
    matmuls; cuDNN's fused kernel never writes them. MESHSERVE_ATTENTION=xla|cudnn overrides the choice.
    """
    forced = os.environ.get("MESHSERVE_ATTENTION")
    if forced:
        return forced
    return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def attend_prefill(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """Causal self-attention over right-padded prompts. q [B,T,H,Q], k/v [B,T,K,Q] -> [B,T,H,Q]; scale: the
    logits' (None: 1 / sqrt(Q)). A windowed layer does not come here (its mask goes through `attend`).

    No padding mask is needed: with right padding a real query (t < length) sees only keys s <= t < length, so
    the causal mask alone hides the padding from every output that is used. Padded query rows compute finite
    values nobody reads, and their keys reach the decode cache only at positions >= length, which decode
    overwrites before its mask lets them be read. Plain causal is also the fused kernels' fastest path (cuDNN
    otherwise switches to its padding-mask variant).
    """
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation=prefill_attention_implementation(q.dtype)
    )


def attention_output(o: jax.Array, p: dict[str, Any]) -> jax.Array:
    """o: [B, T, H, Q] -> [B, T, E], over wo [H, Q, E] or (unrolled int8 layers: `params.unstack_layers`) wo_padded
    [H·Q + zero rows, E]: [o, 0] @ wo_padded = o·wo, the contracted axis already a multiple of 256, where XLA's
    split-K GEMM padded a bf16 copy of the int8 wo on every decode step. With one kv head the decode attention
    kernel writes o's zero heads itself (`transformer._padded_heads`), so o arrives H·Q + zero rows wide and the
    concatenation adds nothing; after XLA's attention the zeros fuse into a kernel that runs anyway (falcon-7b int8
    under MESHSERVE_DECODE_ATTENTION=xla, deviceless H100 compile: batch 1 564 -> 532 kernels, batch 64 536 both)."""
    if "wo_padded" in p:
        B, T, H, Q = o.shape
        y = einsum("BTF,FE->BTE", _with_zero_rows([o.reshape(B, T, H * Q)], p["wo_padded"]), p["wo_padded"])
    else:
        y = einsum("BTHQ,HQE->BTE", o, p["wo"])
    return y + p["bo"].astype(y.dtype) if "bo" in p else y


def _with_zero_rows(parts: list[jax.Array], w: Any) -> jax.Array:
    """Activations parts [B, T, ·] (in parts[0]'s dtype), then zeros up to w's contracted rows: [B, T, w.shape[0]]."""
    B, T, _ = parts[0].shape
    zeros = jnp.zeros((B, T, w.shape[0] - sum(x.shape[-1] for x in parts)), parts[0].dtype)
    return jnp.concatenate([x.astype(parts[0].dtype) for x in parts] + [zeros], axis=-1)


def parallel_output(o: jax.Array, act: jax.Array, p: dict[str, Any]) -> jax.Array:
    """The parallel block's two output projections as one matmul over wo_down [H·Q + F (+ zero rows), E] (wo and
    w_down stacked on the contracted axis by `params.unstack_layers`): [o, act, 0] @ wo_down = o·wo + act·w_down,
    the paper's fused output projection. One GEMM where two were launched per layer and decode step (falcon-7b bf16,
    deviceless H100 compile). o: [B, T, H, Q]; act: [B, T, F] (`mlp_activation`) -> [B, T, E]."""
    B, T, H, Q = o.shape
    w = p["wo_down"]
    y = einsum("BTF,FE->BTE", _with_zero_rows([o.reshape(B, T, H * Q), act], w), w)  # the weight's zero rows, if any
    for name in ("bo", "b_down"):
        if name in p:
            y = y + p[name].astype(y.dtype)
    return y


def mlp(
    h: jax.Array, p: dict[str, Any], config: ModelConfig, projected: dict[str, jax.Array] | None = None
) -> jax.Array:
    """SwiGLU (Swish(hW)·hV), GeGLU (gelu_tanh(hW)·hV, Gemma) or GELU MLP. h: [B, T, E] -> [B, T, E]; projected:
    see `mlp_activation`."""
    y = einsum("BTF,FE->BTE", mlp_activation(h, p, config, projected), p["w_down"])
    return y + p["b_down"].astype(y.dtype) if "b_down" in p else y


def mlp_activation(
    h: jax.Array, p: dict[str, Any], config: ModelConfig, projected: dict[str, jax.Array] | None = None
) -> jax.Array:
    """The MLP up to its down projection: h [B, T, E] -> act [B, T, F]. projected: {"up": h @ w_up, and for a gated
    MLP "gate": h @ w_gate} [B, T, F] (before biases) where the caller computed them already, in one GEMM with the
    attention's input projection (a decode step's `transformer._attend_rotating`); else a gated MLP's two are one
    GEMM over [w_gate, w_up] (`quant.concat_einsum`: XLA ran them apart, llama-2-7b bf16 decode 373 -> 341 kernels
    a step at batch 1, deviceless H100 compile)."""
    projected = projected or {}
    if config.mlp in ("swiglu", "geglu") and not projected:  # gate and up as one GEMM over [w_gate, w_up]
        fused = concat_einsum(h, [p["w_gate"], p["w_up"]])
        if fused is not None:
            parts = jnp.split(fused[0], 2, axis=-1)
            projected = {name: scaled_output(y, s) for name, y, s in zip(("gate", "up"), parts, fused[1], strict=True)}
    up = projected["up"] if "up" in projected else einsum("BTE,EF->BTF", h, p["w_up"])
    if "b_up" in p:
        up = up + p["b_up"].astype(up.dtype)
    if config.mlp in ("swiglu", "geglu"):
        gate = projected["gate"] if "gate" in projected else einsum("BTE,EF->BTF", h, p["w_gate"])
        if "b_gate" in p:
            gate = gate + p["b_gate"].astype(gate.dtype)
        act = gate_activation(gate, config) * up
    else:
        act = jax.nn.gelu(up, approximate=False)
    return act


def gate_activation(gate: jax.Array, config: ModelConfig) -> jax.Array:
    """The gated MLP's nonlinearity on h W_gate: SiLU (SwiGLU) or GELU's tanh form (GeGLU: Gemma's
    gelu_pytorch_tanh)."""
    return jax.nn.gelu(gate, approximate=True) if config.mlp == "geglu" else jax.nn.silu(gate)


def layer_residual(x: jax.Array, p: dict[str, Any], attend_fn, config: ModelConfig, norm_fn=norm) -> jax.Array:
    """One block. attend_fn(h) -> o [B, T, H, Q] runs attention (and updates the cache) on normalised h; its output
    projection is applied here. In a parallel block attend_fn may return (o, projected) instead, projected the MLP's
    input projections of h (`mlp_activation`), which the MLP then takes rather than computing its own. norm_fn:
    `norm`, or a decode step's one-kernel form of it (`transformer.decode_step`: model/decode_norm.py).

    Parallel (PaLM): x + attn(h) + mlp(h) over the one h = norm(x), the two output projections as one matmul where
    the layer holds them fused (wo_down: `parallel_output`). Serial: two norms, two residuals; with post_norms
    (Gemma 3) each sublayer's output is normed too before its residual add.
    """
    if config.parallel_block:
        h = norm_fn(x, p["attn_norm"], config)
        o = attend_fn(h)
        o, projected = o if isinstance(o, tuple) else (o, None)  # attend_fn projected the MLP's inputs too
        if "wo_down" in p:
            return x + parallel_output(o, mlp_activation(h, p, config, projected), p)
        return x + attention_output(o, p) + mlp(h, p, config, projected)

    def attn(h: jax.Array) -> jax.Array:
        return attention_output(attend_fn(h), p)

    if config.post_norms:  # a decode step of one row may take transformer._post_norm_layer instead
        x = x + norm_fn(attn(norm_fn(x, p["attn_norm"], config)), p["attn_out_norm"], config)
        return x + norm_fn(mlp(norm_fn(x, p["mlp_norm"], config), p, config), p["mlp_out_norm"], config)
    x = x + attn(norm_fn(x, p["attn_norm"], config))
    return x + mlp(norm_fn(x, p["mlp_norm"], config), p, config)
