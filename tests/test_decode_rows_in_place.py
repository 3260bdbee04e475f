"""A server's step over b of its B slots reads and writes rows [0, b) of the whole cache (transformer.decode_step
with tokens [b] and a cache of B rows; engine_steps' decode_rows and verify_rows where the backend scatters in
place): the same logits, cache rows and lengths as the step over a cache of those b rows alone, rows b.. untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import decode_attention, transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers
from meshserve.serving import engine_steps

B, S = 4, 32
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.int8}


def _model(name: str, unrolled: bool = False, weights: str = "f32"):
    config = get_config(name)
    params = cast_params(config, init_params(config, jax.random.key(0), jnp.float32), weights)
    return config, unstack_layers(params) if unrolled else params


def _filled(config, params, dtype):
    """A cache of B rows of different lengths, prefilled."""
    tokens = jax.random.randint(jax.random.key(1), (B, 10), 0, config.vocab_size)
    lengths = jnp.array([10, 7, 9, 5], jnp.int32)
    _, k, v = transformer.prefill(params, config, tokens, lengths)
    return transformer.insert(transformer.init_cache(config, B, S, dtype), k, v, lengths, jnp.arange(B))


def _rows(tree, b: int):
    """The first b rows of a cache's leaves (lengths [B], the rest [N, B, ...])."""
    return jax.tree.map(lambda a: a[:b] if a.ndim == 1 else a[:, :b], tree)


@pytest.mark.parametrize(
    ("name", "unrolled", "kv", "attention"),
    [("tiny-falcon", False, "f32", "xla"), ("tiny", True, "bf16", "pallas"), ("tiny-gemma3", True, "f32", "xla"),
     ("tiny", False, "int8", "xla")],
)  # fmt: skip
def test_decode_step_over_the_first_b_rows_of_the_whole_cache(monkeypatch, name, unrolled, kv, attention):
    """Stacked and unrolled layers, the attention kernel (interpreted: a 16-bit cache, head dim 16), sliding
    windows, an int8 cache."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", attention)
    config, params = _model(name, unrolled, "bf16" if kv == "bf16" else "f32")
    cache = _filled(config, params, DTYPES[kv])
    assert decode_attention.kernel_enabled(config.d_head, DTYPES[kv]) == (attention == "pallas")
    b, last = 2, jnp.array([3, 4], jnp.int32)
    want, want_cache = transformer.decode_step(params, config, last, _rows(cache, b), context=16)
    got, got_cache = transformer.decode_step(params, config, last, cache, context=16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for new, sub, old in zip(*(jax.tree.leaves(c) for c in (got_cache, want_cache, cache)), strict=True):
        axis = 0 if new.ndim == 1 else 1
        np.testing.assert_array_equal(np.take(new, range(b), axis), sub)  # the step's rows: as over b alone
        np.testing.assert_array_equal(np.take(new, range(b, B), axis), np.take(old, range(b, B), axis))
    assert list(got_cache.lengths) == [11, 8, 9, 5]
    with pytest.raises(ValueError, match="tokens has 5 rows but the cache only 4"):
        transformer.decode_step(params, config, jnp.zeros((5,), jnp.int32), cache, context=16)


def _state(config, params, kv: str):
    state = engine_steps.fresh_state(config, B, S, DTYPES[kv])
    return engine_steps.dataclasses.replace(state, cache=_filled(config, params, DTYPES[kv]),
                                            last=jnp.array([3, 4, 5, 6], jnp.int32))  # fmt: skip


@pytest.mark.parametrize(("verify", "kv"), [(False, "f32"), (True, "f32"), (True, "int8")])
def test_engine_step_in_place_equals_the_sliced_step(verify, kv):
    """decode_rows / verify_rows over b = 2 of 4 slots, jitted: the whole-cache form (GPUs) and the sliced one
    (XLA:CPU) leave the same state and return the same tokens."""
    config, params = _model("tiny")
    state = _state(config, params, kv)
    steps = engine_steps.ModelSteps()
    drafts = jnp.array([[7, -1], [8, 9]], jnp.int32)
    if verify:
        run = jax.jit(lambda p, s, whole: engine_steps._verify_rows(steps, config, 2, 16, p, s, drafts, whole=whole),
                      static_argnums=2)  # fmt: skip
    else:
        run = jax.jit(lambda p, s, whole: engine_steps._decode_rows(steps, config, 2, 16, p, s, whole=whole),
                      static_argnums=2)  # fmt: skip
    (in_place, out_a), (sliced, out_b) = run(params, state, True), run(params, state, False)
    for a, b in zip(jax.tree.leaves((in_place, out_a)), jax.tree.leaves((sliced, out_b)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    k_new, k_old = jax.tree.leaves(in_place.cache.k), jax.tree.leaves(state.cache.k)
    assert not np.array_equal(k_new[0][:, :2], k_old[0][:, :2])  # the step wrote its rows
    for new, old in zip(k_new, k_old, strict=True):
        np.testing.assert_array_equal(new[:, 2:], old[:, 2:])


def test_decode_rows_branches_on_the_platform_only_for_part_of_the_slots():
    """b < B on a step that can read rows in place: the step is a choice between XLA:CPU's form and the rest's
    (lowered for one backend); b = B, or a mesh's step (decode_reads_rows=False), makes no such choice."""
    config, params = _model("tiny")
    state = _state(config, params, "f32")

    def cpu_choice(steps, b) -> bool:
        jaxpr = jax.make_jaxpr(lambda p, s: engine_steps.decode_rows(steps, config, b, 16, p, s))(params, state).jaxpr
        return any(e.params.get("branches_platforms") == (("cpu",), None) for e in jaxpr.eqns)

    assert cpu_choice(engine_steps.ModelSteps(), 2)
    assert not cpu_choice(engine_steps.ModelSteps(), B)
    assert not cpu_choice(engine_steps.ModelSteps(decode_reads_rows=False), 2)
