"""Every cost-model term re-derived by hand (PAPER.md formulas), plus memory arithmetic and bad input."""

import dataclasses
import math
import sys

import pytest
from meshserve.analytics import choose_plan, collective_time, estimate, get_chip, memory_estimate, model_sizes
from meshserve.analytics.chips import ChipError
from meshserve.analytics.cost import layer_dims
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.partition.comm import Collective, LayoutError, MeshShape, layer_collectives

PALM = get_config("palm-540b").padded_heads(64)
TPU = get_chip("tpu-v4")
MESH = MeshShape(4, 4, 4)


def test_param_counts_match_the_paper_and_the_per_layer_formula():
    E, F, H, Q, V, N = 18432, 73728, 48, 256, 256128, 118
    per_layer = E * (2 * F + H * Q) + E * 2 * Q + (F + H * Q) * E  # PAPER.md, fused SwiGLU
    sizes = model_sizes(get_config("palm-540b"))
    assert sizes.layer_matmul == per_layer
    assert sizes.params == N * per_layer + V * E + N * E + E  # + layernorm scales
    assert round(sizes.params / 1e9, 2) == 540.36
    assert model_sizes(PALM).real_params == sizes.params  # padding is not counted by MFU


def _prefill():
    return estimate(PALM, TPU, MESH, phase="prefill", batch=1, prompt_len=2048, gen_len=64, weights="int8",
                    ffn_layout="ws2d", attention="heads")  # fmt: skip


def test_compute_weight_and_kv_terms_by_hand():
    e, s = _prefill(), model_sizes(PALM)
    E, H, Q, V, N, L = 18432, 64, 256, 256128, 118, 2048
    rate = 275e12 * 0.80
    matmul = 2 * L * N * s.layer_matmul + 2 * E * V
    attention = N * 4 * L * L * H * Q
    assert e.breakdown.compute_s == pytest.approx(matmul / (64 * rate) + attention / (16 * rate))  # repeated over x
    int8_bytes = N * s.layer_matmul * 1 + 2 * (N * s.layer_scales + N * E + V * E + E)
    assert e.breakdown.weight_load_s == pytest.approx(int8_bytes / 64 / (1200e9 * 0.9))
    # multi-query heads-sharded: the one kv head on every chip; prefill writes L positions of K and V (bf16)
    assert e.breakdown.kv_load_s == pytest.approx(2 * N * 1 * L * Q * 2 / (1200e9 * 0.9))


def test_decode_kv_load_batch_sharded_by_hand():
    e = estimate(PALM, TPU, MESH, phase="decode", batch=64, prompt_len=2048, gen_len=64, weights="bf16",
                 ffn_layout="ws2d", attention="batch")  # fmt: skip
    per_chip = 2 * 118 * (64 // 64) * (2048 + 32) * 256 * 2  # B/n rows at the mean context
    assert e.breakdown.kv_load_s == pytest.approx(per_chip / (1200e9 * 0.9))
    assert e.latency_s == pytest.approx(64 * e.step_s)


def test_collective_prices_by_hand():
    bw, hop = 270e9 * 0.40, 2.5e-6
    ag = Collective("all-gather", ("y", "z"), 1_000_000, "", "ffn")
    assert collective_time(ag, MESH, TPU)[0] == pytest.approx(1e6 / bw * 15 / 16 + 6 * hop)  # 16 chips, 3+3 steps
    ar = Collective("all-reduce", ("x",), 1_000_000, "", "ffn")
    assert collective_time(ar, MESH, TPU)[0] == pytest.approx(2 * (1e6 / bw * 3 / 4 + 3 * hop))
    none = Collective("all-gather", ("x",), 1_000_000, "", "ffn")
    assert collective_time(none, MeshShape(1, 8, 8), TPU) == (0.0, 0.0)


def test_comm_term_is_the_sum_over_the_shared_collective_list():
    e = _prefill()
    assert e.collectives, "partition.comm lists collectives for ws2d on 4x4x4"
    assert e.breakdown.comm_s == pytest.approx(118 * sum(c["seconds_per_layer"] for c in e.collectives))
    kinds = {c["kind"] for c in e.collectives}
    assert {"all-gather", "reduce-scatter"} <= kinds


def test_overlap_and_metrics_definitions():
    e = _prefill()
    b = e.breakdown
    assert not e.overlap
    assert e.step_s == pytest.approx(
        b.compute_s + b.weight_load_s + b.kv_load_s + b.comm_s + b.reshard_s + b.step_comm_s
    )
    assert e.step_overlap_s < e.step_s  # ws2d has the looped collective einsum
    real = model_sizes(PALM).real_params
    assert e.mfu == pytest.approx(2 * real * 2048 / (64 * 275e12 * e.latency_s))
    assert e.cost_chip_ms_per_token == pytest.approx(64 * e.latency_s * 1e3 / 2048)


def test_overlap_prices_the_looped_list_and_hides_only_its_ring_steps():
    kw = dict(phase="decode", batch=64, prompt_len=2048, gen_len=64, weights="int8", attention="batch")
    e = estimate(PALM, TPU, MESH, ffn_layout="ws2d", overlap=True, **kw)
    assert e.overlap
    dims = layer_dims(PALM, 64, 1, 2048 + 32, "int8")
    listed = layer_collectives("ws2d", "batch", MESH, dims, overlap=True)
    assert [(c["kind"], c["axes"], c["bytes_per_chip"]) for c in e.collectives] == [
        (c.kind, c.axes, c.bytes_per_chip) for c in listed
    ]
    times = [collective_time(c, MESH, TPU) for c in listed]
    ring = 118 * sum(t - lat for c, (t, lat) in zip(listed, times, strict=True) if c.kind == "collective-permute")
    serial = 118 * sum(t for c, (t, _) in zip(listed, times, strict=True) if c.kind != "collective-permute")
    serial += 118 * sum(lat for c, (_, lat) in zip(listed, times, strict=True) if c.kind == "collective-permute")
    b = e.breakdown
    assert ring > 0 and serial > 0  # the all-reduces, reduce-scatter(x), all-to-alls stay exposed
    hidden_under = max(b.compute_s, b.weight_load_s)
    want = (
        b.compute_s
        + b.weight_load_s
        + b.kv_load_s
        + b.overhead_s
        + b.step_comm_s
        + serial
        + max(0.0, ring - hidden_under)
    )
    assert e.step_s == pytest.approx(want) and e.step_overlap_s == pytest.approx(want)
    plain = estimate(PALM, TPU, MESH, ffn_layout="ws2d", **kw)
    assert plain.step_overlap_s == pytest.approx(e.step_s)
    # decode at B=64 is latency-bound: 2 x 15 one-hop ring steps and a 9-step all-reduce(xyz) per layer cost more
    # than the 3+3-step all-gather(yz) / reduce-scatter(yz) and all-reduce(x) they replace; a 2048-token prefill wins
    assert e.step_s > plain.step_s and _prefill().step_overlap_s < _prefill().step_s
    # no looped einsum outside ws2d (partition/ refuses it): overlap=True is labelled as not applied
    wg = estimate(PALM, TPU, MESH, ffn_layout="wg-xyz", overlap=True, **kw)
    assert not wg.overlap
    assert wg.step_s == estimate(PALM, TPU, MESH, ffn_layout="wg-xyz", **kw).step_s == wg.step_overlap_s


def test_not_fitting_is_reported_not_raised():
    e = estimate(PALM, TPU, MeshShape(2, 2, 2), phase="decode", batch=8, prompt_len=2048, gen_len=64,
                 weights="bf16", ffn_layout="ws2d", attention="batch")  # fmt: skip
    assert not e.fits and "weights" in e.overflow and e.memory["weights"] > TPU.hbm_bytes


def test_finetune_memory_follows_the_7b_arithmetic():
    config = get_config("falcon-7b")
    P = model_sizes(config).params
    f32 = memory_estimate(config, "finetune", "f32", context=128)
    assert f32["weights_bytes"] == 4 * P and f32["gradients_bytes"] == 4 * P
    assert f32["optimizer_bytes"] == pytest.approx(8 * P, rel=1e-6)  # two AdamW moments (+ a step count)
    assert 105e9 < f32["weights_bytes"] + f32["gradients_bytes"] + f32["optimizer_bytes"] < 115e9  # "112 GB"
    bf16 = memory_estimate(config, "finetune", "bf16", context=128)
    assert bf16["optimizer_bytes"] == pytest.approx(f32["optimizer_bytes"] / 2, rel=1e-6)
    int8 = memory_estimate(config, "finetune", "int8", context=128)
    assert 27e9 < int8["weights_bytes"] + int8["gradients_bytes"] + int8["optimizer_bytes"] < 30e9  # "28 GB"
    assert f32["rule_of_thumb_bytes"] == 16 * P
    sharded = memory_estimate(config, "finetune", "f32", context=128, chips=8)
    assert sharded["per_chip_bytes"] == pytest.approx(f32["per_chip_bytes"] / 8)
    assert memory_estimate(config, "finetune", "f32", optimizer="sgd", context=128)["optimizer_bytes"] == 0


def test_lora_counts_adapters_by_hand():
    c = get_config("tiny")  # E 64, F 128, H 8, K 1, Q 16, N 2, swiglu
    E, F, H, K, Q, N, R = 64, 128, 8, 1, 16, 2, 4
    adapters = N * R * ((E + H * Q) + 2 * (E + K * Q) + (H * Q + E) + 2 * (E + F) + (F + E))
    m = memory_estimate(c, "finetune", "f32", lora_rank=R, context=16)
    assert m["trainable_params"] == adapters
    assert m["gradients_bytes"] == 4 * adapters
    assert m["weights_bytes"] == 4 * (model_sizes(c).params + adapters)


def test_bad_input_is_a_user_error():
    with pytest.raises(ChipError, match="known: tpu-v4"):
        get_chip("tpu-v9")
    with pytest.raises(UserError, match="batch"):
        estimate(PALM, TPU, MESH, phase="decode", batch=0, prompt_len=8, gen_len=8)
    with pytest.raises(LayoutError):
        estimate(PALM, TPU, MESH, phase="decode", batch=3, prompt_len=8, gen_len=8, attention="batch")
    with pytest.raises(UserError, match="4x4x4 has 64 chips"):
        choose_plan(PALM, TPU, n_chips=32, mesh="4x4x4")
    with pytest.raises(UserError):
        memory_estimate(PALM, kv_fraction=0.3)  # needs a chip


def test_importing_analytics_starts_no_jax():
    import subprocess

    code = "import sys, meshserve.analytics, meshserve.analytics.cli; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert math.isfinite(_prefill().latency_s)


def test_prefill_pays_the_phase_switch_reshard_by_hand():
    # wg-xyz batch prefill (the paper's throughput pair) -> ws2d batch decode: the multi-query KV of N layers moves
    # by one all-to-all(xyz) per layer, 64 chip pairs x 1 row (partition/comm.py reshard_collectives), once per pass.
    B, L, N, Q = 64, 2048, 118, 256
    e = estimate(PALM, TPU, MESH, phase="prefill", batch=B, prompt_len=L, gen_len=64, weights="bf16",
                 ffn_layout="wg-xyz", attention="batch", decode_layout="ws2d", decode_attention="batch")  # fmt: skip
    per_layer = 2 * B * L * 1 * Q * 2  # K and V of one layer, 64 chips x cap 1 row, bf16: the all-to-all's buffer
    bw, hop = 270e9 * 0.40, 2.5e-6
    assert e.breakdown.reshard_s == pytest.approx(N * (per_layer / bw * 63 / 64 + 9 * hop))  # 3+3+3 torus steps
    rows = [c for c in e.once_collectives if c["what"] == "phase switch"]
    assert len(rows) == N  # one all-to-all per layer
    assert {(r["kind"], r["axes"], r["bytes_per_chip"]) for r in rows} == {("all-to-all", ("x", "y", "z"), per_layer)}
    b = e.breakdown
    assert e.latency_s == e.step_s > b.compute_s + b.weight_load_s + b.kv_load_s + b.reshard_s
    # ws2d heads -> ws2d heads: the KV split agrees (multi-query, no batch split), nothing moves
    assert _prefill().breakdown.reshard_s == 0.0
    assert [c["what"] for c in _prefill().once_collectives] == ["once per pass"] * 3
    # decode never pays it (it is counted once, with the prefill that produced the cache)
    d = estimate(PALM, TPU, MESH, phase="decode", batch=B, prompt_len=L, gen_len=64, ffn_layout="ws2d",
                 attention="batch")  # fmt: skip
    assert d.breakdown.reshard_s == 0.0


def test_weights_per_chip_as_stored_by_hand():
    # PaLM 540B int8, ws2d on 4x4x4 (2D storage E_x·F_yz, heads over yz): every tensor as the layout stores it.
    assert PALM.shared_embedding
    N, E, F, H, Q, V = 118, 18432, 73728, 64, 256, 256128
    ex, fyz, hyz = E // 4, F // 16, H // 16
    wq = N * ex * hyz * Q + 2 * N * hyz * Q  # int8 values + bf16 scale [N, 1, H_yz, Q]
    wkv = 2 * (N * ex * Q + 2 * N * Q)  # multi-query: [N, E_x, 1, Q], E split over x only; scale whole
    wo = N * hyz * Q * ex + 2 * N * ex
    mlp = 2 * (N * ex * fyz + 2 * N * fyz) + (N * fyz * ex + 2 * N * ex)  # w_up, w_gate, w_down
    rest = 2 * (N * E + E) + 2 * V // 64 * E  # norms whole on every chip (bf16), embedding over V_xyz
    e = estimate(PALM, TPU, MESH, phase="decode", batch=64, prompt_len=2048, gen_len=64, weights="int8",
                 ffn_layout="ws2d", attention="batch")  # fmt: skip
    assert e.memory["weights"] == wq + wkv + wo + mlp + rest
    assert N * ex * Q * 2 > 278e6  # W_K + W_V alone: ~278 MB per chip, not 1/64 of their size


def test_a_ring_step_costs_its_chunk_and_one_hop():
    step = Collective("collective-permute", ("y", "z"), 1_000_000, "", "ffn")
    assert collective_time(step, MESH, TPU) == pytest.approx((1e6 / (270e9 * 0.40) + 2.5e-6, 2.5e-6))


def test_once_per_step_collectives_by_hand():
    # decode, ws2d batch on 4x4x4, B = 512: embedding reduce-scatter(xyz) of B·E into BLE_xyz, final all-gather(xyz)
    # of B·E (bf16), logits all-gather(xyz) of B·V float32 (PAPER.md's ~5% of the step)
    B, E, V = 512, 18432, 256128
    e = estimate(PALM, TPU, MESH, phase="decode", batch=B, prompt_len=2048, gen_len=64, weights="bf16",
                 ffn_layout="ws2d", attention="batch")  # fmt: skip
    bw, hop = 270e9 * 0.40, 2.5e-6
    ag = lambda nbytes: nbytes / bw * 63 / 64 + 9 * hop  # noqa: E731
    want = ag(B * E * 2) + ag(B * E * 2) + ag(B * V * 4)  # a reduce-scatter costs one all-gather (not 2: all-reduce)
    assert e.breakdown.step_comm_s == pytest.approx(want)
    assert 0.03 < e.breakdown.step_comm_s / e.step_s < 0.1
    assert [(c["kind"], c["bytes_per_chip"]) for c in e.once_collectives] == [
        ("reduce-scatter", B * E * 2),
        ("all-gather", B * E * 2),
        ("all-gather", B * V * 4),
    ]
    # logits as compiled: every chip holds the gathered float32 [B, V] (and its own V/64 part)
    small = estimate(PALM, TPU, MESH, phase="decode", batch=64, prompt_len=2048, gen_len=64, weights="bf16",
                     ffn_layout="ws2d", attention="batch")  # fmt: skip
    grew = e.memory["activations"] - small.memory["activations"]
    assert grew >= 4 * (B - 64) * V


def test_post_norms_are_priced_as_two_more_all_reduces_per_layer():
    """Gemma 3 norms each sublayer's output: its statistics are summed over the residual's E split (partition.comm),
    so the estimate lists and prices two more all-reduces per layer than the same model without post norms."""
    gemma = get_config("gemma3-1b")
    plain = dataclasses.replace(gemma, post_norms=False)
    mesh, chip = MeshShape(2, 2, 2), get_chip("tpu-v4")
    kw = dict(phase="decode", batch=8, prompt_len=128, gen_len=64, weights="bf16", ffn_layout="ws2d")
    with_norms, without = estimate(gemma, chip, mesh, **kw), estimate(plain, chip, mesh, **kw)
    extra = [c for c in with_norms.collectives if "post norm" in c["tensor"]]
    assert len(extra) == 2 and all(c["kind"] == "all-reduce" for c in extra), with_norms.collectives
    assert len(with_norms.collectives) == len(without.collectives) + 2
    per_layer = sum(c["seconds_per_layer"] for c in extra)
    assert with_norms.breakdown.comm_s == pytest.approx(without.breakdown.comm_s + gemma.n_layers * per_layer)


@pytest.mark.parametrize(("prompt_len", "gen_len"), [(128, 64), (400, 300), (800, 400), (4096, 64)])
def test_a_decode_step_prices_a_windowed_layers_window_and_a_prefill_its_whole_prompt(prompt_len, gen_len):
    """gemma3-1b (window 512 on 5 of every 6 layers): a decode step reads min(context, 512) positions of a windowed
    layer (model/transformer.py decode_step), averaged over the steps exactly; prefill masks, so it pays for the
    whole prompt on every layer as a model with no window does. The cache's size is the whole context either way."""
    gemma = get_config("gemma3-1b")
    plain = dataclasses.replace(gemma, sliding_window=0, global_layers=())
    mesh, chip = MeshShape(1, 1, 1), get_chip("h100-sxm")
    kw = dict(batch=8, prompt_len=prompt_len, gen_len=gen_len, weights="bf16", ffn_layout="ws1d")
    windowed, whole = (estimate(c, chip, mesh, phase="decode", **kw) for c in (gemma, plain))
    # The mean of min(t, W) over contexts t = P + i, i in [0, G), as a piecewise integral.
    start, end, w = prompt_len, prompt_len + gen_len, gemma.sliding_window
    mean_windowed = w if w <= start else (w - start) * (start + w) / 2 / gen_len + (end - w) * w / gen_len
    if w >= end:
        mean_windowed = start + gen_len / 2
    n_windowed = sum(1 for x in gemma.layer_windows if x)
    ratio = ((gemma.n_layers - n_windowed) * (start + gen_len / 2) + n_windowed * mean_windowed) / (
        gemma.n_layers * (start + gen_len / 2)
    )
    assert windowed.breakdown.kv_load_s == pytest.approx(whole.breakdown.kv_load_s * ratio)
    assert (windowed.breakdown.kv_load_s < whole.breakdown.kv_load_s) == (end > w)
    assert windowed.memory["kv_cache"] == whole.memory["kv_cache"]
    prefill_windowed, prefill_whole = (estimate(c, chip, mesh, phase="prefill", **kw) for c in (gemma, plain))
    assert prefill_windowed.breakdown.compute_s == pytest.approx(prefill_whole.breakdown.compute_s)


def test_a_mesh_decode_and_a_verify_step_price_a_windowed_layers_whole_context():
    """Only a one-token decode step on one device reads a window alone: a mesh's decode (model/sharded.py) and a
    speculative verify step (a prefill over the context) mask it, so they pay the whole context as a global layer."""
    gemma = get_config("gemma3-1b")
    plain = dataclasses.replace(gemma, sliding_window=0, global_layers=())
    chip = get_chip("tpu-v4")
    kw = dict(phase="decode", batch=8, prompt_len=4096, gen_len=64, weights="bf16", ffn_layout="ws1d")
    for mesh, tokens in ((MeshShape(2, 1, 1), 1), (MeshShape(1, 1, 1), 4)):
        windowed, whole = (estimate(c, chip, mesh, tokens_per_step=tokens, **kw) for c in (gemma, plain))
        assert windowed.breakdown.kv_load_s == pytest.approx(whole.breakdown.kv_load_s)
        assert windowed.breakdown.compute_s == pytest.approx(whole.breakdown.compute_s)
    one_device = [estimate(c, chip, MeshShape(1, 1, 1), **kw) for c in (gemma, plain)]
    assert one_device[0].breakdown.kv_load_s < 0.3 * one_device[1].breakdown.kv_load_s  # 22 of 26 layers: 512 of 4k
