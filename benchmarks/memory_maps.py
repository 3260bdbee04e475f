"""Does a long-running server's footprint level off? Memory maps and resident memory of a real `meshserve serve`
process while it answers rounds of varied requests over gRPC.

Why maps: on the CPU every compiled XLA executable holds memory maps of its JIT code, and a process may hold at most
vm.max_map_count of them (65530 by default); past it the next compile fails. A server compiles its buckets once,
so once its warm-up has finished (the benchmark waits for meshserve_compile_pending_steps to reach 0) its
count should stay flat however requests vary (prompt lengths across buckets, sampling
options, n, log-probs, stop strings, guided JSON). Each round sends the same mix with new random values.

  python benchmarks/memory_maps.py --rounds 6 --requests 24 [--json] [-- serve flags...]

Prints one row per round: requests answered so far, maps, RSS (MiB); exits 1 if the maps grew after the first
round by more than --tolerance (default 2%).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess  # noqa: E402


def _proc_stats(pid: int) -> tuple[int, float]:
    """(memory maps, resident MiB) of process `pid`, from /proc."""
    from meshserve.serving.map_budget import count_maps

    count = count_maps(pid)
    with open(f"/proc/{pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return count, rss_kb / 1024


def _request(client, rng: random.Random, i: int) -> None:
    """One request of the mix: request i's kind cycles through plain, sampled, n, log-probs, stops, guided JSON."""
    prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 300)))
    kind = i % 6
    kwargs: dict = {"max_new_tokens": rng.randint(1, 24)}
    if kind == 1:
        kwargs.update(temperature=0.8, top_p=0.9, top_k=rng.randint(0, 40), seed=rng.randint(0, 1 << 30))
    elif kind == 2:
        kwargs.update(temperature=1.0, n=rng.randint(2, 3), seed=i, frequency_penalty=0.5)
    elif kind == 3:
        kwargs.update(top_logprobs=rng.randint(1, 5))
    elif kind == 4:
        kwargs.update(stop=["a", "k "], min_tokens=2)
    elif kind == 5:
        kwargs.update(response_format={"type": "json_object"}, max_new_tokens=16)
    client.generate(prompt, timeout=600, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of requests (default 6)")
    parser.add_argument("--requests", type=int, default=24, help="requests per round (default 24)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed map growth after round 1 (0.02)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("serve_flags", nargs="*", help="flags for meshserve serve (after --)")
    args = parser.parse_args(argv)
    for name in ("rounds", "requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    from meshserve.serving.client import Client

    server = ServeProcess(args.serve_flags, "memory_maps")
    rows = []
    try:
        with Client(server.target) as client:
            client.wait_ready(600)
            # The background warm-up compiles the other buckets first: their maps are not growth.
            deadline = time.monotonic() + 900
            while server.scrape(("meshserve_compile_pending_steps",))["meshserve_compile_pending_steps"] != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server's background warm-up did not finish in 900 s")
                time.sleep(0.5)
            rows.append({"requests": 0, **dict(zip(("maps", "rss_mib"), _proc_stats(server.proc.pid), strict=True))})
            with ThreadPoolExecutor(args.concurrency) as pool:
                for r in range(args.rounds):
                    ids = range(r * args.requests, (r + 1) * args.requests)
                    # request i draws its values from Random(i): every run sends the same requests
                    list(pool.map(lambda i: _request(client, random.Random(i), i), ids))  # raises the first error
                    maps, rss = _proc_stats(server.proc.pid)
                    rows.append({"requests": (r + 1) * args.requests, "maps": maps, "rss_mib": round(rss, 1)})
                    if not args.json:
                        print(f"round {r + 1}: {rows[-1]['requests']} requests, {maps} maps, {rss:.0f} MiB RSS")
    finally:
        server.stop()
    first, last = rows[1]["maps"], rows[-1]["maps"]
    grew = (last - first) / first
    verdict = {"rows": rows, "growth_after_round_1": round(grew, 4), "flat": grew <= args.tolerance}
    print(json.dumps(verdict) if args.json else f"maps after round 1: {first} -> {last} ({grew:+.1%})")
    return 0 if verdict["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
