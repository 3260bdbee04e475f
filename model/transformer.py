"""The decoder's two steps over a preallocated KV cache: prefill (a batch of prompts) and decode (one token).

Prompts are right-padded to a common length T with per-row `lengths`; positions are 0..len-1 per row (from the
prefix length on, when prefill continues a cached `Prefix`), and keys at or beyond a row's length are masked, so
padding never changes a result.
KV cache: k, v [N, B, S, K, Q] (layers, batch slots, context, kv heads, head dim) and lengths [B]; k and v are
arrays of the compute dtype, or `kv_quant.Int8KV` (int8 values, a power-of-two scale per token and kv head), which
the code below slices, writes and reads as it does an array.
A layer with a sliding window (config.layer_windows, Mistral / Gemma 3) attends through the same mask builder
(`layers.attention_scores_mask` with its window) in every path here: the cache keeps the whole context, and a
decode step reads only a windowed layer's window of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from meshserve.model import decode_attention, decode_norm, kv_quant, layers
from meshserve.model.config import ModelConfig
from meshserve.model.params import Params
from meshserve.model.quant import concat_einsum, einsum, scaled_output

__all__ = [
    "KVCache",
    "Prefix",
    "init_cache",
    "scan_layers",
    "prefill",
    "decode_step",
    "insert",
    "compute_dtype",
    "unembed",
]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """k, v: [N, B, S, K, Q] (an array, or `Int8KV`); lengths: int32 [B], tokens already in each row (= next write
    position)."""

    k: jax.Array | kv_quant.Int8KV
    v: jax.Array | kv_quant.Int8KV
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Prefix:
    """Keys and values already computed for the first `lengths[b]` tokens of each row (a cached prompt prefix).

    k, v: [N, b, C, K, Q] (rows of a cache, so arrays or `Int8KV`), valid at positions [0, lengths[b]) of each
    row; lengths: int32 [b] (0 = no prefix).
    """

    k: jax.Array | kv_quant.Int8KV
    v: jax.Array | kv_quant.Int8KV
    lengths: jax.Array


def scan_layers(fn, carry, layer_params, n_layers: int):
    """Run fn(carry, p, i) -> (carry, y) over the layers; ys come back stacked on a leading N axis.

    Stacked weights (a dict of [N, ...] arrays) run as one `lax.scan` (one compiled layer, short compiles).
    A list of per-layer dicts (`params.unstack_layers`) runs as an unrolled Python loop: no dynamic slice of the
    stacked weights per layer, which on GPUs can otherwise cost an extra copy of every weight per step.
    """
    if isinstance(layer_params, list | tuple):
        ys = []
        for i, p in enumerate(layer_params):
            carry, y = fn(carry, p, i)
            ys.append(y)
        return carry, (None if ys[0] is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys))
    return jax.lax.scan(lambda c, xs: fn(c, *xs), carry, (layer_params, jnp.arange(n_layers)))


def compute_dtype(params: Params) -> jnp.dtype:
    """Activations run in the embedding's dtype: f32 for f32 weights, bf16 for bf16 and int8."""
    return params["embed"].dtype


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache [N, batch, max_len, K, Q] of `dtype`; int8 is an `Int8KV` cache."""
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    empty = kv_quant.zeros(shape, dtype)
    return KVCache(k=empty, v=empty, lengths=jnp.zeros((batch,), jnp.int32))


def unembed(h: jax.Array, params: Params) -> jax.Array:
    """h: [B, T, E] -> float32 logits [B, T, V] (shared embedding unless an `unembed` weight exists)."""
    if "unembed" in params:
        return einsum("BTE,EV->BTV", h, params["unembed"], out_dtype=jnp.float32)
    return einsum("BTE,VE->BTV", h, params["embed"], out_dtype=jnp.float32)


def _final_logits(x: jax.Array, params: Params, config: ModelConfig, norm_fn=layers.norm) -> jax.Array:
    return unembed(norm_fn(x, params["final_norm"], config), params)


def prefill(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    all_logits: bool = False,
    prefix: Prefix | None = None,
    int8_kv: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run prompts through the model.

    tokens: int32 [B, T] right-padded; lengths: int32 [B] (1 <= length <= T).
    Returns (logits, k, v): logits float32 [B, V] at each row's last prompt token, or [B, T, V] with
    all_logits; k, v [N, B, T, K, Q] ready for `insert` into a decode cache.

    prefix: the rows' earlier tokens, already in a cache (prefix caching, or the previous chunk of a long prompt):
    `tokens` then continue each row at position prefix.lengths[b] and attend over the prefix too; k, v are still
    only the new tokens' (`insert(..., prefix=prefix)` writes both).

    int8_kv: the cache these k, v go into is int8: they are rounded to its grid before the prompt attends over them
    (and come back rounded), so prefill reads the keys a later decode step reads (model/kv_quant.py).
    """
    B, T = tokens.shape
    start = jnp.zeros((B,), jnp.int32) if prefix is None else prefix.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    x = layers.embed_scale(params["embed"][tokens].astype(compute_dtype(params)), config)  # [B, T, E]
    scale = layers.attention_scale(config)
    if prefix is None:
        # Keys are the prompt's own: causal (padding keys sit after every real query), windowed where a layer is.
        k_positions, k_valid = positions, jnp.ones((B, T), bool)
    else:
        C = prefix.k.shape[2]
        # Keys [prefix C; new T]: a prefix key at position c is visible below the row's prefix length, a new key
        # (at start + j) causally; both within the layer's window.
        k_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(C)[None, :], (B, C)), positions], axis=1)
        k_valid = jnp.concatenate([jnp.arange(C)[None, :] < start[:, None], jnp.ones((B, T), bool)], axis=1)

    def layer_fn(x: jax.Array, p: dict[str, Any], i) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        kv = {}

        def attn(h: jax.Array) -> jax.Array:  # h [B, T, E] -> o [B, T, H, Q], projected by layer_residual
            q, k, v = layers.qkv_projection(h, p, positions, config, i)
            if int8_kv:
                k, v = kv_quant.round_to_int8(k), kv_quant.round_to_int8(v)
            kv["k"], kv["v"] = k, v
            if prefix is None and not config.windowed:  # plain causal: the fused kernel's path
                return layers.attend_prefill(q, k, v, scale)
            mask = layers.attention_scores_mask(positions, k_positions, k_valid, layers.layer_window(config, i))
            if prefix is None:
                return layers.attend(q, k, v, mask, scale)
            keys = jnp.concatenate([prefix.k[i].astype(k.dtype), k], axis=1)  # [B, C + T, K, Q]
            values = jnp.concatenate([prefix.v[i].astype(v.dtype), v], axis=1)
            return layers.attend(q, keys, values, mask, scale)

        x = layers.layer_residual(x, p, attn, config)
        return x, (kv["k"], kv["v"])

    x, (k, v) = scan_layers(layer_fn, x, params["layers"], config.n_layers)
    if all_logits:
        return _final_logits(x, params, config), k, v
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
    return _final_logits(last, params, config)[:, 0], k, v


def insert(
    cache: KVCache,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    slots: jax.Array,
    *,
    prefix: Prefix | None = None,
) -> KVCache:
    """Write prefilled k, v [N, b, T, K, Q] (T <= S) into cache rows `slots` [b]; set their lengths.

    With a prefix (the one `prefill` attended over), row b becomes prefix positions [0, prefix.lengths[b]) then
    the new tokens from there on, and its length prefix.lengths[b] + lengths[b]. The prefix is written too, so it
    may come from another row (a prompt shared with another slot). A slot index out of range (B) drops its row,
    and so does a position past S.
    """
    k, v = kv_quant.storable(k, cache.k), kv_quant.storable(v, cache.v)
    if prefix is None:
        T = k.shape[2]
        new_k = cache.k.at[:, slots, :T].set(k, mode="drop")
        new_v = cache.v.at[:, slots, :T].set(v, mode="drop")
        return KVCache(new_k, new_v, cache.lengths.at[slots].set(lengths.astype(jnp.int32), mode="drop"))
    C, T = prefix.k.shape[2], k.shape[2]
    new_k = cache.k.at[:, slots, :C].set(kv_quant.storable(prefix.k, cache.k), mode="drop")
    new_v = cache.v.at[:, slots, :C].set(kv_quant.storable(prefix.v, cache.v), mode="drop")
    # Positions past a row's prefix hold another prompt's keys (or nothing): the new tokens overwrite them.
    rows = slots[:, None]  # [b, 1]
    at = prefix.lengths[:, None] + jnp.arange(T)[None, :]  # [b, T]
    new_k = new_k.at[:, rows, at].set(k, mode="drop")
    new_v = new_v.at[:, rows, at].set(v, mode="drop")
    new_lengths = cache.lengths.at[slots].set((prefix.lengths + lengths).astype(jnp.int32), mode="drop")
    return KVCache(new_k, new_v, new_lengths)


def decode_step(
    params: Params, config: ModelConfig, tokens: jax.Array, cache: KVCache, *, context: int | None = None
) -> tuple[jax.Array, KVCache]:
    """One token per row. tokens: int32 [B] (the last sampled token of each row), for the cache's first B rows
    (cache.batch >= B: a server's step over its lowest slots).

    Writes each row's new k, v at position lengths[b], attends over positions <= lengths[b], and
    returns float32 logits [B, V] and the cache with lengths + 1 (rows past B untouched). Rows are independent;
    the caller ignores rows it does not use. The first B rows are read where they lie: sliced into a cache of
    their own they were copied whole every step, [N, B, S, K, Q] twice (deviceless H100 compile of a server's
    step: falcon-7b, 8 of 64 slots, 2048 positions: 128 MiB per step).

    context (static, <= S): attend over cache positions [0, context) only, so a step reads the filled part of
    the cache rather than all S slots. The caller promises lengths[b] < context for every row it uses.

    A sliding-window layer (Mistral, Gemma 3's local layers) whose window W is below the context reads only the W
    cached positions that end at each row's own (a gather of [B, W] positions) instead of all C: a Gemma 3 step at
    long context reads the whole cache in its global layers alone.
    """
    B = tokens.shape[0]
    S = cache.max_len
    C = S if context is None else context
    if not 1 <= C <= S:
        raise ValueError(f"context must be in [1, S={S}], got {context}")
    if cache.batch < B:
        raise ValueError(f"tokens has {B} rows but the cache only {cache.batch}")
    lengths = cache.lengths[:B]
    pos = jnp.minimum(lengths, S - 1)  # a full row keeps overwriting its last slot, never out of range
    positions = pos[:, None]  # [B, 1]
    # Keys: the cache's positions before pos (within the context) and this step's own key, attended without
    # writing the cache (layers.attend_cached); the new k, v of all layers go in with one scatter after the layer
    # loop, not one per layer, and no layer's attention waits on a cache write.
    cached = jnp.arange(C)[None, :]  # [1, C]
    x = layers.embed_scale(params["embed"][tokens][:, None, :].astype(compute_dtype(params)), config)  # [B, 1, E]
    rows = jnp.arange(B)
    scale = layers.attention_scale(config)
    # The widest window below C (static): the positions a windowed layer reads, [start_b, start_b + span) with
    # start_b = pos_b - span + 1 where that fits in [0, C); 0 = every layer reads [0, C).
    span = max((w for w in config.layer_windows if 0 < w < C), default=0) if config.windowed else 0
    near = jnp.clip(pos - span + 1, 0, C - span)[:, None] + jnp.arange(span)[None, :] if span else None  # [B, span]
    # MESHSERVE_DECODE_ATTENTION=pallas: a whole-context layer's attention in one kernel (model/decode_attention.py),
    # which takes the whole cache and picks its layer statically: unrolled layers and a 16-bit cache only.
    kernel = isinstance(cache.k, jax.Array) and decode_attention.kernel_enabled(config.d_head, cache.k.dtype)
    norm_fn = decode_norm.kernel_norm if decode_norm.norms_in_kernel(config, B) else layers.norm
    add_norm_fn = decode_norm.kernel_add_norm if decode_norm.add_norms_in_kernel(config, B) else None

    def layer_fn(x, p, i):
        new = {}
        window = layers.layer_window(config, i)

        def attn(h: jax.Array) -> jax.Array:  # h [B, T, E] -> o [B, T, H, Q], projected by layer_residual
            if kernel and _rotates_in_kernel(p, config, i, span, h.dtype, cache.k.dtype):
                o, (new["k"], new["v"]) = _attend_rotating(h, p, config, cache, i, pos, C, scale)
                return o
            q, k, v = layers.qkv_projection(h, p, positions, config, i)
            new["k"], new["v"] = kv_quant.storable(k, cache.k), kv_quant.storable(v, cache.v)  # [B, 1, K, Q]
            own_k, own_v = new["k"].astype(q.dtype), new["v"].astype(q.dtype)

            def over(k_stored, v_stored, k_positions: jax.Array) -> jax.Array:
                """Attention over the cached keys at k_positions [B or 1, L] (stored [B, L, K, Q]) and the own key."""
                # Cached positions before pos, within the layer's window (the own key, at pos, is always visible).
                visible = layers.attention_scores_mask(positions, k_positions, k_positions < positions, window)
                # [B, L, K, Q] as stored, and an int8 cache's scales [B, L, K] (applied outside the Q contraction)
                (kc, ks), (vc, vs) = (kv_quant.operands(c, q.dtype) for c in (k_stored, v_stored))
                return layers.attend_cached(q, kc, vc, visible[:, 0], own_k, own_v, ks, vs, scale)

            def whole() -> jax.Array:  # positions [0, C)
                if kernel and isinstance(i, int) and q.dtype == cache.k.dtype:
                    # The kernel reads each row's cached positions [0, pos) only, plus the own key: what `over`
                    # sees of [0, C), since pos < C.
                    return decode_attention.decode_attention(q, cache.k, cache.v, i, pos, own_k, own_v, C, scale,
                                                             out_heads=_padded_heads(p, cache.k.shape))  # fmt: skip
                return over(cache.k[i, :B, :C], cache.v[i, :B, :C], cached)

            def windowed() -> jax.Array:  # each row's `span` positions: a gather [B, span, K, Q]
                return over(cache.k[i, rows[:, None], near], cache.v[i, rows[:, None], near], near)

            if not span:
                return whole()
            if isinstance(i, int):  # unrolled layers: the layer's own read, chosen here
                return windowed() if config.layer_windows[i] else whole()
            return jax.lax.cond(window > 0, windowed, whole)  # one scanned layer for all: chosen as it runs

        if add_norm_fn is not None:  # a post-norm block, its last residual add deferred into the next seam
            return _post_norm_layer(x, p, attn, config, add_norm_fn), (new["k"], new["v"])
        return layers.layer_residual(x, p, attn, config, norm_fn), (new["k"], new["v"])

    if add_norm_fn is not None:  # (x, the MLP's output a and its post-norm, not yet added): layer 0 adds a = 0
        layer0 = params["layers"][0] if isinstance(params["layers"], list | tuple) else params["layers"]
        post = jax.tree.map(lambda s: jnp.zeros(s.shape[-1:], s.dtype), layer0["mlp_out_norm"])  # as scan carries
        x = (x, jnp.zeros_like(x), post)
    x, (k_new, v_new) = scan_layers(layer_fn, x, params["layers"], config.n_layers)  # [N, B, 1, K, Q]
    k = cache.k.at[:, rows, pos].set(k_new[:, :, 0])
    v = cache.v.at[:, rows, pos].set(v_new[:, :, 0])
    if add_norm_fn is not None:
        x, a, post = x
        logits = unembed(add_norm_fn(a, x, post, params["final_norm"], config)[1], params)[:, 0]
    else:
        logits = _final_logits(x, params, config, norm_fn)[:, 0]
    return logits, KVCache(k=k, v=v, lengths=cache.lengths.at[:B].set(jnp.minimum(lengths + 1, S)))


def _post_norm_layer(state: tuple, p: dict, attend_fn, config: ModelConfig, add_norm_fn) -> tuple:
    """`layers.layer_residual` of a post-norm block with each seam in one step (`decode_norm.decode_add_norm`):
    state (x, a, post) stands for the stream x + norm(a; post), the previous layer's last residual add deferred so
    that it joins this layer's first norm (XLA spent three kernels on each seam at batch 1: the post-norm's
    statistics, the next norm's with the add, their use). Returns this layer's state; the final norm takes the last.
    At layer 0, a = 0 adds 0 exactly (norm(0) = 0)."""
    x, a, post = state
    x, h = add_norm_fn(a, x, post, p["attn_norm"], config)
    a = layers.attention_output(attend_fn(h), p)
    x, h = add_norm_fn(a, x, p["attn_out_norm"], p["mlp_norm"], config)
    return x, layers.mlp(h, p, config), p["mlp_out_norm"]


def _rotates_in_kernel(p: dict, config: ModelConfig, layer: Any, span: int, dtype: Any, cache_dtype: Any) -> bool:
    """Whether layer `layer` of a decode step takes `decode_attention_rotating` (the rotation inside the kernel):
    a fused wqkv without biases (the kernel's operand is the projection as the GEMM wrote it; head norms, one [Q]
    scale each, it applies itself), a static layer index reading its whole context, the cache's dtype, and a head dim
    of at least 32 (two dots of Q/2 >= 16, Triton's least). Else `decode_attention`, after XLA's rotation."""
    return (
        isinstance(layer, int)
        and not (span and config.layer_windows[layer])
        and "wqkv" in p
        and "bq" not in p
        and ("q_norm" not in p or p["q_norm"]["scale"].ndim == p["k_norm"]["scale"].ndim == 1)  # one [Q] each
        and config.d_head >= 32
        and jnp.dtype(dtype) == jnp.dtype(cache_dtype)
    )


def _attend_rotating(
    h: jax.Array, p: dict, config: ModelConfig, cache: KVCache, layer: int, pos: jax.Array, context: int, scale
) -> tuple[jax.Array | tuple[jax.Array, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """One layer's decode attention with the rotary embedding applied in the kernel: h [B, 1, E] -> (o [B, 1, H or
    the padded heads, Q], or in a parallel block (o, {"gate", "up": [B, 1, F]}), the MLP's input projections of h
    for `layers.layer_residual`; (k, v) [B, 1, K, Q] for the cache: k rotated by the kernel, v the projection's (with
    int8 weights scaled by the kernel)).

    The kernel's operand is the input projection unrotated, [B, 1, H + 2K, Q]. In a parallel block that is one
    GEMM over [wqkv, (w_gate,) w_up] (`quant.concat_einsum`: the paper's fused input projection), whose whole
    output [B, 1, H + 2K + (2)F / Q, Q] the kernel takes and whose tail is the MLP's: XLA merged the matmuls into
    such a GEMM anyway, and then copied q, k, v out of its output for the custom call (falcon-7b and palm-8b bf16,
    deviceless H100 compile). int8 weights (XLA's path) leave that product unscaled: the kernel applies wqkv's
    scale as it loads q, k, v, and the tails take theirs in the MLP's fusion, where XLA spent a kernel per layer on
    the qkv multiply (falcon-7b int8, deviceless H100 compile: 277 -> 245 kernels at batch 1)."""
    H, K, Q = config.n_heads, config.n_kv_heads, config.d_head
    names = ("gate", "up") if config.mlp in ("swiglu", "geglu") else ("up",)
    mlp_in = [p.get(f"w_{name}") for name in names]
    fused = None
    if config.parallel_block and all(w is not None and w.shape[-1] % Q == 0 for w in mlp_in):
        fused = concat_einsum(h, [p["wqkv"], *mlp_in])
    fused = fused or concat_einsum(h, [p["wqkv"]])  # a serial block, or the MLP's weights apart
    if fused is None:  # int8 on another path (a Pallas config, w8a8, rows): einsum's own
        y, scales = einsum("BTE,EHQ->BTHQ", h, p["wqkv"]).reshape(*h.shape[:2], -1), [None]
    else:
        y, scales = fused
    projection = y.reshape(*y.shape[:2], -1, Q)  # [B, 1, H + 2K (+ (2)F / Q), Q]
    tails = jnp.split(y[..., (H + 2 * K) * Q :], len(names), axis=-1) if len(scales) > 1 else None
    projection_scale = None if scales[0] is None else scales[0].reshape(H + 2 * K, Q)
    cos, sin = layers.rotary_tables(pos, layers.layer_frequencies(config, layer))  # [B, Q/2]
    head_norm = None
    if "q_norm" in p:  # Qwen3's, Gemma 3's: applied in the kernel before the rotation
        # two [Q] operands: stacked in the step they took a kernel per layer (qwen3-8b, deviceless H100 compile)
        head_norm = (p["q_norm"]["scale"], p["k_norm"]["scale"], config.norm_eps, config.norm_scale_offset)
    o, k, v = decode_attention.decode_attention_rotating(
        projection, H, cache.k, cache.v, layer, pos, cos, sin, context, scale,
        out_heads=_padded_heads(p, cache.k.shape), projection_scale=projection_scale, head_norm=head_norm)  # fmt: skip
    kv = kv_quant.storable(k, cache.k), kv_quant.storable(v, cache.v)
    if tails is None:
        return o, kv
    return (o, {name: scaled_output(t, s) for name, t, s in zip(names, tails, scales[1:], strict=True)}), kv


def _padded_heads(p: dict, cache_shape: tuple[int, ...]) -> int | None:
    """Heads the decode attention kernel writes for a layer whose int8 wo is stored padded (`wo_padded` [H·Q + zero
    rows, E], params.unstack_layers): the zero heads it then writes are the zeros `layers.attention_output` would
    otherwise concatenate onto o in a kernel of its own. One kv head only (then the heads are one group); else None."""
    if "wo_padded" not in p or cache_shape[3] != 1 or p["wo_padded"].shape[0] % cache_shape[4]:
        return None
    return p["wo_padded"].shape[0] // cache_shape[4]
