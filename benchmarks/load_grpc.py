"""Load test of `meshserve serve` over gRPC (or its OpenAI-compatible HTTP API): requests/s, p50/p99 time to first
token (TTFT) and time per output token (TPOT) at several client concurrencies, and the server's overhead per decode
step over the bare engine step.

    python benchmarks/load_grpc.py                       # starts a server (demo model, or --model tiny) and loads it
    python benchmarks/load_grpc.py --api http            # the same load through POST /v1/completions, streamed
    python benchmarks/load_grpc.py --json > load.json

Each client loops: one GenerateStream (or a streamed completion) of --new-tokens tokens (ignore_eos, greedy) on a
short prompt, for --seconds per concurrency level. TTFT and TPOT are measured at the client (so they include gRPC or
HTTP and detokenization). Server step time comes from the server's Prometheus histogram meshserve_decode_step_seconds
(dispatch to dispatch in the engine loop); the bare engine step is `Engine.decode(b)` timed in this process on the
same plan and batch bucket, with nothing else running.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from timing import median_ms


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = float(re.search(r"^meshserve_decode_step_seconds_sum ([0-9.e+-]+)$", text, re.M).group(1))
    count = float(re.search(r"^meshserve_decode_step_seconds_count ([0-9.e+-]+)$", text, re.M).group(1))
    return total, count


def _grpc_stream(target: str):
    """A function (prompt, new_tokens) -> (arrival times of the chunks that carried tokens, tokens generated), over
    one gRPC channel."""
    from meshserve.serving.client import Client

    client = Client(target)

    def stream(prompt: str, new_tokens: int) -> tuple[list[float], int]:
        times, count = [], 0
        for chunk in client.generate_stream(prompt, max_new_tokens=new_tokens, ignore_eos=True):
            if chunk.tokens:
                times.append(time.perf_counter())
                count += len(chunk.tokens)
        return times, count

    return stream


def _http_stream(target: str):
    """As _grpc_stream, through a streamed POST /v1/completions (a connection per request: a stream ends with its
    connection). Chunks carry text, not token ids: the count is the usage chunk's completion_tokens."""
    import http.client

    host, port = target.rsplit(":", 1)

    def stream(prompt: str, new_tokens: int) -> tuple[list[float], int]:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = {"prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise SystemExit(f"HTTP {reply.status}: {reply.read()[:500]!r}")
        times, count = [], 0
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            data = json.loads(line[6:])
            if data["choices"] and data["choices"][0]["text"]:
                times.append(time.perf_counter())
            elif data.get("usage"):
                count = data["usage"]["completion_tokens"]
        conn.close()
        return times, count

    return stream


def _level(target: str, concurrency: int, seconds: float, new_tokens: int, metrics_port: int, api: str) -> dict:
    ttft, tpot, done = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    s0, c0 = _scrape(metrics_port)

    def worker(i: int) -> None:
        stream = (_grpc_stream if api == "grpc" else _http_stream)(target)
        n = 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            times, count = stream(f"def f{i}_{n}(x):", new_tokens)
            with lock:
                ttft.append(times[0] - start)
                if count > 1:
                    tpot.append((times[-1] - times[0]) / (count - 1))
                done.append(times[-1])
            n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    s1, c1 = _scrape(metrics_port)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": len(done) * new_tokens / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50),
        "tpot_p99_ms": pct(tpot, 99),
        "server_step_ms": (s1 - s0) / max(c1 - c0, 1) * 1e3,
    }


def _bare_steps(args, buckets: list[int]) -> dict[int, float]:
    """Engine.decode(b) alone, same model and plan, in this process."""
    from meshserve.model.loading import load_model
    from meshserve.serving.engine import Engine
    from meshserve.serving.plan import make_plan

    model = load_model(args.checkpoint, preset=args.model)
    plan = make_plan(model.config, max_batch=args.max_batch, decode_buckets=tuple(buckets), length_buckets=(32,))
    engine = Engine(model.params, model.config, plan)
    engine.warm_up(phases=("generate",))
    out = {}
    context = 32 + args.new_tokens  # what the server's steps attend over: a short prompt plus the new tokens
    for b in buckets:
        out[b] = median_ms(functools.partial(engine.decode, b, context), args.bare_steps)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the bundled demo model)")
    p.add_argument("--model", help="a preset with random weights instead (e.g. tiny)")
    p.add_argument("--concurrency", default="1,8,32", help="client counts (default 1,8,32)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per level (default 10)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--max-batch", type=int, default=32, help="server decode slots (default 32)")
    p.add_argument("--bare-steps", type=int, default=100, help="bare engine steps timed per bucket (default 100)")
    p.add_argument(
        "--api",
        choices=["grpc", "http"],
        default="grpc",
        help="load gRPC's GenerateStream (default) or the OpenAI-compatible POST /v1/completions, streamed",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    source = ["--model", args.model] if args.model else (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    buckets = sorted({min(args.max_batch, 1 << (c - 1).bit_length()) for c in levels})
    cmd = [sys.executable, "-m", "meshserve.serving.cli", "serve", *source, "--port", str(port), "--metrics-port",
           str(metrics_port), "--max-batch", str(args.max_batch), "--length-buckets", "32",
           "--decode-buckets", ",".join(map(str, buckets)), "--http-port", str(http_port)]  # fmt: skip
    log = Path("/tmp") / f"load_grpc_server_{port}.log"
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        while "listening on" not in log.read_text():
            if server.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()}")
            time.sleep(0.2)
        target = f"127.0.0.1:{port if args.api == 'grpc' else http_port}"
        results = [_level(target, c, args.seconds, args.new_tokens, metrics_port, args.api) for c in levels]
    finally:
        server.terminate()
        server.wait(60)
    bare = _bare_steps(args, buckets)
    for r in results:
        b = min(args.max_batch, 1 << (r["concurrency"] - 1).bit_length())
        r["bare_engine_step_ms"] = bare[b]
        r["server_overhead_per_step_ms"] = r["server_step_ms"] - bare[b]
    import jax

    report = {"device": jax.devices()[0].device_kind, "source": source or ["demo"], "api": args.api,
              "new_tokens": args.new_tokens, "levels": results}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"device {report['device']}, model {' '.join(report['source'])}, {args.api}, {args.new_tokens} "
              "tokens/request")  # fmt: skip
        head = (
            "clients  req/s  out tok/s  TTFT p50/p99 ms   TPOT p50/p99 ms   server step ms  bare step ms  overhead ms"
        )
        print(head)
        for r in results:
            print(f"{r['concurrency']:>7}  {r['requests_per_s']:5.1f}  {r['output_tokens_per_s']:9.0f}  "
                  f"{r['ttft_p50_ms']:7.1f}/{r['ttft_p99_ms']:<7.1f}  {r['tpot_p50_ms']:7.2f}/{r['tpot_p99_ms']:<7.2f}  "
                  f"{r['server_step_ms']:14.2f}  {r['bare_engine_step_ms']:12.2f}  {r['server_overhead_per_step_ms']:11.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
