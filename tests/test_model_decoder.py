"""The decoder: against an independent NumPy forward, prefill vs step-by-step decode, and padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.generate import GenerateError, generate
from meshserve.model.params import init_params

ARCHITECTURES = {
    "palm-mqa": {},
    "multi-head": {"n_kv_heads": 8},
    "grouped": {"n_kv_heads": 2},
    "falcon-like": {"mlp": "gelu", "norm_bias": True, "linear_bias": True, "shared_embedding": False},
    "serial-rmsnorm": {"parallel_block": False, "norm": "rmsnorm", "rope_base": 500.0},
}


def _model(arch, seed=0):
    config = get_config("tiny", **ARCHITECTURES[arch])
    params = init_params(config, jax.random.key(seed))
    # Give biases and norms non-trivial values so the test sees them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.1 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if any(getattr(k, "key", "").startswith(("b", "bias", "scale")) for k in path)
            else x
        ),
        params,
    )
    return config, params


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefill_matches_independent_numpy_forward(arch):
    config, params = _model(arch)
    tokens = [5, 17, 200, 3, 99, 42, 7]
    logits, _, _ = transformer.prefill(
        params, config, jnp.asarray([tokens]), jnp.asarray([len(tokens)]), all_logits=True
    )
    expected = reference_numpy.forward(jax.device_get(params), config, tokens)
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("arch", ["palm-mqa", "grouped", "serial-rmsnorm"])
def test_decode_steps_reproduce_prefill_logits(arch):
    config, params = _model(arch)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    full, _, _ = transformer.prefill(params, config, tokens, jnp.asarray([12, 12]), all_logits=True)
    _, k, v = transformer.prefill(params, config, tokens[:, :5], jnp.asarray([5, 5]))
    cache = transformer.insert(
        transformer.init_cache(config, 2, 16, jnp.float32), k, v, jnp.asarray([5, 5]), jnp.asarray([0, 1])
    )
    for t in range(5, 12):
        logits, cache = transformer.decode_step(params, config, tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)
    assert list(np.asarray(cache.lengths)) == [12, 12]


def test_insert_into_chosen_slots_leaves_other_slots_untouched():
    config, params = _model("palm-mqa")
    cache = transformer.init_cache(config, 4, 16, jnp.float32)
    _, k, v = transformer.prefill(params, config, jnp.asarray([[1, 2, 3]]), jnp.asarray([3]))
    cache = transformer.insert(cache, k, v, jnp.asarray([3]), jnp.asarray([2]))
    assert list(np.asarray(cache.lengths)) == [0, 0, 3, 0]
    assert float(jnp.abs(cache.k[:, [0, 1, 3]]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(cache.k[:, 2, :3]), np.asarray(k[:, 0]))


def test_padding_in_a_batch_changes_no_result():
    config, params = _model("grouped")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7], [1, 8, 2, 8, 1]]
    batched = generate(params, config, prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = generate(params, config, [prompt], max_new_tokens=12)[0]
        assert alone.tokens == result.tokens
        np.testing.assert_allclose(alone.logprobs, result.logprobs, rtol=1e-5, atol=1e-5)


def test_generate_stops_at_a_stop_token_and_reports_why():
    config, params = _model("palm-mqa")
    free = generate(params, config, [[1, 2, 3]], max_new_tokens=10)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 10
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    stopped = generate(params, config, [[1, 2, 3]], max_new_tokens=10, stop_ids=[stop])[0]
    assert stopped.tokens == free.tokens[: first + 1]
    assert stopped.finish_reason == "stop"


@pytest.mark.parametrize(
    "prompts,max_new,message",
    [
        ([[]], 4, "prompt 0 is empty"),
        ([[1, 256]], 4, r"token id 256 outside the vocabulary \[0, 256\)"),
        ([[1] * 120], 9, "exceed the context limit max_seq_len=128"),
        ([[1]], 0, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_requests_name_the_field_and_limit(prompts, max_new, message):
    config, params = _model("palm-mqa")
    with pytest.raises(GenerateError, match=message):
        generate(params, config, prompts, max_new_tokens=max_new)


@pytest.mark.parametrize("outlier", [None, 0, 2272, -1])
def test_layernorm_one_pass_holds_a_large_common_offset(outlier):
    """The one-pass LayerNorm (both sums in one reduction, over x shifted by its first channel) against float64's
    two-pass at E = 4544 (falcon-7b): rows whose mean is 1e4 times their spread (the unshifted E[x^2] - E[x]^2
    loses the variance to float32 cancellation), and rows with one channel 1000 times the others. An outlier on
    channel 0, the shift, costs the documented bound (relative error up to ~E * 1.2e-7); elsewhere it costs nothing."""
    from meshserve.model import layers

    config = get_config("tiny-falcon").replace(d_model=4544)
    x = 3e3 + 0.3 * jax.random.normal(jax.random.key(0), (4, config.d_model), jnp.float32)
    if outlier is not None:
        x = jax.random.normal(jax.random.key(1), (4, config.d_model), jnp.float32).at[:, outlier].set(1000.0)
    p = {"scale": jnp.ones((config.d_model,)), "bias": jnp.zeros((config.d_model,))}
    x64 = np.asarray(x, np.float64)
    centered = x64 - x64.mean(-1, keepdims=True)
    ref = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + config.norm_eps)
    got = np.asarray(layers.norm(x, p, config), np.float64)
    bound = config.d_model * 1.2e-7 if outlier == 0 else 2e-5  # float32 epsilon times E
    assert np.abs(got - ref).max() <= bound * np.abs(ref).max()
