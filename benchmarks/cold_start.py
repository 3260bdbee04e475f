"""Cold start of `meshserve serve`: how long until it answers, and how fast it answers while it is still compiling.

    python benchmarks/cold_start.py                              # demo model, --warm-up background and all
    python benchmarks/cold_start.py --model tiny --json > cold.json --plot cold.png

For each mode (`--modes background,all`) it starts a server with no compilation cache (`--compile-cache off`, the
default here: nothing is read from or written to the persistent cache, so every step really compiles), and from the moment it
prints `listening on` sends one request at a time (a prompt of --prompt-tokens ids, --new-tokens generated tokens,
greedy, ignore_eos, over GenerateStream), until the server has printed `warm-up done` (background) and
--after more requests have run, then stops it (SIGTERM).

Reported per mode: seconds from launch to `listening on` (model load and the compiles before it), to `warm-up done`
(background only: the last bucket compiled), and per request the client's time to first token and total time, with
when it was sent. `during` summarises the requests sent before warm-up was done, `after` the rest: a request during
a background warm-up runs in the smallest compiled bucket that covers it (padded) and shares the CPU with the
compiler. Every request sends the same greedy prompt, so the report counts the distinct answers (per mode). With
f32 weights there is one; with bf16 (the demo) a request run in a covering bucket may flip a near-tie token (the
larger bucket sums in another order), as a request may between two batch buckets at any time; and with prefix
caching on, the next requests reuse that first request's keys and values, so they inherit its rounding.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import numpy as np
from serve_process import ServeProcess

MODES = ("background", "all")


def _split_flags(text: str) -> list[str]:
    """--serve-args as the shell would split it; unbalanced quotes are argparse's one-line error."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {e}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a preset with random weights (default: the bundled demo checkpoint)")
    source.add_argument("--checkpoint", help="a meshserve checkpoint directory")
    p.add_argument("--weights", choices=["f32", "bf16", "int8"], help="weight dtype (default: the model's)")
    p.add_argument("--compile-cache", default="off", metavar="DIR|off",
                   help="the server's persistent compile cache (default off: a true cold start)")  # fmt: skip
    p.add_argument(
        "--serve-args",
        type=_split_flags,
        default=[],
        metavar="'FLAGS'",
        help="more flags for meshserve serve, e.g. '--max-batch 8 --length-buckets 32' (default none)",
    )
    p.add_argument("--modes", default="background,all", help="warm-up modes to run, comma-separated (default both)")
    p.add_argument("--prompt-tokens", type=int, default=24, help="prompt length in tokens (default 24)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--after", type=int, default=5, help="requests after warm-up is done (default 5)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between requests (default 0.5)")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for `listening on` (900)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop sending this many seconds after launch even if warm-up is not done (0 = no limit)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--plot", metavar="PNG", help="also plot TTFT against time since launch")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES] or ([] if modes else ["(none)"])
    for name, value, low in (("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 1),
                             ("--after", args.after, 1), ("--interval", args.interval, 0),
                             ("--max-seconds", args.max_seconds, 0)):  # fmt: skip
        if value < low:
            raise SystemExit(f"cold_start: error: {name} must be >= {low}, got {value}")
    if bad:
        raise SystemExit(f"cold_start: error: --modes must be among {','.join(MODES)}, got {args.modes!r}")
    return modes


def _request(client, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT s, total s, tokens) of one streamed greedy request, as the client sees it."""
    start = time.perf_counter()
    first, tokens = None, []
    for chunk in client.stream_call(prompt, max_new_tokens=new_tokens, ignore_eos=True):
        if chunk.tokens and first is None:
            first = time.perf_counter()
        tokens.extend(chunk.tokens)
    return first - start, time.perf_counter() - start, tokens


def _run_mode(args: argparse.Namespace, mode: str, prompt: list[int]) -> dict:
    from meshserve.serving.client import Client

    source = ["--model", args.model] if args.model else (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    source += ["--weights", args.weights] if args.weights else []
    server = ServeProcess([*source, "--warm-up", mode, "--compile-cache", args.compile_cache,
                           *args.serve_args], f"cold_start_{mode}",
                          args.start_timeout)  # fmt: skip
    records = []
    warm_at = server.listening - server.started if mode == "all" else None
    try:
        with Client(server.target) as client:
            after = 0
            while after < args.after and not (
                args.max_seconds and time.monotonic() - server.started > args.max_seconds
            ):
                sent = time.monotonic() - server.started
                ttft, total, tokens = _request(client, prompt, args.new_tokens)
                if warm_at is None and "warm-up done" in server.text():
                    warm_at = time.monotonic() - server.started
                during = warm_at is None or sent < warm_at
                records.append({"sent_s": sent, "ttft_ms": ttft * 1e3, "total_ms": total * 1e3, "during": during,
                                "tokens": tokens})  # fmt: skip
                after += not during
                print(f"cold_start {mode}: t={sent:6.1f} s ttft {ttft * 1e3:7.1f} ms total {total * 1e3:7.1f} ms"
                      f"{' (warming up)' if during else ''}", file=sys.stderr)  # fmt: skip
                time.sleep(args.interval)
    finally:
        server.stop()
    steps = server.wait_for(r"(\d+) (?:of (\d+) steps compiled|compiled steps)", time.monotonic())
    return {
        "listening_s": server.listening - server.started,
        "warm_up_done_s": warm_at,
        "steps_before_listening": int(steps.group(1)),
        "steps": int(steps.group(2) or steps.group(1)),
        "during": _summary([r for r in records if r["during"]]),
        "after": _summary([r for r in records if not r["during"]]),
        "per_request": records,
    }


def _summary(records: list[dict]) -> dict:
    if not records:
        return {"requests": 0}
    return {
        "requests": len(records),
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in records),
        "ttft_ms_max": max(r["ttft_ms"] for r in records),
        "total_ms_p50": statistics.median(r["total_ms"] for r in records),
    }


def _distinct_answers(modes: dict) -> list[dict]:
    """Each distinct answer (all requests send the same greedy prompt): how many requests per mode got it, and when
    the first of them was sent."""
    seen: dict[tuple[int, ...], dict] = {}
    for mode, m in modes.items():
        for r in m["per_request"]:
            a = seen.setdefault(tuple(r["tokens"]), {"requests": {}, "first": (mode, r["sent_s"])})
            a["requests"][mode] = a["requests"].get(mode, 0) + 1
    return [{"requests": a["requests"], "first_mode": a["first"][0], "first_sent_s": a["first"][1]}
            for a in seen.values()]  # fmt: skip


def _cell(summary: dict, key: str, count: bool = False) -> str:
    if not summary["requests"]:
        return "–"
    return f"{summary[key]:.1f}" + (f" ({summary['requests']})" if count else "")


def _seconds(value: float | None) -> str:
    return "not done" if value is None else f"{value:.1f}"


def _table(report: dict) -> str:
    lines = ["| warm-up | listening s | steps then | warm-up done s | TTFT p50 ms during (n) | TTFT max ms during |"
             " TTFT p50 ms after (n) | total p50 ms after |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, m in report["modes"].items():
        d, a = m["during"], m["after"]
        cells = [_cell(d, "ttft_ms_p50", count=True), _cell(d, "ttft_ms_max"), _cell(a, "ttft_ms_p50", count=True),
                 _cell(a, "total_ms_p50")]  # fmt: skip
        lines.append(f"| {mode} | {m['listening_s']:.1f} | {m['steps_before_listening']} of {m['steps']} | "
                     f"{_seconds(m['warm_up_done_s'])} | {' | '.join(cells)} |")  # fmt: skip
    answers = report["answers"]
    lines.append(f"\ndistinct answers to the one greedy prompt: {len(answers)}")
    for a in answers:
        counts = ", ".join(f"{n} {mode}" for mode, n in a["requests"].items())
        lines.append(f"  {counts} (first: {a['first_mode']} at {a['first_sent_s']:.1f} s)")
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (mode, m), color in zip(report["modes"].items(), ("tab:blue", "tab:orange"), strict=False):
        ax.plot([r["sent_s"] for r in m["per_request"]], [r["ttft_ms"] for r in m["per_request"]], "o-", ms=3,
                color=color, label=f"--warm-up {mode}")  # fmt: skip
        ax.axvline(m["listening_s"], color=color, ls=":", lw=1)
        if m["warm_up_done_s"] is not None:
            ax.axvline(m["warm_up_done_s"], color=color, ls="--", lw=1)
    ax.set_xlabel("seconds since launch (dotted: listening, dashed: every step compiled)")
    ax.set_ylabel("time to first token, ms")
    ax.set_yscale("log")
    ax.set_title(f"meshserve serve cold start ({report['model']}, compile cache {report['compile_cache']})")
    ax.legend()
    fig.tight_layout()
    from meshserve.analytics.output import save_figure  # atomic: a failed draw leaves no half-written image

    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    modes = _check(args)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, 200, args.prompt_tokens)]  # below every preset's vocabulary, no BOS/EOS
    report = {"model": args.model or args.checkpoint or "demo", "compile_cache": args.compile_cache,
              "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "modes": {m: _run_mode(args, m, prompt) for m in modes}}  # fmt: skip
    report["answers"] = _distinct_answers(report["modes"])
    if args.plot:
        _plot(report, args.plot)
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
