"""The measuring and housekeeping commands (bench, calibrate, plan, memory, cache) asked what a capacity planner asks:
shapes past the machine's memory are refused before any compile, list flags refuse empty items, mistyped model and
chip names say what was meant, plots and CSVs are written whole or not at all, and the bench table keeps its
columns. Every refusal is one line, exit 2, in well under a second of work (nothing here compiles)."""

from __future__ import annotations

import json
import time

import pytest
from meshserve.serving.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    start = time.perf_counter()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    assert time.perf_counter() - start < 20, "a refusal must come before any measuring or compiling"
    return code, out, err


def _refused(capsys, argv: list[str], needle: str) -> str:
    code, out, err = _run(capsys, *argv)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert last.startswith(f"meshserve {argv[0]}: error: ") and needle in last, err
    assert err.count("\n") == 1, err  # flag type errors too (before: argparse's usage block first)
    return last


@pytest.mark.parametrize(
    "argv, needle",
    [
        # once: 4.5 minutes of compiling and timing for 300000 rows, and no end at 100000000 (the host's 22 GiB:
        # 858 GiB needed at least)
        (
            ["bench", "--model", "tiny", "--batch", "1,100000000", "--prompt-len", "8", "--gen-len", "4"],
            "--batch 100000000 with --prompt-len 8 + --gen-len 4 needs at least",
        ),  # fmt: skip
        (
            [
                "bench",
                "--set",
                "d_model=65536,d_ff=262144,n_layers=64",
                "--weights",
                "bf16",
                "--batch",
                "1",
                "--prompt-len",
                "8",
                "--gen-len",
                "4",
            ],
            "the weights alone do not fit (try --weights int8)",
        ),  # fmt: skip
        # once: XLA's RESOURCE_EXHAUSTED traceback
        (["calibrate", "--model", "tiny", "--batch", "1,100000000"], "--batch 100000000 with --prompt-len 64"),
        (["calibrate", "--model", "tiny", "--held-out", "100000000"], "--held-out 100000000 with --prompt-len 64"),
    ],
)
def test_a_batch_past_the_machines_memory_is_refused_before_any_compile(capsys, argv, needle):
    last = _refused(capsys, argv, needle)
    assert "free; " in last and ("at most --" in last or "do not fit" in last)
    if "100000000" in " ".join(argv):  # the largest batch that could fit is named, and it is a real number of rows
        fit = int(last.split("at most ")[1].split()[1])
        assert 1 <= fit < 100000000


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["calibrate", "--model", "tiny", "--batch", "4"], "--batch needs at least 2 different sizes"),
        (["calibrate", "--model", "tiny", "--batch", "1,4", "--held-out", "4"], "--held-out 4 is also in --batch"),
        (["calibrate", "--model", "tiny", "--out", "/no/such/dir/chip.json"], "directory /no/such/dir does not exist"),
        (["bench", "--model", "tiny-falcon", "--peer", "--gen-len", "0"], "--peer compares decode steps"),
        (["bench", "--model", "tiny-falcon", "--peer", "--gen-len", "1"], "it needs --gen-len >= 2, got 1"),
        (["bench", "--prompt-len", "100000"], "--prompt-len 100000 exceeds tiny's max_seq_len 128"),
        (["plan", "--objective", "cost", "--latency-bound", "nan"], "--latency-bound must be a positive number"),
        (["plan", "--objective", "cost", "--latency-bound", "inf"], "--latency-bound must be a positive number"),
        (["plan", "--objective", "cost", "--latency-bound", "-1"], "--latency-bound must be a positive number"),
        (["plan", "--batch", "1,,2"], "got '1,,2' (an empty item)"),
        (["plan", "--batch", "1,"], "got '1,' (an empty item)"),
        (["bench", "--batch", "1,,2"], "got '1,,2' (an empty item)"),
        (["calibrate", "--held-out", ","], "got ',' (an empty item)"),
        (["cache", "--compile-cache", ""], "--compile-cache needs a directory, got an empty string"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, needle):
    _refused(capsys, argv, needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "--hardware", "h100"], "--hardware 'h100': unknown hardware; did you mean h100-sxm"),
        (["memory", "--hardware", "A100"], "did you mean a100-80g?"),
        (["plan", "--hardware", "tpuv4"], "did you mean tpu-v4"),
        (
            ["plan", "--model", "palm-54b"],
            "--model 'palm-54b': no such preset, file or directory; did you mean palm-540b",
        ),
        (["bench", "--model", "tinyy"], "did you mean tiny?"),
        (["calibrate", "--model", "dem"], "did you mean demo?"),
        (["speculate", "--hardware", "h100"], "--hardware 'h100': unknown hardware; did you mean h100-sxm"),
    ],
)
def test_a_mistyped_name_says_what_was_meant(capsys, argv, needle):
    _refused(capsys, argv, needle)


def test_a_name_close_to_nothing_still_lists_what_is_known(capsys):
    last = _refused(capsys, ["plan", "--hardware", "xyz"], "--hardware 'xyz': unknown hardware (known: tpu-v4")
    assert "did you mean" not in last


def test_a_missing_cache_directory_is_named_as_missing_and_not_made(capsys, tmp_path):
    missing = tmp_path / "typo"
    code, out, _ = _run(capsys, "cache", "--compile-cache", str(missing))
    assert code == 0 and out.strip() == f"{missing}: 0 entries, 0.0 MiB (no such directory: nothing cached there yet)"
    code, out, _ = _run(capsys, "cache", "--compile-cache", str(missing), "--clear", "--json")
    assert code == 0 and json.loads(out)["exists"] is False and not missing.exists()


def test_the_bench_table_keeps_its_columns_where_a_figure_is_missing(capsys):
    """On the CPU MFU has no peak to divide by, and the peer is absent: each "-" used to be unpadded, shifting every
    column after it; tiny's peak memory read 0.00 GiB."""
    from meshserve.serving.cli_bench import print_table

    row = {"weights": "bf16", "kv_cache_dtype": "auto", "batch": 1, "prefill_ms": 0.15, "ttft_ms": 0.16,
           "decode_step_ms": 0.067, "tokens_per_s": 14917.4, "hbm_gbps": 3.1, "hbm_fraction": 0.639,
           "prefill_mfu": None, "peak_memory_bytes": 207681, "peer_decode_step_ms": None, "speedup_vs_peer": None,
           "hbm_bytes_per_step": 206464, "platform": "gpu"}  # fmt: skip
    full = dict(row, prefill_mfu=0.5, peer_decode_step_ms=1.0, speedup_vs_peer=14.9, peak_memory_bytes=3 * 2**30)
    print_table([row, full])
    head, rule, *lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and {len(line) for line in lines} == {len(head)} == {len(rule)}
    assert "0.2 MiB" in lines[0] and "3.00 GiB" in lines[1]
    # each column's right edge is where the header's is: "MFU" sits over "-" and over "50.0%"
    mfu_end = head.index("MFU") + len("MFU")
    assert lines[0][mfu_end - 1] == "-" and lines[1][mfu_end - 5 : mfu_end] == "50.0%"


def test_figures_and_csv_are_written_whole_or_not_at_all(tmp_path):
    """A figure that fails while it is drawn (here a bad mathtext label) leaves the file that was there untouched
    and no temporary file behind; a good one replaces it. savefig used to write straight into the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from meshserve.analytics.output import save_figure, write_atomic

    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    fig, ax = plt.subplots()
    ax.set_title(r"$\notacommand{$")
    with pytest.raises(ValueError):
        save_figure(fig, target)
    plt.close(fig)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    save_figure(fig, target)
    plt.close(fig)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "plot.png"
    ]
    write_atomic(tmp_path / "rows.csv", "a,b\n1,2\n")
    assert (tmp_path / "rows.csv").read_text() == "a,b\n1,2\n" and len(list(tmp_path.iterdir())) == 2


def test_a_bench_row_adds_up(tmp_path):
    """One real row on the CPU: every derived figure follows from the row's own fields as serving/bench.py's docstring
    defines them (the KV bytes at the mean context P + (G + 1) / 2: decode step i of G reads P + i keys), and --out
    holds what --json printed, with no temporary file left beside it."""
    import subprocess
    import sys

    from meshserve.analytics.sizes import model_sizes
    from meshserve.model.config import get_config

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "bench", "--model", "tiny", "--batch", "2",
                           "--prompt-len", "8", "--gen-len", "4", "--weights", "bf16", "--repeats", "1", "--json",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == [row] and [p.name for p in tmp_path.iterdir()] == ["rows.json"]
    c = get_config("tiny")
    step_s = row["decode_step_ms"] / 1e3
    kv = 2 * (8 + (4 + 1) / 2) * 2 * c.n_layers * c.n_kv_heads * c.d_head * 2  # batch x mean context x k, v x bf16
    assert row["hbm_bytes_per_step"] == model_sizes(c).weight_bytes("bf16") + int(kv)
    assert row["tokens_per_s"] == pytest.approx(2 / step_s)
    assert row["hbm_gbps"] == pytest.approx(row["hbm_bytes_per_step"] / step_s / 1e9)
    assert row["hbm_fraction"] == pytest.approx(row["hbm_gbps"] / row["copy_gbps"])
    assert row["prefill_mfu"] is None  # the CPU has no peak in the chip table
