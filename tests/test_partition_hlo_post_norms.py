"""Gemma 3's post norms in partition/comm.py's list equal the compiled collectives (kind, mesh axes, bytes).

Each half's output is normed after its reduce-scatter, on the residual's E split, so the norm's statistics are
summed over that split: one all-reduce per half (ws1d, ws2d: over xyz; wg-*: over the axes E stays split on).
Lowered for every layout × attention × phase (int8, multi-head) and compiled (float32) for four layouts.
"""

import jax
import pytest
from meshserve.model import get_config, sharded
from meshserve.model.params import cast_params, init_params
from meshserve.partition.comm import ATTENTION_LAYOUTS, FFN_LAYOUTS, LayerDims, layer_collectives
from meshserve.partition.hlo import collectives_in_hlo, summarize
from meshserve.partition.mesh import make_mesh, mesh_shape
from meshserve.partition.rules import Layout

BYTES = {"f32": 4, "int8": 1}
PHASES = {"prefill": (4, 0), "decode": (1, 16)}  # (tokens L, context S; 0 = attend over its own tokens)
# Gemma 3's block: serial, RMSNorm, post norms on both sublayers' outputs
GEMMA = dict(parallel_block=False, norm="rmsnorm", post_norms=True)


@pytest.fixture(scope="module")
def models():
    """Sharded tiny post-norm models by (kv heads, weights, storage layout)."""
    cache = {}

    def get(kv_heads, weights, ffn, mesh):
        key = (kv_heads, weights, ffn == "ws1d", str(mesh_shape(mesh)))
        if key not in cache:
            config = get_config("tiny", n_kv_heads=kv_heads, **GEMMA)
            params = cast_params(config, init_params(config, jax.random.key(0)), weights)
            cache[key] = config, sharded.shard_params(params, config, mesh, ffn)
        return cache[key]

    return get


def compare(models, layout, mesh, kv_heads, weights, phase, compiled):
    config, params = models(kv_heads, weights, layout.ffn, mesh)
    tokens, context = PHASES[phase]
    text = sharded.layer_hlo(params, config, mesh, layout, 8, tokens, context, compiled=compiled)
    got = summarize(collectives_in_hlo(text, mesh))
    dims = LayerDims(8, tokens, context or tokens, config.d_model, config.d_ff, config.n_heads, config.n_kv_heads,
                     config.d_head, act_bytes=4 if weights == "f32" else 2, weight_bytes=BYTES[weights],
                     serial=True, post_norms=True)  # fmt: skip
    listed = layer_collectives(layout.ffn, layout.attention, mesh_shape(mesh), dims, overlap=layout.overlap)
    want = summarize(listed)
    assert got == want, f"{layout} {phase} K={kv_heads} {weights}: HLO-only {got - want}, list-only {want - got}"
    return listed


@pytest.mark.parametrize("ffn", FFN_LAYOUTS)
def test_post_norm_layers_lower_to_their_listed_collectives(models, ffn):
    mesh = make_mesh("2x2x2")
    for attention in ATTENTION_LAYOUTS if ffn in ("ws1d", "ws2d") else ("batch",):  # wg-*: batch only
        for phase in PHASES:
            listed = compare(models, Layout(ffn, attention), mesh, 8, "int8", phase, compiled=False)
            # the post norms' statistics are there (wg-xyz: E is whole on each chip, its norms are local)
            post = [c for c in listed if c.kind == "all-reduce" and c.axes == {"wg-x": ("y", "z"), "wg-xy": ("z",),
                    "wg-xyz": ()}.get(ffn, ("x", "y", "z"))]  # fmt: skip
            assert len(post) == (0 if ffn == "wg-xyz" else 2), (ffn, attention, phase)


@pytest.mark.parametrize(
    "mesh_text,layout,kv_heads",
    [
        ("2x2x2", Layout("ws2d", "batch"), 4),
        ("2x2x2", Layout("ws2d", "heads", overlap=True), 1),  # the looped einsum: statistics over xyz, each norm
        ("2x2x2", Layout("ws1d", "batch"), 8),
        ("2x1x2", Layout("wg-x", "batch"), 1),  # E split over z alone, the batch over x
    ],
)
def test_compiled_post_norm_collectives_equal_the_list(models, mesh_text, layout, kv_heads):
    n = 1
    for part in mesh_text.split("x"):
        n *= int(part)
    mesh = make_mesh(mesh_text, jax.devices()[:n])
    for phase in PHASES:
        compare(models, layout, mesh, kv_heads, "f32", phase, compiled=True)
