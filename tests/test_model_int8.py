"""int8 weights: per-output-channel scales, the one einsum path, and a whole model run in int8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.errors import UserError
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, params_nbytes
from meshserve.model.quant import QuantizedArray, dequantize, einsum, quantize


def test_quantize_is_per_output_channel_and_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (16, 4, 8)) * jnp.arange(1, 9)  # channels of different ranges
    q = quantize(w, contract_axes=[0])
    assert q.values.dtype == jnp.int8 and q.scale.shape == (1, 4, 8)
    assert int(jnp.max(jnp.abs(q.values))) == 127
    err = jnp.abs(dequantize(q) - w)
    assert bool(jnp.all(err <= q.scale.astype(jnp.float32) * 0.5 + 1e-6))


def test_int8_einsum_equals_einsum_of_the_dequantized_weight():
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))  # [B, T, H, Q]
    w = jax.random.normal(jax.random.key(2), (4, 8, 16))  # [H, Q, E]
    q = quantize(w, contract_axes=[0, 1])
    np.testing.assert_allclose(
        einsum("BTHQ,HQE->BTE", x, q), jnp.einsum("BTHQ,HQE->BTE", x, dequantize(q)), rtol=1e-5, atol=1e-5
    )
    # A scale on a non-trailing output axis, with output axes reordered relative to the weight.
    w2 = jax.random.normal(jax.random.key(3), (16, 4, 8))  # [E, H, Q]
    q2 = quantize(w2, contract_axes=[0])
    y = jax.random.normal(jax.random.key(4), (2, 3, 16))
    np.testing.assert_allclose(
        einsum("BTE,EHQ->BQTH", y, q2), jnp.einsum("BTE,EHQ->BQTH", y, dequantize(q2)), rtol=1e-5, atol=1e-5
    )


def test_int8_model_quantizes_matmuls_keeps_embedding_and_stays_close():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    q = cast_params(config, params, "int8")
    assert isinstance(q["layers"]["wq"], QuantizedArray) and isinstance(q["layers"]["w_down"], QuantizedArray)
    assert q["embed"].dtype == jnp.bfloat16 and not isinstance(q["embed"], QuantizedArray)
    bf16 = cast_params(config, params, "bf16")
    assert params_nbytes(q) < 0.75 * params_nbytes(bf16)
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, config.vocab_size)
    lengths = jnp.asarray([16, 9])
    ref, _, _ = transformer.prefill(params, config, tokens, lengths, all_logits=True)
    got, _, _ = transformer.prefill(q, config, tokens, lengths, all_logits=True)
    top1 = jnp.mean((jnp.argmax(ref[0], -1) == jnp.argmax(got[0], -1)).astype(jnp.float32))
    assert float(top1) >= 0.9
    assert float(jnp.max(jnp.abs(ref - got))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_w8a8_quantizes_each_token_and_multiplies_in_integers(monkeypatch):
    """MESHSERVE_INT8_MATMUL=w8a8: int8 x int8 -> int32 dots, within the activations' rounding of the dequantized
    product; an einsum of another form (output axes reordered) keeps the float path; a typo'd mode is refused."""
    x = jax.random.normal(jax.random.key(6), (2, 3, 64)) * jnp.arange(1, 4)[None, :, None]  # rows of other ranges
    q = quantize(jax.random.normal(jax.random.key(7), (64, 32)), contract_axes=[0])
    exact = jnp.einsum("BTE,EF->BTF", x, dequantize(q))
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "w8a8")
    got = einsum("BTE,EF->BTF", x, q)
    row_err = jnp.linalg.norm(got - exact, axis=-1) / jnp.linalg.norm(exact, axis=-1)  # [B, T]
    assert float(jnp.max(row_err)) < 1e-2 and float(jnp.min(row_err)) > 1e-5  # every token rounded, none badly
    # Each token has its own scale: a row 1000x smaller than the others keeps its precision (one scale for the
    # whole tensor would round it to a few levels).
    tiny_row = x.at[0, 0].multiply(1e-3)
    tiny_err = jnp.linalg.norm(einsum("BTE,EF->BTF", tiny_row, q)[0, 0] - (tiny_row @ dequantize(q))[0, 0])
    assert float(tiny_err / jnp.linalg.norm((tiny_row @ dequantize(q))[0, 0])) < 1e-2
    dots = [e for e in jax.make_jaxpr(lambda a: einsum("BTE,EF->BTF", a, q))(x).jaxpr.eqns if "dot" in e.primitive.name]
    assert [(str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype)) for e in dots] == [("int8", "int8")]
    w2 = quantize(jax.random.normal(jax.random.key(3), (64, 4, 8)), contract_axes=[0])
    np.testing.assert_allclose(einsum("BTE,EHQ->BQTH", x, w2), jnp.einsum("BTE,EHQ->BQTH", x, dequantize(w2)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, config.vocab_size)
    ref, _, _ = transformer.prefill(params, config, tokens, jnp.asarray([16, 9]), all_logits=True)
    got, _, _ = transformer.prefill(cast_params(config, params, "int8"), config, tokens, jnp.asarray([16, 9]),
                                    all_logits=True)  # fmt: skip
    assert float(jnp.mean((jnp.argmax(ref[0], -1) == jnp.argmax(got[0], -1)).astype(jnp.float32))) >= 0.9
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "int4")
    with pytest.raises(UserError, match="MESHSERVE_INT8_MATMUL must be one of xla, pallas, w8a8, rowsum, got 'int4'"):
        einsum("BTE,EF->BTF", x, q)
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "")  # `MESHSERVE_INT8_MATMUL= meshserve ...`: unset, the default
    from meshserve.model.quant import int8_matmul_mode

    assert int8_matmul_mode() == "xla"


def test_a_bad_int8_matmul_mode_stops_a_job_at_start_whatever_the_weights(tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "int4")
    code, _, err = run_cli(capsys, "batch-generate", str(src), "-o", str(out), "--model", "tiny", "--weights", "bf16")
    assert code == 2 and "MESHSERVE_INT8_MATMUL must be one of xla, pallas, w8a8, rowsum, got 'int4'" in err
    assert "Traceback" not in err and not out.exists()


def test_pallas_mode_routes_a_colsum_shape_to_colsum_on_a_gpu(tmp_path, monkeypatch):
    """With MESHSERVE_INT8_MATMUL=pallas on CUDA (faked: platform_dependent takes its cuda branch), a shape the tuning
    file marks colsum runs colsum_matmul for real (no dot in the trace, output checked against float64); a shape it
    does not name keeps XLA's convert + GEMM."""
    import json

    from meshserve.model import int8_kernel

    q = quantize(jax.random.normal(jax.random.key(8), (142, 96)), contract_axes=[0])  # [E, F], falcon-like odd E
    x = jax.random.normal(jax.random.key(9), (1, 2, 142), jnp.bfloat16)  # [B, T, E]: 2 rows, bucket 2
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"model": "tiny", "device": "gpu", "configs": {"2x142x96": {"form": "colsum"}}}))
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "pallas")
    monkeypatch.setenv("MESHSERVE_INT8_TUNING", str(path))
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: cuda(*args))

    def dots(a):
        jaxpr = jax.make_jaxpr(lambda a: einsum("BTE,EF->BTF", a, q))(a).jaxpr
        return [e for e in jaxpr.eqns if "dot" in e.primitive.name]

    int8_kernel.load_tuning.cache_clear()
    try:
        assert dots(x) == []  # colsum: a multiply and a reduction
        got = einsum("BTE,EF->BTF", x, q, out_dtype=jnp.float32)
        ref = np.asarray(x, np.float64) @ np.asarray(dequantize(q), np.float64)
        assert got.shape == (1, 2, 96) and got.dtype == jnp.float32
        assert np.max(np.abs(np.asarray(got, np.float64) - ref)) <= 1e-5 * np.max(np.abs(ref))
        assert len(dots(x[:, :1])) == 1  # 1 row: bucket 1 is not in the file, so XLA's GEMM
        monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")
        assert len(dots(x)) == 1  # the file only counts under pallas
    finally:
        int8_kernel.load_tuning.cache_clear()
