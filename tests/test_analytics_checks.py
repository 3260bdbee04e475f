"""Review-finding checks for analytics/ (issue 5): plan bounds, head padding, bad input, plots, memory by hand."""

import pytest
from meshserve.analytics import choose_plan, get_chip
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape
from meshserve.serving.cli import main

PALM = get_config("palm-540b").padded_heads(64)
TPU = get_chip("tpu-v4")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cost_objective_refuses_an_unmeetable_or_nonpositive_bound():
    plan = choose_plan(PALM, TPU, mesh="4x4x4", objective="cost", batch_buckets=[1, 64], latency_bound_s=0.1)
    assert plan.score < float("inf")  # a meetable bound still gives a plan
    # The fastest decode step of any candidate plan (each keeps one dtype and one weight storage: take them all).
    kw = dict(mesh="4x4x4", objective="cost", batch_buckets=[1, 64], latency_bound_s=0.1)
    candidates = [choose_plan(PALM, TPU, weights=w, storage=s, **kw) for w in ("bf16", "int8") for s in ("1d", "2d")]
    fastest = min(p.step_s for c in candidates for p in c.phases if p.phase == "decode")
    with pytest.raises(UserError, match=r"latency bound 1e-06 s .* fastest decode step .* is") as info:
        choose_plan(PALM, TPU, mesh="4x4x4", objective="cost", batch_buckets=[1, 64], latency_bound_s=1e-6)
    assert f"{fastest:.4g}" in str(info.value)  # names the best achievable step
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="latency bound must be a positive"):
            choose_plan(PALM, TPU, mesh="4x4x4", objective="cost", batch_buckets=[64], latency_bound_s=bad)


def test_plan_cli_unmeetable_bound_is_one_line_exit_2(capsys):
    code, _, err = _run(capsys, "plan", "--mesh", "4x4x4", "--objective", "cost", "--latency-bound", "1e-6")
    assert code == 2 and "latency bound" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "plan", "--mesh", "4x4x4", "--objective", "cost", "--latency-bound", "0")
    assert code == 2 and "positive" in err


def test_heads_padded_per_mesh_and_layout_not_per_chip_count():
    from meshserve.analytics.plan import analysis_config
    from meshserve.partition.comm import MeshShape

    palm = get_config("palm-540b")  # 48 real heads, multi-query
    assert analysis_config(palm, MeshShape(4, 8, 8), "ws2d").n_heads == 64  # y·z = 64
    assert analysis_config(palm, MeshShape(4, 4, 4), "ws2d").n_heads == 48  # 48 % 16 == 0: no padding needed
    assert analysis_config(palm, MeshShape(4, 4, 4), "ws1d").n_heads == 64  # heads over all 64 chips
    assert analysis_config(palm, MeshShape(4, 8, 8), "ws1d").n_heads == 256
    assert analysis_config(PALM, MeshShape(4, 4, 4), "ws1d") is PALM  # already divides: unchanged


def test_palm_540b_on_256_chips_is_not_charged_772b_parameters(capsys):
    import json

    code, out, _ = _run(capsys, "analyze", "--model", "palm-540b", "--chips", "256", "--batch", "64", "--phase",
                        "decode", "--weights", "bf16", "--json")  # fmt: skip
    assert code == 0
    rows = json.loads(out)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["ffn_layout"] != "ws1d"
    from meshserve.analytics.cost import estimate
    from meshserve.analytics.sizes import model_sizes
    from meshserve.partition.comm import MeshShape

    assert model_sizes(get_config("palm-540b").padded_heads(64)).params < 560e9  # vs 772B with 256 heads
    for r in rows:
        if r["ffn_layout"] != "ws1d" and r["mesh"] == "4x8x8":
            assert r["n_heads"] == 64
            # charged exactly what the 64-head model costs on this layout
            same = estimate(get_config("palm-540b").padded_heads(64), TPU, MeshShape(4, 8, 8), phase="decode",
                            batch=64, prompt_len=2048, gen_len=64, weights="bf16", ffn_layout=r["ffn_layout"],
                            attention=r["attention"])  # fmt: skip
            assert r["memory"]["weights"] == same.memory["weights"] and r["step_s"] == same.step_s


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_analyze_unwritable_output_is_one_line_exit_2(capsys, tmp_path, flag):
    for path, needle in (("/nonexistent/x.out", "does not exist"), (str(tmp_path), "is a directory")):
        code, out, err = _run(capsys, "analyze", "--mesh", "4x4x4", "--batch", "1", flag, path)
        assert code == 2 and needle in err and err.count("\n") == 1 and out == "", err


@pytest.mark.parametrize("text", ["[1]", "3", '"x"', "{not json"])
def test_local_chip_file_that_is_not_an_object_is_one_line_exit_2(capsys, tmp_path, monkeypatch, text):
    path = tmp_path / "chip.json"
    path.write_text(text)
    monkeypatch.setenv("MESHSERVE_LOCAL_CHIP", str(path))
    code, _, err = _run(capsys, "analyze", "--hardware", "local", "--chips", "1", "--model", "tiny")
    assert code == 2 and "chip 'local': cannot read" in err and err.count("\n") == 1, err


def test_memory_estimate_activations_by_hand():
    from meshserve.analytics import memory_estimate

    # Inference: the widest live tensors of one prefill pass, bf16: residual E + fused input projection
    # (w_up F, w_gate F when SwiGLU, queries H·Q, keys and values 2·K·Q) per token.
    # palm-8b: E 4096, F 16384 (SwiGLU), H 16, K 1, Q 256; batch 4, context 1024.
    got = memory_estimate(get_config("palm-8b"), batch=4, context=1024)["activations_bytes"]
    assert got == 2 * 4 * 1024 * (4096 + 2 * 16384 + 16 * 256 + 2 * 1 * 256)
    # falcon-7b: GELU MLP (no gate): E 4544, F 18176, H 71, K 1, Q 64.
    got = memory_estimate(get_config("falcon-7b"), batch=2, context=512)["activations_bytes"]
    assert got == 2 * 2 * 512 * (4544 + 18176 + 71 * 64 + 2 * 64)
    # Fine-tuning: Korthikanti et al. 2022 eq. 2, s·b·h·(34 + 5·a·s/h) bytes per layer, 32 layers.
    got = memory_estimate(get_config("palm-8b"), mode="finetune", batch=1, context=256)["activations_bytes"]
    assert got == pytest.approx(32 * 256 * 1 * 4096 * (34 + 5 * 16 * 256 / 4096))


def test_device_kinds_map_to_the_chip_table():
    from meshserve.analytics.chips import chip_for_device

    kinds = ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite", "TPU v5p", "cpu"]
    assert [chip_for_device(k) for k in kinds] == ["h100-sxm", "h200", "a100-80g", "tpu-v4", "tpu-v5e", "tpu-v5p", None]


def test_prefill_mfu_curve_reports_each_whole_prompt_batch_once():
    # token counts below one prompt have no prefill batch; counts that round to the same B are one point
    from meshserve.analytics.sweep import prefill_mfu_curve

    config, chip, mesh = get_config("palm-8b"), get_chip("tpu-v4"), MeshShape(2, 2, 2)
    requested = [256, 1024, 2048, 3000, 4096, 5000, 8192]
    curves, switches = prefill_mfu_curve(config, chip, mesh, token_batches=requested, prompt_len=2048, weights="bf16")
    assert curves
    for layout, points in curves.items():
        tokens = [t for t, _ in points]
        assert tokens == sorted(set(tokens)), (layout, tokens)  # one point per batch
        assert set(tokens) <= {2048, 4096, 8192}, (layout, tokens)  # B·prompt_len, never below one prompt
    assert all(t in (4096, 8192) for t, _, _ in switches)  # a switch is at a batch after the first
