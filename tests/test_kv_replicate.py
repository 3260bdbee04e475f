"""Grouped-query kv heads replicated for a heads split they do not divide (model.config.kv_replication, ModelConfig.
replicate_kv_heads, model.params.replicate_kv_params, model.sharded_specs.replicate_for_mesh, analytics' pricing).

Exact by construction: query head h reads kv head h // (H/K); after repeating each kv head r times in a row it reads
h // (H/(K·r)), a copy of the same head. Checked here: the smallest r (against brute force) and a refusal naming H,
K and the split; the config's record and round trips (dict, checkpoint); the repeated weights (f32 and int8, with
q/k/v biases); on the 8-device CPU mesh, float32 prefill and three decode steps equal the one-device model for ws1d
(r = 4) and ws2d heads-sharded attention (r = 2), and generate_sharded (what `meshserve generate --mesh` runs) gives
the one-device greedy tokens with int8 weights; analytics prices the replicated KV cache; the serial block's
mlp_norm is in the memory estimators' weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import get_config, sharded, transformer
from meshserve.model.config import ConfigError, ModelConfig, kv_replication
from meshserve.model.generate import generate
from meshserve.model.params import cast_params, init_params, replicate_kv_params
from meshserve.model.quant import QuantizedArray
from meshserve.partition.mesh import make_mesh
from meshserve.partition.rules import Layout

# Llama-shaped tiny: serial block, RMSNorm, 8 query heads over 2 kv heads, Qwen2's q/k/v biases (so bk, bv repeat).
LLAMA = dict(parallel_block=False, norm="rmsnorm", n_kv_heads=2, qkv_bias=True)


def _tiny(weights: str = "f32"):
    config = get_config("tiny", **LLAMA)
    params = init_params(config, jax.random.key(11))
    layer = params["layers"]
    for i, name in enumerate(("bq", "bk", "bv")):  # init makes biases 0, which would hide a bias not repeated
        layer[name] = 0.3 * jax.random.normal(jax.random.key(20 + i), layer[name].shape)
    params = cast_params(config, params, weights)
    if weights != "f32":  # float32 compute over the stored weights: activations follow the embedding's dtype
        params["embed"] = params["embed"].astype(jnp.float32)
    return config, params


# ------------------------------------------------------------------------------------------------ the helper


def test_replication_is_the_smallest_that_splits_and_divides_the_query_heads():
    assert kv_replication(8, 2, 4) == 2 and kv_replication(8, 2, 8) == 4 and kv_replication(8, 4, 4) == 1
    assert kv_replication(64, 8, 16) == 2 and kv_replication(64, 8, 64) == 8  # Llama 2 70B: ws2d on 4x4x4, ws1d
    for H in range(1, 33):
        for K in (k for k in range(1, H + 1) if H % k == 0):
            for split in range(1, 17):
                brute = next((r for r in range(1, H + 1) if (K * r) % split == 0 and H % (K * r) == 0), None)
                if brute is None:
                    with pytest.raises(ConfigError):
                        kv_replication(H, K, split)
                else:
                    assert kv_replication(H, K, split) == brute, (H, K, split)


def test_an_impossible_replication_is_refused_naming_h_k_and_the_split():
    with pytest.raises(ConfigError) as e:
        kv_replication(12, 3, 8)
    message = str(e.value)
    assert "n_kv_heads K = 3" in message and "n_heads H = 12" in message and "over 8 chips" in message
    assert "24" in message  # the smallest common multiple of K and the split, which H does not reach


# ------------------------------------------------------------------------------------------------ the config


def test_replicated_config_records_the_true_count_and_round_trips(tmp_path):
    config = get_config("tiny", **LLAMA)
    twice = config.replicate_kv_heads(2)
    assert (twice.n_kv_heads, twice.true_kv_heads, twice.real_kv_heads, twice.kv_replication) == (4, 2, 2, 2)
    assert twice.group_size == 2 and config.kv_replication == 1 and config.replicate_kv_heads(1) is config
    assert twice.replicate_kv_heads(2) == config.replicate_kv_heads(4)  # composes; the true count stays 2
    assert ModelConfig.from_dict(twice.to_dict()) == twice
    assert ModelConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "true_kv_heads"}) == config
    assert config.for_kv_split(4) == twice and config.for_kv_split(2) is config  # 2 kv heads already split 2 ways
    mq, mha = get_config("tiny"), get_config("tiny", n_kv_heads=8)
    assert mq.for_kv_split(8) is mq and mha.for_kv_split(8) is mha  # multi-query stays whole; multi-head splits
    for bad in (dict(true_kv_heads=3), dict(true_kv_heads=8)):
        with pytest.raises(ConfigError, match="true_kv_heads must be 0 or divide n_kv_heads=4"):
            twice.replace(**bad)
    with pytest.raises(ConfigError, match="multi-query"):
        mq.replicate_kv_heads(2)
    with pytest.raises(ConfigError, match="must divide n_heads H = 8"):
        config.replicate_kv_heads(8)

    # A checkpoint stores the true model; replicating what it loads equals replicating what was saved.
    from meshserve.model.checkpoint import load_checkpoint, save_checkpoint

    config, params = _tiny()
    save_checkpoint(tmp_path / "ckpt", config, params, "f32")
    info, loaded = load_checkpoint(tmp_path / "ckpt")
    assert info.config == config and info.config.true_kv_heads == 0
    a = replicate_kv_params(config, params, 2)["layers"]["wk"]
    np.testing.assert_array_equal(replicate_kv_params(info.config, loaded, 2)["layers"]["wk"], a)
    # A replicated model is never saved: it is refused before anything is written.
    from meshserve.model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="kv heads replicated to 4 for a mesh"):
        save_checkpoint(tmp_path / "replicated", config.replicate_kv_heads(2), replicate_kv_params(config, params, 2),
                        "f32")  # fmt: skip
    assert not (tmp_path / "replicated").exists()


# ------------------------------------------------------------------------------------------------ the weights


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_repeated_kv_weights_are_copies_of_their_true_head(weights):
    config, params = _tiny(weights)
    r = 4
    out = replicate_kv_params(config, params, r)
    declared = config.replicate_kv_heads(r)
    N, E, K, Q = config.n_layers, config.d_model, config.n_kv_heads, config.d_head
    for name, shape, axis in (("wk", (N, E, K * r, Q), 2), ("wv", (N, E, K * r, Q), 2), ("bk", (N, K * r, Q), 1),
                              ("bv", (N, K * r, Q), 1)):  # fmt: skip
        new, old = out["layers"][name], params["layers"][name]
        assert new.shape == shape and tuple(new.shape) == jax.eval_shape(lambda: init_params(
            declared, jax.random.key(0)))["layers"][name].shape  # fmt: skip
        parts = (new.values, new.scale, old.values, old.scale) if isinstance(new, QuantizedArray) else (new, old)
        if isinstance(new, QuantizedArray):
            assert weights == "int8" and new.scale.shape[axis] == K * r  # the scale repeats with its values
        for got, was in zip(parts[: len(parts) // 2], parts[len(parts) // 2 :], strict=True):
            for j in range(K * r):  # new head j is true head j // r
                np.testing.assert_array_equal(np.take(np.asarray(got), j, axis), np.take(np.asarray(was), j // r, axis))
    assert out["layers"]["wq"] is params["layers"]["wq"] and out["embed"] is params["embed"]  # nothing else copied
    assert replicate_kv_params(config, params, 1) is params
    consumed = replicate_kv_params(config, dict(params, layers=dict(params["layers"])), r, consume=True)
    leaf = params["layers"]["wk"]
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(leaf))  # the original freed once repeated
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(consumed["layers"]["wk"]))


# ------------------------------------------------------------------------------------------------ on the mesh


@pytest.mark.parametrize("ffn,r", [("ws2d", 2), ("ws1d", 4)])
def test_float32_prefill_and_decode_equal_one_device(ffn, r):
    """2 kv heads on 2x2x2: ws2d (heads over y·z = 4) repeats them twice, ws1d (over all 8) four times; heads-sharded
    attention; prefill logits and three decode steps equal the one-device model's, float32."""
    config, params = _tiny()
    mesh, layout = make_mesh("2x2x2"), Layout(ffn, "heads")
    B, T, S = 2, 8, 16
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size)
    lengths = jnp.array([8, 5])
    ref_logits, k, v = transformer.prefill(params, config, tokens, lengths)
    ref_cache = transformer.insert(transformer.init_cache(config, B, S, k.dtype), k, v, lengths, jnp.arange(B))

    with pytest.raises(sharded.LayoutError, match=f"replicate each kv head {r} times"):
        sharded.check_model(config, mesh, layout, B)  # the true model as given: refused, saying what fixes it
    run, on_mesh = sharded.replicate_for_mesh(config, params, mesh, ffn)
    assert run.n_kv_heads == 2 * r and run.true_kv_heads == 2
    assert on_mesh["layers"]["wk"].sharding.spec == sharded.param_specs(run, ffn)["layers"]["wk"]  # placed as stored
    logits, k, v = sharded.prefill(on_mesh, run, tokens, lengths, mesh=mesh, layout=layout)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-6, rtol=1e-5)
    cache = sharded.init_cache(run, mesh, layout, B, S, k.dtype)
    cache = sharded.insert(cache, k, v, lengths, jnp.arange(B), config=run, mesh=mesh, prefill_layout=layout,
                           decode_layout=layout)  # fmt: skip
    nxt = jnp.argmax(ref_logits, -1)
    for _ in range(3):
        ref_step, ref_cache = transformer.decode_step(params, config, nxt, ref_cache)
        step, cache = sharded.decode_step(on_mesh, run, nxt, cache, mesh=mesh, layout=layout)
        np.testing.assert_allclose(step, ref_step, atol=2e-6, rtol=1e-5)
        nxt = jnp.argmax(ref_step, -1)


def test_generate_sharded_gives_the_one_device_tokens_with_int8_weights():
    """What `meshserve generate --mesh 2x2x2` runs (the model as loaded, replicated inside): greedy tokens equal."""
    config, params = _tiny("int8")
    prompts = [[5, 17, 33, 2, 9, 41], [7, 8]]
    want = [r.tokens for r in generate(params, config, prompts, max_new_tokens=6)]
    got = sharded.generate_sharded(
        params,
        config,
        prompts,
        mesh=make_mesh("2x2x2"),
        max_new_tokens=6,
        prefill_layout=Layout("ws2d", "heads"),
        decode_layout=Layout("ws2d", "batch"),
    )
    assert [r.tokens for r in got] == want and len({t for w in want for t in w}) > 2


# ------------------------------------------------------------------------------------------------ analytics


def test_analytics_prices_the_replicated_kv_cache_where_it_used_to_refuse():
    from meshserve.analytics import get_chip
    from meshserve.analytics.cost import estimate
    from meshserve.analytics.plan import analysis_config, choose_plan
    from meshserve.analytics.sizes import model_sizes
    from meshserve.partition.comm import LayoutError, MeshShape

    config, chip, mesh = get_config("llama-2-70b"), get_chip("tpu-v4"), MeshShape(4, 4, 4)
    kw = dict(phase="decode", batch=8, prompt_len=1024, gen_len=64, attention="heads")
    with pytest.raises(LayoutError, match="n_kv_heads K = 8 is not divisible by the ws2d split 16"):
        estimate(config, chip, mesh, ffn_layout="ws2d", **kw)  # the true model: refused, as before
    for ffn, r in (("ws2d", 2), ("ws1d", 8)):
        run = analysis_config(config, mesh, ffn)
        assert (run.n_kv_heads, run.true_kv_heads) == (8 * r, 8)
        e = estimate(run, chip, mesh, ffn_layout=ffn, **kw)
        split = 16 if ffn == "ws2d" else 64
        true_kv = 2 * 80 * 8 * (1024 + 64) * 8 * 128 * 2  # k and v, N, B, S, K, Q, bf16: the whole true cache
        assert e.memory["kv_cache"] == true_kv * r / split > true_kv / split  # r copies of what an even split holds
        more_kv = model_sizes(run).params - model_sizes(config).params
        assert more_kv == 80 * 2 * 8192 * (8 * r - 8) * 128  # the repeated W_K, W_V
        assert model_sizes(run).real_params == model_sizes(config).params  # MFU counts the model once
    plan = choose_plan(config, chip, mesh=mesh, batch_buckets=[8], prompt_len=1024, storage="2d")
    assert plan.kv_replication == 2 and plan.n_kv_heads == 16 and plan.fits


def test_memory_estimators_count_the_serial_blocks_second_norm():
    """The serial block's mlp_norm (declared for parallel_block=False) is in every weight count: N·E more bf16
    scales than the parallel block, whole on every chip."""
    from meshserve.analytics.cost import memory_per_chip
    from meshserve.analytics.memory import memory_estimate
    from meshserve.analytics.sizes import model_sizes
    from meshserve.model.params import declare
    from meshserve.partition.comm import LayerDims, MeshShape
    from meshserve.partition.rules import weight_bytes_per_chip

    parallel, serial = get_config("llama-2-7b", parallel_block=True), get_config("llama-2-7b")
    assert "mlp_norm" in declare(serial)["layers"] and "mlp_norm" not in declare(parallel)["layers"]
    norm = serial.n_layers * serial.d_model
    assert model_sizes(serial).params - model_sizes(parallel).params == norm
    for weights, per in (("bf16", 2), ("int8", 2), ("f32", 4)):  # norms stay bf16 under int8
        diff = memory_estimate(serial, weights=weights)["weights_bytes"] - memory_estimate(parallel, weights=weights)[
            "weights_bytes"]  # fmt: skip
        assert diff == norm * per, weights
    mesh = MeshShape(2, 2, 2)
    for ffn in ("ws1d", "ws2d", "wg-xy"):
        a, b = (weight_bytes_per_chip(declare(c), ffn, mesh, "bf16", False) for c in (serial, parallel))
        assert a - b == norm * 2  # whole on every chip: not divided by the 8 chips
    dims = LayerDims(1, 1, 1, 4096, 11008, 32, 32, 128)
    got = [memory_per_chip(c, mesh, model_sizes(c), "bf16", "ws2d", dims, 0.0)["weights"] for c in (serial, parallel)]
    assert got[0] - got[1] == norm * 2 and math.isfinite(got[0])
