"""Where one decode step's time goes: the bench's decode loop (serving/bench.py's `_decode_loop`) run under JAX's
profiler, and the device's kernel time per step summed by kernel name and by kind.

    MESHSERVE_DECODE_ATTENTION=pallas python benchmarks/profile_step.py --model falcon-7b --weights bf16 --batch 1
    python benchmarks/profile_step.py --model tiny --steps 8 --json          # a CPU dry run of the plumbing

The trace is the profiler's own Perfetto export (`jax.profiler.trace(create_perfetto_trace=True)`), read back
here; no extra package. Kernel events are those on the device's tracks (a process named like "/device:GPU:0"); on
a CPU, where there are none, the XLA op events of the host's threads stand in (plumbing only). XLA runs its thunks
outside CUDA graphs while it is profiled unless told otherwise, so launch gaps can differ from an unprofiled run:
read `busy` (the kernels' summed time per step) against `wall` (the step's time under the profiler) and against
`meshserve bench`'s unprofiled step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KINDS = (  # (kind, pattern on the kernel's name), first match wins
    ("GEMM (XLA's gemm fusions, cuBLAS)", r"gemm|cublas|cutlass|sm90_|nvjet|gemv"),
    ("attention kernel (Pallas)", r"decode_attention|pallas|attend"),
    ("input fusion (reductions, concatenations)", r"reduce|input_"),
    ("dynamic-update-slice (cache write)", r"dynamic.update.slice|dynamic_update"),
    ("copy / transpose", r"copy|transpose"),
    ("other fusion", r"fusion|loop_"),
)


def kernel_kind(name: str) -> str:
    """The kind of a kernel by its name (KINDS), else "other"."""
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def device_events(trace: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Complete events ("ph": "X") on the device's tracks, and which tracks were read ("gpu" or "host")."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu_pids = {pid for pid, name in names.items() if re.search(r"/device:GPU|GPU:\d|stream", name, re.IGNORECASE)}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    on_gpu = [e for e in complete if e["pid"] in gpu_pids]
    if on_gpu:
        return on_gpu, "gpu"
    host_pids = {pid for pid, name in names.items() if re.search(r"/host:CPU", name)}
    return [e for e in complete if e["pid"] in host_pids and not e["name"].startswith(("$", "Thunk"))], "host"


def summarize(events: list[dict[str, Any]], steps: int, top: int = 25) -> dict[str, Any]:
    """Per step: kernel time summed by name (the `top` largest) and by kind, kernel count, µs."""
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, (dur, count) in by_name.items():
        by_kind[kernel_kind(name)][0] += dur
        by_kind[kernel_kind(name)][1] += count
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    return {
        "busy_us_per_step": sum(dur for dur, _ in by_name.values()) / steps,
        "kernels_per_step": sum(count for _, count in by_name.values()) / steps,
        "by_kind": {
            k: {"us_per_step": d / steps, "per_step": c / steps}
            for k, (d, c) in sorted(by_kind.items(), key=lambda item: -item[1][0])
        },  # fmt: skip
        "top": [{"name": n[:120], "us_per_step": d / steps, "per_step": c / steps} for n, (d, c) in ranked[:top]],
    }


def profile(
    config: Any, weights: str, batch: int, prompt_len: int, steps: int, phase: str = "decode"
) -> dict[str, Any]:
    """Run the decode loop of `steps` steps (phase "prefill": the bench's prefill of [batch, prompt_len] tokens, one
    call, steps = 1) three times unprofiled (warm; the fastest is kept), once profiled; the summary of the profiled
    run, per step."""
    import jax
    from meshserve.model import transformer
    from meshserve.model.decode_attention import decode_attention_label
    from meshserve.model.quant import int8_matmul_label
    from meshserve.serving.bench import _decode_loop, _prefill, _prefill_and_insert, bench_inputs, bench_params

    params = bench_params(config, weights, "unrolled", consume=True)
    tokens, lengths, sampling = bench_inputs(config, batch, prompt_len)  # the bench's own
    steps = 1 if phase == "prefill" else steps
    context = prompt_len + steps
    if phase == "prefill":  # nothing else compiled: a prompt of the model's whole context leaves no decode step
        prefill = _prefill.lower(params, config, tokens, lengths).compile()
    else:
        first, cache = _prefill_and_insert(params, config, tokens, lengths, sampling, context)
        decode = _decode_loop.lower(params, config, first, cache, sampling, steps).compile()

    def run(trace_dir: str | None = None) -> float:
        """One decode loop from a fresh prefill (its cache is donated), or one prefill; only that is timed and
        traced."""
        if phase == "decode":
            first, cache = _prefill_and_insert(params, config, tokens, lengths, sampling, context)
            jax.block_until_ready(cache)
        if trace_dir:
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        if phase == "prefill":
            jax.block_until_ready(prefill(params, tokens, lengths))
        else:
            jax.block_until_ready(decode(params, first, cache, sampling))
        elapsed = time.perf_counter() - start
        if trace_dir:
            jax.profiler.stop_trace()
        return elapsed

    unprofiled_s = min(run() for _ in range(3))
    kv_dtype = transformer.compute_dtype(params)  # the bench's cache: the compute dtype
    with tempfile.TemporaryDirectory() as trace_dir:
        profiled_s = run(trace_dir)
        found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
        if not found:
            raise SystemExit("profile_step: the profiler wrote no perfetto_trace.json.gz")
        with gzip.open(found[-1], "rt") as f:
            trace = json.load(f)
    events, tracks = device_events(trace)
    return {
        "model": config.name, "phase": phase, "weights": weights, "batch": batch, "prompt_len": prompt_len,
        "steps": steps,
        "int8_matmul": int8_matmul_label(True) if weights == "int8" else "-",
        "decode_attention": decode_attention_label(config, True, kv_dtype, context) if phase == "decode" else "-",
        "device": jax.devices()[0].device_kind, "tracks": tracks,
        "wall_us_per_step_unprofiled": unprofiled_s / steps * 1e6,
        "wall_us_per_step_profiled": profiled_s / steps * 1e6,
        **summarize(events, steps),
    }  # fmt: skip


def print_table(row: dict[str, Any]) -> None:
    """The summary as text: step times, then kinds, then the top kernels."""
    print(f"== {row['model']} {row.get('phase', 'decode')} {row['weights']} (int8 {row['int8_matmul']}, attention "
          f"{row['decode_attention']}) batch {row['batch']}, {row['steps']} steps on {row['device']} "
          f"({row['tracks']} tracks)")  # fmt: skip
    print(f"wall µs/step unprofiled {row['wall_us_per_step_unprofiled']:.1f}, profiled "
          f"{row['wall_us_per_step_profiled']:.1f}; kernel time {row['busy_us_per_step']:.1f} µs/step over "
          f"{row['kernels_per_step']:.0f} kernels")  # fmt: skip
    for kind, v in row["by_kind"].items():
        print(f"  {v['us_per_step']:9.1f} µs {v['per_step']:6.1f}x  {kind}")
    for v in row["top"]:
        print(f"  {v['us_per_step']:9.1f} µs {v['per_step']:6.1f}x  {v['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="a preset name (default tiny)")
    parser.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE", help="model field overrides, as meshserve bench's"
    )
    parser.add_argument("--weights", default="bf16", choices=("bf16", "int8"), help="weight storage (default bf16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before the loop (default 128)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled (default 32)")
    parser.add_argument(
        "--phase",
        choices=("decode", "prefill"),
        default="decode",
        help="profile the decode loop (default) or one prefill of --batch x --prompt-len tokens",
    )
    parser.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    from meshserve.analytics.cli_helpers import model_from_args

    row = profile(model_from_args(args), args.weights, args.batch, args.prompt_len, args.steps, args.phase)
    row["top"] = row["top"][: args.top]
    print(json.dumps(row, indent=1)) if args.json else print_table(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
