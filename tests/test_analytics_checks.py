"""Review-finding checks for analytics/ (issue 5): plan bounds, head padding, bad input, plots, memory by hand."""

import pytest
from meshserve.analytics import choose_plan, get_chip
from meshserve.errors import UserError
from meshserve.model.config import get_config
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
    fastest = min(p.step_s for p in plan.phases if p.phase == "decode")
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
