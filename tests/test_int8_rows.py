"""MESHSERVE_INT8_MATMUL=rowsum: int8 weights stored contracted-axes-last (model/int8_rows.py) compute what the
declared layout computes, through the row reduction for a few rows and the stored-letters einsum otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_cli
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.int8_rows import ROWSUM_MAX_ROWS, rows_einsum, rows_first
from meshserve.model.params import cast_params, init_params, unstack_layers
from meshserve.model.quant import dequantize, einsum, quantize


def _int8_layers(name: str, seed: int):
    config = get_config(name)
    params = cast_params(config, init_params(config, jax.random.key(seed), jnp.float32), "int8")
    return config, params


def test_rows_first_stores_contracted_axes_last_and_keeps_the_declared_weight():
    w = quantize(jax.random.normal(jax.random.key(0), (6, 1, 5)), contract_axes=(0,))  # like MQA's wk [E, K=1, Q]
    t = rows_first(w)
    assert t.perm == (1, 2, 0) and t.values.shape == (1, 5, 6) and t.shape == (6, 1, 5)
    assert t.scale.shape == w.scale.shape and rows_first(t) is t
    np.testing.assert_array_equal(dequantize(t), dequantize(w))


@pytest.mark.parametrize("rows", [1, 3, ROWSUM_MAX_ROWS + 1, 12])
@pytest.mark.parametrize(
    ("subscripts", "x_shape", "w_shape", "contract"),
    [
        ("bte,ef->btf", (1, -1, 16), (16, 24), (0,)),  # MLP in
        ("bte,ekq->btkq", (1, -1, 16), (16, 1, 8), (0,)),  # MQA key projection, one kv head
        ("bthq,hqe->bte", (1, -1, 4, 8), (4, 8, 16), (0, 1)),  # attention out: two contracted axes
    ],
)
def test_rows_einsum_equals_the_declared_layout(rows, subscripts, x_shape, w_shape, contract):
    """A few rows take the row reduction, more the stored-letters einsum; both give the declared einsum's result."""
    kx, kw = jax.random.split(jax.random.key(rows))
    x = jax.random.normal(kx, tuple(rows if d == -1 else d for d in x_shape), jnp.float32)
    w = quantize(jax.random.normal(kw, w_shape), contract_axes=contract)
    expected = einsum(subscripts, x, w)
    got = rows_einsum(subscripts, x, rows_first(w), jnp.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda x: einsum(subscripts, x, rows_first(w)))(x))
    assert ("dot_general" in jaxpr) == (rows > ROWSUM_MAX_ROWS)  # the reduction has no dot; a GEMM does


@pytest.mark.parametrize("rows", [1, 12])
@pytest.mark.parametrize(
    ("subscripts", "x_shape", "w_shape", "contract"),
    [
        ("bte,ef->btf", (1, -1, 16), (16, 24), (0,)),
        ("bthq,hqe->bte", (1, -1, 4, 8), (4, 8, 16), (0, 1)),
    ],
)
def test_w8a8_over_rows_first_weights_is_the_declared_w8a8_without_a_transpose(
    monkeypatch, rows, subscripts, x_shape, w_shape, contract
):
    """MESHSERVE_INT8_MATMUL=w8a8 stores unrolled int8 weights rows-first too (`int8_rows_layout`): its int8 x int8
    einsum runs over the stored letters, K minor in both operands (the declared [K, N] layout made XLA copy every
    weight transposed), at any row count, with the declared layout's result."""
    from meshserve.model.quant import int8_rows_layout, w8a8_einsum

    for mode, rows_layout in (("xla", False), ("pallas", False), ("rowsum", True), ("w8a8", True)):
        monkeypatch.setenv("MESHSERVE_INT8_MATMUL", mode)
        assert int8_rows_layout() is rows_layout
    kx, kw = jax.random.split(jax.random.key(rows))
    x = jax.random.normal(kx, tuple(rows if d == -1 else d for d in x_shape), jnp.float32)
    w = quantize(jax.random.normal(kw, w_shape), contract_axes=contract)
    expected = w8a8_einsum(subscripts, x, w)
    got = rows_einsum(subscripts, x, rows_first(w), jnp.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, jnp.einsum(subscripts, x, dequantize(w)), rtol=1e-4, atol=1e-4)  # x quantised too
    jaxpr = jax.make_jaxpr(lambda x: rows_einsum(subscripts, x, rows_first(w), jnp.float32))(x).jaxpr
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    (_, rhs_contract), _ = dot.params["dimension_numbers"]
    assert dot.invars[1].aval.dtype == jnp.int8 and tuple(rhs_contract) == tuple(
        range(len(w_shape) - len(contract), len(w_shape))
    )


@pytest.mark.parametrize(("name", "mode"), [("tiny", "rowsum"), ("tiny-falcon", "rowsum"), ("tiny-falcon", "w8a8")])
def test_a_model_over_rows_first_weights_gives_the_declared_layouts_logits(monkeypatch, name, mode):
    """Prefill (many rows: the einsum) and a batch-2 decode step (the row reduction) over every int8 weight; under
    w8a8 both layouts quantise the activations, and both steps run the int8 x int8 einsum."""
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", mode)
    config, params = _int8_layers(name, 5)
    declared = unstack_layers(params)
    rows = unstack_layers(params, int8_rows=True)
    assert all(w.perm is not None for w in jax.tree_util.tree_leaves(rows["layers"], is_leaf=_is_q) if _is_q(w))
    tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, config.vocab_size)
    lengths = jnp.array([10, 7], jnp.int32)
    outs = []
    for p in (declared, rows):
        logits, k, v = transformer.prefill(p, config, tokens, lengths)
        cache = transformer.insert(transformer.init_cache(config, 2, 16, k.dtype), k, v, lengths, jnp.arange(2))
        step, _ = transformer.decode_step(p, config, jnp.array([3, 4], jnp.int32), cache)
        outs.append((logits, step))
    for want, got in zip(*outs, strict=True):
        # rowsum rounds its float32 sum once; the declared layout's XLA path rounds the product to bf16 before the
        # scale (quant._convert_einsum), so the two meet to bf16's resolution; w8a8 runs the same integer sums
        tol = 2e-2 if mode == "rowsum" else 2e-4
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _is_q(x) -> bool:
    from meshserve.model.quant import QuantizedArray

    return isinstance(x, QuantizedArray)


def test_consuming_unstack_with_int8_rows_frees_the_stacked_weights():
    config, params = _int8_layers("tiny", 7)
    stacked = jax.tree_util.tree_leaves(params["layers"])
    unrolled = unstack_layers(params, consume=True, int8_rows=True)
    assert all(leaf.is_deleted() for leaf in stacked)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(unrolled))


def test_bench_runs_and_labels_rowsum_only_over_unrolled_layers(capsys, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")  # bench sets it from --int8-matmul: restored after the test

    for layers, label in (("unrolled", "rowsum"), ("scan", "xla")):
        out = tmp_path / f"{layers}.json"
        code, _, err = run_cli(capsys, "bench", "--model", "tiny", "--batch", "1", "--prompt-len", "8", "--gen-len",
                               "4", "--weights", "int8", "--int8-matmul", "rowsum", "--layers", layers, "--json",
                               "--repeats", "1", "--out", str(out))  # fmt: skip
        assert code == 0, err
        (row,) = json.loads(out.read_text())
        assert row["int8_matmul"] == label and row["decode_step_ms"] > 0


def test_weights_stored_rows_first_are_not_saved_as_a_checkpoint(tmp_path):
    """A checkpoint holds the declared layout: saving transposed values would load as wrong weights."""
    from meshserve.model.checkpoint import save_checkpoint

    config, params = _int8_layers("tiny", 8)
    params["layers"] = jax.tree_util.tree_map(
        lambda x: rows_first(x) if _is_q(x) else x, params["layers"], is_leaf=_is_q
    )
    with pytest.raises(ValueError, match="contracted-axes-last"):
        save_checkpoint(tmp_path / "ckpt", config, params, weights="int8")
    assert list(tmp_path.iterdir()) == []  # no checkpoint and no temporary directory left behind


def test_a_server_over_rows_first_int8_weights_answers_as_the_declared_layout(tmp_path, monkeypatch):
    """`serve --weights int8 --layers unrolled` with MESHSERVE_INT8_MATMUL=rowsum: its start line names the matmul,
    and a greedy request over gRPC gets the tokens in-process generation gives over the declared layout (log-probs
    to float32 summation order)."""
    from meshserve.model.generate import generate
    from meshserve.model.loading import load_model
    from meshserve.serving.client import Client
    from test_serving_support import ServerProcess, make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "rowsum")
    server = ServerProcess(checkpoint, "--weights", "int8", "--layers", "unrolled")
    try:
        assert "(int8, int8 matmul rowsum," in server.output() and "unrolled layers" in server.output()
        prompt = [5, 17, 3, 9]
        with Client(server.target) as client:
            got = client.generate(prompt, max_new_tokens=6, ignore_eos=True, timeout=60)
    finally:
        server.close()
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "xla")
    model = load_model(checkpoint, weights="int8")
    (ref,) = generate(model.params, model.config, [prompt], max_new_tokens=6)  # no stop ids: as ignore_eos
    assert got.tokens == list(ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-3, atol=1e-3)


def test_xla_is_the_default_int8_matmul_on_cuda_too(monkeypatch):
    """Unset (or empty) MESHSERVE_INT8_MATMUL: xla on every platform (rowsum tied it at batch 1 and lost at 64 in
    the whole model on an H200), without asking which device is there; a set value wins, and rowsum labels XLA's
    path over stacked layers."""
    from meshserve.model import quant

    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "")

    def no_device_query() -> bool:
        raise AssertionError("the default int8 path must not start the backend")

    monkeypatch.setattr(quant, "on_cuda", no_device_query)
    assert quant.int8_matmul_mode() == "xla" and not quant.int8_rows_layout()
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "rowsum")
    assert quant.int8_matmul_mode() == "rowsum" and quant.int8_rows_layout()
    assert quant.int8_matmul_label(unrolled_layers=True) == "rowsum"
    assert quant.int8_matmul_label(unrolled_layers=False) == "xla"
