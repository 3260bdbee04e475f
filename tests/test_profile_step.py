"""benchmarks/profile_step.py: its trace reading on a made-up Perfetto trace (device tracks chosen over host ones,
sums per step by name and kind), and one real run on the tiny preset on this CPU (the profiler's own export read
back; host tracks stand in for a GPU's). Never its timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
sys.path.insert(0, str(SCRIPT.parent))
from profile_step import device_events, kernel_kind, summarize  # noqa: E402


def _trace() -> dict:
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
    ]
    gpu = [{"ph": "X", "pid": 2, "tid": 7, "name": name, "ts": i, "dur": dur}
           for i, (name, dur) in enumerate([("gemm_fusion_dot_1", 50.0), ("gemm_fusion_dot_1", 52.0),
                                            ("decode_attention", 8.0), ("input_reduce_fusion_3", 1.5),
                                            ("decode_attention", 8.0), ("input_reduce_fusion_3", 1.5)])]  # fmt: skip
    host = [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(decode)", "ts": 0, "dur": 900.0}]
    return {"traceEvents": meta + gpu + host}


def test_device_tracks_are_read_and_summed_per_step():
    events, tracks = device_events(_trace())
    assert tracks == "gpu" and len(events) == 6  # the host's event is left out
    summary = summarize(events, steps=2, top=2)
    assert summary["kernels_per_step"] == 3 and summary["busy_us_per_step"] == (50 + 52 + 16 + 3) / 2
    assert [t["name"] for t in summary["top"]] == ["gemm_fusion_dot_1", "decode_attention"]
    assert summary["top"][0] == {"name": "gemm_fusion_dot_1", "us_per_step": 51.0, "per_step": 1.0}
    kinds = summary["by_kind"]
    assert (
        list(kinds)[0] == kernel_kind("gemm_fusion_dot_1") and kinds[kernel_kind("decode_attention")]["per_step"] == 1
    )
    assert kernel_kind("decode_attention") != kernel_kind("input_reduce_fusion_3") != kernel_kind("gemm_fusion_dot_1")


def test_without_device_tracks_the_host_ops_stand_in():
    trace = _trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["pid"] == 1]
    events, tracks = device_events(trace)
    assert tracks == "host" and [e["name"] for e in events] == ["PjitFunction(decode)"]


def test_a_real_profile_of_tiny_on_this_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--steps", "2", "--prompt-len", "8",
                           "--top", "5", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)
    assert row["model"] == "tiny" and row["steps"] == 2 and row["tracks"] == "host"
    assert row["kernels_per_step"] > 0 and len(row["top"]) == 5
    assert row["busy_us_per_step"] >= max(t["us_per_step"] for t in row["top"])


def test_bad_steps_is_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--steps must be at least 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_prefill_of_the_whole_context_profiles_alone():
    """--phase prefill: one prefill of the model's whole context (tiny: 128 tokens, so no decode step could follow),
    counted per call."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--phase", "prefill", "--prompt-len", "128",
                           "--top", "3", "--json"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)
    assert row["phase"] == "prefill" and row["steps"] == 1 and row["prompt_len"] == 128
    assert row["decode_attention"] == "-" and row["kernels_per_step"] > 0 and len(row["top"]) == 3
