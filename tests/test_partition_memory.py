"""Per-chip memory of the sharded weights and KV cache, measured on the emulated mesh, against the cost model.

KV cache: equal to analytics' figure exactly (both split it as partition/comm.py's kv_axes says).
Weights: analytics charges every weight split n ways; the stored layout keeps a few small tensors whole or split
fewer ways (norms; multi-query K/V projections, which have no heads to split; int8 scales along unsplit dims).
The test derives that surplus by hand from the shapes and checks measured = cost model + surplus, exactly.
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


def surplus(config, mesh, storage: str, weights: str) -> float:
    """Bytes per chip above total/n, by hand: what the layout keeps whole or splits fewer than n ways."""
    N, E, F, H, K, Q = (config.n_layers, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads,
                        config.d_head)  # fmt: skip
    n, X, YZ = mesh.n, mesh.x, mesh.y * mesh.z
    act = 4 if weights == "f32" else 2  # norms (and scales) stay bf16 unless f32
    wb = {"f32": 4, "bf16": 2, "int8": 1}[weights]
    out = (N * E + E) * act * (1 - 1 / n)  # attn_norm per layer + final_norm: whole on every chip
    heads_split = n if storage == "1d" else YZ
    e_split = 1 if storage == "1d" else X
    if K == 1:  # W_K, W_V [E, 1, Q]: E split over x (2D) or whole (1D)
        out += 2 * N * E * Q * wb * (1 / e_split - 1 / n)
    if weights == "int8":  # scales, bf16: one per output channel, split like that output dim
        out += N * H * Q * 2 * (1 / heads_split - 1 / n)  # wq scale [1, H, Q]
        out += 2 * N * K * Q * 2 * ((1 if K == 1 else 1 / heads_split) - 1 / n)  # wk, wv scales
        out += 2 * N * E * 2 * (1 / e_split - 1 / n)  # wo and w_down scales [.., E]
        out += 2 * N * F * 2 * (1 / (n if storage == "1d" else YZ) - 1 / n)  # w_up, w_gate scales [.., F]
    return out


@pytest.mark.parametrize(
    "mesh_text,layout,kv_heads,weights",
    [
        ("2x2x2", Layout("ws2d", "batch"), 1, "bf16"),
        ("2x2x2", Layout("ws2d", "heads"), 1, "int8"),
        ("2x2x2", Layout("ws1d", "heads"), 8, "int8"),
        ("2x2x2", Layout("ws1d", "batch"), 1, "bf16"),
        ("1x2x4", Layout("wg-xy", "heads"), 8, "bf16"),
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
    storage = "1d" if layout.ffn == "ws1d" else "2d"
    measured = per_chip_bytes(on_mesh)
    assert measured == pytest.approx(model["weights"] + surplus(config, mesh_shape(mesh), storage, weights), abs=0.5)
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
