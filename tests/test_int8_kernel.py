"""The Pallas int8 matmul kernels (model/int8_kernel.py): numerics in interpret mode, Triton lowering, configs.

No GPU here: interpret mode runs the kernel bodies on the CPU for the numbers, and exporting for the `cuda` platform
runs Pallas' Triton lowering (the step that rejects unsupported ops or layouts) without a device. Speed is measured
on a GPU by benchmarks/int8_probe.py, not here.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.errors import UserError
from meshserve.model import int8_kernel
from meshserve.model.config import get_config
from meshserve.model.int8_kernel import (
    COLSUM,
    Int8KernelConfig,
    candidate_configs,
    choose_config,
    colsum_matmul,
    default_config,
    int8_matmul,
)

K, N = 256, 128


def _operands(m: int):
    w = jax.random.randint(jax.random.key(1), (K, N), -127, 128, jnp.int32).astype(jnp.int8)
    scale = jax.random.uniform(jax.random.key(2), (N,), jnp.float32, 0.005, 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
    ref = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)) * np.asarray(scale, np.float64)
    return x, w, scale, ref


@pytest.mark.parametrize(
    "m, config",
    [
        (1, Int8KernelConfig("reduce", bn=32, bk=32)),
        (3, Int8KernelConfig("reduce", bn=64, bk=16, split=4)),  # rows not a power of two, split-K partial sums
        (1, Int8KernelConfig("reduce", bn=32, bk=16, split=16)),  # one K chunk per program
        (8, Int8KernelConfig("mma", bn=32, bk=64, split=2)),
        (64, Int8KernelConfig("mma", bn=64, bk=32)),
    ],
)
def test_kernel_matches_float64_reference(m, config):
    x, w, scale, ref = _operands(m)
    got = np.asarray(int8_matmul(x, w, scale, config=config, interpret=True), np.float64)
    assert got.shape == (m, N)
    # bf16 output: relative error of a few bf16 ulps of the largest value
    assert np.max(np.abs(got - ref)) <= 1e-2 * np.max(np.abs(ref))


@pytest.mark.parametrize("form", ["reduce", "mma"])
def test_kernel_lowers_to_triton_for_cuda(form):
    """Pallas' Triton lowering accepts both kernel bodies (would fail on an unsupported op or block shape)."""
    m = 1 if form == "reduce" else 8
    x, w, scale, _ = _operands(m)
    config = Int8KernelConfig(form, bn=64, bk=32, split=2)
    fn = jax.jit(lambda x, w, s: int8_matmul(x, w, s, config=config))
    exported = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(x, w, scale)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "grid_x = 2" in text and "grid_y = 2" in text  # N/bn column blocks x split slices of K


@pytest.mark.parametrize("preset", ["falcon-7b", "palm-8b"])
def test_default_and_candidate_configs_tile_every_model_matmul(preset):
    c = get_config(preset)
    shapes = [(c.d_model, c.d_ff), (c.d_ff, c.d_model), (c.d_model, c.n_heads * c.d_head), (c.d_model, c.d_head)]
    for k, n in shapes:
        for m in (1, 2, 8, 64):
            configs = candidate_configs(m, k, n)
            assert configs[0] == default_config(m, k, n) and len(configs) == len(set(configs))
            for cfg in configs:
                cfg.check(m, k, n)  # raises if the grid would not tile the matrix exactly
                assert cfg.form == ("reduce" if m <= int8_kernel.REDUCE_MAX_ROWS else "mma")
    # falcon's 4544 x 18176 MLP: enough programs to fill an H100's 132 SMs several times over
    cfg = default_config(1, 4544, 18176)
    assert 18176 // cfg.bn * cfg.split >= 4 * 132


def test_config_check_names_the_problem():
    with pytest.raises(ValueError, match="does not tile"):
        Int8KernelConfig("mma", bn=64, bk=64, split=2).check(8, 4544, 18176)  # 4544 % 128 != 0
    with pytest.raises(ValueError, match="power of two"):
        Int8KernelConfig("reduce", bn=48, bk=32).check(1, 256, 96)
    with pytest.raises(ValueError, match="bn, bk >= 16"):
        Int8KernelConfig("mma", bn=8, bk=64).check(8, 256, 64)
    Int8KernelConfig("reduce", bn=32, bk=64, split=71).check(1, 4544, 18176)  # split need not be a power of two
    with pytest.raises(ValueError, match="at most 4 rows"):
        Int8KernelConfig("reduce", bn=32, bk=32).check(8, 256, 128)


def test_tuning_file_chooses_per_shape(tmp_path, monkeypatch):
    tuned = Int8KernelConfig("reduce", bn=128, bk=16, split=4, warps=8, stages=2)
    path = tmp_path / "tuning.json"
    configs = {"1x256x128": vars(tuned), "8x256x128": {"form": "xla"}}
    path.write_text(json.dumps({"model": "tiny", "device": "cpu", "configs": configs}))
    monkeypatch.setenv("MESHSERVE_INT8_TUNING", str(path))
    int8_kernel.load_tuning.cache_clear()
    assert choose_config(1, 256, 128) == tuned
    assert choose_config(5, 256, 128) is None  # bucket 8 -> XLA was faster there
    assert choose_config(1, 512, 128) is None  # not in the file: never timed on this device, so XLA
    path.write_text("{not json")
    int8_kernel.load_tuning.cache_clear()
    with pytest.raises(UserError, match="MESHSERVE_INT8_TUNING"):
        choose_config(1, 256, 128)
    int8_kernel.load_tuning.cache_clear()


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_colsum_matches_float64_reference_at_odd_shapes(m):
    """XLA's column-reduction form (M <= 4), on falcon-like odd K (71 * 2) and N, in bf16 and in float32 out."""
    k, n = 142, 96
    w = jax.random.randint(jax.random.key(3), (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    scale = jax.random.uniform(jax.random.key(4), (n,), jnp.float32, 0.005, 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(10 + m), (m, k), jnp.bfloat16)
    ref = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)) * np.asarray(scale, np.float64)
    got = colsum_matmul(x, w, scale)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(got, np.float64) - ref)) <= 1e-2 * np.max(np.abs(ref))  # a few bf16 ulps
    # float32 out: float32 accumulation, so far tighter than bf16's rounding
    got32 = np.asarray(colsum_matmul(x, w, scale, out_dtype=jnp.float32), np.float64)
    assert np.max(np.abs(got32 - ref)) <= 1e-5 * np.max(np.abs(ref))
    jaxpr = jax.make_jaxpr(colsum_matmul)(x, w, scale).jaxpr
    assert not [e for e in jaxpr.eqns if "dot" in e.primitive.name]  # a reduction, not a GEMM (the point of it)


def test_colsum_refuses_more_rows_and_is_not_a_kernel_config():
    x, w, scale, _ = _operands(8)
    with pytest.raises(ValueError, match="M <= 4"):
        colsum_matmul(x, w, scale)
    with pytest.raises(ValueError, match="call colsum_matmul"):
        int8_matmul(x[:1], w, scale, config=COLSUM, interpret=True)


def test_tuning_file_colsum_entries_and_unknown_forms(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    configs = {"1x142x96": {"form": "colsum"}, "4x142x96": {"form": "colsum"}, "8x142x96": {"form": "xla"}}
    path.write_text(json.dumps({"model": "tiny", "device": "cpu", "configs": configs}))
    monkeypatch.setenv("MESHSERVE_INT8_TUNING", str(path))
    int8_kernel.load_tuning.cache_clear()
    assert choose_config(1, 142, 96) is COLSUM
    assert choose_config(3, 142, 96) is COLSUM  # bucket 4
    assert choose_config(2, 142, 96) is None  # bucket 2: not in the file, so XLA
    assert choose_config(8, 142, 96) is None
    assert vars(COLSUM) == {"form": "colsum"}  # what int8_probe.py writes for it
    bad = {
        "1x142x96": {"form": "rowsum"},  # a probe experiment, never a choice
        "1x256x128": {"form": "foo", "bn": 32, "bk": 32},  # would build an Int8KernelConfig without the form check
        "8x142x96": {"form": "colsum"},  # colsum is for at most 4 rows
    }
    for key, entry in bad.items():
        path.write_text(json.dumps({"model": "tiny", "device": "cpu", "configs": {key: entry}}))
        int8_kernel.load_tuning.cache_clear()
        with pytest.raises(UserError, match=f"MESHSERVE_INT8_TUNING={path}: not a tuning file.*{key}"):
            choose_config(1, 142, 96)
    int8_kernel.load_tuning.cache_clear()
