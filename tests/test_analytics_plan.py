"""The plan chooser keeps one weight storage per plan and picks it by the objective's total (review of 6fba2c9).

A server stores its weights once (1D E·F_xyz for ws1d, 2D E_x·F_yz for ws2d and the weight-gathered layouts), so
every bucket of both phases must use layouts of one storage, and that storage is weighed against the whole plan's
score, not chosen by the decode step alone.
"""

import itertools

import pytest
from meshserve.analytics import choose_plan, get_chip
from meshserve.analytics.cost import estimate
from meshserve.analytics.plan import STORAGES, analysis_config
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape
from meshserve.partition.rules import storage_of

TPU = get_chip("tpu-v4")


def test_falcon_7b_latency_picks_2d_storage_with_weight_gathered_prefill():
    # Before the fix: int8, ws1d prefill (0.872 s) + ws1d decode (0.206 s) = 1.078 s, because decode alone chose 1D.
    kw = dict(mesh="4x4x4", objective="latency", batch_buckets=[64], prompt_len=2048, gen_len=64)
    plan = choose_plan(get_config("falcon-7b"), TPU, **kw)
    assert plan.storage == "2d" and plan.fits
    assert {storage_of(p.ffn_layout) for p in plan.phases} == {"2d"}
    assert plan.score < 0.5, plan.score
    prefill, decode = plan.lookup("prefill", 64), plan.lookup("decode", 64)
    assert plan.score == pytest.approx(prefill.latency_s + decode.latency_s)
    # The 1D plan exists and is worse as a whole, although its decode step alone is faster.
    one_d = choose_plan(get_config("falcon-7b"), TPU, storage="1d", weights=plan.weights, **kw)
    assert one_d.storage == "1d" and one_d.score > plan.score
    assert one_d.lookup("decode", 64).latency_s < decode.latency_s


GRID = list(itertools.product(["palm-8b", "palm-540b", "falcon-7b"], ["2x2x2", "4x4x4"], [[1, 8, 64], [64]]))


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_no_plan_mixes_storages_and_the_storage_is_the_best_whole_plan(objective):
    mixed, checked = [], 0
    for model, mesh, batches in GRID:
        config = get_config(model)
        kw = dict(mesh=mesh, objective=objective, batch_buckets=batches, prompt_len=2048, gen_len=64, weights="bf16")
        plan = choose_plan(config, TPU, **kw)
        if {storage_of(p.ffn_layout) for p in plan.phases} != {plan.storage}:
            mixed.append((model, mesh, batches))
        fixed = {s: choose_plan(config, TPU, storage=s, **kw) for s in STORAGES}
        fitting = [p for p in fixed.values() if p.fits] or list(fixed.values())
        assert plan.score == pytest.approx(min(p.score for p in fitting)), (model, mesh, batches)
        assert plan == fixed[plan.storage]  # the chosen plan is that storage's own best plan, unchanged
        checked += 1
    assert not mixed and checked == len(GRID)


def test_a_fixed_decode_cache_sets_the_storage_and_prices_every_prefill_into_it():
    # A server prices its shorter prompt lengths against the cache it already runs (serving/plan.py).
    config, kw = get_config("palm-8b"), dict(mesh="2x2x2", batch_buckets=[1, 8, 32], prompt_len=512)
    for cache in [("wg-x", "batch"), ("ws1d", "batch"), ("ws1d", "heads")]:
        plan = choose_plan(config, TPU, decode_cache=cache, **kw)
        decode = plan.lookup("decode", 32)
        assert (decode.ffn_layout, decode.attention) == cache and plan.storage == storage_of(cache[0])
        assert {storage_of(p.ffn_layout) for p in plan.phases} == {plan.storage}
        for pre in (p for p in plan.phases if p.phase == "prefill"):
            mesh = MeshShape(2, 2, 2)
            switched = estimate(analysis_config(config, mesh, pre.ffn_layout), TPU, mesh, phase="prefill",
                                batch=pre.batch, prompt_len=512, gen_len=64, weights=plan.weights,
                                ffn_layout=pre.ffn_layout, attention=pre.attention, decode_layout=cache[0],
                                decode_attention=cache[1], decode_batch=32)  # fmt: skip
            assert pre.step_s == pytest.approx(switched.step_s) and pre.reshard_s == switched.breakdown.reshard_s
    free = choose_plan(config, TPU, **kw)
    cache = free.lookup("decode", 32)
    assert choose_plan(config, TPU, decode_cache=(cache.ffn_layout, cache.attention), **kw) == free


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(storage="3d"), "storage must be one of 2d, 1d"),
        (dict(decode_cache=("ws3d", "batch")), "decode cache must be"),
        (dict(decode_cache=("ws2d", "rows")), "decode cache must be"),
        (dict(decode_cache=("ws2d", "batch"), storage="1d"), "reads storage 2d, not 1d"),
    ],
)
def test_bad_storage_or_cache_is_a_user_error(kw, needle):
    with pytest.raises(UserError, match=needle):
        choose_plan(get_config("palm-8b"), TPU, mesh="2x2x2", **kw)
