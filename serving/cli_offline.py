"""`meshserve score` and `meshserve batch-generate`: offline JSONL jobs in process (no server), throughput plan.

Rerunning a command after an interruption (Ctrl-C, kill -9, a crash) continues where it stopped: ids already in
OUT are skipped. Bad input lines go to the errors file (default OUT.errors.jsonl) with their line numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from meshserve.serving.cli_serve import add_model_arguments, load_for_serving

__all__ = ["COMMANDS"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.jsonl", help="input lines (see `meshserve COMMAND --help` for fields)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT.jsonl", help="results, one line per id (appended)"
    )
    parser.add_argument("--errors", metavar="PATH", help="bad lines with line numbers (default: OUT.errors.jsonl)")
    parser.add_argument(
        "--objective",
        choices=["latency", "throughput"],
        default="throughput",
        help="plan objective (default throughput: large batches)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    add_model_arguments(parser)


def _run(args: argparse.Namespace, kind: str) -> int:
    from meshserve.serving.engine import Engine, ModelSteps
    from meshserve.serving.offline import check_paths, resume_output, run_generate, run_score
    from tqdm import tqdm

    in_path, out_path = Path(args.input), Path(args.output)
    errors_path = Path(args.errors) if args.errors else out_path.with_name(out_path.name + ".errors.jsonl")
    # Before loading and compiling (minutes on a large model): bad paths and a corrupt OUT fail fast.
    check_paths(in_path, out_path, errors_path)
    resume_output(out_path)
    model, plan, steps, _ = load_for_serving(args, args.objective)
    engine = Engine(model.params, model.config, plan, steps or ModelSteps())
    phases = ("score",) if kind == "score" else ("generate",)
    with tqdm(total=plan.compile_count(phases), desc="compiling", unit="step", file=sys.stderr, leave=False) as bar:
        engine.warm_up(lambda s: bar.update(2 if s.startswith("prefill") else 1), phases)
    start = time.monotonic()
    job = run_score if kind == "score" else run_generate
    with tqdm(desc=kind, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True) as bar:
        summary = job(model, engine, in_path, out_path, errors_path, progress=bar)
    seconds = time.monotonic() - start
    report = {**summary.to_dict(), "seconds": round(seconds, 3), "tokens_per_s": round(summary.tokens / max(seconds, 1e-9), 1),
              "output": str(out_path), "errors_file": str(errors_path)}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    print(f"meshserve {kind}: {summary.done} written, {summary.skipped} already done, {summary.errors} bad lines "
          f"(see {errors_path}), {report['tokens_per_s']} tokens/s", file=sys.stderr)  # fmt: skip
    return 0


COMMANDS = {
    "score": (add_arguments, lambda args: _run(args, "score")),
    "batch-generate": (add_arguments, lambda args: _run(args, "batch-generate")),
}
