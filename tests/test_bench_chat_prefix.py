"""benchmarks/chat_prefix.py as a user runs it: two real servers (tiny preset), prefix caching on and off, a short
multi-turn chat workload, --json. Checks what the benchmark claims to measure, never its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_serving_support import env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "chat_prefix.py"
# Tiny context 128, buckets 16 and 128 (few compiles). Prompts of 48 (turn 0) and 64 (turn 1) tokens sit in the
# 128 bucket; what is left after the cached system prompt (8) or the cached first turn (1 + 8) fits 16.
SMALL = ["--model", "tiny", "--conversations", "2", "--concurrency", "1", "--turns", "2", "--system-tokens", "40",
         "--user-tokens", "8", "--new-tokens", "8", "--max-batch", "2", "--length-buckets", "16"]  # fmt: skip


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)  # fmt: skip


def test_caching_on_reuses_earlier_turns_and_leaves_answers_unchanged():
    done = _run(*SMALL, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["modes"]) == {"on", "off"}
    on, off = report["modes"]["on"], report["modes"]["off"]
    for s in (on, off):
        assert s["requests"] == 4 and len(s["per_request"]) == 4
        assert [(r["conversation"], r["turn"]) for r in s["per_request"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert [r["prompt_tokens"] for r in s["per_request"]] == [48, 64, 48, 64]
        assert all(r["output_tokens"] == 8 for r in s["per_request"])
    # Caching on: every later turn reuses at least the system prompt and the first turn (the server keeps prompt +
    # answer but its last token); the client's sum agrees with the server's own counter.
    assert all(r["cached_prompt_tokens"] >= 40 + 8 for r in on["per_request"] if r["turn"] > 0)
    assert on["cached_tokens_by_turn"][1] > 0 and on["cached_fraction"] > 0
    assert on["server_counters"]["meshserve_prefix_cache_hit_tokens_total"] == on["cached_prompt_tokens"]
    # Caching off: nothing reused, anywhere.
    assert off["cached_prompt_tokens"] == 0 and off["cached_tokens_by_turn"] == [0, 0]
    assert off["server_counters"]["meshserve_prefix_cache_hit_tokens_total"] == 0
    # Greedy decoding: the answers do not depend on where the keys and values came from.
    assert [r["tokens_sha1"] for r in on["per_request"]] == [r["tokens_sha1"] for r in off["per_request"]]
    assert report["same_answers"] is True


def test_bad_flags_exit_2_naming_the_flag_before_any_server_starts():
    for args, flag in (
        (["--conversations", "0"], "--conversations"),
        (["--new-tokens", "-1"], "--new-tokens"),
        (["--modes", "on,maybe"], "--modes"),
        (["--model", "tiny", "--turns", "4"], "max_context 128"),  # 42 + 4 x (24 + 40) = 298 > 128
    ):
        done = _run(*args, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert flag in done.stderr and "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0 and "starting" not in done.stderr  # one line, no server
