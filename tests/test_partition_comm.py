"""partition/comm.py and rules.py without devices: the collective list against PAPER.md's formulas, bad input."""

import pytest
from meshserve.errors import UserError
from meshserve.partition.comm import (
    FFN_LAYOUTS,
    LayerDims,
    LayoutError,
    MeshShape,
    attention_batch_axes,
    kv_axes,
    layer_collectives,
    reshard_collectives,
)
from meshserve.partition.rules import check_rules, make_rules_two_d, make_rules_weight_gathered

M = MeshShape(2, 2, 2)
PALM_8B = dict(d_model=4096, d_ff=16384, n_heads=16, n_kv_heads=1, d_head=256)


def dims(batch=8, tokens=4, **kw):
    return LayerDims(batch=batch, tokens=tokens, context=tokens, **{**PALM_8B, **kw})


def total(colls, block=None, kinds=("all-gather", "reduce-scatter")):
    return sum(c.bytes_per_chip for c in colls if c.kind in kinds and (block is None or c.block == block))


def test_mesh_parse_and_errors():
    m = MeshShape.parse("1x2x4")
    assert (m.x, m.y, m.z, m.n, m.size(("y", "z"))) == (1, 2, 4, 8, 8)
    for bad in ("2x2", "2x2x2x2", "axbxc", "0x2x2", ""):
        with pytest.raises(UserError, match="mesh"):
            MeshShape.parse(bad)


def test_ws1d_moves_2BLE_independent_of_chips():
    # PAPER.md: 1D T_comm = 2·B·L·E/bw whatever n (all-gather + reduce-scatter of the whole BLE).
    for mesh in (MeshShape(2, 2, 2), MeshShape(4, 4, 4)):
        d = dims(n_heads=64)
        assert total(layer_collectives("ws1d", "heads", mesh, d)) == 2 * d.batch * d.tokens * d.d_model * 2


def test_ws2d_matches_paper_formula():
    # PAPER.md: 2D T_comm = (2·B·L/bw)·(E/X + F/(Y·Z)); SwiGLU's two input matmuls double the F reduce-scatter.
    mesh, d = MeshShape(4, 4, 4), dims(n_heads=64)
    colls = layer_collectives("ws2d", "heads", mesh, d)
    B, L, E, F = d.batch, d.tokens, d.d_model, d.d_ff
    ffn = total(colls, "ffn")
    assert ffn == 2 * (2 * B * L * E // 4 + 3 * B * L * F // 16)  # AG+RS of E/X, RS of 2·F/YZ, AG of F/YZ
    assert [c.kind for c in colls if c.axes == ("x",)].count("all-reduce") == 2  # norm statistics, qkv


def test_weight_gathered_traffic():
    # PAPER.md: weights gathered over N chips, activations over n/N: per-chip bytes E·F·(F/YZ)... per weight.
    d = dims(batch=64)
    for layout, N in (("wg-x", 2), ("wg-xy", 4), ("wg-xyz", 8)):
        colls = layer_collectives(layout, "batch", M, d)
        w_up = next(c for c in colls if c.tensor.startswith("W_up"))
        assert w_up.bytes_per_chip == d.d_model * d.d_ff * N // M.n * 2
        acts = total(colls, "ffn")
        assert acts == (0 if N == 8 else 2 * (d.batch // N) * d.tokens * d.d_model * 2)
    int8 = layer_collectives("wg-xyz", "batch", M, dims(batch=64, weight_bytes=1))
    bf16 = layer_collectives("wg-xyz", "batch", M, dims(batch=64))
    assert total(int8, "weights") < 0.51 * total(bf16, "weights")  # int8 gathers half the bytes (+ scales)


def test_batch_attention_splits_a_subset_when_batch_is_small():
    assert attention_batch_axes("ws2d", "batch", M, 8) == ("x", "z", "y")
    assert attention_batch_axes("ws2d", "batch", M, 4) == ("x", "y")
    assert attention_batch_axes("ws2d", "batch", M, 2) == ("x",)
    assert attention_batch_axes("ws1d", "batch", M, 2) == ("z",)
    assert attention_batch_axes("ws2d", "heads", M, 1) == ()
    with pytest.raises(LayoutError, match="batch 1"):
        attention_batch_axes("ws2d", "batch", M, 1)


def test_bad_dims_name_the_dim_and_split():
    with pytest.raises(LayoutError, match=r"n_heads H = 12 .* 8"):
        layer_collectives("ws1d", "heads", M, dims(n_heads=12))
    with pytest.raises(LayoutError, match=r"d_ff F = 100 "):
        layer_collectives("ws2d", "heads", M, dims(d_ff=100))
    with pytest.raises(LayoutError, match=r"batch B = 4 .* split 8"):
        layer_collectives("wg-xyz", "batch", M, dims(batch=4))
    with pytest.raises(LayoutError, match="layout must be one of"):
        layer_collectives("ws3d", "heads", M, dims())


def test_size_one_axes_run_no_collectives():
    one = MeshShape(1, 1, 1)
    for layout in FFN_LAYOUTS:
        assert layer_collectives(layout, "batch", one, dims(batch=1)) == []


def test_kv_split_and_reshard():
    d = dims(batch=8, n_kv_heads=8)
    assert kv_axes("ws2d", "heads", M, d) == ((), ("y", "z"))
    assert kv_axes("ws2d", "batch", M, d) == (("x", "y", "z"), ())
    assert kv_axes("wg-x", "batch", M, d) == (("x",), ("y", "z"))
    assert reshard_collectives("ws2d", "heads", "ws2d", "heads", M, d) == []
    moves = reshard_collectives("wg-xyz", "batch", "ws2d", "batch", M, dims(batch=8), n_layers=3)
    assert len(moves) == 3  # one per layer: a chip never holds more than one layer's moving rows
    for move in moves:
        assert (move.kind, move.axes) == ("all-to-all", ("x", "y", "z"))
        # K and V of one layer: 8 chip pairs x cap = min(1 row per prefill chip, 1 slot per decode chip), T·K·Q bf16
        assert move.bytes_per_chip == 2 * 8 * 1 * 4 * 1 * 256 * 2


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    assert make_rules_two_d().weights["embed"] == ("x",)
    assert make_rules_weight_gathered(("x", "y")).residual == {"batch": ("x", "y"), "embed": ("z",)}
    with pytest.raises(LayoutError, match="mesh axis x holds both"):
        check_rules({"embed": ("x",), "mlp": ("x", "y")})


def test_overlap_keeps_the_norm_statistics_when_yz_is_one():
    # the looped einsum's norm sums its statistics over every live axis, also when Y·Z = 1 (no ring at all)
    for mesh in (MeshShape(2, 1, 1), MeshShape(8, 1, 1), MeshShape(2, 2, 2)):
        colls = layer_collectives("ws2d", "heads", mesh, dims(), overlap=True)
        stats = [c for c in colls if c.tensor.startswith("BL2")]
        assert [(c.kind, c.axes) for c in stats] == [("all-reduce", tuple(a for a in "xyz" if getattr(mesh, a) > 1))]


def test_weight_gathered_layouts_refuse_heads_attention():
    # wg-* always split attention's batch over their gathered axes: 'heads' would be silently ignored
    for layout in ("wg-x", "wg-xy", "wg-xyz"):
        with pytest.raises(LayoutError, match=rf"attention 'heads' means nothing under {layout}"):
            layer_collectives(layout, "heads", M, dims(batch=8))
        assert layer_collectives(layout, "batch", M, dims(batch=8))


def test_batch_split_error_names_the_smallest_real_split_on_a_mesh_with_size_one_axes():
    # ws2d on 1x2x4: x has one chip, so the smallest batch split is over y (2 ways), not "1 ways (axes x)"
    with pytest.raises(
        LayoutError, match=r"at least 2 ways \(axes y\); batch 1 .* multiple of 2 .*2 over y, 8 over yz"
    ):
        attention_batch_axes("ws2d", "batch", MeshShape(1, 2, 4), 1)
    with pytest.raises(LayoutError, match=r"at least 2 ways \(axes z\); batch 3 .*splits: 2 over z, 4 over xz\)"):
        attention_batch_axes("ws1d", "batch", MeshShape(2, 1, 2), 3)


def _key(c):
    return c.kind, c.axes, c.bytes_per_chip


def test_serial_block_adds_one_input_gather_and_one_output_reduce_scatter():
    # Llama's serial block: the MLP reads the residual after attention's add, so each half gathers the residual
    # (ws2d: and sums its norm statistics) and reduce-scatters its own output; everything else runs once.
    from collections import Counter

    d = dims(n_kv_heads=8)  # grouped-query: 8 kv heads of 16
    cases = [("ws1d", "batch", False, M), ("ws2d", "heads", False, M), ("ws2d", "batch", True, M),
             ("wg-xy", "batch", False, M), ("ws2d", "batch", True, MeshShape(2, 1, 1))]  # fmt: skip
    for layout, attention, overlap, mesh in cases:
        parallel = Counter(map(_key, layer_collectives(layout, attention, mesh, d, overlap=overlap)))
        serial_dims = LayerDims(**{**d.__dict__, "serial": True})
        serial = Counter(map(_key, layer_collectives(layout, attention, mesh, serial_dims, overlap)))
        assert not parallel - serial  # nothing dropped
        # the extra ones: the residual's gather (+ statistics; overlap: its ring) and the output reduce-scatter
        # (overlap: its ring), not ws2d's ffn RS(x)/AG(x) around the activation, nor the weights' gathers
        sides = [c for c in layer_collectives(layout, attention, mesh, d, overlap=overlap)
                 if c.block == "ffn" and (c.kind == "all-reduce" or c.axes != ("x",))]  # fmt: skip
        assert serial - parallel == Counter(map(_key, sides)), (layout, attention, overlap, mesh)
        ring = 2 * (mesh.y * mesh.z - 1) if overlap else 0
        assert len(sides) == {"ws1d": 2, "wg-xy": 2}.get(layout, 1 + ring if overlap else 3)


def test_the_cost_model_prices_a_serial_model_s_own_list():
    # analytics.cost reads partition.comm: Llama's step pays its extra collectives, a parallel twin does not
    from meshserve.analytics import collective_time, estimate, get_chip
    from meshserve.analytics.cost import layer_dims
    from meshserve.model.config import get_config

    llama, chip = get_config("llama-2-70b"), get_chip("tpu-v4")
    twin = llama.replace(parallel_block=True)
    kw = dict(phase="decode", batch=64, prompt_len=2048, gen_len=64, weights="int8", ffn_layout="ws2d",
              attention="batch")  # fmt: skip
    serial, parallel = estimate(llama, chip, M, **kw), estimate(twin, chip, M, **kw)
    dims, twin_dims = layer_dims(llama, 64, 1, 2048 + 32, "int8"), layer_dims(twin, 64, 1, 2048 + 32, "int8")
    assert dims.serial and not twin_dims.serial
    listed = layer_collectives("ws2d", "batch", M, dims)
    assert [(c["kind"], c["axes"], c["bytes_per_chip"]) for c in serial.collectives] == list(map(_key, listed))

    def comm(colls):
        return sum(collective_time(c, M, chip)[0] for c in colls)

    difference = llama.n_layers * (comm(listed) - comm(layer_collectives("ws2d", "batch", M, twin_dims)))
    assert serial.breakdown.comm_s - parallel.breakdown.comm_s == pytest.approx(difference)
    assert difference > 0 and serial.step_s > parallel.step_s


def test_post_norms_add_one_statistics_all_reduce_after_each_output():
    # Gemma 3: each half's output is normed after its reduce-scatter, on the residual's E split: its sum and sum of
    # squares (float32, NORM_STAT_BYTES per token) are summed over that split, right after each output collective.
    from collections import Counter

    from meshserve.partition.dims import NORM_STAT_BYTES

    serial = dims(n_kv_heads=8, serial=True)
    post = LayerDims(**{**serial.__dict__, "post_norms": True})
    B, L, xyz = serial.batch, serial.tokens, ("x", "y", "z")
    cases = [("ws1d", "batch", False, M, xyz, B), ("ws2d", "heads", False, M, xyz, B),
             ("ws2d", "batch", True, M, xyz, B), ("ws2d", "heads", False, MeshShape(1, 2, 4), ("y", "z"), B),
             ("wg-x", "batch", False, M, ("y", "z"), B // 2), ("wg-xy", "batch", False, M, ("z",), B // 4),
             ("wg-xyz", "batch", False, M, None, 0)]  # fmt: skip
    for layout, attention, overlap, mesh, axes, rows in cases:
        plain = layer_collectives(layout, attention, mesh, serial, overlap)
        normed = layer_collectives(layout, attention, mesh, post, overlap)
        if axes is None:  # wg-xyz: E is whole on each chip, the post norms are local
            assert normed == plain
            continue
        assert not Counter(map(_key, plain)) - Counter(map(_key, normed))  # nothing dropped
        extra = Counter(map(_key, normed)) - Counter(map(_key, plain))
        assert extra == Counter({("all-reduce", axes, rows * L * NORM_STAT_BYTES): 2}), (layout, attention, overlap)
        # program order: each right after its half's output collective (the attention half's, then the MLP's)
        at = [i for i, c in enumerate(normed) if c.tensor.endswith("(post norm)")]
        assert len(at) == 2 and at[1] == len(normed) - 1
        assert [normed[i - 1].kind for i in at] == ["collective-permute" if overlap else "reduce-scatter"] * 2
        assert [c for c in normed if not c.tensor.endswith("(post norm)")] == plain
    with pytest.raises(LayoutError, match="post_norms needs the serial block"):
        layer_collectives("ws2d", "heads", M, LayerDims(**{**post.__dict__, "serial": False}))
