"""benchmarks/attn_sweep.py as its CPU dry run (--small: the kernel interpreted at tiny shapes): every config it
tries is checked against float64 attention before it is timed, and each row says which config ran. Never its
timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "attn_sweep.py"


def test_small_sweep_checks_and_times_each_config():
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--layers", "2", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # one line per row, as it is measured
    shapes = {r["shape"] for r in rows}
    assert shapes == {"tiny b1", "tiny b2 gqa"}
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape]
        assert mine[0]["config"] == "xla"  # XLA's attention first, the reference the kernel rows are checked against
        kernel_rows = mine[1:]
        configs = [r["config"] for r in kernel_rows]
        assert len(kernel_rows) >= 3 and len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        assert {c["splits"] for c in configs} == {1, 2} and {c["num_stages"] for c in configs} == {1, 2}
        # head blocks with one kv head only (tiny b1); GQA has none
        assert {c.get("head_block") for c in configs} == ({None, 16} if shape == "tiny b1" else {None})
        # the rotation in the kernel last, at the defaults (block 64, 4 warps, 2 stages) and at the best config
        rotary = [c for c in configs if c.get("rotary")]
        assert configs[-len(rotary) :] == rotary and 1 <= len(rotary) <= 2
        assert {"block": 64, "num_warps": 4, "num_stages": 2, "splits": 1, "rotary": 1} in rotary
        for r in mine:  # interpreted, every config computes the same attention, within attn_check's bound
            assert r["ok"] and r["max_error"] <= max(2 * mine[0]["max_error"], 1e-2) and r["us_per_layer"] > 0, r


def test_bad_repeats_is_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--repeats must be at least 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr
