"""`meshserve speculate` and analytics/speculation.py: a verify step of k drafts priced by the cost model against a
decode step, the expected tokens per verify step, the break-even acceptance, and the command's table, JSON, plot
and errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cli_helpers import run_cli
from meshserve.analytics.chips import get_chip
from meshserve.analytics.cost import estimate
from meshserve.analytics.speculation import break_even_acceptance, expected_tokens, speculation
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape


def test_expected_tokens_and_break_even():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    for ratio in (1.2, 2.0, 4.9):
        a = break_even_acceptance(ratio, 4)
        assert 0 < a < 1 and expected_tokens(a, 4) == pytest.approx(ratio, rel=1e-9)
    assert break_even_acceptance(0.9, 4) == 0.0  # a verify step no dearer than a decode step always pays
    assert break_even_acceptance(5.5, 4) is None  # dearer than k + 1 decode steps: never pays


def test_a_verify_step_costs_k_plus_1_times_the_compute_and_the_same_reads():
    """tokens_per_step = k + 1 multiplies the matmul and attention work by k + 1 and leaves the weight and cache
    reads alone; tokens_per_step = 1 is the decode step as it was priced before."""
    config, chip, mesh = get_config("palm-62b"), get_chip("tpu-v4"), MeshShape(2, 2, 4)
    kw = dict(phase="decode", batch=64, prompt_len=2048, gen_len=1, ffn_layout="ws2d", attention="batch")
    plain = estimate(config, chip, mesh, **kw)
    assert dataclasses.asdict(estimate(config, chip, mesh, **kw, tokens_per_step=1)) == dataclasses.asdict(plain)
    verify = estimate(config, chip, mesh, **kw, tokens_per_step=5)
    assert verify.breakdown.compute_s == pytest.approx(5 * plain.breakdown.compute_s, rel=1e-12)
    assert verify.breakdown.weight_load_s == plain.breakdown.weight_load_s
    assert verify.breakdown.kv_load_s == plain.breakdown.kv_load_s
    assert verify.breakdown.comm_s > plain.breakdown.comm_s  # activations k + 1 times larger
    # The once-per-step collectives too: the embedding's and the logits' ([B, k + 1, V]) carry k + 1 tokens a row.
    pairs = list(zip(plain.once_collectives, verify.once_collectives, strict=True))
    assert any("BLV" in p["tensor"] for p, _ in pairs)
    for p, v in pairs:
        assert v["bytes_per_chip"] == 5 * p["bytes_per_chip"], (p["tensor"], p["bytes_per_chip"], v["bytes_per_chip"])
    with pytest.raises(UserError, match="tokens_per_step"):
        estimate(config, chip, mesh, **{**kw, "phase": "prefill"}, tokens_per_step=5)


def test_speculation_pays_at_small_batches_and_not_at_large_ones():
    """The paper's regimes: at batch 1 a decode step reads the weights and the extra tokens are nearly free; at
    batch 1024 it is compute-bound and a verify step costs several decode steps."""
    rows = speculation(get_config("palm-540b"), get_chip("tpu-v4"), MeshShape(4, 4, 4), batches=[1, 64, 1024],
                       context=2048, k=4, acceptances=[0.5, 0.9])  # fmt: skip
    small, _, large = rows
    assert small.cost_ratio < 1.1 and small.break_even_acceptance < 0.1 and small.speedup[0.5] > 1.7
    assert large.cost_ratio > 3 and large.break_even_acceptance > 0.8 and large.speedup[0.5] < 1
    ratios = [r.cost_ratio for r in rows]
    assert ratios == sorted(ratios)  # dearer relative to decoding as the batch grows
    for r in rows:
        assert r.speedup[0.9] == pytest.approx(expected_tokens(0.9, 4) / r.cost_ratio)


def test_speculate_command(capsys, tmp_path):
    code, out, err = run_cli(capsys, "speculate", "--model", "falcon-7b", "--hardware", "h100-sxm", "--chips", "1",
                             "--batch", "1,64", "--acceptance", "0.6", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["mesh"] == "1x1x1" and [r["batch"] for r in report["rows"]] == [1, 64]
    assert set(report["rows"][0]["speedup"]) == {"0.6"} and report["rows"][0]["verify_step_s"] > 0
    assert report["rows"][0]["fits"] is True and report["rows"][0]["memory_per_chip_bytes"] > 13e9  # 7B in bf16
    code, out, err = run_cli(capsys, "speculate", "--context", "1000000", "--batch", "256")
    assert code == 0 and "beyond palm-540b's max_seq_len 2048" in err and out.splitlines()[-1].endswith("NO")
    plot = tmp_path / "spec.png"
    code, out, err = run_cli(capsys, "speculate", "--model", "palm-8b", "--chips", "8", "--plot", str(plot))
    assert code == 0 and "pays from" in out and "speedup a=0.7" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tokens", "0"], "--tokens must be in [1, 16]"),
        (["--acceptance", "0.5,1.5"], "--acceptance: each rate must be in [0, 1], got 1.5"),
        (["--context", "0"], "--context must be positive"),
        (["--batch", "0"], "--batch must be positive"),
        (["--mesh", "2x2x2", "--chips", "4"], "mesh 2x2x2 has 8 chips but --chips is 4"),
        (["--plot", "out.txt"], "--plot out.txt: extension .txt"),
    ],
)
def test_speculate_refuses_bad_flags_in_one_line(capsys, flags, message):
    code, out, err = run_cli(capsys, "speculate", *flags)
    assert code == 2 and message in err and "Traceback" not in err and not out, err
