"""Per-chip memory of the sharded weights and KV cache, measured on the emulated mesh, against the cost model.

KV cache: equal to analytics' figure exactly (both split it as partition/comm.py's kv_axes says).
Weights: equal to analytics' figure exactly: both read partition/rules.py's split tables (weight_split), which keep
norms whole, multi-query K/V projections split over E only, and int8 scales split like their output dim.
"""

import jax
import pytest
from meshserve.analytics.chips import get_chip
from meshserve.analytics.cost import estimate
from meshserve.model import get_config, sharded
from meshserve.model.params import cast_params, init_params
from meshserve.partition.mesh import make_mesh, mesh_shape
from meshserve.partition.rules import Layout


def mesh_shape_n(text: str) -> int:
    x, y, z = (int(p) for p in text.split("x"))
    return x * y * z


def per_chip_bytes(tree) -> int:
    """Bytes device 0 holds of every array in `tree` (each chip holds the same amount here)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "mesh_text,layout,kv_heads,weights",
    [
        ("2x2x2", Layout("ws2d", "batch"), 1, "bf16"),
        ("2x2x2", Layout("ws2d", "heads"), 1, "int8"),
        ("2x2x2", Layout("ws1d", "heads"), 8, "int8"),
        ("2x2x2", Layout("ws1d", "batch"), 1, "bf16"),
        ("1x2x4", Layout("wg-xy", "batch"), 8, "bf16"),
        ("2x1x2", Layout("wg-xyz", "batch"), 8, "int8"),
    ],
)
def test_per_chip_memory_equals_cost_model(mesh_text, layout, kv_heads, weights):
    n = mesh_shape_n(mesh_text)
    mesh = make_mesh(mesh_text, jax.devices()[:n])
    config = get_config("tiny", n_kv_heads=kv_heads)
    batch, prompt, gen = 8, 24, 40
    params = cast_params(config, init_params(config, jax.random.key(0)), weights)
    on_mesh = sharded.shard_params(params, config, mesh, layout.ffn)
    cache = sharded.init_cache(config, mesh, layout, batch, prompt + gen)
    model = estimate(config, get_chip("tpu-v4"), mesh_shape(mesh), phase="decode", batch=batch, prompt_len=prompt,
                     gen_len=gen, weights=weights, ffn_layout=layout.ffn, attention=layout.attention).memory  # fmt: skip

    assert per_chip_bytes((cache.k, cache.v)) == model["kv_cache"]
    measured = per_chip_bytes(on_mesh)
    assert measured == model["weights"]  # norms, multi-query W_K/W_V and int8 scales as stored, no surplus
    assert measured < 0.5 * per_chip_bytes(params)  # sharding really shrinks what each chip holds


def test_checkpoint_restores_straight_into_the_layout(tmp_path):
    from meshserve.model.checkpoint import load_checkpoint, save_checkpoint

    mesh = make_mesh("2x2x2")
    config = get_config("tiny")
    params = cast_params(config, init_params(config, jax.random.key(0)), "int8")
    save_checkpoint(tmp_path / "ckpt", config, params, "int8", None)
    _, restored = load_checkpoint(tmp_path / "ckpt", shardings=sharded.param_shardings(config, mesh, "ws2d"))
    wq = restored["layers"]["wq"]  # QuantizedArray [N, E_x, H_yz, Q] with its scale [N, 1, H_yz, Q]
    assert wq.values.sharding.spec == jax.sharding.PartitionSpec(None, "x", ("z", "y"), None)
    assert wq.scale.sharding.spec == jax.sharding.PartitionSpec(None, None, ("z", "y"), None)
    assert per_chip_bytes(restored) == per_chip_bytes(sharded.shard_params(params, config, mesh, "ws2d"))
