"""`quant.concat_einsum`: a decode layer's input weights as one GEMM over their concatenation (16-bit, or int8
values left unscaled with each weight's scale returned), and where it must refuse so that `quant.einsum`'s own path
(a tuned Pallas kernel, colsum, w8a8, a transposed layout) runs instead."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import quant
from meshserve.model.config import get_config
from meshserve.model.int8_kernel import tuning_key
from meshserve.model.params import cast_params, init_params, unstack_layers

CONFIG = get_config("tiny").replace(d_head=32, n_kv_heads=2)  # a parallel SwiGLU block: wqkv, w_gate, w_up


def _layer(weights: str, int8_rows: bool = False) -> dict:
    params = cast_params(CONFIG, init_params(CONFIG, jax.random.key(4), jnp.float32), weights)
    return unstack_layers(params, int8_rows=int8_rows)["layers"][0]


def _x(p: dict) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (2, 1, p["wqkv"].shape[0]), jnp.float32).astype(jnp.bfloat16)


def test_16_bit_weights_are_one_gemm_over_their_concatenation():
    p = _layer("bf16")
    x = _x(p)
    y, scales = quant.concat_einsum(x, [p["wqkv"], p["w_up"]])
    assert scales == [None, None]
    want = jnp.concatenate([quant.einsum("BTE,EHQ->BTHQ", x, p["wqkv"]).reshape(2, 1, -1),
                            quant.einsum("BTE,EF->BTF", x, p["w_up"])], axis=-1)  # fmt: skip
    assert y.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_int8_product_scaled_after_equals_einsum_bit_for_bit(monkeypatch):
    """XLA's int8 path: the unscaled product, each part then scaled by `scaled_output`, is `quant.einsum`'s result
    exactly (the product rounded to bf16, times the scale in float32, rounded again)."""
    monkeypatch.delenv("MESHSERVE_INT8_MATMUL", raising=False)
    p = _layer("int8")
    x = _x(p)
    names = ("wqkv", "w_gate", "w_up")
    y, scales = quant.concat_einsum(x, [p[n] for n in names])
    widths = [int(np.prod(p[n].shape[1:])) for n in names]
    parts = jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
    assert [s.shape for s in scales] == [(w,) for w in widths]
    for name, part, scale in zip(names, parts, scales, strict=True):
        subscripts = "BTE,EHQ->BTHQ" if name == "wqkv" else "BTE,EF->BTF"
        want = quant.einsum(subscripts, x, p[name]).reshape(part.shape)
        np.testing.assert_array_equal(np.asarray(quant.scaled_output(part, scale)), np.asarray(want), err_msg=name)
    assert not np.array_equal(np.asarray(parts[0]), np.asarray(quant.scaled_output(parts[0], scales[0])))


def _tuning(tmp_path, choices: dict[str, dict]) -> str:
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"model": "tiny", "device": "test", "configs": choices}))
    return str(path)


@pytest.mark.parametrize(
    ("mode", "tuned", "merged", "alone"),
    [
        ("xla", None, True, True),
        ("pallas", None, False, False),  # untuned: every decode-sized shape takes the kernel's default config
        ("pallas", {"qkv": "xla", "mlp": "xla"}, True, True),  # measured: XLA's path everywhere
        ("pallas", {"qkv": "xla", "mlp": "colsum"}, False, True),  # the MLP's matmul is colsum's
        ("pallas", {"qkv": "colsum", "mlp": "xla"}, False, False),
        ("w8a8", None, False, False),  # int8 activations: other numerics
        ("rowsum", None, False, False),  # weights stored [N, K]
    ],
)
def test_int8_merges_only_where_einsum_takes_xlas_path(monkeypatch, tmp_path, mode, tuned, merged, alone):
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", mode)
    monkeypatch.delenv("MESHSERVE_INT8_TUNING", raising=False)
    p = _layer("int8", int8_rows=quant.int8_rows_layout())
    x = _x(p)
    if tuned is not None:
        E, n_qkv, F = x.shape[-1], int(np.prod(p["wqkv"].shape[1:])), p["w_up"].shape[-1]
        monkeypatch.setenv("MESHSERVE_INT8_TUNING", _tuning(tmp_path, {
            tuning_key(2, E, n_qkv): {"form": tuned["qkv"]}, tuning_key(2, E, F): {"form": tuned["mlp"]}}))  # fmt: skip
    assert (quant.concat_einsum(x, [p["wqkv"], p["w_gate"], p["w_up"]]) is not None) == merged
    assert (quant.concat_einsum(x, [p["wqkv"]]) is not None) == alone


def test_mixed_kinds_are_not_merged(monkeypatch):
    monkeypatch.delenv("MESHSERVE_INT8_MATMUL", raising=False)
    p, p16 = _layer("int8"), _layer("bf16")
    assert quant.concat_einsum(_x(p), [p["wqkv"], p16["w_up"]]) is None


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_gated_mlp_takes_gate_and_up_from_one_gemm(monkeypatch, weights):
    """`layers.mlp_activation` of a gated MLP (no projections given) runs one GEMM over [w_gate, w_up], and its
    activation equals the two einsums' bit for bit (bf16; int8 on XLA's path, each scaled as einsum scales)."""
    from meshserve.model import layers

    monkeypatch.delenv("MESHSERVE_INT8_MATMUL", raising=False)
    config = CONFIG.replace(parallel_block=False)
    p = _layer(weights)
    x = _x(p)
    calls = []

    def counted(x, ws):
        calls.append(len(ws))
        return quant.concat_einsum(x, ws)

    monkeypatch.setattr(layers, "concat_einsum", counted)
    got = layers.mlp_activation(x, p, config)
    assert calls == [2]
    gate, up = (quant.einsum("BTE,EF->BTF", x, p[name]) for name in ("w_gate", "w_up"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(layers.gate_activation(gate, config) * up))
