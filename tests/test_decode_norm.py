"""The one-kernel decode norm (model/decode_norm.py) against `layers.norm`, the XLA path it stands in for.

No GPU here: interpret mode runs the kernel body on the CPU for the numbers, and exporting for the `cuda` platform
runs Pallas' Triton lowering without a device (benchmarks/triton_ptx.py compiles it on to PTX where the CUDA plugin
is installed). Its speed is for a GPU benchmark, not these tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import decode_norm as dn
from meshserve.model import layers
from meshserve.model.config import get_config

# (kind, bias, scale_offset, eps): falcon's LayerNorm with bias, PaLM's without, Llama's RMSNorm, Gemma's 1 + scale.
NORMS = [("layernorm", True, False, 1e-5), ("layernorm", False, False, 1e-6), ("rmsnorm", False, False, 1e-6),
         ("rmsnorm", False, True, 1e-6)]  # fmt: skip


def _case(kind, bias, offset, eps, shape, dtype, seed=0, offset_x=0.0, noise=1.0):
    """x [*shape], norm params {scale, bias?} for E = shape[-1], and the config `layers.norm` reads."""
    E = shape[-1]
    keys = jax.random.split(jax.random.key(seed), 3)
    x = (offset_x + noise * jax.random.normal(keys[0], shape, jnp.float32)).astype(dtype)
    p = {"scale": (1.0 + 0.2 * jax.random.normal(keys[1], (E,), jnp.float32)).astype(dtype)}
    if bias:
        p["bias"] = (0.1 * jax.random.normal(keys[2], (E,), jnp.float32)).astype(dtype)
    config = get_config("tiny", norm=kind, norm_bias=bias, norm_scale_offset=offset, norm_eps=eps)
    return x, p, config


def _kernel(x, p, config, **kwargs):
    kwargs.setdefault("interpret", True)
    return dn.decode_norm(x, p["scale"], p.get("bias"), kind=config.norm, eps=config.norm_eps,
                          scale_offset=config.norm_scale_offset, **kwargs)  # fmt: skip


def _assert_matches(got, ref):
    """float32: 1e-5 relative, with 1e-5 of the row's largest |y| as the floor (the kernel adds the sums in another
    order, a few float32 ulps of the statistics; an output near 0, where y cancels against the bias, keeps the
    absolute error of its terms). bf16: both round one float32 value that differs by that little, so at most one
    bf16 ulp of |y| apart (plus the same floor), and mostly equal."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g, r = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    floor = 1e-5 * np.abs(r).max()
    if ref.dtype == jnp.float32:
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=floor)
        return
    _, exponent = np.frexp(np.abs(r))  # |r| = m 2^e with m in [0.5, 1): bf16's 8-bit significand steps by 2^(e-8)
    ulp = np.ldexp(1.0, exponent - 8)
    assert np.all(np.abs(g - r) <= ulp + floor), np.abs(g - r).max()
    assert np.mean(g == r) > 0.9  # a one-ulp difference needs a float32 value within ~1e-6 of a rounding midpoint


@pytest.mark.parametrize(("kind", "bias", "offset", "eps"), NORMS)
@pytest.mark.parametrize("E", [64, 72, 200])  # 72 and 200: 128- and 256-lane blocks with masked padding lanes
@pytest.mark.parametrize("lead", [(1, 1), (3, 1), (2, 3)])  # decode's [B, 1, E]; any leading dims flatten to rows
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_layers_norm(kind, bias, offset, eps, E, lead, dtype):
    x, p, config = _case(kind, bias, offset, eps, (*lead, E), dtype, seed=E)
    _assert_matches(_kernel(x, p, config), layers.norm(x, p, config))


@pytest.mark.parametrize("E", [72, 200])
def test_large_common_offset_keeps_its_variance(E):
    """x = 1000 + noise of 0.01 (variance 1e-4 under a mean square of 1e6, which float32's E[x^2] - E[x]^2 would
    lose entirely): the shifted sums give the float64 two-pass answer, and padding lanes, whose unmasked d would be
    -x_0 ~ -1000, add nothing."""
    x, p, config = _case("layernorm", True, False, 1e-5, (3, 1, E), jnp.float32, offset_x=1000.0, noise=0.01)
    got = _kernel(x, p, config)
    _assert_matches(got, layers.norm(x, p, config))
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    y64 = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    want = y64 * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)
    # float32's error here is ~ulp(1000) / 0.01 ~ 6e-3 of a unit output (x itself is stored to 6e-5), not a variance
    # off by orders of magnitude.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2)


def test_interpret_none_runs_the_interpreted_kernel_on_cpu():
    """interpret=None: `platform_dependent` picks the interpreted body on the CPU (the Triton branch would fail to
    lower here), and it computes what interpret=True does."""
    x, p, config = _case("layernorm", True, False, 1e-5, (3, 1, 72), jnp.bfloat16)
    got = jax.jit(lambda x, p: _kernel(x, p, config, interpret=None))(x, p)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(_kernel(x, p, config), np.float32))
    _assert_matches(got, layers.norm(x, p, config))


@pytest.mark.parametrize(("bias", "E", "warps"), [(True, 4544, 8), (False, 4096, 4)])
def test_kernel_lowers_to_triton_for_cuda(bias, E, warps):
    """Pallas' Triton lowering takes the kernel at falcon-7b's E = 4544 (a masked 8192-lane block) and llama's 4096:
    one custom call named decode_norm, one program per row, default_warps' warps."""
    x, p, config = _case("layernorm", bias, False, 1e-5, (5, 1, E), jnp.bfloat16)
    text = jax.export.export(
        jax.jit(lambda x, p: _kernel(x, p, config, interpret=None)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(x, p).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "decode_norm" in text and "grid_x = 5" in text and f"num_warps = {warps}" in text


def test_warps_and_supported_widths():
    assert [dn.default_warps(E) for E in (64, 2048, 4096, 4544, 8192, 18432)] == [4, 4, 4, 8, 8, 32]
    assert dn.norm_kernel_supported(18432) and dn.norm_kernel_supported(32768) and dn.norm_kernel_supported(1)
    assert not dn.norm_kernel_supported(32769) and not dn.norm_kernel_supported(0)
    x = jnp.zeros((1, 32769), jnp.float32)
    with pytest.raises(ValueError, match="rows of 1 to 32768 elements, got E = 32769"):
        dn.decode_norm(x, x[0], None, kind="rmsnorm", eps=1e-6, scale_offset=False, interpret=True)
    with pytest.raises(ValueError, match="kind must be one of layernorm, rmsnorm, got 'batchnorm'"):
        dn.decode_norm(x[:, :8], x[0, :8], None, kind="batchnorm", eps=1e-6, scale_offset=False, interpret=True)
