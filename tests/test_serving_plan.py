"""serving/plan.py's predicted step times: a prefill is priced with the phase switch into the server's decode cache,
and every step of a plan reads one weight storage (the weights are stored once)."""

import pytest
from meshserve.analytics import get_chip
from meshserve.analytics.cost import estimate
from meshserve.analytics.plan import analysis_config
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape
from meshserve.partition.rules import storage_of
from meshserve.serving.plan import make_plan


def test_prefill_prediction_pays_the_phase_switch_into_the_decode_cache():
    # Grouped (4 kv heads) on 2x2x2: the decode cache (ws2d batch at B = 32 slots) keeps whole kv heads, so a prefill
    # that splits them over yz (ws2d heads at batch 1) gathers them at the switch: a cost its own layout lacks.
    # 12 query heads keep ws1d (heads over all 8 chips) out, as 4 kv heads did before they could be replicated.
    config = get_config("palm-8b", n_heads=12, n_kv_heads=4)
    plan = make_plan(config, objective="latency", max_context=2048, mesh_axes={"x": 2, "y": 2, "z": 2},
                     length_buckets=(512,), device_kind="TPU v4")  # fmt: skip
    chip, mesh = get_chip("tpu-v4"), MeshShape(2, 2, 2)
    [cache] = [s for s in plan.steps if s.phase == "decode" and s.batch == plan.max_batch]
    prefills = [s for s in plan.steps if s.phase == "prefill"]
    scores = {(s.batch, s.length): s for s in plan.steps if s.phase == "score"}
    assert prefills and plan.source == "analytics" and (cache.ffn_layout, cache.attention_layout) == ("ws2d", "batch")
    paid = 0
    for step in prefills:
        assert storage_of(step.ffn_layout) == storage_of(cache.ffn_layout)  # one copy of the weights
        kw = dict(phase="prefill", batch=step.batch, prompt_len=step.length, gen_len=max(1, plan.max_context - step.length),
                  weights="bf16", ffn_layout=step.ffn_layout, attention=step.attention_layout)  # fmt: skip
        padded = analysis_config(config, mesh, step.ffn_layout)
        switched = estimate(padded, chip, mesh, decode_layout=cache.ffn_layout, decode_attention=cache.attention_layout,
                            decode_batch=cache.batch, **kw)  # fmt: skip
        assert abs(step.predicted_ms - switched.step_s * 1e3) < 1e-9
        score = scores.get((step.batch, step.length))
        if score is not None and score.ffn_layout == step.ffn_layout:  # the same pass, no insert: no switch
            assert abs(score.predicted_ms - (switched.step_s - switched.breakdown.reshard_s) * 1e3) < 1e-9
        own = estimate(padded, chip, mesh, **kw)  # the switch into the prefill's own layout: what was priced before
        paid += switched.breakdown.reshard_s > own.breakdown.reshard_s
    assert paid  # at least one bucket's prediction now carries a switch its own layout would not pay


@pytest.mark.parametrize(
    "model, mesh, objective",
    # Before: each prompt length chose its own storage, so these plans mixed ws1d and ws2d steps.
    [("falcon-7b", (4, 4, 4), "latency"), ("palm-8b", (2, 2, 2), "throughput")],
)
def test_every_length_uses_one_storage_and_the_servers_decode_cache(model, mesh, objective):
    config, chip, shape = get_config(model), get_chip("tpu-v4"), MeshShape(*mesh)
    plan = make_plan(config, objective=objective, max_context=2048, mesh_axes=dict(zip("xyz", mesh, strict=True)),
                     length_buckets=(64, 512), device_kind="TPU v4")  # fmt: skip
    assert {storage_of(s.ffn_layout) for s in plan.steps} == {plan.planner["storage"]}
    [cache] = [s for s in plan.steps if s.phase == "decode" and s.batch == plan.max_batch]
    prefills = [s for s in plan.steps if s.phase == "prefill"]
    assert {s.length for s in prefills} == {64, 512, 2048}
    for step in prefills:
        switched = estimate(
            analysis_config(config, shape, step.ffn_layout), chip, shape, phase="prefill", batch=step.batch,
            prompt_len=step.length, gen_len=max(1, plan.max_context - step.length), weights="bf16",
            ffn_layout=step.ffn_layout, attention=step.attention_layout, decode_layout=cache.ffn_layout,
            decode_attention=cache.attention_layout, decode_batch=cache.batch,
        )  # fmt: skip
        assert abs(step.predicted_ms - switched.step_s * 1e3) < 1e-9, (step, cache)


@pytest.mark.parametrize("field", ["max_batch", "max_context"])
def test_zero_batch_or_context_is_refused_and_only_none_means_the_default(field):
    from meshserve.serving.plan import PlanError

    config = get_config("tiny")
    with pytest.raises(PlanError, match=rf"^{field} must be in \[.*got 0$"):
        make_plan(config, **{field: 0})
    default = make_plan(config, **{field: None})
    assert (default.max_batch, default.max_context) == (32, config.max_seq_len)
