"""A post-norm block's seam in one kernel (`decode_norm.decode_add_norm`): y = x + norm(a), h = norm(y), taken by a
decode step of one row for Gemma-style blocks at each of its seams (`decode_norm.add_norms_in_kernel`,
`transformer._post_norm_layer`).

Interpret mode runs the kernel body on the CPU against `layers.norm` composed as `layers.layer_residual` composes
it; exporting for `cuda` runs Pallas' Triton lowering without a device. Whether it saves kernels is a deviceless
compile's count (benchmarks/decode_hlo.py --target h100; BENCHMARKS.md), not a test's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import decode_norm as dn
from meshserve.model import layers, transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers


def _operands(E, lead, dtype, offset, seed=0):
    """a (an attention output), x (the residual stream) [*lead, E], the two norms' params, the config."""
    keys = jax.random.split(jax.random.key(seed), 4)
    a = (3.0 * jax.random.normal(keys[0], (*lead, E), jnp.float32)).astype(dtype)
    x = jax.random.normal(keys[1], (*lead, E), jnp.float32).astype(dtype)
    post, pre = ({"scale": (0.2 * jax.random.normal(k, (E,), jnp.float32)).astype(dtype)} for k in keys[2:])
    config = get_config("tiny", norm="rmsnorm", norm_scale_offset=offset, norm_eps=1e-6)
    return a, x, post, pre, config


def _within_one_ulp(got, ref):
    """bf16: each side rounds a float32 value the other computed with its sums in another order, so at most one
    bf16 ulp apart (plus 1e-5 of the largest |ref|), and mostly equal; float32: 1e-5 relative."""
    g, r = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    floor = 1e-5 * np.abs(r).max()
    if ref.dtype == jnp.float32:
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=floor)
        return
    ulp = np.ldexp(1.0, np.frexp(np.abs(r))[1] - 8)
    assert np.all(np.abs(g - r) <= ulp + floor), np.abs(g - r).max()
    assert np.mean(g == r) > 0.9


@pytest.mark.parametrize("E", [64, 200])  # 200: a 256-lane block with masked padding lanes
@pytest.mark.parametrize("lead", [(1, 1), (2, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("offset", [True, False])  # Gemma's 1 + scale, and a plain scale
def test_kernel_equals_the_composed_norms(E, lead, dtype, offset):
    a, x, post, pre, config = _operands(E, lead, dtype, offset, seed=E)
    y, h = dn.decode_add_norm(a, x, post["scale"], pre["scale"], kind="rmsnorm", eps=config.norm_eps,
                              scale_offset=offset, interpret=True)  # fmt: skip
    y_ref = x + layers.norm(a, post, config)  # layers.layer_residual's post-norm seam
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == x.dtype
    _within_one_ulp(y, y_ref)
    # h from the kernel's own y: the pre-norm of the stream as the kernel wrote it
    _within_one_ulp(h, layers.norm(y, pre, config))
    # Neither half skipped: without the residual add, or without the post-norm, y differs.
    assert np.abs(np.asarray(y, np.float32) - np.asarray(layers.norm(a, post, config), np.float32)).max() > 0.1
    assert np.abs(np.asarray(y, np.float32) - np.asarray(x + a, np.float32)).max() > 0.1


def test_refuses_layernorm_and_mismatched_shapes():
    a, x, post, pre, _ = _operands(64, (1, 1), jnp.float32, False)
    with pytest.raises(ValueError, match="kind 'rmsnorm' only, got 'layernorm'"):
        dn.decode_add_norm(a, x, post["scale"], pre["scale"], kind="layernorm", eps=1e-6, scale_offset=False)
    with pytest.raises(ValueError, match="a and x of one shape"):
        dn.decode_add_norm(a[..., :32], x, post["scale"], pre["scale"], kind="rmsnorm", eps=1e-6, scale_offset=False)


def test_kernel_lowers_to_triton_for_cuda():
    """Pallas' Triton lowering takes it at gemma3-1b's E = 1152 (a masked 2048-lane block): one custom call named
    decode_add_norm, one program per row."""
    a, x, post, pre, _ = _operands(1152, (1, 1), jnp.bfloat16, True)
    fn = jax.jit(lambda a, x, s1, s2: dn.decode_add_norm(a, x, s1, s2, kind="rmsnorm", eps=1e-6, scale_offset=True))
    text = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(a, x, post["scale"], pre["scale"]).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1 and "decode_add_norm" in text and "grid_x = 1" in text


def _decode_logits(monkeypatch, mode, params, config, rows, **compiler_options):
    """A prefill of `rows` prompts, then three decode steps fed fixed tokens: logits [3, rows, V], and the decode
    step's jaxpr (traced under `mode`)."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", mode)
    tokens = jax.random.randint(jax.random.key(5), (rows, 9), 0, config.vocab_size)
    lengths = jnp.full((rows,), 9, jnp.int32)
    _, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.insert(transformer.init_cache(config, rows, 32, k.dtype), k, v, lengths, jnp.arange(rows))

    def step(p, t, c):
        return transformer.decode_step(p, config, t, c, context=24)

    jaxpr = str(jax.make_jaxpr(step)(params, tokens[:, 0], cache))
    out = []
    for tok in jax.random.randint(jax.random.key(6), (3, rows), 0, config.vocab_size):
        logits, cache = jax.jit(step, compiler_options=compiler_options or None)(params, tok, cache)
        out.append(logits)
    return np.asarray(jnp.stack(out), np.float32), jaxpr


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_gemma3_decode_step_of_one_row_takes_the_kernel(monkeypatch, weights):
    """tiny-gemma3 (post-norms, RMSNorm with 1 + scale): a one-row decode step runs each seam as the kernel (between
    attention and MLP, between a layer's MLP and the next layer's attention, and into the final norm:
    `transformer._post_norm_layer`) and its logits match XLA's composed norms; two rows keep XLA's (from batch 8 XLA
    makes the seam one fusion itself)."""
    config = get_config("tiny-gemma3")
    params = unstack_layers(cast_params(config, init_params(config, jax.random.key(3), jnp.float32), weights))
    ref, ref_jaxpr = _decode_logits(monkeypatch, "xla", params, config, rows=1)
    got, jaxpr = _decode_logits(monkeypatch, "pallas", params, config, rows=1)
    assert "decode_add_norm" not in ref_jaxpr
    # Per platform branch (CUDA's and the interpreted one): each layer's two seams, and the last MLP's output with
    # the final norm
    assert jaxpr.count("name=decode_add_norm") == 2 * (2 * config.n_layers + 1)
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()  # XLA's attention against the kernel's
    assert dn.decode_norm_label(config, 1) == "pallas-interpret" and dn.decode_norm_label(config, 2) == "xla"
    # Against the same step with the seams composed by XLA, told to round where the block's ops say (its CPU fusions
    # otherwise skip a bf16 rounding the kernel keeps): bit for bit.
    monkeypatch.setattr(dn, "add_norms_in_kernel", lambda config, batch: False)
    composed, _ = _decode_logits(monkeypatch, "pallas", params, config, rows=1, xla_allow_excess_precision=False)
    np.testing.assert_array_equal(got, composed)
    _, two_rows = _decode_logits(monkeypatch, "pallas", params, config, rows=2)
    assert "decode_add_norm" not in two_rows


@pytest.mark.parametrize("unrolled", [True, False])  # a Python loop over layers, or one lax.scan carrying the state
def test_deferred_residual_is_the_same_arithmetic(monkeypatch, unrolled):
    """In float32 (no bf16 rounding for XLA's fusions to skip) the seams in the kernel, each layer's last residual
    add deferred into the next layer's first norm, give XLA's composed block's logits exactly."""
    config = get_config("tiny-gemma3")
    params = init_params(config, jax.random.key(3), jnp.float32)
    params = unstack_layers(params) if unrolled else params
    got, jaxpr = _decode_logits(monkeypatch, "pallas", params, config, rows=1)
    assert "decode_add_norm" in jaxpr
    monkeypatch.setattr(dn, "add_norms_in_kernel", lambda config, batch: False)
    want, jaxpr = _decode_logits(monkeypatch, "pallas", params, config, rows=1)
    assert "decode_add_norm" not in jaxpr
    np.testing.assert_array_equal(got, want)
