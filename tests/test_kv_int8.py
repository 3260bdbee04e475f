"""The int8 KV cache (model/kv_quant.py): the rounding (smallest power-of-two scale, exact round trip, error bound),
`Int8KV` read and written as the array it stands for, every path seeing the same keys (a prompt prefilled whole or
over a cached prefix, a decode step, a verify step, a mesh), the engine and `meshserve generate` on it, and its
memory (half of bf16's, plus one exponent byte per vector)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_cli
from engine_helpers import assert_equal_to_generate, run_prefix_scenario, serve_requests
from meshserve.model import kv_quant, transformer
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.memory_fit import state_bytes_per_device
from meshserve.serving.plan import PlanError, make_plan

CONFIG = get_config("tiny")
GRID = dict(max_batch=4, max_context=128, length_buckets=(16, 64), decode_buckets=(1, 4), context_buckets=(128,))


def _vectors(seed: int, shape=(64, 3, 32)) -> jax.Array:
    """Random vectors over the last axis with magnitudes spread over ~10 binary orders, and some all-zero ones."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape) * jnp.exp2(jax.random.uniform(k2, shape[:-1] + (1,), minval=-6, maxval=6))
    return x.at[0].set(0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rounding_takes_the_smallest_exponent_and_round_trips_exactly(dtype):
    x = _vectors(0).astype(dtype)
    q = kv_quant.quantize(x)
    x32 = np.asarray(x, np.float32)
    amax, e = np.abs(x32).max(-1), np.asarray(q.exponent, np.float64)
    live = amax > 0
    assert (amax <= 127 * np.exp2(e)).all()  # every value fits [-127, 127] ...
    assert (amax[live] > 127 * np.exp2(e[live] - 1)).all()  # ... and no smaller power of two would do
    assert (np.asarray(q.values)[~live] == 0).all()
    back = np.asarray(q.astype(dtype), np.float32)
    # Round to nearest: within half a step, at most max|x| / 127 per vector.
    assert (np.abs(back - x32).max(-1) <= np.exp2(e) / 2 + 1e-12).all()
    assert (np.abs(back - x32).max(-1)[live] <= amax[live] / 127).all()
    again = kv_quant.quantize(q.astype(dtype))  # rounding a rounded vector changes nothing, in f32 and bf16
    np.testing.assert_array_equal(again.values, q.values)
    np.testing.assert_array_equal(again.exponent, q.exponent)
    np.testing.assert_array_equal(np.asarray(kv_quant.round_to_int8(x), np.float32), back)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_exponent_is_found_exactly(dtype):
    """A vector whose largest element is v * 2^e (v in 64..127, every e the cache holds) gets exponent e and value v,
    and reads back bit for bit: the exponent comes from the float's bits, not from log2 / exp2 (inexact on XLA)."""
    e = np.arange(-126, 121)  # up to 127 * 2^120, below float32's largest (2^128)
    v = np.arange(64, 128)
    ee, vv = np.meshgrid(e, v, indexing="ij")  # [E, 64]
    x = np.zeros(ee.shape + (8,), np.float32)
    x[..., 0] = vv * np.exp2(ee.astype(np.float64))
    x[..., 1] = -3 * np.exp2(ee.astype(np.float64))
    x = jnp.asarray(x, dtype)
    q = jax.jit(kv_quant.quantize)(x)
    np.testing.assert_array_equal(q.exponent, ee)
    np.testing.assert_array_equal(q.values[..., 0], vv)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda q: q.astype(dtype))(q), np.float32), np.asarray(x, np.float32)
    )
    np.testing.assert_array_equal(kv_quant.pow2(jnp.asarray(e)), np.exp2(e).astype(np.float32))


def test_int8kv_takes_only_leading_axes_indexes():
    kv = kv_quant.zeros((2, 4, 8, 3, 32), "int8")
    for bad in ((..., 0), (0, 0, 0, 0, 0), (None,), (slice(None), None)):
        with pytest.raises(IndexError, match="leading 4 axes"):
            kv[bad]
        with pytest.raises(IndexError, match="leading 4 axes"):
            kv.at[bad]


def test_int8kv_reads_and_writes_like_the_array_it_stands_for():
    shape = (2, 4, 8, 3, 32)  # [N, B, S, K, Q]
    ref = np.zeros(shape, np.float32)
    kv = kv_quant.zeros(shape, "int8")
    assert isinstance(kv, kv_quant.Int8KV) and kv.shape == shape and kv.nbytes == 2 * 4 * 8 * 3 * 33
    rows = jnp.array([[1], [3]])  # [b, 1]
    at = jnp.array([[2, 3, 9], [0, 1, 2]])  # [b, T]; position 9 is past S: dropped, as for an array
    x = kv_quant.round_to_int8(_vectors(1, (2, 2, 3, 3, 32)))  # [N, b, T, K, Q] already on the grid
    kv = kv.at[:, rows, at].set(x, mode="drop")
    ref_j = jnp.asarray(ref).at[:, rows, at].set(x, mode="drop")
    np.testing.assert_array_equal(kv.astype(jnp.float32), ref_j)
    np.testing.assert_array_equal(kv[1, :, :5].astype(jnp.float32), ref_j[1, :, :5])  # leading-axes slices
    other = kv_quant.zeros(shape, "int8").at[:, :2].set(kv[:, 2:])  # copying Int8KV rows: values and exponents
    np.testing.assert_array_equal(other[:, :2].values, kv[:, 2:].values)
    np.testing.assert_array_equal(other[:, :2].exponent, kv[:, 2:].exponent)
    assert isinstance(kv_quant.storable(x, kv), kv_quant.Int8KV) and kv_quant.storable(kv, kv) is kv
    assert kv_quant.storable(x, jnp.zeros(shape, jnp.bfloat16)).dtype == jnp.bfloat16
    assert kv_quant.bytes_per_element("int8", 128) == 1 + 1 / 128 and kv_quant.bytes_per_element(jnp.bfloat16, 128) == 2


def _params():
    return init_params(CONFIG, jax.random.key(3))


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma3"])
def test_every_path_reads_the_keys_a_decode_step_reads(name):
    """With an int8 cache, logits of a prompt's tokens agree whether the prompt is prefilled whole, prefilled over a
    cached first half, or run token by token through decode steps; and the cache holds the same bytes. tiny-gemma3:
    the same through its 5-token window (every path past it)."""
    CONFIG = get_config(name)  # noqa: N806  (the module's name, per case)
    params = init_params(CONFIG, jax.random.key(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, CONFIG.vocab_size, (2, 24)), jnp.int32)
    lengths = jnp.full((2,), 24, jnp.int32)
    whole, k, v = transformer.prefill(params, CONFIG, tokens, lengths, all_logits=True, int8_kv=True)
    cache = transformer.insert(transformer.init_cache(CONFIG, 2, 32, jnp.int8), k, v, lengths, jnp.arange(2))
    # Over a cached first half: the prefix is read from an int8 cache holding only the first 10 tokens.
    half = transformer.init_cache(CONFIG, 2, 32, jnp.int8)
    _, k10, v10 = transformer.prefill(params, CONFIG, tokens[:, :10], jnp.full((2,), 10), int8_kv=True)
    half = transformer.insert(half, k10, v10, jnp.full((2,), 10), jnp.arange(2))
    prefix = transformer.Prefix(half.k[:, :, :10], half.v[:, :, :10], jnp.full((2,), 10, jnp.int32))
    rest, kr, vr = transformer.prefill(params, CONFIG, tokens[:, 10:], jnp.full((2,), 14), all_logits=True,
                                       prefix=prefix, int8_kv=True)  # fmt: skip
    np.testing.assert_allclose(rest, whole[:, 10:], atol=1e-5)
    joined = transformer.insert(transformer.init_cache(CONFIG, 2, 32, jnp.int8), kr, vr, jnp.full((2,), 14),
                                jnp.arange(2), prefix=prefix)  # fmt: skip
    np.testing.assert_array_equal(joined.k.values, cache.k.values)
    np.testing.assert_array_equal(joined.v.exponent, cache.v.exponent)
    # Token by token: decode steps from the first token on.
    step = transformer.init_cache(CONFIG, 2, 32, jnp.int8)
    _, k1, v1 = transformer.prefill(params, CONFIG, tokens[:, :1], jnp.ones((2,), jnp.int32), int8_kv=True)
    step = transformer.insert(step, k1, v1, jnp.ones((2,), jnp.int32), jnp.arange(2))
    for t in range(1, 24):
        logits, step = transformer.decode_step(params, CONFIG, tokens[:, t], step)
        np.testing.assert_allclose(logits, whole[:, t], atol=1e-5)
    np.testing.assert_array_equal(step.k.values, cache.k.values)


def test_int8_logits_stay_near_the_float_caches():
    """Teacher-forced over 40 tokens: the int8 cache's log-probs within 0.05 of the f32 cache's (tiny model)."""
    params = _params()
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, CONFIG.vocab_size, (3, 40)), jnp.int32)
    lengths = jnp.full((3,), 40, jnp.int32)
    exact, _, _ = transformer.prefill(params, CONFIG, tokens, lengths, all_logits=True)
    rounded, _, _ = transformer.prefill(params, CONFIG, tokens, lengths, all_logits=True, int8_kv=True)
    diff = np.abs(jax.nn.log_softmax(exact) - jax.nn.log_softmax(rounded))
    assert 0 < diff.max() < 0.05, diff.max()


def test_a_bf16_engine_on_an_int8_cache_answers_as_generate_does():
    """bf16 weights and activations (the f32 tests above cannot see a bf16-only rounding slip)."""
    from meshserve.model.params import cast_params

    params = cast_params(CONFIG, _params(), "bf16")
    engine = Engine(params, CONFIG, make_plan(CONFIG, **GRID, weights="bf16", kv_cache_dtype="int8"))
    engine.warm_up(phases=("generate",))
    rng = np.random.default_rng(5)
    cases = [(rng.integers(1, CONFIG.vocab_size, n).tolist(), 10, SamplingParams()) for n in (4, 20, 40)]
    for (prompt, n, _), got in zip(cases, serve_requests(engine, cases), strict=True):
        want = generate(params, CONFIG, [prompt], max_new_tokens=n, kv_cache_dtype="int8")[0]
        assert got.tokens == list(want.tokens), prompt


@pytest.fixture(scope="module")
def engines():
    """The tiny model's engines with an int8 cache: plain, and with verify steps (speculative decoding, k = 4)."""
    params = _params()
    plan = make_plan(CONFIG, **GRID, kv_cache_dtype="int8")
    plain = Engine(params, CONFIG, plan)
    spec = Engine(params, CONFIG, dataclasses.replace(plan, speculative_tokens=4))
    for e in (plain, spec):
        e.warm_up(phases=("generate",))
    return params, plain, spec


def test_engine_with_an_int8_cache_answers_as_generate_does(engines):
    params, plain, spec = engines
    assert isinstance(plain._state.cache.k, kv_quant.Int8KV)
    rng = np.random.default_rng(0)
    repeats = [5, 6, 7, 8, 9] * 6  # text that repeats, so the speculative engine drafts and keeps drafts
    cases = [(rng.integers(1, CONFIG.vocab_size, n).tolist(), 12, SamplingParams()) for n in (5, 17, 30)]
    cases += [(repeats, 20, SamplingParams()), (repeats[:22], 10, SamplingParams(temperature=0.8, seed=4))]
    for engine in (plain, spec):
        for (prompt, n, sampling), got in zip(cases, serve_requests(engine, cases), strict=True):
            want = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling, kv_cache_dtype="int8")[0]
            assert got.tokens == list(want.tokens), (engine is spec, prompt)


def test_prefix_caching_over_an_int8_cache_equals_whole_prefills():
    params = _params()
    plan = make_plan(CONFIG, **{**GRID, "decode_buckets": (4,)}, prefix_caching=True, kv_cache_dtype="int8")
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    requests, _ = run_prefix_scenario(engine)
    assert_equal_to_generate(params, CONFIG, requests, kv_cache_dtype="int8")


def test_an_int8_cache_holds_half_the_bytes():
    config = get_config("tiny", d_head=64)
    B, S = 8, 128
    states = {}
    for dtype in ("auto", "int8"):
        engine = Engine(init_params(config, jax.random.key(0), jnp.bfloat16), config,
                        make_plan(config, max_batch=B, max_context=S, kv_cache_dtype=dtype))  # fmt: skip
        states[dtype] = state_bytes_per_device(engine._abstract_state().cache)
    elements = 2 * config.n_layers * B * S * config.n_kv_heads * config.d_head  # keys and values
    assert states["auto"] == elements * 2 + B * 4  # bf16, and lengths int32 [B]
    assert states["int8"] == elements * (1 + 1 / 64) + B * 4


def test_a_bad_kv_cache_dtype_is_refused_by_name(capsys):
    with pytest.raises(PlanError, match="kv_cache_dtype must be 'auto' or 'int8', got 'fp8'"):
        make_plan(CONFIG, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8; got 'bf16'"):
        generate(_params(), CONFIG, [[1, 2]], max_new_tokens=2, kv_cache_dtype="bf16")
    with pytest.raises(SystemExit):  # argparse's choices: exit 2, the flag and the value named
        run_cli(capsys, "generate", "--model", "tiny", "--kv-cache-dtype", "fp8", "x")
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "'fp8'" in err
    code, _, err = run_cli(capsys, "generate", "--server", "127.0.0.1:1", "--kv-cache-dtype", "int8", "x")
    assert code == 2 and "--kv-cache-dtype" in err and "Traceback" not in err


def test_generate_cli_runs_on_an_int8_cache(capsys):
    code, out, err = run_cli(capsys, "generate", "--model", "tiny", "--tokens", "5,6,7", "--max-new-tokens", "4",
                             "--json", "--kv-cache-dtype", "int8")  # fmt: skip
    assert code == 0, err
    params = init_params(CONFIG, jax.random.key(0))  # the preset's random weights (seed 0, f32)
    want = generate(params, CONFIG, [[5, 6, 7]], max_new_tokens=4, kv_cache_dtype="int8")[0]
    assert json.loads(out)["tokens"] == list(want.tokens)


def test_on_a_mesh_an_int8_cache_gives_the_one_device_tokens():
    """generate_sharded (`meshserve generate --mesh`) and the serving engine on a 2x2x2 mesh, each with an int8
    cache in the decode layout's split, give one device's int8 tokens (the switch moves prefill's k, v as they are
    and the write rounds them, as one device does)."""
    from meshserve.model.sharded import generate_sharded
    from meshserve.partition.mesh import make_mesh
    from meshserve.partition.rules import Layout
    from meshserve.serving.sharding import mesh_steps

    params = _params()
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8], list(range(60, 71))]
    want = generate(params, CONFIG, prompts, max_new_tokens=10, kv_cache_dtype="int8")
    mesh = make_mesh("2x2x2", jax.devices()[:8])
    got = generate_sharded(params, CONFIG, prompts, mesh=mesh, prefill_layout=Layout("wg-xyz", "batch"),
                           decode_layout=Layout("ws2d", "heads"), max_new_tokens=10, kv_cache_dtype="int8")  # fmt: skip
    assert [g.tokens for g in got] == [w.tokens for w in want]
    buckets = dict(max_batch=8, length_buckets=(16,), decode_buckets=(8,), weights="f32", kv_cache_dtype="int8")
    placed, steps, run_plan = mesh_steps(CONFIG, params, make_plan(CONFIG, mesh_axes={"x": 2, "y": 2, "z": 2},
                                                                   **buckets))  # fmt: skip
    engine = Engine(placed, CONFIG, run_plan, steps)
    engine.warm_up(phases=("generate",))
    assert isinstance(engine._state.cache.k, kv_quant.Int8KV)
    assert len(engine._state.cache.k.exponent.sharding.device_set) == 8
    first = engine.prefill_insert(prompts, [0, 1, 2], [SamplingParams()] * 3, batch=4, length=16)
    tokens = [first.tokens]
    for _ in range(9):
        tokens.append(engine.decode(8).tokens[:3])
    assert np.stack(tokens, 1).tolist() == [list(w.tokens) for w in want]
