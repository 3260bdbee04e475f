"""The phase switch (model/sharded.py insert) moves only what each chip keeps, and still equals one device.

Rows go to arbitrary cache slots (the serving engine fills whichever slots are free), so every case scatters
the prefilled rows into shuffled slots of a larger cache and compares the whole cache with transformer.insert.
The compiled program's reshard collectives equal partition/comm.py's list (kind, axes, bytes per layer).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import get_config, sharded, transformer
from meshserve.partition.comm import LayerDims, MeshShape, reshard_collectives
from meshserve.partition.hlo import collectives_in_hlo, summarize
from meshserve.partition.mesh import make_mesh, mesh_shape
from meshserve.partition.rules import Layout

CASES = [
    # (prefill layout, decode layout, kv heads, prefill rows b, cache slots B)
    (Layout("wg-xyz", "batch"), Layout("ws2d", "batch"), 1, 8, 16),  # the paper's throughput pair
    (Layout("wg-x", "batch"), Layout("ws2d", "batch"), 1, 8, 8),  # decode chips hold fewer slots than rows
    (Layout("wg-x", "batch"), Layout("ws2d", "batch"), 8, 4, 16),  # multi-head: kv heads zy -> whole
    (Layout("wg-xy", "batch"), Layout("ws2d", "heads"), 8, 4, 8),  # kv heads z -> zy: a slice, no gather
    (Layout("wg-x", "batch"), Layout("ws2d", "batch"), 8, 4, 4),  # kv heads zy -> z: gather over y only
    (Layout("ws2d", "heads"), Layout("ws2d", "batch"), 8, 3, 8),  # rows replicated: local slice only
    (Layout("ws1d", "batch"), Layout("ws1d", "heads"), 8, 2, 8),  # 1D storage, batch over z
]


@pytest.mark.parametrize("prefill,decode,kv_heads,b,B", CASES)
def test_insert_into_shuffled_slots_equals_one_device(prefill, decode, kv_heads, b, B):
    mesh = make_mesh("2x2x2")
    config = get_config("tiny", n_kv_heads=kv_heads)
    T, S = 4, 8
    shape = (config.n_layers, b, T, kv_heads, config.d_head)
    k, v = (jax.random.normal(jax.random.key(i), shape) for i in (1, 2))
    lengths = jnp.arange(b, dtype=jnp.int32) % T + 1
    slots = jnp.asarray(np.random.default_rng(b + B).permutation(B)[:b], jnp.int32)
    want = transformer.insert(transformer.init_cache(config, B, S, jnp.float32), k, v, lengths, slots)
    p_spec = jax.sharding.NamedSharding(mesh, sharded.kv_spec(config, mesh, prefill, b))
    cache = sharded.init_cache(config, mesh, decode, B, S, jnp.float32)
    got = sharded.insert(cache, jax.device_put(k, p_spec), jax.device_put(v, p_spec), lengths, slots, config=config,
                         mesh=mesh, prefill_layout=prefill, decode_layout=decode)  # fmt: skip
    np.testing.assert_array_equal(got.k, want.k)
    np.testing.assert_array_equal(got.v, want.v)
    np.testing.assert_array_equal(got.lengths, want.lengths)

    text = sharded.insert_hlo(config, mesh, prefill, decode, batch=b, tokens=T, slots=B, context=S,
                              dtype=jnp.float32, compiled=False)  # fmt: skip
    dims = LayerDims(b, T, T, config.d_model, config.d_ff, config.n_heads, kv_heads, config.d_head)
    listed = reshard_collectives(prefill.ffn, prefill.attention, decode.ffn, decode.attention, mesh_shape(mesh),
                                 dims, cache_bytes=4, decode_batch=B)  # fmt: skip
    assert summarize(collectives_in_hlo(text, mesh)) == summarize(listed)  # one layer: the loop body


def test_rows_move_only_where_a_chip_keeps_them():
    # Per chip, per layer, K and V: the all-gather's output was every prefill row; the all-to-all's buffer holds
    # cap = min(rows per prefill chip, slots per decode chip) rows per chip pair.
    mesh, row = MeshShape(2, 2, 2), 2 * 4 * 256 * 2  # k and v, T = 4, Q = 256, bf16, one kv head
    dims = lambda b, **kw: LayerDims(b, 4, 4, 4096, 16384, 16, kw.get("kv", 1), 256)  # noqa: E731
    [a2a] = reshard_collectives("wg-x", "batch", "ws2d", "batch", mesh, dims(8), decode_batch=8)
    assert (a2a.kind, a2a.axes, a2a.bytes_per_chip) == ("all-to-all", ("x",), 2 * 1 * row)  # was 8 rows
    [a2a] = reshard_collectives("wg-xyz", "batch", "ws2d", "batch", mesh, dims(8), decode_batch=64)
    assert a2a.bytes_per_chip == 8 * 1 * row  # one row per chip, any of which may land on any chip: no saving
    # multi-head wg-x -> ws2d batch at B = 4 (batch over xy, kv heads over z): gather y on the chip's own 2 rows,
    # then cap = 1 row of K/2 heads per chip pair over x (was: all-gather(x) of 4 rows, all-gather(yz) of 4 rows x K)
    gather, a2a = reshard_collectives("wg-x", "batch", "ws2d", "batch", mesh, dims(4, kv=8), decode_batch=4)
    assert (gather.kind, gather.axes, gather.bytes_per_chip) == ("all-gather", ("y",), 2 * 4 * row)
    assert (a2a.kind, a2a.axes, a2a.bytes_per_chip) == ("all-to-all", ("x",), 2 * 1 * 4 * row)
    assert reshard_collectives("ws2d", "heads", "ws2d", "batch", mesh, dims(8, kv=8)) != []  # heads zy -> whole
    assert reshard_collectives("ws2d", "heads", "ws2d", "heads", mesh, dims(8, kv=8)) == []
