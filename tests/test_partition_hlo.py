"""The collectives each layout compiles to equal partition/comm.py's list (kind, mesh axes, bytes per chip).

comm.py is what analytics/ prices, so these tests keep the cost model and the code from drifting apart.
The lowered HLO (the program as written, exact dtypes) is compared for every layout × attention × phase ×
(bf16, int8) × (multi-query, multi-head); the compiled HLO (after XLA's passes) for a subset in float32,
because XLA:CPU widens bf16 collectives to f32 (it would double their bytes on this machine only).
Llama's serial block (with linear biases and rope scaling, which must add no collective) is compared lowered for
every layout (int8, multi-head) and compiled for four layouts, grouped-query and the looped einsum among them.
"""

from collections import Counter

import jax
import pytest
from meshserve.model import get_config, sharded
from meshserve.model.params import cast_params, init_params
from meshserve.partition.comm import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    LayerDims,
    layer_collectives,
    reshard_collectives,
    step_collectives,
)
from meshserve.partition.hlo import collectives_in_hlo, summarize
from meshserve.partition.mesh import make_mesh, mesh_shape
from meshserve.partition.rules import Layout

BYTES = {"f32": 4, "bf16": 2, "int8": 1}
PHASES = {"prefill": (4, 0), "decode": (1, 16)}  # (tokens L, context S; 0 = attend over its own tokens)
# Llama's serial block; its biases (added on local slices) must add no collective.
SERIAL = dict(parallel_block=False, norm="rmsnorm", linear_bias=True, rope_scaling=(8.0, 1.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def models():
    """Sharded tiny models by (kv heads, weights, storage layout, mesh)."""
    cache = {}

    def get(kv_heads, weights, layout, mesh, serial=False):
        key = (kv_heads, weights, layout.ffn == "ws1d", str(mesh_shape(mesh)), serial)
        if key not in cache:
            config = get_config("tiny", n_kv_heads=kv_heads, **(SERIAL if serial else {}))
            params = cast_params(config, init_params(config, jax.random.key(0)), weights)
            cache[key] = config, sharded.shard_params(params, config, mesh, layout.ffn)
        return cache[key]

    return get


def expected(config, layout, mesh, weights, batch, tokens, context, overlap=False):
    act = 4 if weights == "f32" else 2
    dims = LayerDims(batch, tokens, context or tokens, config.d_model, config.d_ff, config.n_heads,
                     config.n_kv_heads, config.d_head, act_bytes=act, weight_bytes=BYTES[weights],
                     serial=not config.parallel_block, post_norms=config.post_norms)  # fmt: skip
    return summarize(layer_collectives(layout.ffn, layout.attention, mesh_shape(mesh), dims, overlap=overlap))


def compare(models, layout, mesh, kv_heads, weights, phase, compiled, batch=8, serial=False):
    config, params = models(kv_heads, weights, layout, mesh, serial)
    tokens, context = PHASES[phase]
    text = sharded.layer_hlo(params, config, mesh, layout, batch, tokens, context, compiled=compiled)
    got = summarize(collectives_in_hlo(text, mesh))
    want = expected(config, layout, mesh, weights, batch, tokens, context, layout.overlap)
    assert got == want, (
        f"{layout} {phase} K={kv_heads} {weights} serial={serial}: HLO-only {got - want}, list-only {want - got}"
    )
    return got


@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
def test_every_layout_lowers_to_its_listed_collectives(models, ffn):
    mesh = make_mesh("2x2x2")
    for kv_heads in (1, 8):
        for weights in ("bf16", "int8"):
            for attention in ATTENTION_LAYOUTS if ffn in ("ws1d", "ws2d") else ("batch",):  # wg-*: batch only
                for phase in PHASES:
                    got = compare(models, Layout(ffn, attention), mesh, kv_heads, weights, phase, compiled=False)
                    assert sum(got.values()) >= 1  # every layout communicates on 2x2x2
    for attention in ATTENTION_LAYOUTS if ffn in ("ws1d", "ws2d") else ("batch",):  # the serial block, int8
        for phase in PHASES:
            compare(models, Layout(ffn, attention), mesh, 8, "int8", phase, compiled=False, serial=True)


@pytest.mark.parametrize(
    "mesh_text,layout,kv_heads,serial",
    [
        ("2x2x2", Layout("ws2d", "batch"), 1, False),
        ("2x2x2", Layout("ws2d", "heads", overlap=True), 8, False),
        ("2x2x2", Layout("ws1d", "batch"), 8, False),
        ("2x2x2", Layout("wg-xy", "batch"), 1, False),
        ("2x1x2", Layout("ws2d", "batch"), 8, False),  # the paper's 4-chip mesh, on 4 of the 8 devices
        ("2x1x2", Layout("wg-x", "batch"), 1, False),
        ("2x1x1", Layout("ws2d", "heads", overlap=True), 1, False),  # Y·Z = 1: no ring, the norm statistics still sum
        ("8x1x1", Layout("ws2d", "batch", overlap=True), 8, False),
        # Llama's serial block: a second input gather (+ norm statistics) and output reduce-scatter per layer
        ("2x2x2", Layout("ws2d", "batch"), 4, True),  # grouped-query K = 4
        ("2x2x2", Layout("ws2d", "heads", overlap=True), 1, True),  # two rings per layer
        ("2x2x2", Layout("ws1d", "batch"), 8, True),
        ("2x2x2", Layout("wg-xyz", "batch"), 4, True),
    ],
)
def test_compiled_collectives_equal_the_list(models, mesh_text, layout, kv_heads, serial):
    n = 1
    for part in mesh_text.split("x"):
        n *= int(part)
    mesh = make_mesh(mesh_text, jax.devices()[:n])
    for phase in PHASES:
        compare(models, layout, mesh, kv_heads, "f32", phase, compiled=True, serial=serial)


@pytest.mark.parametrize(
    "prefill,decode,kv_heads",
    [
        (Layout("wg-xyz", "batch"), Layout("ws2d", "batch"), 1),  # the paper's high-throughput pair
        (Layout("ws2d", "heads"), Layout("ws2d", "batch"), 1),  # low latency: the slice is local, nothing moves
        (Layout("wg-x", "batch"), Layout("ws2d", "batch"), 8),  # multi-head: rows and kv heads both move
    ],
)
def test_phase_switch_reshard_equals_the_list(prefill, decode, kv_heads):
    mesh = make_mesh("2x2x2")
    config = get_config("tiny", n_kv_heads=kv_heads)
    text = sharded.insert_hlo(config, mesh, prefill, decode, batch=8, tokens=4, slots=8, context=16, compiled=False)
    found = collectives_in_hlo(text, mesh)
    # one layer at a time: the program moves one layer's rows inside a loop over the N layers
    # (each listed collective carries one layer's bytes; the lowered program has it once, in the loop body)
    assert "while" in text
    got = summarize(found)
    dims = LayerDims(8, 4, 4, config.d_model, config.d_ff, config.n_heads, kv_heads, config.d_head)
    listed = reshard_collectives(prefill.ffn, prefill.attention, decode.ffn, decode.attention, mesh_shape(mesh), dims,
                                 n_layers=config.n_layers)  # fmt: skip
    assert summarize(listed) == Counter({key: count * config.n_layers for key, count in got.items()})


@pytest.mark.parametrize("layout", [Layout("ws2d", "batch"), Layout("wg-xy", "batch")])
def test_whole_decode_step_is_n_layers_plus_the_step_list(models, layout):
    """The full compiled decode step: N x the layer list (the scan's while body, run N times) + step_collectives."""
    mesh = make_mesh("2x2x2")
    config, params = models(1, "f32", layout, mesh)
    text = sharded.decode_hlo(params, config, mesh, layout, batch=8, context=16)
    found = collectives_in_hlo(text, mesh)
    in_loop = [c for c in found if "while/body" in c.tensor]
    once = [c for c in found if "while/body" not in c.tensor]
    dims = LayerDims(8, 1, 16, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads, config.d_head,
                     act_bytes=4, weight_bytes=4)  # fmt: skip
    shape = mesh_shape(mesh)
    assert summarize(in_loop) == summarize(layer_collectives(layout.ffn, layout.attention, shape, dims))
    want_once = step_collectives(layout.ffn, layout.attention, shape, dims, config.vocab_size)
    assert summarize(once) == summarize(want_once)
    # embedding reduce-scatter straight into the residual's split (no all-reduce), final gather, logits
    kinds = [c.kind for c in want_once]
    assert kinds[0] == "reduce-scatter" and set(kinds[1:]) == {"all-gather"}
    # the while body runs once per layer: XLA records its trip count, N
    assert f'known_trip_count":{{"n":"{config.n_layers}"}}' in text and len(in_loop) > 0
