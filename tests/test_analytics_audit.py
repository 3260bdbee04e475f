"""What a user audit of `meshserve analyze | memory | plan | calibrate` (and bench's help) found, each as a check:
bad input refused before any measuring or sweep as one line, a context warning, calibration's doubts, memory's
units, counts and closed pipes, help that states defaults, and the real reason a layout cannot split a model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from meshserve.serving.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(command: str, code: int, err: str) -> None:
    assert code == 2 and err.startswith(f"meshserve {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        # 100000 tokens once asked the device for 970 GB after compiling; now refused naming the limit
        (["--prompt-len", "100000"], "must be below max_seq_len 128"),
        (["--prompt-len", "128"], "must be below max_seq_len 128"),  # the decode point needs one more position
        (["--held-out", "0"], "--held-out must be positive, got 0"),  # was "batch must be ..." after 8 s
        (["--out", "{tmp}"], "is a directory"),  # was IsADirectoryError after measuring
        (["--out", "{tmp}/file.txt/chip.json"], "is not a directory"),
    ],
)
def test_calibrate_refuses_bad_input_before_measuring(capsys, tmp_path, argv, needle):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    start = time.perf_counter()
    code, out, err = _run(capsys, "calibrate", "--model", "tiny", *argv)
    _one_line_error("calibrate", code, err)
    assert needle in err and out == ""
    assert time.perf_counter() - start < 5  # a measurement takes 8 s or more; nothing was timed


@pytest.mark.parametrize("flag, path", [("--plot", "pareto.txt"), ("--plot", "pareto"), ("--csv", "{tmp}")])
def test_analyze_refuses_an_output_it_cannot_write_before_the_sweep(capsys, tmp_path, flag, path):
    target = path.replace("{tmp}", str(tmp_path))
    code, out, err = _run(capsys, "analyze", "--model", "palm-62b", "--chips", "16", flag, target)
    _one_line_error("analyze", code, err)
    assert out == "" and "pareto sweep" not in err
    if flag == "--plot":
        assert "use an image format matplotlib writes: " in err and "png" in err


def test_analyze_beyond_the_context_keeps_the_rows_and_warns_once_on_stderr(capsys):
    code, out, err = _run(capsys, "analyze", "--model", "tiny", "--chips", "8", "--prompt-len", "100000", "--json")
    assert code == 0 and json.loads(out)  # stdout stays pure JSON
    assert err.count("\n") == 1 and err.startswith("warning: ") and "tiny's max_seq_len 128" in err, err
    code, out, err = _run(capsys, "analyze", "--model", "demo", "--chips", "8", "--batch", "1")  # default 2048
    assert code == 0 and "demo's max_seq_len 512" in err and err.count("warning") == 1
    code, out, err = _run(capsys, "plan", "--model", "tiny", "--chips", "8", "--prompt-len", "16", "--gen-len", "16")
    assert code == 0 and err == ""  # within the context: no warning
    code, out, err = _run(capsys, "analyze", "--model", "palm-8b", "--chips", "8", "--batch", "1")
    assert code == 0 and err == ""  # the paper's setting, 2048 + 64 on a 2048 context: generation past it is fine


def test_ws1d_on_a_grouped_query_model_prices_its_kv_heads_replicated_and_says_so(capsys):
    """8 kv heads over ws1d's 64-chip heads split (once refused: 8 is not divisible by 64) run repeated 8 times, one
    whole kv head per chip: the row prices that KV cache (8x the model's own K = 8 spread over 64 chips) and the
    table says so; the plan command too."""
    argv = ["analyze", "--model", "llama-2-70b", "--chips", "64", "--hardware", "tpu-v4", "--layout", "ws1d",
            "--batch", "4", "--prompt-len", "1024", "--gen-len", "64"]  # fmt: skip
    code, out, err = _run(capsys, *argv)
    assert code == 0 and err == "" and "kv heads replicated: ws1d 8x to 64" in out.splitlines()[0]
    code, out, _ = _run(capsys, *argv, "--json")
    rows = json.loads(out)
    assert code == 0 and {r["ffn_layout"] for r in rows} == {"ws1d"} and len(rows) == 4  # 2 phases x 2 attentions
    assert all(r["n_kv_heads"] == 64 and r["kv_replication"] == 8 for r in rows)
    heads = next(r for r in rows if r["attention"] == "heads")  # every chip: all 4 rows, its one kv head
    one_head = 2 * 80 * 4 * (1024 + 64) * 1 * 128 * 2  # k and v, N, B, S, one kv head, Q, bf16
    assert heads["memory"]["kv_cache"] == one_head
    assert heads["memory"]["kv_cache"] * 64 == 8 * (2 * 80 * 4 * (1024 + 64) * 8 * 128 * 2)  # 8x the true cache
    code, out, _ = _run(capsys, "plan", "--model", "llama-2-70b", "--mesh", "4x4x4", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["kv_replication"] == {"1d": 8, "2d": 2}[plan["storage"]]  # y·z = 16 for 2D storage
    assert plan["n_kv_heads"] == 8 * plan["kv_replication"]
    code, out, _ = _run(capsys, "plan", "--model", "llama-2-70b", "--mesh", "4x4x4")
    assert code == 0 and f"kv heads replicated {plan['kv_replication']}x (8 -> {plan['n_kv_heads']})" in out, out


def test_calibration_warnings_name_a_clamped_or_implausible_coefficient():
    from meshserve.analytics.calibrate import PLAUSIBLE, calibration_warnings, local_base_chip

    base = local_base_chip(1e11, 2e10, "cpu")
    plausible = replace(base, matmul_efficiency=0.23, hbm_efficiency=0.06, kv_efficiency=0.35)
    assert calibration_warnings(plausible, "tiny") == []
    # What `meshserve calibrate --model tiny` once stored: compute fitted to zero (the clamp), KV 12786x.
    degenerate = replace(plausible, matmul_efficiency=1000.0, hbm_efficiency=0.078, kv_efficiency=12786.55)
    warnings = calibration_warnings(degenerate, "tiny")
    assert len(warnings) == 2
    matmul, kv = warnings
    assert matmul.startswith("matmul_efficiency = 1000 is at its clamp") and "treated as free" in matmul
    assert kv.startswith("kv_efficiency = 1.279e+04") and "too small to measure that term" in kv
    assert all("tiny" in w for w in warnings)
    high = replace(plausible, hbm_efficiency=PLAUSIBLE[1] * 2)
    assert [w.split(" = ")[0] for w in calibration_warnings(high)] == ["hbm_efficiency"]


def test_stored_local_chip_keeps_its_warnings_and_still_loads(tmp_path):
    from meshserve.analytics.calibrate import local_base_chip
    from meshserve.analytics.chips import get_chip, save_local_chip

    chip = local_base_chip(1e11, 2e10, "cpu")
    path = save_local_chip(chip, tmp_path / "chip.json", warnings=["matmul_efficiency = 1000 is at its clamp"])
    assert json.loads(path.read_text())["warnings"] == ["matmul_efficiency = 1000 is at its clamp"]
    assert get_chip("local", path) == chip


@pytest.mark.parametrize("extra", [["--optimizer", "sgd"], ["--lora-rank", "8"]])
def test_memory_refuses_fine_tuning_options_in_inference_mode(capsys, extra):
    code, out, err = _run(capsys, "memory", "--mode", "inference", *extra)
    _one_line_error("memory", code, err)
    assert f"{extra[0]} applies to --mode finetune only" in err
    code, out, _ = _run(capsys, "memory", "--mode", "finetune", "--model", "tiny", *extra, "--json")
    assert code == 0 and json.loads(out)["optimizer_bytes"] >= 0


def test_memory_prints_a_readable_count_and_one_unit(capsys):
    code, out, _ = _run(capsys, "memory", "--model", "tiny")
    assert code == 0 and "103K parameters" in out and "0.000B" not in out
    code, out, _ = _run(capsys, "memory", "--model", "palm-8b", "--hardware", "h100-sxm")
    assert code == 0 and "8.63B parameters" in out and " GB" not in out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert all("GiB" in line for line in lines), out  # sizes and the fit line in the same unit
    weights = next(line for line in lines if line.split()[0] == "weights")
    assert float(weights.split()[1]) == pytest.approx(8.633e9 * 2 / 2**30, rel=1e-2)  # bf16 bytes in GiB


def test_memory_into_a_closed_pipe_exits_quietly():
    """`meshserve memory | head -2`: the reader goes away before everything is written: no BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "memory", "--mode", "inference"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def _help(command: str) -> dict[str, str]:
    """Each option's help text as `meshserve COMMAND --help` shows it (argparse's % escapes expanded)."""
    import importlib

    from meshserve.serving.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).COMMANDS[command][0](parser)
    return {a.option_strings[-1]: (a.help or "") % {"default": a.default} for a in parser._actions}


@pytest.mark.parametrize(
    "command, flags",
    [
        ("memory", ["--mode", "--weights", "--batch", "--chips", "--attention", "--optimizer", "--lora-rank"]),
        ("plan", ["--objective", "--weights"]),
        ("bench", ["--model", "--prompt-len", "--gen-len", "--repeats"]),
    ],
)
def test_help_states_every_default(command, flags):
    helps = _help(command)
    missing = [f for f in flags if "default" not in helps[f]]
    assert not missing, {f: helps[f] for f in missing}
