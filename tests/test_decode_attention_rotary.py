"""The decode attention kernel with the rotary embedding inside it (`decode_attention.decode_attention_rotating`,
taken by `transformer.decode_step` for fused, unbiased wqkv layers of head dim >= 32, with Qwen3's and Gemma 3's q
and k head norms applied in it too).

Interpret mode runs the kernel body on the CPU: the reference is XLA's path, `layers.rotate` then
`layers.attend_cached`. Whether the rotation saves a kernel per layer on a GPU is a deviceless compile's count
(benchmarks/decode_hlo.py --target h100; BENCHMARKS.md), its time a GPU run's, not a test's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import decode_attention as da
from meshserve.model import layers, transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers


def _rotating_operands(B, H, K, Q, S, extra_heads, N=3, seed=0):
    """An unrotated projection [B, 1, H + 2K + extra_heads, Q] (the extra heads: a parallel block's up projection,
    never read) and caches [N, B, S, K, Q]."""
    keys = jax.random.split(jax.random.key(seed), 3)
    projection = jax.random.normal(keys[0], (B, 1, H + 2 * K + extra_heads, Q), jnp.bfloat16)
    k_cache, v_cache = (jax.random.normal(keys[i], (N, B, S, K, Q), jnp.bfloat16) for i in (1, 2))
    return projection, k_cache, v_cache


@pytest.mark.parametrize(
    ("B", "H", "K", "Q", "S", "context", "lengths", "split_positions", "extra_heads", "head_block", "out_heads"),
    [
        (1, 71, 1, 64, 136, 136, [100], 512, 5, None, None),  # falcon-7b's heads, with up-projection heads after
        (3, 8, 2, 32, 80, 70, [0, 5, 69], 512, 0, None, None),  # GQA; a row with only its own key
        (2, 8, 2, 32, 80, 80, [3, 79], 16, 3, None, None),  # several splits: only split 0 writes the own k
        (2, 71, 1, 64, 48, 48, [40, 1], 512, 0, 16, 72),  # head blocks: only the first writes k; padded heads
    ],
)
def test_rotating_kernel_equals_rotate_then_attend(
    monkeypatch, B, H, K, Q, S, context, lengths, split_positions, extra_heads, head_block, out_heads
):
    monkeypatch.setattr(da, "_SPLIT_POSITIONS", split_positions)
    projection, k_cache, v_cache = _rotating_operands(B, H, K, Q, S, extra_heads)
    pos = jnp.asarray(lengths, jnp.int32)
    inv_freq = layers.rope_frequencies(Q // 2, 10000.0)
    cos, sin = layers.rotary_tables(pos, inv_freq)
    layer = 2
    o, k, v = da.decode_attention_rotating(projection, H, k_cache, v_cache, layer, pos, cos, sin, context,
                                           interpret=True, head_block=head_block, out_heads=out_heads)  # fmt: skip
    q_ref = layers.rotate(projection[:, :, :H], pos[:, None], inv_freq)
    k_ref = layers.rotate(projection[:, :, H : H + K], pos[:, None], inv_freq)
    v_new = projection[:, :, H + K : H + 2 * K]
    assert (v == v_new).all()
    # The own key as the cache will hold it: XLA's rotation, to within one rounding of bf16 (Triton may fuse the
    # float32 multiply-adds that XLA rounds apart).
    assert k.shape == (B, 1, K, Q) and k.dtype == projection.dtype
    np.testing.assert_allclose(np.asarray(k, np.float32), np.asarray(k_ref, np.float32), rtol=1e-2, atol=1e-2)
    visible = jnp.arange(context)[None, :] < pos[:, None]
    ref = layers.attend_cached(q_ref, k_cache[layer, :, :context], v_cache[layer, :, :context], visible, k_ref, v_new)
    heads = out_heads or H
    assert o.shape == (B, 1, heads, Q)
    np.testing.assert_allclose(np.asarray(o[:, :, :H], np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    assert not np.asarray(o[:, :, H:], np.float32).any()
    # Unrotated, the scores differ: the test would see a kernel that skipped the rotation.
    unrotated = layers.attend_cached(projection[:, :, :H], k_cache[layer, :, :context], v_cache[layer, :, :context],
                                     visible, projection[:, :, H : H + K], v_new)  # fmt: skip
    assert np.abs(np.asarray(o[:, :, :H], np.float32) - np.asarray(unrotated, np.float32)).max() > 0.05


@pytest.mark.parametrize(
    ("B", "H", "K", "Q", "lengths", "split_positions", "head_block", "out_heads"),
    [
        (1, 71, 1, 64, [100], 512, None, 72),  # falcon-7b's int8 step: wo_padded's zero heads
        (3, 8, 2, 32, [0, 5, 69], 16, None, None),  # GQA, several splits: only split 0 writes k and v
        (2, 71, 1, 64, [40, 1], 512, 16, 72),  # head blocks: each block reads its own rows of the scale
    ],
)
def test_scaled_rotating_kernel_equals_scaling_first(
    monkeypatch, B, H, K, Q, lengths, split_positions, head_block, out_heads
):
    """projection_scale (an int8 wqkv's channel scale [H + 2K, Q]) applied in the kernel equals the projection
    scaled first, in float32 and rounded to bf16 as XLA's int8 path does, then the unscaled kernel: o, the rotated
    own k and the own v (which the kernel then writes, scaled), bit for bit."""
    monkeypatch.setattr(da, "_SPLIT_POSITIONS", split_positions)
    S = context = 136
    projection, k_cache, v_cache = _rotating_operands(B, H, K, Q, S, 3, seed=1)
    channel = jax.random.uniform(jax.random.key(2), (H + 2 * K, Q), jnp.float32, 0.5, 2.0).astype(jnp.bfloat16)
    pos = jnp.asarray(lengths, jnp.int32)
    cos, sin = layers.rotary_tables(pos, layers.rope_frequencies(Q // 2, 10000.0))
    scaled = projection.at[:, :, : H + 2 * K].set(
        (projection[:, :, : H + 2 * K].astype(jnp.float32) * channel.astype(jnp.float32)).astype(jnp.bfloat16)
    )
    run = functools.partial(da.decode_attention_rotating, n_heads=H, k_cache=k_cache, v_cache=v_cache, layer=1,
                            pos=pos, cos=cos, sin=sin, context=context, interpret=True, head_block=head_block,
                            out_heads=out_heads)  # fmt: skip
    got, want = run(projection, projection_scale=channel), run(scaled)
    for name, a, b in zip(("o", "k", "v"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    # The scale was applied: without it, v (and so o) differ.
    assert not np.array_equal(np.asarray(got[2], np.float32), np.asarray(projection[:, :, H + K : H + 2 * K]))
    with pytest.raises(ValueError, match="projection_scale must be"):
        run(projection, projection_scale=channel[1:])


@pytest.mark.parametrize(("B", "H", "K", "Q", "offset"), [(1, 8, 1, 64, True), (2, 8, 2, 32, False)])
def test_head_norms_in_the_kernel_equal_norming_first(B, H, K, Q, offset):
    """head_norm (Qwen3's, Gemma 3's q_norm and k_norm, [Q] each) applied in the kernel before the rotation equals
    `layers.head_norm` applied to the projection's q and k heads first (bf16, as XLA's path rounds them)."""
    S = context = 80
    projection, k_cache, v_cache = _rotating_operands(B, H, K, Q, S, 2, seed=3)
    projection = projection * 3.0  # a mean square far from 1: a kernel that skipped the norm would show
    q_scale, k_scale = (jax.random.normal(jax.random.key(i), (Q,), jnp.float32).astype(jnp.bfloat16) for i in (7, 8))
    pos = jnp.arange(B, dtype=jnp.int32) * 17 + 9
    cos, sin = layers.rotary_tables(pos, layers.rope_frequencies(Q // 2, 10000.0))
    normed = projection.at[:, :, :H].set(layers.head_norm(projection[:, :, :H], q_scale, 1e-6, offset))
    normed = normed.at[:, :, H : H + K].set(layers.head_norm(projection[:, :, H : H + K], k_scale, 1e-6, offset))
    run = functools.partial(da.decode_attention_rotating, n_heads=H, k_cache=k_cache, v_cache=v_cache, layer=0,
                            pos=pos, cos=cos, sin=sin, context=context, interpret=True)  # fmt: skip
    got, want = run(projection, head_norm=(q_scale, k_scale, 1e-6, offset)), run(normed)
    for name, a, b in zip(("o", "k", "v"), got, want, strict=True):  # the same roundings, in the same order
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    unnormed = run(projection)
    assert np.abs(np.asarray(got[1], np.float32) - np.asarray(unnormed[1], np.float32)).max() > 0.5
    with pytest.raises(ValueError, match="head_norm's scales must be \\[Q\\] each"):
        run(projection, head_norm=(q_scale[:-1], k_scale, 1e-6, offset))


def test_rotating_needs_q_of_32_and_all_of_q_k_v():
    projection, k_cache, v_cache = _rotating_operands(1, 4, 1, 16, 32, 0)
    cos = sin = jnp.zeros((1, 8), jnp.float32)
    pos = jnp.zeros(1, jnp.int32)
    with pytest.raises(ValueError, match="head dim of at least 32"):
        da.decode_attention_rotating(projection, 4, k_cache, v_cache, 0, pos, cos, sin, 32, interpret=True)
    with pytest.raises(ValueError, match="fewer than H \\+ 2K = 7"):
        da.decode_attention_rotating(projection, 5, k_cache, v_cache, 0, pos, cos, sin, 32, interpret=True)


def _decode_logits(monkeypatch, mode, params, config, steps=3):
    """Prefill two prompts of different lengths, then decode steps fed the same random tokens whatever each step
    predicts (a near tie's argmax may differ between the paths): logits [steps, 2, V]."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", mode)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, config.vocab_size)
    fed = jax.random.randint(jax.random.key(6), (steps, 2), 0, config.vocab_size)
    lengths = jnp.array([12, 7], jnp.int32)
    _, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.init_cache(config, 2, 32, k.dtype)
    cache = transformer.insert(cache, k, v, lengths, jnp.arange(2))
    step = jax.jit(lambda p, t, c: transformer.decode_step(p, config, t, c, context=24))
    out = []
    for tok in fed:
        logits, cache = step(params, tok, cache)
        out.append(logits)
    return np.asarray(jnp.stack(out), np.float32)


@pytest.mark.parametrize(
    ("preset", "overrides", "weights", "merged"),
    [
        ("tiny-falcon", dict(d_head=32), "bf16", True),  # parallel GELU block: one GEMM over [wqkv, w_up]
        ("tiny", dict(d_head=32, n_kv_heads=2), "bf16", True),  # parallel SwiGLU: one GEMM over [wqkv, w_gate, w_up]
        ("tiny", dict(d_head=32, parallel_block=False), "bf16", False),  # serial block
        ("tiny", dict(d_head=32, rope_scaling=(8.0, 1.0, 4.0, 16.0)), "bf16", True),  # Llama 3.1's scaled rotation
        # a windowed layer (window >= context: read whole) rotating at its own base, beside a global one
        ("tiny", dict(d_head=32, sliding_window=32, global_layers=(1,), local_rope_base=100.0), "bf16", True),
        # int8 weights: merged too, unscaled (the kernel scales q, k, v); 65 heads of 64 -> wo_padded's 4352 rows,
        # the kernel writing 3 zero heads
        ("tiny-falcon", dict(d_head=64, n_heads=65), "int8", True),
        ("tiny", dict(d_head=32, n_kv_heads=2, parallel_block=False), "int8", False),  # int8, serial: scaled alone
        # Qwen3's and Gemma 3's head norms, applied in the kernel before the rotation
        ("tiny", dict(d_head=32, n_kv_heads=2, parallel_block=False, qk_norm=True), "bf16", False),
        ("tiny-gemma3", dict(d_head=32, sliding_window=32), "bf16", False),  # window >= context: read whole
        ("tiny-gemma3", dict(d_head=32, sliding_window=32), "int8", False),
    ],
)
def test_decode_steps_rotating_in_the_kernel_equal_xla(monkeypatch, preset, overrides, weights, merged):
    """Unrolled layers of head dim 32 take the rotating kernel in every layer (counted), and their decode steps'
    logits match XLA's attention within bf16 rounding; a parallel block's MLP (16-bit weights) takes its input
    projections from the merged GEMM."""
    config = get_config(preset).replace(**overrides)
    params = unstack_layers(cast_params(config, init_params(config, jax.random.key(4), jnp.float32), weights))
    if (
        config.qk_norm
    ):  # head norms' scales drawn at random (initialised they are all 0 or 1): the kernel must read them
        params["layers"] = [
            {**p, **{name: {"scale": (0.5 * jax.random.normal(jax.random.key(10 * i + j), p[name]["scale"].shape))
                            .astype(p[name]["scale"].dtype)} for j, name in enumerate(("q_norm", "k_norm"))}}
            for i, p in enumerate(params["layers"])
        ]  # fmt: skip
    ref = _decode_logits(monkeypatch, "xla", params, config)
    calls, ups, scales = [], [], []
    rotating, mlp_activation = da.decode_attention_rotating, layers.mlp_activation

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        scales.append(kwargs.get("projection_scale"))
        return rotating(*args, **kwargs)

    def noted(h, p, config, projected=None):
        ups.append(sorted(projected or {}))
        return mlp_activation(h, p, config, projected)

    monkeypatch.setattr(da, "decode_attention_rotating", counted)
    monkeypatch.setattr(layers, "mlp_activation", noted)
    got = _decode_logits(monkeypatch, "pallas", params, config)
    assert len(calls) == config.n_layers  # traced once: one call per layer
    H, K, Q = config.n_heads, config.n_kv_heads, config.d_head
    mlp_inputs = ["gate", "up"] if config.mlp == "swiglu" else ["up"]
    assert calls[0][2] == H + 2 * K + (len(mlp_inputs) * config.d_ff // Q if merged else 0)
    padded = "wo_padded" in params["layers"][0]  # int8 whose H Q (65 x 64) is no multiple of 256
    assert padded == (weights == "int8" and H * Q % 256 != 0)
    assert not padded or transformer._padded_heads(params["layers"][0], (1, 1, 1, K, Q)) == 68
    # int8: the kernel applied wqkv's scale to the GEMM's unscaled product (XLA's multiply kernel gone)
    assert all((s is not None) == (weights == "int8") for s in scales)
    assert weights != "int8" or scales[0].shape == (H + 2 * K, Q)
    # The decode step traced last (prefill first): the MLP took the merged GEMM's projections, or made its own.
    assert ups[-config.n_layers :] == [mlp_inputs if merged else []] * config.n_layers
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()
    if weights == "int8":
        # Bit for bit what XLA's scaling before the kernel gives (concat_einsum refused: einsum's scaled product,
        # and the MLP's own input projections): the rounding order is the same, not only close.
        monkeypatch.setattr(transformer, "concat_einsum", lambda x, weights: None)
        np.testing.assert_array_equal(got, _decode_logits(monkeypatch, "pallas", params, config))
