"""A parallel block's unrolled layers fuse wo and w_down into one wo_down [H·Q + F (+ zero rows), E]
(`params.unstack_layers`), run as one matmul by `layers.parallel_output`: its logits are those of the same layers
with the two projections apart, biases included; serial blocks and int8 weights keep them apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import params as params_module
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers
from meshserve.model.quant import QuantizedArray
from model_helpers import prefill_and_decode_logits


def _model(weights: str, **overrides):
    config = get_config("tiny-falcon", **overrides)
    params = cast_params(config, init_params(config, jax.random.key(0), jnp.float32), weights)
    for i, name in enumerate(("bo", "b_down")):  # declared zero: random, so a bias dropped or added twice would show
        if name in params["layers"]:
            noise = 0.1 * jax.random.normal(jax.random.key(20 + i), params["layers"][name].shape)
            params["layers"][name] = noise.astype(params["embed"].dtype)
    return config, params


def _split_out(config, unrolled):
    """Per-layer trees with wo_down cut back into wo [H, Q, E] and w_down [F, E] (its zero rows dropped)."""
    H, Q, F = config.n_heads, config.d_head, config.d_ff
    layers = []
    for layer in unrolled["layers"]:
        layer = dict(layer)
        w = layer.pop("wo_down")
        layer["wo"], layer["w_down"] = w[: H * Q].reshape(H, Q, -1), w[H * Q : H * Q + F]
        layers.append(layer)
    return dict(unrolled, layers=layers)


def test_unstack_stacks_wo_and_w_down_on_the_contracted_axis():
    config, params = _model("f32")
    H, Q, E, F = config.n_heads, config.d_head, config.d_model, config.d_ff
    unrolled = unstack_layers(params)
    for i, layer in enumerate(unrolled["layers"]):
        assert not {"wo", "w_down"} & set(layer) and layer["wo_down"].shape == (H * Q + F, E)
        np.testing.assert_array_equal(layer["wo_down"][: H * Q], params["layers"]["wo"][i].reshape(H * Q, E))
        np.testing.assert_array_equal(layer["wo_down"][H * Q :], params["layers"]["w_down"][i])


def test_a_large_fused_weight_gets_zero_rows_to_a_multiple_of_256():
    """falcon-7b's 71·64 + 18176 = 22720 rows become 22784; a small weight, or one already a multiple, none."""
    assert params_module._out_padding(71 * 64 + 18176) == 64
    assert params_module._out_padding(4096 + 16384) == 0 and params_module._out_padding(320) == 0
    wo, w_down = jnp.ones((3, 8, 4)), 2 * jnp.ones((4072, 4))  # 24 + 4072 = 4096 rows: a multiple already
    assert params_module._fuse_out(wo, w_down).shape == (4096, 4)
    fused = params_module._fuse_out(wo, 2 * jnp.ones((4080, 4)))  # 4104 rows -> 4352
    assert fused.shape == (4352, 4) and not fused[4104:].any() and (fused[24:4104] == 2).all()


@pytest.mark.parametrize(("weights", "pad"), [("f32", 0), ("bf16", 0), ("f32", 64)])
def test_fused_logits_equal_the_split_ones(monkeypatch, weights, pad):
    """Prefill and decode over wo_down (with and without zero rows; linear biases bo and b_down both added) equal
    the same unrolled layers with wo and w_down apart, to float32 rounding even in bf16 (one matmul's sum where two
    were added), and the stacked scan's to the compute dtype's rounding."""
    monkeypatch.setattr(params_module, "_out_padding", lambda rows: pad)
    config, params = _model(weights, linear_bias=True)
    fused = unstack_layers(params)
    assert fused["layers"][0]["wo_down"].shape[0] == config.n_heads * config.d_head + config.d_ff + pad
    split = _split_out(config, fused)
    tol = 1e-5 if weights == "f32" else 3e-2
    for scan, apart, got in zip(
        prefill_and_decode_logits(params, config),
        prefill_and_decode_logits(split, config),
        prefill_and_decode_logits(fused, config),
        strict=True,
    ):
        np.testing.assert_allclose(got, apart, rtol=tol, atol=tol)
        np.testing.assert_allclose(got, scan, rtol=tol, atol=tol)


def test_serial_blocks_and_int8_keep_wo_and_w_down_apart():
    """A serial block adds attention and the MLP at two residuals (their projections cannot share a matmul); int8
    weights each carry their own per-output-channel scale."""
    serial = get_config("tiny", parallel_block=False)
    layer = unstack_layers(init_params(serial, jax.random.key(1)))["layers"][0]
    assert {"wo", "w_down"} <= set(layer) and "wo_down" not in layer
    config, params = _model("int8")
    layer = unstack_layers(params)["layers"][0]
    assert isinstance(layer["wo"], QuantizedArray) and isinstance(layer["w_down"], QuantizedArray)
    assert "wo_down" not in layer and "wqkv" in layer


def test_consuming_unstack_deletes_the_stacked_wo_and_w_down():
    config, params = _model("bf16")
    expected = jax.device_get(unstack_layers(params)["layers"])
    stacked = [params["layers"]["wo"], params["layers"]["w_down"]]
    unrolled = unstack_layers(params, consume=True)
    assert all(leaf.is_deleted() for leaf in stacked)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(unrolled["layers"])), jax.tree_util.tree_leaves(expected),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
