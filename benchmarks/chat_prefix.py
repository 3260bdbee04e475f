"""Multi-turn chat over gRPC against `meshserve serve`, with prefix caching on and off: what reusing the cached
system prompt and earlier turns buys in time to first token (TTFT).

    python benchmarks/chat_prefix.py                          # demo model, both modes, a table on stdout
    python benchmarks/chat_prefix.py --model tiny --system-tokens 40 --user-tokens 8 --new-tokens 8 --turns 2
    python benchmarks/chat_prefix.py --json > chat.json --plot chat.png

For each mode (`--modes on,off`) it starts a server (`--prefix-caching` / `--no-prefix-caching`, the other flags
the same), waits for `listening on`, runs the workload and stops it (SIGTERM). Workload: --conversations chats run by
--concurrency client threads, each chat --turns turns. Every chat opens with the same system prompt of
--system-tokens ids; each turn adds a user message of --user-tokens ids and the answer of --new-tokens tokens
(greedy, ignore_eos), so turn t's prompt is the system prompt, all earlier (user message + answer) pairs and this
user message. Ids are drawn with a fixed seed from the vocabulary, never BOS or EOS (a BOS opens the system prompt
when the model has one); both modes send the same user messages.

Measured at the client, per request, over GenerateStream: TTFT = until the first chunk carrying tokens (so it
includes gRPC and the server's queueing), total time, and, from the stream's last chunk (which carries usage and
timing), prompt tokens, cached_prompt_tokens and the server's own TTFT. Streaming rather than unary Generate: the
client-side TTFT is what a chat user waits for, and the last chunk still has the usage. The server's
meshserve_prefix_cache_hit_tokens_total / meshserve_prompt_tokens_total are scraped as a cross-check. Each answer's
tokens are hashed per (conversation, turn): greedy answers must be the same with and without caching. They are
with f32 weights (`--weights f32`); with the demo's bf16 weights a near-tie can flip a greedy token when the same
tokens are computed in another bucket or batch, so a few conversations may differ from some turn on, as they do
between two runs with caching off at --concurrency > 1 (a run's report names them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
from serve_process import ServeProcess

MODES = {"on": "--prefix-caching", "off": "--no-prefix-caching"}
COUNTERS = ("meshserve_prefix_cache_hit_tokens_total", "meshserve_prompt_tokens_total")
DEFAULT_USER_TOKENS = 24  # a short chat message; 1 + 24 new tokens per turn fit one 32-token prefill bucket
DEFAULT_NEW_TOKENS = 40  # demo (512 context): 170 system + 4 turns x (24 + 40) = 426 tokens, inside the context


class FlagError(Exception):
    """A bad flag value: one line on stderr, exit 2."""


def _check_flags(args: argparse.Namespace) -> None:
    """Values that need no model: counts >= 1, token counts >= 0 / >= 1, known modes, matplotlib for --plot."""
    for flag, low in (("conversations", 1), ("concurrency", 1), ("turns", 1), ("user_tokens", 1),
                      ("new_tokens", 1), ("max_batch", 1)):  # fmt: skip
        value = getattr(args, flag)
        if value < low:
            raise FlagError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.start_timeout <= 0:
        raise FlagError(f"--start-timeout must be > 0 seconds, got {args.start_timeout}")
    if args.system_tokens is not None and args.system_tokens < 0:
        raise FlagError(f"--system-tokens must be >= 0, got {args.system_tokens}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise FlagError(f"--modes must be a comma-separated subset of on,off without repeats, got {args.modes!r}")
    args.modes = modes
    if args.plot is not None:
        if not args.plot.endswith(".png"):
            raise FlagError(f"--plot must name a .png file, got {args.plot!r}")
        if not Path(args.plot).resolve().parent.is_dir():
            raise FlagError(f"--plot {args.plot}: its folder does not exist")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FlagError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


def _model_context(args: argparse.Namespace) -> int:
    """The model's max_seq_len (the server's max_context: the benchmark never passes --max-context), read without
    loading weights, so a workload too long is refused before any server starts."""
    from meshserve.errors import UserError
    from meshserve.model.checkpoint import read_checkpoint_info
    from meshserve.model.config import get_config
    from meshserve.model.loading import DEMO_CHECKPOINT

    try:
        if args.model:
            return get_config(args.model).max_seq_len
        return read_checkpoint_info(args.checkpoint or DEMO_CHECKPOINT).config.max_seq_len
    except UserError as e:
        raise FlagError(f"--{'model' if args.model else 'checkpoint'}: {e}") from None


def _check_fit(args: argparse.Namespace, max_context: int) -> None:
    """The last turn's prompt plus its answer must fit the context: system + turns x (user + new) <= max_context."""
    need = args.system_tokens + args.turns * (args.user_tokens + args.new_tokens)
    if need > max_context:
        raise FlagError(
            f"--system-tokens {args.system_tokens} + --turns {args.turns} x (--user-tokens {args.user_tokens} + "
            f"--new-tokens {args.new_tokens}) = {need} tokens, past the model's context (max_context {max_context}): "
            "lower one of them"
        )


def _workload(args: argparse.Namespace, vocab: int, bos: int | None, eos: int | None) -> tuple[list, list]:
    """(system prompt ids, user messages [conversation][turn] -> ids), from --seed; never BOS or EOS."""
    allowed = np.setdiff1d(np.arange(vocab), [t for t in (bos, eos) if t is not None])
    rng = np.random.default_rng(args.seed)
    system = [int(t) for t in rng.choice(allowed, args.system_tokens)]
    if bos is not None and system:
        system[0] = bos
    users = [[[int(t) for t in rng.choice(allowed, args.user_tokens)] for _ in range(args.turns)]
             for _ in range(args.conversations)]  # fmt: skip
    return system, users


class Server(ServeProcess):
    """`meshserve serve` for one mode, every step compiled before it listens (--warm-up all): a background warm-up
    would run the first requests in padded buckets and skew TTFT."""

    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        source = (
            ["--model", args.model] if args.model else (["--checkpoint", args.checkpoint] if args.checkpoint else [])
        )
        extra = ["--length-buckets", args.length_buckets] if args.length_buckets else []
        extra += ["--weights", args.weights] if args.weights else []
        flags = [*source, MODES[mode], "--warm-up", "all", "--max-batch", str(args.max_batch), *extra]
        super().__init__(flags, f"chat_prefix_{mode}", args.start_timeout)


def _run_mode(args: argparse.Namespace, server: Server, system: list, users: list, bar) -> tuple[list, float]:
    """Every conversation, turn by turn, on --concurrency threads; per request a dict of what the client saw."""
    from meshserve.serving.client import Client

    todo: queue.Queue[int] = queue.Queue()
    for c in range(args.conversations):
        todo.put(c)
    records, errors = [], []
    lock = threading.Lock()

    def worker() -> None:
        with Client(server.target) as client:
            while True:
                try:
                    conv = todo.get_nowait()
                except queue.Empty:
                    return
                history = list(system)
                for turn in range(args.turns):
                    prompt = history + users[conv][turn]
                    start = time.perf_counter()
                    first, tokens, last = None, [], None
                    for chunk in client.stream_call(prompt, max_new_tokens=args.new_tokens, ignore_eos=True):
                        if chunk.tokens and first is None:
                            first = time.perf_counter()
                        tokens.extend(chunk.tokens)
                        last = chunk
                    end = time.perf_counter()
                    record = {
                        "conversation": conv,
                        "turn": turn,
                        "prompt_tokens": last.usage.prompt_tokens,
                        "cached_prompt_tokens": last.usage.cached_prompt_tokens,
                        "output_tokens": len(tokens),
                        "ttft_ms": (first - start) * 1e3,
                        "server_ttft_ms": last.timing.time_to_first_token_ms,
                        "total_ms": (end - start) * 1e3,
                        "tokens_sha1": hashlib.sha1(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16],
                        "tokens": tokens,
                    }
                    with lock:
                        records.append(record)
                        bar.update(1)
                    history = prompt + tokens

    def guarded() -> None:
        try:
            worker()
        except Exception as e:  # a failed RPC: reported after the threads end, not lost in a thread
            with lock:
                errors.append(e)

    with Client(server.target) as client:  # unmeasured: the first call's connection and first step run here
        warm = [t for t in users[0][0] if not system or t != system[0]][:1] or [users[0][0][0]]
        for _ in client.stream_call(warm, max_new_tokens=1):
            pass
    t0 = time.monotonic()
    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]!r}")
    return sorted(records, key=lambda r: (r["conversation"], r["turn"])), wall


def _summary(records: list, wall: float, turns: int, counters: dict) -> dict:
    ttft = np.array([r["ttft_ms"] for r in records])
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_prompt_tokens"] for r in records)
    by_turn = [[r for r in records if r["turn"] == t] for t in range(turns)]
    return {
        "requests": len(records),
        "wall_s": wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "ttft_p50_by_turn_ms": [float(np.median([r["ttft_ms"] for r in rs])) for rs in by_turn],
        "server_ttft_p50_ms": float(np.median([r["server_ttft_ms"] for r in records])),
        "total_p50_ms": float(np.median([r["total_ms"] for r in records])),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "cached_fraction": cached / prompt,
        "cached_tokens_by_turn": [sum(r["cached_prompt_tokens"] for r in rs) for rs in by_turn],
        "prompt_tokens_per_s": prompt / wall,
        "output_tokens_per_s": sum(r["output_tokens"] for r in records) / wall,
        "server_counters": counters,
        "per_request": records,
    }


def _compare_answers(on: list, off: list) -> dict:
    """Greedy answers per (conversation, turn) in both modes. Once a conversation's answer differs, its later prompts
    differ too, so only the first differing turn of each conversation is a finding."""
    first: dict[int, int] = {}
    for a, b in zip(on, off, strict=True):
        if a["tokens_sha1"] != b["tokens_sha1"] and a["conversation"] not in first:
            first[a["conversation"]] = a["turn"]
    return {"same_answers": not first, "first_differing_turn": first}


def _table(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"model {report['model']} on {report['device']}: {w['conversations']} conversations x {w['turns']} turns, "
        f"{w['concurrency']} clients, system {w['system_tokens']} + user {w['user_tokens']} + answer "
        f"{w['new_tokens']} tokens per turn, max_context {w['max_context']}",
        "mode  requests  wall s  TTFT p50/p99 ms   server TTFT p50  prompt tok/s  out tok/s  cached  "
        + "  ".join(f"turn{t} p50" for t in range(w["turns"])),
    ]
    for mode, s in report["modes"].items():
        lines.append(
            f"{mode:<4}  {s['requests']:>8}  {s['wall_s']:6.1f}  {s['ttft_p50_ms']:7.1f}/{s['ttft_p99_ms']:<7.1f}  "
            f"{s['server_ttft_p50_ms']:15.1f}  {s['prompt_tokens_per_s']:12.0f}  {s['output_tokens_per_s']:9.1f}  "
            f"{s['cached_fraction']:6.1%}  " + "  ".join(f"{x:10.1f}" for x in s["ttft_p50_by_turn_ms"])
        )
    if "ttft_p50_speedup" in report:
        lines.append(
            f"TTFT p50 speedup on vs off: {report['ttft_p50_speedup']:.2f}x; answers identical in both modes: "
            + ("yes" if report["same_answers"] else "no, from (conversation: turn) "
               + ", ".join(f"{c}: {t}" for c, t in report["first_differing_turn"].items()))
        )  # fmt: skip
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, s in report["modes"].items():
        ax.plot(
            range(len(s["ttft_p50_by_turn_ms"])), s["ttft_p50_by_turn_ms"], marker="o", label=f"prefix caching {mode}"
        )
    ax.set_xticks(range(len(next(iter(report["modes"].values()))["ttft_p50_by_turn_ms"])))
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms, client)")
    ax.set_title(f"chat TTFT by turn, {report['model']} on {report['device']}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    from meshserve.analytics.output import save_figure  # atomic: a failed draw leaves no half-written image

    save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description="\n\n".join(doc[:2]), epilog="\n\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", help="checkpoint to serve (default: the bundled demo model)")
    p.add_argument("--model", metavar="PRESET", help="a preset with random weights instead (e.g. tiny)")
    p.add_argument("--weights", choices=["f32", "bf16", "int8"], help="server weight dtype (default: the "
                   "checkpoint's; the demo is bf16)")  # fmt: skip
    p.add_argument("--modes", default="on,off", help="which servers to run, in order: on, off or both (default on,off)")
    p.add_argument("--conversations", type=int, default=16, help="chats to run, >= 1 (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads, each runs whole chats, >= 1 (default 4)")
    p.add_argument("--turns", type=int, default=4, help="turns per chat, >= 1 (default 4)")
    p.add_argument("--system-tokens", type=int, help="shared system prompt length, >= 0 (default: a third of the "
                   "model's context)")  # fmt: skip
    p.add_argument("--user-tokens", type=int, default=DEFAULT_USER_TOKENS,
                   help=f"user message per turn, >= 1 (default {DEFAULT_USER_TOKENS})")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                   help=f"answer per turn (greedy, ignore_eos), >= 1 (default {DEFAULT_NEW_TOKENS}); system + turns x "
                   "(user + new) must fit the context")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="server decode slots, >= 1 (default 8); freed slots keep "
                   "their chat's tokens until another request takes them")  # fmt: skip
    p.add_argument("--length-buckets", metavar="16,64,...", help="server prompt-length buckets (default: the server's, "
                   "powers of two from 16); reuse needs the rest of a prompt in a smaller bucket")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for each server to listen, "
                   "compiling included (default 900)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object (with every request) instead of a table")
    p.add_argument("--plot", metavar="PATH.png", help="draw TTFT p50 by turn for each mode (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_flags(args)
        max_context = _model_context(args)
        if args.system_tokens is None:
            args.system_tokens = max_context // 3
        _check_fit(args, max_context)
    except FlagError as e:
        print(f"chat_prefix: error: {e}", file=sys.stderr)
        return 2
    from meshserve.progress import progress

    report = {"model": args.model or args.checkpoint or "demo", "modes": {}}
    bar = progress("requests", "req", len(args.modes) * args.conversations * args.turns)
    workload = None
    try:
        for mode in args.modes:
            server = Server(args, mode)
            try:
                from meshserve.serving.client import Client

                with Client(server.target) as client:
                    info = client.model_info()
                config = json.loads(info.model.json)
                if workload is None:  # the server's own limit, in case it differs from the config read above
                    _check_fit(args, info.limits.max_context)
                    workload = _workload(args, config["vocab_size"], config.get("bos_id"), config.get("eos_id"))
                    report["device"] = info.mesh.device_kind
                    report["workload"] = {k: getattr(args, k) for k in ("conversations", "concurrency", "turns",
                                          "system_tokens", "user_tokens", "new_tokens", "max_batch", "seed")}  # fmt: skip
                    report["workload"]["max_context"] = info.limits.max_context
                records, wall = _run_mode(args, server, *workload, bar)
                report["modes"][mode] = _summary(records, wall, args.turns, server.scrape(COUNTERS))
            finally:
                server.stop()
    except FlagError as e:
        bar.close()
        print(f"chat_prefix: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        bar.close()
        print(f"chat_prefix: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the servers were stopped on the way out (finally above)
        bar.close()
        print("chat_prefix: interrupted", file=sys.stderr)
        return 130
    bar.close()
    if {"on", "off"} <= report["modes"].keys():
        on, off = report["modes"]["on"], report["modes"]["off"]
        report["ttft_p50_speedup"] = off["ttft_p50_ms"] / on["ttft_p50_ms"]
        report.update(_compare_answers(on["per_request"], off["per_request"]))
    if args.plot:
        _plot(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
