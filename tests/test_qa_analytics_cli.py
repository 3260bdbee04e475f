"""What-if commands asked the questions a capacity planner asks: the default mesh is chosen for the asked prompt and
generation lengths, `memory`'s refusals name the flag, and a chip count no layout splits says which dim it does not
divide."""

import json

import pytest
from meshserve.serving.cli import main


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse and UserError exits
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_default_mesh_follows_prompt_and_generation_lengths(capsys):
    """PaLM 540B on 64 TPU v4, batches 1, 64 and 512: the latency plan takes 2x4x8 for 2048-token prompts and 64
    tokens out, 4x4x4 for 128-token prompts and 2048 tokens out (long decodes favour the decode step of 4x4x4)."""
    base = ("analyze", "--model", "palm-540b", "--hardware", "tpu-v4", "--chips", "64", "--batch", "1,64,512")
    base += ("--json",)
    meshes = {}
    for prompt, gen in ((2048, 64), (128, 2048)):
        code, out, _ = _run(capsys, *base, "--prompt-len", str(prompt), "--gen-len", str(gen))
        assert code == 0
        meshes[prompt, gen] = {r["mesh"] for r in json.loads(out)}
    assert meshes == {(2048, 64): {"2x4x8"}, (128, 2048): {"4x4x4"}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chips", "0"], "--chips must be positive, got 0"),
        (["--batch", "0"], "--batch must be positive, got 0"),
        (["--context", "0"], "--context must be positive, got 0"),
        (["--kv-fraction", "nan", "--hardware", "tpu-v4"], "--kv-fraction must be in (0, 1]"),
        (["--mode", "finetune", "--lora-rank", "-2"], "--lora-rank must be 0 (every weight) or a positive rank"),
    ],
)
def test_memory_refusals_name_the_flag(capsys, args, message):
    code, out, err = _run(capsys, "memory", "--model", "tiny", *args)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_chip_count_no_layout_splits_names_the_dim(capsys):
    code, _, err = _run(capsys, "plan", "--model", "palm-8b", "--chips", "3")
    assert code == 2
    assert "no layout splits palm-8b" in err and "on 3 chips" in err
    assert "d_ff F = 16384 is not divisible by the ws2d split 3" in err


def test_a_question_nothing_fits_says_so_and_how_far_off(capsys):
    """PaLM 540B in int8 on 3 TPU v4 chips needs 170 GiB per chip: every row is NO, and stderr says where and by how
    much (before: a table of NO and no line saying nothing was chosen)."""
    code, out, err = _run(capsys, "analyze", "--chips", "3", "--weights", "int8", "--batch", "1")
    assert code == 0 and not any(line.startswith("*") for line in out.splitlines())
    assert err.strip().splitlines() == [
        "note: nothing fits 32 GiB per tpu-v4 at prefill b1, decode b1 (the least a row there needs: 170.2 GiB "
        "per chip); try more --chips"
    ]
    code, out, err = _run(capsys, "analyze", "--chips", "64", "--weights", "int8", "--batch", "1")
    assert code == 0 and any(line.startswith("*") for line in out.splitlines()) and err == ""


def test_latency_bound_without_objective_cost_is_refused(capsys):
    """Before: `plan --latency-bound 0.05` planned for latency and dropped the bound unseen."""
    code, out, err = _run(capsys, "plan", "--latency-bound", "0.05")
    assert code == 2 and out == ""
    assert err.strip().endswith("--latency-bound applies to --objective cost only (got --objective latency)")


def test_gemma3_1b_reads_as_1b_parameters(capsys):
    """Its 999.9M parameters printed as "1000M" before."""
    code, out, _ = _run(capsys, "memory", "--model", "gemma3-1b")
    assert code == 0 and out.splitlines()[0].endswith(", 1B parameters, 1 chip(s)")
