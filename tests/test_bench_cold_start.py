"""benchmarks/cold_start.py as a user runs it: a real server (tiny preset, f32) per warm-up mode, requests from the
moment it listens until its warm-up is done, --json. Checks what the benchmark reports, never its timings. The
tests' compilation cache stands in for the default `--compile-cache off`, so each server compiles little."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_serving_support import GRID, env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cold_start.py"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)  # fmt: skip


def test_both_modes_answer_the_same_and_background_listens_before_compiling_everything(tmp_path):
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    # The serving tests' small grid: its steps are in the shared compile cache (and there are few of them).
    done = _run("--model", "tiny", "--weights", "f32", "--compile-cache", cache, "--after", "2", "--interval", "0",
                "--new-tokens", "4", "--json", "--plot", str(tmp_path / "cold.png"), "--serve-args",
                " ".join(GRID))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    background, everything = report["modes"]["background"], report["modes"]["all"]
    assert background["steps"] == everything["steps"] == everything["steps_before_listening"]
    assert 0 < background["steps_before_listening"] < background["steps"]
    assert background["listening_s"] <= background["warm_up_done_s"]
    assert everything["listening_s"] == everything["warm_up_done_s"] and everything["during"] == {"requests": 0}
    for m in (background, everything):
        assert m["after"]["requests"] == 2 and all(len(r["tokens"]) == 4 for r in m["per_request"])
        assert [r["sent_s"] for r in m["per_request"]] == sorted(r["sent_s"] for r in m["per_request"])
    assert len(report["answers"]) == 1  # f32: a covering bucket gives the same greedy tokens
    assert report["answers"][0]["requests"] == {m: len(report["modes"][m]["per_request"]) for m in report["modes"]}
    assert (tmp_path / "cold.png").stat().st_size > 10_000


def test_bad_flags_exit_with_one_line():
    for flags, message in ((["--modes", "lazy"], "--modes must be among background,all"),
                           (["--after", "0"], "--after must be >= 1"),
                           (["--serve-args", "'oops"], "No closing quotation")):  # fmt: skip
        done = _run(*flags, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
