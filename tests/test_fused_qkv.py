"""Unrolled layers fuse wq, wk, wv into one wqkv [E, H + 2K, Q] (`params.unstack_layers`), run as one matmul by
`layers.qkv_projection`: the logits are those of the stacked weights (lax.scan) and of unfused per-layer weights,
for MQA and GQA, f32, bf16 and int8 (every int8 matmul mode that runs on a CPU); readers that need the declared
q/k/v (checkpoints, meshes) refuse the fused tree in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers
from meshserve.model.quant import QuantizedArray, dequantize
from model_helpers import prefill_and_decode_logits

MODELS = {
    "mqa": ("tiny-falcon", {}),  # K = 1, parallel block
    "gqa": ("tiny", {"n_kv_heads": 4}),
    "qwen-like": ("tiny", {"n_kv_heads": 2, "qk_norm": True, "qkv_bias": True}),  # head norms and q/k/v biases
    "gemma3": ("tiny-gemma3", {}),  # head norms with the 1 + w scale, windows, a local rotary base
}


def _is_q(x) -> bool:
    return isinstance(x, QuantizedArray)


def _model(key: str, weights: str, seed: int = 0):
    name, overrides = MODELS[key]
    config = get_config(name, **overrides)
    params = cast_params(config, init_params(config, jax.random.key(seed), jnp.float32), weights)
    if "bq" in params["layers"]:  # declared zero: random, so that a bias added to the wrong head would show
        for i, b in enumerate(("bq", "bk", "bv")):
            shape = params["layers"][b].shape
            params["layers"][b] = 0.1 * jax.random.normal(jax.random.key(100 + i), shape).astype(params["embed"].dtype)
    if "q_norm" in params["layers"]:  # declared ones (or zeros under 1 + w): random, so q's and k's differ
        for i, n in enumerate(("q_norm", "k_norm")):
            scale = params["layers"][n]["scale"]
            noise = 0.3 * jax.random.normal(jax.random.key(110 + i), scale.shape)
            params["layers"][n] = {"scale": (scale.astype(jnp.float32) + noise).astype(scale.dtype)}
    return config, params


def _unfused(config, unrolled):
    """Per-layer trees with wqkv cut back into wq, wk, wv (declared layout): the unrolled model before fusion."""
    H, K = config.n_heads, config.n_kv_heads
    layers = []
    for layer in unrolled["layers"]:
        layer = dict(layer)
        w = layer.pop("wqkv")
        for name, lo, hi in (("wq", 0, H), ("wk", H, H + K), ("wv", H + K, H + 2 * K)):
            layer[name] = QuantizedArray(w.values[:, lo:hi], w.scale[:, lo:hi]) if _is_q(w) else w[:, lo:hi]
        layers.append(layer)
    return dict(unrolled, layers=layers)


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_unstack_fuses_each_layers_q_k_v_on_the_heads_axis(weights):
    """wqkv holds wq, then wk, then wv, exactly (int8: values and per-channel scales alike); nothing else changes."""
    config, params = _model("gqa", weights)
    H, K, E, Q = config.n_heads, config.n_kv_heads, config.d_model, config.d_head
    unrolled = unstack_layers(params)
    for i, layer in enumerate(unrolled["layers"]):
        assert not {"wq", "wk", "wv"} & set(layer) and layer["wqkv"].shape == (E, H + 2 * K, Q)
        got = dequantize(layer["wqkv"]) if _is_q(layer["wqkv"]) else layer["wqkv"]
        for name, lo, hi in (("wq", 0, H), ("wk", H, H + K), ("wv", H + K, H + 2 * K)):
            w = params["layers"][name]
            want = dequantize(QuantizedArray(w.values[i], w.scale[i])) if _is_q(w) else w[i]
            np.testing.assert_array_equal(got[:, lo:hi], want)
        w_up = params["layers"]["w_up"]
        np.testing.assert_array_equal(layer["w_up"].values if _is_q(w_up) else layer["w_up"],
                                      (w_up.values if _is_q(w_up) else w_up)[i])  # fmt: skip
    if weights == "int8":
        assert unrolled["layers"][0]["wqkv"].scale.shape == (1, H + 2 * K, Q)
        rows = unstack_layers(params, int8_rows=True)["layers"][0]["wqkv"]  # stored contracted-axes-last, fused
        assert rows.perm == (1, 2, 0) and rows.values.shape == (H + 2 * K, Q, E)
        np.testing.assert_array_equal(dequantize(rows), dequantize(unrolled["layers"][0]["wqkv"]))


@pytest.mark.parametrize(
    ("model", "weights"),
    # Each model and each weight kind at least once (the suite's time: every case compiles two models).
    [("mqa", "bf16"), ("mqa", "int8"), ("gqa", "f32"), ("gqa", "int8"), ("qwen-like", "f32"),
     ("qwen-like", "int8"), ("gemma3", "bf16")],
)  # fmt: skip
def test_fused_logits_equal_the_stacked_and_the_unfused_ones(model, weights):
    """Prefill and decode over fused unrolled weights: the unfused unrolled model's logits (the same compiled
    layer loop but for the q/k/v matmul, so to float32 rounding even in bf16), and the scan's to the compute
    dtype's rounding (16-bit compute: XLA rounds the unrolled and the scanned loop's intermediates differently)."""
    config, params = _model(model, weights, seed=3)
    fused = unstack_layers(params)
    want_scan, want_unfused, got = (
        prefill_and_decode_logits(params, config),
        prefill_and_decode_logits(_unfused(config, fused), config),
        prefill_and_decode_logits(fused, config),
    )
    tol = 1e-5 if weights == "f32" else 2e-2
    for scan, unfused, logits in zip(want_scan, want_unfused, got, strict=True):
        np.testing.assert_allclose(logits, unfused, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits, scan, rtol=tol, atol=tol)


@pytest.mark.parametrize(("mode", "model"), [("w8a8", "qwen-like"), ("rowsum", "mqa"), ("rowsum", "qwen-like")])
def test_int8_matmul_modes_run_the_fused_weight(monkeypatch, mode, model):
    """w8a8 (activations quantised per row: the same rows whether q, k, v are one matmul or three) and rowsum (the
    fused weight stored contracted-axes-last: the row reduction at decode, the stored-letters einsum at prefill)."""
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", mode)
    config, params = _model(model, "int8", seed=4)
    fused = unstack_layers(params, int8_rows=mode == "rowsum")
    unfused = _unfused(config, unstack_layers(params))
    for want, got in zip(
        prefill_and_decode_logits(unfused, config), prefill_and_decode_logits(fused, config), strict=True
    ):
        # rowsum rounds its float32 sum once; the declared layout's XLA path rounds the product to bf16 before the
        # scale (quant._convert_einsum), so the two meet to bf16's resolution; w8a8 runs the same integer sums
        tol = 2e-2 if mode == "rowsum" else 2e-4
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_pallas_default_configs_tile_the_fused_shapes():
    """MESHSERVE_INT8_MATMUL=pallas (GPU only) runs wqkv as x [M, E] @ w [E, (H + 2K) Q]: without a tuning file the
    default config must tile that N (a tuning file without the shape takes XLA's path: int8_probe lists wqkv)."""
    from meshserve.model.int8_kernel import default_config

    for name in ("falcon-7b", "qwen3-8b", "llama-2-70b", "gemma3-1b"):
        c = get_config(name)
        for m in (1, 8, 64):
            default_config(m, c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.d_head).check(
                m, c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.d_head
            )


def test_consuming_unstack_deletes_the_stacked_q_k_v_and_keeps_the_fused_values():
    config, params = _model("mqa", "int8", seed=5)
    expected = jax.device_get(unstack_layers(params)["layers"])
    stacked = jax.tree_util.tree_leaves([params["layers"][n] for n in ("wq", "wk", "wv")])
    unrolled = unstack_layers(params, consume=True)
    assert stacked and all(leaf.is_deleted() for leaf in stacked)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(unrolled))
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(unrolled["layers"])), jax.tree_util.tree_leaves(expected),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_fused_weights_are_refused_by_checkpoints_and_meshes(tmp_path):
    """A checkpoint and every mesh layout hold the declared wq, wk, wv: each refuses unrolled, fused params in one
    line, before writing anything."""
    from meshserve.model import sharded
    from meshserve.model.checkpoint import save_checkpoint

    config, params = _model("mqa", "f32")
    unrolled = unstack_layers(params)
    with pytest.raises(ValueError, match=r"^fused weights \(wo_down, wqkv\) cannot be saved: save the params before "):
        save_checkpoint(tmp_path / "ckpt", config, unrolled, "f32")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"^a mesh runs the stacked layers: these are unrolled") as err:
        sharded.param_specs(config, "ws2d", unrolled)
    assert "\n" not in str(err.value)
