"""Sharded equals one device: every layout, in both phases, against the unsharded model on the same weights.

float32 compute (over f32, bf16 or int8 stored weights): logits equal to float32 rounding at every step (prefill,
the phase switch, decode) for every layout x attention, both storages, multi-query and multi-head, B = 2, 4, 8.
bf16 / int8 weights: whole generations (prefill layout -> phase switch -> 16 greedy decode steps in the decode
layout) give identical tokens, computing in float32 over the stored bf16/int8 weights (which move and gather
as stored); and with bf16 compute, prefill and decode logits agree within bf16 rounding. (A random tiny model's
top-2 logits are often closer than bf16 rounding, so greedy tokens are compared where rounding cannot swap them.)
Together the cases run every layout in both phases, with bf16 and int8, multi-query and multi-head, on 8 and 4
emulated devices. Llama-family variants (serial block, grouped-query attention, q/k/v and linear biases, rope
scaling, Qwen3's q/k norms, Gemma 3's sliding window, local rotary base, (1 + w) norms and post norms) and a
biased parallel block equal one device under each ws layout, the looped einsum and two wg layouts; a windowed model
generates the one-device tokens past its window over f32 / bf16 / int8 weights and the int8 KV cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from meshserve.model import get_config, sharded, transformer
from meshserve.model.generate import generate
from meshserve.model.params import cast_params, init_params
from meshserve.partition.mesh import make_mesh
from meshserve.partition.rules import Layout

PROMPTS = [[5, 17, 33, 2, 9, 41], [7, 8], list(range(60, 71))]


def tiny(kv_heads: int, weights: str, compute_f32: bool = False):
    config = get_config("tiny", n_kv_heads=kv_heads)
    params = cast_params(config, init_params(config, jax.random.key(kv_heads)), weights)
    if compute_f32:  # activations follow the embedding's dtype; matmul weights stay bf16 / int8 as stored
        params["embed"] = params["embed"].astype(jnp.float32)
    return config, params


def _step_cases() -> list[tuple[str, str, int, str, int]]:
    """(ffn, attention, kv heads, stored weights, batch B): every layout x attention (weight-gathered: batch only)
    twice, so each sees bf16 and int8 storage and multi-query and multi-head, and B = 2 and 4 split the batch
    over a subset of the mesh's axes (ws1d z / yz, ws2d x / xy; wg-x / wg-xy their own). The f32-stored cases at
    B = 8 split it over the whole mesh. 16 cases rather than the whole 7 x 2 x 2 x 2 product keep it ~1 minute."""
    combos = [("ws1d", "heads"), ("ws1d", "batch"), ("ws2d", "heads"), ("ws2d", "batch"), ("wg-x", "batch"),
              ("wg-xy", "batch"), ("wg-xyz", "batch")]  # fmt: skip
    gathered = {"wg-x": 2, "wg-xy": 4, "wg-xyz": 8}
    cases = []
    for i, (ffn, attention) in enumerate(combos):
        for j, weights in enumerate(("bf16", "int8")):
            kv = (1, 8)[(i + j) % 2]
            batch = max(gathered.get(ffn, 1), (2, 4)[j])
            cases.append((ffn, attention, kv, weights, batch))
    full = [("ws1d", "batch", 8), ("ws2d", "batch", 1)]  # the batch over all of x, y, z (wg-xyz above too)
    return cases + [(ffn, attention, kv, "f32", 8) for ffn, attention, kv in full]


STEP_CASES = _step_cases()


@pytest.mark.parametrize("ffn,attention,kv_heads,weights,B", STEP_CASES)
def test_float32_steps_equal_one_device(ffn, attention, kv_heads, weights, B):
    config, params = tiny(kv_heads, weights, compute_f32=True)  # float32 compute over the stored weights
    _steps_equal_one_device(config, params, make_mesh("2x2x2"), Layout(ffn, attention), B)


def _steps_equal_one_device(config, params, mesh, layout, B):
    """Prefill, the phase switch and one decode step on `mesh` give the one-device float32 logits."""
    T, S = 8, 16
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 256)
    lengths = jnp.array([8, 3, 5, 1, 8, 2, 7, 4])[:B]
    ref_logits, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.insert(transformer.init_cache(config, B, S, k.dtype), k, v, lengths, jnp.arange(B))
    nxt = jnp.argmax(ref_logits, -1)
    ref_step, _ = transformer.decode_step(params, config, nxt, cache)

    on_mesh = sharded.shard_params(params, config, mesh, layout.ffn)
    logits, k, v = sharded.prefill(on_mesh, config, tokens, lengths, mesh=mesh, layout=layout)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-6, rtol=1e-5)
    cache = sharded.init_cache(config, mesh, layout, B, S, k.dtype)
    # Rows in reverse slot order: the phase switch must route every row to the chip holding its slot.
    slots = jnp.arange(B)[::-1]
    cache = sharded.insert(cache, k, v, lengths, slots, config=config, mesh=mesh, prefill_layout=layout,
                           decode_layout=layout)  # fmt: skip
    step, cache = sharded.decode_step(on_mesh, config, nxt[::-1], cache, mesh=mesh, layout=layout)
    np.testing.assert_allclose(step[::-1], ref_step, atol=2e-6, rtol=1e-5)
    assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, sharded.kv_spec(config, mesh, layout, B)), 5)
    np.testing.assert_array_equal(cache.lengths, lengths[::-1] + 1)


# Llama-family variants of tiny (float32): Qwen3-like (multi-query, per-head q/k RMSNorm), Qwen2-like (serial block,
# RMSNorm, grouped-query K = 4, q/k/v biases),
# Llama-3.1-like (serial, multi-query, every linear bias, rope scaling whose original length 4 < the 8-token prompts
# puts the 8 frequencies of d_head 16 in all three bands) and a Falcon-like parallel block (GELU, LayerNorm with
# bias, linear biases: b_up without a gate).
FAMILIES = {
    "qwen2": dict(parallel_block=False, norm="rmsnorm", n_kv_heads=4, qkv_bias=True),
    "llama31": dict(parallel_block=False, norm="rmsnorm", linear_bias=True, rope_scaling=(8.0, 1.0, 4.0, 4.0)),
    "falcon": dict(mlp="gelu", norm_bias=True, linear_bias=True),
    "qwen3": dict(parallel_block=False, norm="rmsnorm", n_kv_heads=1, qk_norm=True),  # multi-query, q/k RMSNorm
    # Gemma 3: a 3-token window on layer 0 (the 8-token prompts and the decode step cross it) with its own rotary
    # base, (1 + w) norms, post norms of whole sums (statistics over the E split), GeGLU, sqrt(E) embedding scale,
    # its own attention scale; multi-query, as Gemma 3 1B
    "gemma3": dict(
        parallel_block=False,
        norm="rmsnorm",
        n_kv_heads=1,
        qk_norm=True,
        mlp="geglu",
        sliding_window=3,
        global_layers=(1,),
        local_rope_base=100.0,
        norm_scale_offset=True,
        post_norms=True,
        scale_embed=True,
        attn_scale=0.3,
    ),
}


def family(name: str, **drop):
    """(config, float32 params) with random biases and norm weights (init makes them 0 and 1, which would hide a
    bias added twice or the MLP half reading attn_norm). drop: config fields to reset, for the checks below."""
    config = get_config("tiny", **{**FAMILIES[name], **drop})
    params = init_params(config, jax.random.key(7))
    keys = iter(jax.random.split(jax.random.key(8), 16))
    layer = params["layers"]
    for key in [k for k in layer if k.startswith("b")]:
        layer[key] = 0.3 * jax.random.normal(next(keys), layer[key].shape)
    for norm in [k for k in layer if k.endswith("_norm")]:
        layer[norm] = {k: v + 0.3 * jax.random.normal(next(keys), v.shape) for k, v in layer[norm].items()}
    return config, params


SERIAL_CASES = [
    # (family, mesh, layout, B): each ws layout with heads and batch attention, the looped einsum, a wg layout
    ("qwen2", "2x2x2", Layout("ws2d", "heads"), 4),
    ("qwen2", "2x2x2", Layout("ws2d", "batch", overlap=True), 8),
    ("qwen2", "1x2x2", Layout("ws1d", "batch"), 4),  # K = 4 kv heads split over 4 chips
    ("qwen2", "2x2x2", Layout("wg-xy", "batch"), 4),
    ("llama31", "2x2x2", Layout("ws2d", "batch"), 8),
    ("llama31", "2x2x2", Layout("ws1d", "heads"), 2),
    ("llama31", "2x2x2", Layout("wg-xyz", "batch"), 8),
    ("falcon", "2x2x2", Layout("ws2d", "heads", overlap=True), 2),
    # q/k norms of whole sums: after ws2d's reduction over x (a norm of a partial sum would differ), on local heads
    ("qwen3", "2x2x2", Layout("ws2d", "heads"), 4),
    ("qwen3", "2x2x2", Layout("ws2d", "batch", overlap=True), 8),
    ("qwen3", "2x2x2", Layout("wg-xyz", "batch"), 8),
    ("gemma3", "2x2x2", Layout("ws2d", "heads"), 4),
    ("gemma3", "2x2x2", Layout("ws2d", "batch", overlap=True), 8),
    ("gemma3", "1x2x2", Layout("ws1d", "batch"), 4),
    ("gemma3", "2x2x2", Layout("wg-xy", "batch"), 4),
]


def _case_id(case) -> str:
    name, mesh_text, layout, B = case
    return f"{name}-{mesh_text}-{layout.ffn}-{layout.attention}{'-overlap' if layout.overlap else ''}-B{B}"


@pytest.mark.parametrize("name,mesh_text,layout,B", SERIAL_CASES, ids=[_case_id(c) for c in SERIAL_CASES])
def test_serial_block_biases_and_rope_scaling_equal_one_device(name, mesh_text, layout, B):
    n = int(np.prod([int(s) for s in mesh_text.split("x")]))
    config, params = family(name)
    _steps_equal_one_device(config, params, make_mesh(mesh_text, jax.devices()[:n]), layout, B)


@pytest.mark.parametrize(
    "name,change",
    [("qwen2", ("bq", "bk", "bv")), ("llama31", ("bo", "b_down")), ("llama31", ("b_up", "b_gate")),
     ("llama31", "rope_scaling"), ("llama31", "mlp_norm"), ("falcon", ("bo", "b_up", "b_down")),
     ("qwen3", "qk_norm"), ("gemma3", "sliding_window"), ("gemma3", "local_rope_base"), ("gemma3", "attn_out_norm"),
     ("gemma3", "mlp_out_norm"), ("gemma3", "norm_scale_offset"), ("gemma3", "scale_embed")],
)  # fmt: skip
def test_each_family_feature_moves_the_logits(name, change):
    """The cases above would pass vacuously if a feature did nothing: without each one (biases zeroed, no rope
    scaling, attn_norm's weights for the MLP half) the logits move far more than their tolerance, so e.g. a bias
    added X times or the MLP half normalised with attn_norm would show."""
    tokens, lengths = jax.random.randint(jax.random.key(1), (2, 8), 0, 256), jnp.array([8, 5])
    config, params = family(name)
    layer = dict(params["layers"])
    other = config
    if change == "rope_scaling":
        other = config.replace(rope_scaling=())
    elif change == "qk_norm":
        other = config.replace(qk_norm=False)
        layer = {key: value for key, value in layer.items() if key not in ("q_norm", "k_norm")}
    elif change == "mlp_norm":
        layer["mlp_norm"] = layer["attn_norm"]
    elif change in ("sliding_window", "local_rope_base", "norm_scale_offset", "scale_embed"):
        other = config.replace(**{change: type(getattr(config, change))()}, **({"global_layers": ()} if change ==
                                                                              "sliding_window" else {}))  # fmt: skip
    elif isinstance(change, str) and change.endswith(
        "_out_norm"
    ):  # the output norm read as the MLP's input norm: a misplaced norm shows
        layer[change] = layer["mlp_norm"]
    else:
        layer.update({key: jnp.zeros_like(layer[key]) for key in change})
    want = transformer.prefill(params, config, tokens, lengths, all_logits=True)[0]
    got = transformer.prefill({**params, "layers": layer}, other, tokens, lengths, all_logits=True)[0]
    assert float(jnp.max(jnp.abs(got - want))) > 1e-2


@pytest.mark.parametrize(
    "weights,kv_cache_dtype", [("f32", "auto"), ("bf16", "int8"), ("int8", "int8")], ids=["f32", "bf16-kv8", "int8-kv8"]
)
def test_a_windowed_generation_equals_one_device(weights, kv_cache_dtype):
    """The Gemma-3-like family generates 16 tokens past its 3-token window with prefill and decode in different
    layouts, the tokens one device generates, over f32, bf16 and int8 stored weights (float32 compute) and the int8
    KV cache."""
    config, params = family("gemma3")
    params = cast_params(config, params, weights)
    params["embed"] = params["embed"].astype(jnp.float32)
    want = generate(params, config, PROMPTS, max_new_tokens=16, kv_cache_dtype=kv_cache_dtype)
    out = sharded.generate_sharded(params, config, PROMPTS, mesh=make_mesh("2x2x2"), prefill_layout=Layout("wg-xyz",
                                   "batch"), decode_layout=Layout("ws2d", "heads"), max_new_tokens=16,
                                   kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    for got, ref in zip(out, want, strict=True):
        assert got.tokens == ref.tokens and len(got.tokens) == 16
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)


GENERATIONS = [
    # (mesh, prefill layout, decode layout, kv heads, weights): each layout appears in both phases.
    ("2x2x2", Layout("wg-xyz", "batch"), Layout("ws2d", "batch"), 1, "bf16"),  # the paper's high throughput
    ("2x2x2", Layout("ws2d", "heads"), Layout("ws2d", "batch", overlap=True), 1, "int8"),  # its low latency
    ("2x2x2", Layout("wg-x", "batch"), Layout("wg-xyz", "batch"), 8, "int8"),
    ("2x2x2", Layout("wg-xy", "batch"), Layout("wg-x", "batch"), 8, "bf16"),
    ("1x2x2", Layout("ws1d", "heads"), Layout("ws1d", "batch"), 8, "int8"),  # 4 devices
    ("2x1x2", Layout("ws2d", "batch"), Layout("wg-xy", "batch"), 1, "bf16"),  # 4 devices, the paper's shape
]


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(kv_heads, weights):
        if (kv_heads, weights) not in cache:
            config, params = tiny(kv_heads, weights, compute_f32=True)
            cache[kv_heads, weights] = config, params, generate(params, config, PROMPTS, max_new_tokens=16)
        return cache[kv_heads, weights]

    return get


@pytest.mark.parametrize("mesh_text,prefill,decode,kv_heads,weights", GENERATIONS)
def test_generation_equals_one_device(references, mesh_text, prefill, decode, kv_heads, weights):
    config, params, ref = references(kv_heads, weights)
    n = int(np.prod([int(s) for s in mesh_text.split("x")]))
    mesh = make_mesh(mesh_text, jax.devices()[:n])
    out = sharded.generate_sharded(params, config, PROMPTS, mesh=mesh, prefill_layout=prefill, decode_layout=decode,
                                   max_new_tokens=16)  # fmt: skip
    for got, want in zip(out, ref, strict=True):
        assert got.tokens == want.tokens and len(got.tokens) == 16
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.finish_reason == want.finish_reason


@pytest.mark.parametrize(
    "prefill,decode,kv_heads,weights",
    [
        (Layout("ws2d", "heads"), Layout("ws2d", "batch"), 1, "int8"),
        (Layout("wg-xyz", "batch"), Layout("wg-xy", "batch"), 8, "bf16"),
    ],
)
def test_bf16_compute_logits_within_bf16_rounding(prefill, decode, kv_heads, weights):
    mesh = make_mesh("2x2x2")
    config, params = tiny(kv_heads, weights)
    B, T, S = 8, 8, 16
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, 256)
    lengths = jnp.array([8, 3, 5, 1, 8, 2, 7, 4])
    ref, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.insert(transformer.init_cache(config, B, S, k.dtype), k, v, lengths, jnp.arange(B))
    ref_step, _ = transformer.decode_step(params, config, jnp.argmax(ref, -1), cache)
    on_mesh = sharded.shard_params(params, config, mesh, prefill.ffn)
    logits, k, v = sharded.prefill(on_mesh, config, tokens, lengths, mesh=mesh, layout=prefill)
    cache = sharded.init_cache(config, mesh, decode, B, S, k.dtype)
    cache = sharded.insert(cache, k, v, lengths, jnp.arange(B), config=config, mesh=mesh, prefill_layout=prefill,
                           decode_layout=decode)  # fmt: skip
    step, _ = sharded.decode_step(on_mesh, config, jnp.argmax(ref, -1), cache, mesh=mesh, layout=decode)
    scale = float(jnp.max(jnp.abs(ref)))  # bf16 keeps 8 bits: a few units of 2^-8 of the logits' size
    np.testing.assert_allclose(logits, ref, atol=0.05 * scale)
    np.testing.assert_allclose(step, ref_step, atol=0.05 * scale)
    assert float(jnp.max(jnp.abs(logits - ref))) > 0  # bf16 rounding really differs: the check is not vacuous


@pytest.mark.parametrize(
    "prefill,decode,prompts,rows",
    [
        (Layout("ws2d", "heads"), Layout("ws2d", "batch"), PROMPTS[:1], 1),  # one prompt is prefilled as 1 row
        (Layout("wg-xyz", "batch"), Layout("ws2d", "heads"), PROMPTS[1:], 8),  # the prefill split pads to 8
    ],
)
def test_generation_prefills_only_the_real_rows(monkeypatch, references, prefill, decode, prompts, rows):
    config, params, _ = references(1, "bf16")
    mesh = make_mesh("2x2x2")
    seen, real = [], sharded._prefill

    def spy(params, config, tokens, lengths, **kw):  # records the traced prefill batch, runs the real step
        seen.append(tokens.shape[0])
        return real(params, config, tokens, lengths, **kw)

    monkeypatch.setattr(sharded, "_prefill", spy)
    sharded._generate.clear_cache()  # trace afresh so the spy sees this call's shapes
    out = sharded.generate_sharded(params, config, prompts, mesh=mesh, prefill_layout=prefill, decode_layout=decode,
                                   max_new_tokens=16)  # fmt: skip
    assert seen == [rows]
    want = generate(params, config, prompts, max_new_tokens=16)
    assert [r.tokens for r in out] == [r.tokens for r in want]
