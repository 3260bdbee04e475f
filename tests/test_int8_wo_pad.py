"""Unrolled int8 layers store wo [H, Q, E] as wo_padded [H·Q + zero rows, E] (`params.unstack_layers`), which
`layers.attention_output` runs with as many zeros after o, so XLA's split-K GEMM pads no bf16 copy of it per step:
the logits are those of the unpadded wo. Models here are falcon-shaped at H·Q = 71·64 = 4544 (falcon-7b's, 64 zero
rows by the real `_out_padding`) with a small d_model, so every test runs the real threshold and path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import params as params_module
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers
from meshserve.model.quant import QuantizedArray, dequantize, quantize
from model_helpers import prefill_and_decode_logits

H, Q, PAD = 71, 64, 64  # falcon-7b's heads and head dim: 4544 rows -> 4608


@pytest.fixture(autouse=True)
def _xla_int8_matmul(monkeypatch):
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")  # the path padded, whatever the shell running the tests says


def _model(weights: str, name: str = "tiny-falcon", **overrides):
    config = get_config(name, n_heads=H, d_head=Q, **overrides)
    params = cast_params(config, init_params(config, jax.random.key(0), jnp.float32), weights)
    if "bo" in params["layers"]:  # declared zero: random, so a bias dropped or added twice would show
        noise = 0.1 * jax.random.normal(jax.random.key(20), params["layers"]["bo"].shape)
        params["layers"]["bo"] = noise.astype(params["embed"].dtype)
    return config, params


def _unpadded(unrolled):
    """Per-layer trees with wo_padded cut back into the declared int8 wo [H, Q, E] (zero rows dropped)."""
    layers = []
    for layer in unrolled["layers"]:
        layer = dict(layer)
        w = layer.pop("wo_padded")
        E = w.values.shape[1]
        layer["wo"] = QuantizedArray(values=w.values[: H * Q].reshape(H, Q, E), scale=w.scale.reshape(1, 1, E))
        layers.append(layer)
    return dict(unrolled, layers=layers)


def test_pad_wo_appends_zero_rows_and_keeps_the_scale():
    """falcon-7b's 4544 rows become 4608: the int8 values in order, then zeros; one scale per output channel, as
    before. A wo already a multiple of 256 (llama-2-7b's 4096), or small, is left alone."""
    wo = quantize(jax.random.normal(jax.random.key(1), (H, Q, 4)), contract_axes=(0, 1))
    padded = params_module._pad_wo(wo)
    assert padded.values.shape == (H * Q + PAD, 4) and padded.values.dtype == jnp.int8 and padded.perm is None
    np.testing.assert_array_equal(padded.values[: H * Q], wo.values.reshape(H * Q, 4))
    assert not padded.values[H * Q :].any()
    np.testing.assert_array_equal(padded.scale, wo.scale.reshape(1, 4))
    np.testing.assert_array_equal(dequantize(padded)[: H * Q], dequantize(wo).reshape(H * Q, 4))
    assert params_module._paddable_wo(wo) is wo
    assert params_module._paddable_wo(quantize(jnp.ones((32, 128, 4)), contract_axes=(0, 1))) is None
    assert params_module._paddable_wo(quantize(jnp.ones((8, 8, 4)), contract_axes=(0, 1))) is None
    assert params_module._paddable_wo(jnp.ones((H, Q, 4))) is None  # 16/32-bit: not this change's


@pytest.mark.parametrize("name", ["tiny-falcon", "tiny"])
def test_padded_logits_equal_the_unpadded_ones(name):
    """Prefill and two decode steps over wo_padded equal the same unrolled layers over the declared int8 wo, in a
    parallel (falcon: wo apart from w_down, each with its scales) and a serial block (wo, then the MLP), with the
    output bias: to float32 rounding of the compute dtype (the zero rows add exact zeros, but a longer contraction
    may sum in another order); and the stacked scan's, which keeps the declared wo, to int8 rounding."""
    config, params = _model("int8", name, parallel_block=name == "tiny-falcon", linear_bias=True)
    padded = unstack_layers(params)
    for layer in padded["layers"]:
        assert "wo" not in layer and layer["wo_padded"].values.shape == (H * Q + PAD, config.d_model)
    assert isinstance(params["layers"]["wo"], QuantizedArray) and params["layers"]["wo"].shape[1:] == (H, Q, 64)
    for scan, apart, got in zip(
        prefill_and_decode_logits(params, config),
        prefill_and_decode_logits(_unpadded(padded), config),
        prefill_and_decode_logits(padded, config),
        strict=True,
    ):
        np.testing.assert_allclose(got, apart, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, scan, rtol=2e-2, atol=2e-2)


def test_zero_rows_are_exact_for_float_weights():
    """`layers.attention_output` over a float wo_padded (o and its zeros against wo and zero rows) equals the
    declared wo's result to float32 rounding: the layout adds nothing of its own on top of the int8 values."""
    config, params = _model("f32", "tiny", parallel_block=False, linear_bias=True)
    declared = unstack_layers(params)
    padded = dict(declared, layers=[dict(layer) for layer in declared["layers"]])
    for layer in padded["layers"]:
        layer["wo_padded"] = params_module._stack_rows(layer.pop("wo"), zero_rows=PAD)
    for want, got in zip(
        prefill_and_decode_logits(declared, config), prefill_and_decode_logits(padded, config), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_only_the_declared_int8_layout_is_padded(monkeypatch):
    """Stored contracted-axes-last (rowsum, w8a8) the GEMM pads nothing; "pallas" keys its tuned kernel by the declared
    shape; 16-bit weights keep wo (serial) or fuse it into wo_down (parallel); the stacked params are untouched."""
    config, params = _model("int8")
    rows = unstack_layers(params, int8_rows=True)["layers"][0]
    assert "wo_padded" not in rows and rows["wo"].perm is not None
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "pallas")
    assert "wo_padded" not in unstack_layers(params)["layers"][0]
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")
    assert "wo_padded" in unstack_layers(params)["layers"][0]
    assert "wo" in params["layers"] and "wo_padded" not in params["layers"]
    serial, bf16 = _model("bf16", "tiny", parallel_block=False)
    layer = unstack_layers(bf16)["layers"][0]
    assert "wo_padded" not in layer and layer["wo"].shape == (H, Q, serial.d_model)


def test_consuming_unstack_deletes_the_stacked_and_unpadded_wo():
    config, params = _model("int8")
    expected = jax.device_get(unstack_layers(params)["layers"])
    stacked = params["layers"]["wo"]
    unrolled = unstack_layers(params, consume=True)
    assert stacked.values.is_deleted() and stacked.scale.is_deleted()
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(unrolled))
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(unrolled["layers"])), jax.tree_util.tree_leaves(expected),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_checkpoints_refuse_the_padded_wo(tmp_path):
    """A checkpoint holds the declared wo [H, Q, E]: unrolled params with wo_padded are refused in one line, before
    anything is written."""
    from meshserve.model.checkpoint import save_checkpoint

    config, params = _model("int8", "tiny", parallel_block=False)
    unrolled = unstack_layers(params)
    with pytest.raises(
        ValueError, match=r"^fused weights \(wo_padded, wqkv\) cannot be saved: save the params before "
    ):
        save_checkpoint(tmp_path / "ckpt", config, unrolled, "int8")
    assert list(tmp_path.iterdir()) == []


def test_the_attention_kernel_writes_the_padding_heads(monkeypatch):
    """With the decode attention kernel (interpreted here) a padded int8 wo's zeros come from the kernel: it writes
    H·Q + zero rows / Q heads, the last ones zero (`transformer._padded_heads`: 72 for falcon-7b's 71 x 64), so no
    pad of o is left for XLA. The decode steps' logits equal XLA attention's over the same padded weights to bf16
    rounding."""
    from meshserve.model import transformer

    config, params = _model("int8", "tiny-falcon", parallel_block=True)
    padded = unstack_layers(params)
    cache_shape = (config.n_layers, 2, 16, 1, Q)
    assert transformer._padded_heads(padded["layers"][0], cache_shape) == H + PAD // Q
    assert transformer._padded_heads(padded["layers"][0], cache_shape[:3] + (2, Q)) is None  # two kv heads: XLA pads
    assert transformer._padded_heads(_unpadded(padded)["layers"][0], cache_shape) is None
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "xla")
    ref = prefill_and_decode_logits(padded, config)
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    from meshserve.model import decode_attention as da

    seen = []

    def observed(kernel):  # what each decode step asks of the kernel, and the width it gets back
        def call(*args, **kwargs):
            out = kernel(*args, **kwargs)
            seen.append(
                (kernel.__name__, kwargs.get("out_heads"), (out[0] if isinstance(out, tuple) else out).shape[2])
            )
            return out

        return call

    # Head dim 64: the layers take the kernel that rotates q and k itself (transformer._rotates_in_kernel).
    for name in ("decode_attention", "decode_attention_rotating"):
        monkeypatch.setattr(da, name, observed(getattr(da, name)))
    got = prefill_and_decode_logits(padded, config)
    heads = H + PAD // Q  # every layer of every step: 72 heads out
    assert seen and set(seen) == {("decode_attention_rotating", heads, heads)}, seen
    for r, g in zip(ref[1:], got[1:], strict=True):  # the decode steps (prefill never takes the kernel)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=3e-2 * np.abs(r).max())
