"""`meshserve bench`: prefill and decode speed, HBM bandwidth use and MFU on this machine's first device."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshserve.analytics.cli_helpers import ints
from meshserve.errors import UserError
from meshserve.model.model_spec import MODEL_HELP, SET_HELP

if TYPE_CHECKING:
    from meshserve.model.config import ModelConfig

__all__ = ["COMMANDS", "attention_note", "check_args", "check_context", "check_peer", "lengths", "print_table"]


def _weights(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in ("bf16", "int8", "f32")]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--weights takes a comma list of bf16, int8, f32; got {text!r}")
    return items


def _kv_dtypes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in ("auto", "int8") for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma list of auto and int8, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help=f"{MODEL_HELP}; timed with random weights (default tiny)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--batch", type=ints, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="prompt tokens per sequence (default 128, or half the model's max_seq_len when that is less: 64 on tiny)",
    )
    parser.add_argument(
        "--gen-len",
        type=int,
        default=None,
        help="generated tokens per sequence, 0 = prefill only (default 128, or what is left of max_seq_len after "
        "the prompt); --prompt-len + --gen-len must fit the model's max_seq_len",
    )
    parser.add_argument("--weights", type=_weights, default=["bf16", "int8"], help="comma list (default bf16,int8)")
    parser.add_argument(
        "--kv-cache-dtype",
        type=_kv_dtypes,
        default=["auto"],
        metavar="auto,int8",
        help="KV cache storage, a comma list: auto (the compute dtype) and/or int8 (half of bf16's bytes); a row per "
        "value (default auto)",
    )
    parser.add_argument(
        "--layers",
        choices=["unrolled", "scan"],
        default="unrolled",
        help="layer loop: unrolled per-layer weights (default) or lax.scan over stacked weights",
    )
    parser.add_argument(
        "--int8-matmul",
        choices=["xla", "pallas", "w8a8", "rowsum"],
        default=None,
        help="int8 weight matmul: XLA's convert + GEMM, the fused Pallas kernel on a GPU, w8a8 (activations "
        "quantised per token too, an int8 x int8 GEMM; changes the numerics), or rowsum (unrolled layers: weights "
        "stored contracted-axes-last, a row reduction for <= 4 rows) (default: $MESHSERVE_INT8_MATMUL, else xla)",
    )
    parser.add_argument(
        "--decode-attention",
        choices=["xla", "pallas"],
        default=None,
        help="decode attention: XLA's ops, or one Pallas kernel per layer (model/decode_attention.py: unrolled layers, "
        "a 16-bit KV cache, a power-of-two head dim >= 16; Triton on a CUDA GPU, interpreted as XLA ops elsewhere, "
        "slowly) (default: $MESHSERVE_DECODE_ATTENTION, else pallas on CUDA GPUs of compute capability >= 9.0, xla "
        "elsewhere); each row's decode_attention says which ran",
    )
    parser.add_argument(
        "--int8-tuning",
        type=Path,
        default=None,
        help="kernel configs per shape from `benchmarks/int8_probe.py --tune` (default: $MESHSERVE_INT8_TUNING)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per figure; the median is reported (default 3)"
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also time transformers' generate on the same shapes (needs torch + transformers)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument(
        "--plot", type=Path, help="also draw decode step time against the byte floor (an image: .png, .svg, .pdf, ...)"
    )


def _fmt(value, spec: str) -> str:
    """format(value, spec), or "-" padded to the spec's width so a missing figure keeps its column."""
    if value is None:
        width = spec.split(".")[0].lstrip("<>^")
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(value, spec)


def _mem(n: int | None) -> str:
    """Peak device memory: GiB, or MiB below one GiB (tiny's 0.2 MiB read as 0.00 GiB)."""
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def copy_note(rows: list[dict]) -> str | None:
    """Why "of copy" is not a bandwidth fraction on a CPU, or None on an accelerator (see serving/bench.py)."""
    if not rows or rows[0].get("platform", "cpu") != "cpu":
        return None
    step = max(r["hbm_bytes_per_step"] for r in rows)
    return (
        f"* of copy is not a bandwidth fraction on a CPU: a step's weights + KV cache ({step / 2**20:.2f} MiB at most "
        "here) can stay in the CPU caches between steps, while the copy figure streams 128 MiB through DRAM with a "
        "bf16 add that is partly compute-bound, so it can read over 100%. On a GPU or TPU both are HBM traffic."
    )


def print_table(rows: list[dict]) -> None:
    note = copy_note(rows)
    head = (
        f"{'weights':>7} {'kv':>4} {'batch':>5} {'prefill ms':>10} {'ttft ms':>8} {'step ms':>8} {'tok/s':>9} "
        f"{'HBM GB/s':>8} {'of copy' + ('*' if note else ''):>8} {'MFU':>6} {'peak mem':>9} {'peer step':>9} "
        f"{'speedup':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = r["peak_memory_bytes"]
        print(
            f"{r['weights']:>7} {r['kv_cache_dtype']:>4} {r['batch']:>5} {r['prefill_ms']:>10.2f} {r['ttft_ms']:>8.2f} "
            f"{_fmt(r['decode_step_ms'], '8.3f')} {_fmt(r['tokens_per_s'], '9.1f')} {_fmt(r['hbm_gbps'], '8.1f')} "
            f"{_fmt(r['hbm_fraction'], '8.1%')} {_fmt(r['prefill_mfu'], '6.1%')} "
            f"{_mem(mem):>9} {_fmt(r['peer_decode_step_ms'], '9.3f')} "
            f"{_fmt(r['speedup_vs_peer'], '6.1f') + 'x' if r['speedup_vs_peer'] else '-':>7}"
        )
    if note:
        print(note)


def attention_note(rows: list[dict]) -> str:
    """The title's words on decode attention: "" where every row ran XLA's; else the kernel's path, and which rows
    ran it when some did not (f32 weights and an int8 cache stay on XLA's in the same run)."""
    ran = [r for r in rows if r.get("decode_attention", "xla") != "xla"]
    if not ran:
        return ""
    note = f", decode attention {ran[0]['decode_attention']}"
    if len(ran) == len(rows):
        return note
    kinds = dict.fromkeys(f"{r['weights']}/{r['kv_cache_dtype']}" for r in ran)  # weights/kv, in row order
    return f"{note} ({', '.join(kinds)} rows; xla in the others)"


def check_args(args: argparse.Namespace) -> None:
    """Every user-input check, before any JAX work (compile, bandwidth probes, measurement)."""
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    for b in args.batch:
        if b < 1:
            raise UserError(f"--batch values must be >= 1, got {b}")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise UserError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if args.gen_len is not None and args.gen_len < 0:
        raise UserError(f"--gen-len must be >= 0, got {args.gen_len}")
    if args.plot and args.gen_len == 0:
        raise UserError("--plot draws decode steps: it needs --gen-len > 0")
    from meshserve.analytics.output import check_image_path, check_output_path

    check_output_path("--out", args.out)
    check_image_path("--plot", args.plot)
    if args.int8_tuning and not args.int8_tuning.is_file():
        raise UserError(f"--int8-tuning: no such file {args.int8_tuning}")


def lengths(config: ModelConfig, prompt_len: int | None, gen_len: int | None) -> tuple[int, int]:
    """(prompt, generated) tokens: the given ones, else 128 each, shortened to fit the model's context when not
    given (tiny, max_seq_len 128: 64 + 64); given ones are checked by `check_context`, never shortened."""
    if prompt_len is None:
        prompt_len = max(1, min(128, config.max_seq_len // 2))
    if gen_len is None:
        gen_len = max(0, min(128, config.max_seq_len - prompt_len))
    return prompt_len, gen_len


def check_context(config: ModelConfig, prompt_len: int, gen_len: int, gen_given: bool = True) -> None:
    """Refuse a prompt (+ generated tokens) beyond the model's context: it is past what the model was built for, and
    a long enough one asks the device for more memory than it has (100000 tokens of tiny: 970 GB). gen_given:
    --gen-len was given (else it was defaulted to what is left, and the message names --prompt-len alone)."""
    context = prompt_len + gen_len
    if not gen_given and prompt_len > config.max_seq_len:
        raise UserError(
            f"--prompt-len {prompt_len} exceeds {config.name}'s max_seq_len {config.max_seq_len} (to time a longer "
            f"context on purpose: --set max_seq_len={prompt_len + 128} for 128 generated tokens)"
        )
    if context > config.max_seq_len:
        raise UserError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} = {context} tokens exceeds {config.name}'s "
            f"max_seq_len {config.max_seq_len} (to time a longer context on purpose: --set max_seq_len={context})"
        )


def check_peer(config: ModelConfig, gen_len: int) -> None:
    """--peer's needs, before any measuring: a Falcon-shaped model, decode steps to compare, torch and transformers
    (found missing after meshserve's rows, they cost the whole run's time and ended in a traceback)."""
    import importlib.util

    if config.mlp != "gelu" or not config.parallel_block or config.n_kv_heads != 1:
        raise UserError(
            f"--peer needs a Falcon-shaped model (gelu MLP, parallel block, multi-query): not {config.name}"
        )
    # The peer step is (generate(G) - generate(1)) / (G - 1): at G = 1 it is timing noise (tiny-falcon: 1e-6 ms,
    # i.e. 1e9 tokens/s, or 123 ms, run to run).
    if gen_len < 2:
        raise UserError(f"--peer compares decode steps: it needs --gen-len >= 2, got {gen_len}")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--peer needs {' and '.join(missing)} installed (pip install torch transformers)")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.int8_matmul:
        os.environ["MESHSERVE_INT8_MATMUL"] = args.int8_matmul  # read by model/quant.py when a step is traced
    from meshserve.model.quant import int8_matmul_mode

    int8_matmul_mode()  # a bad MESHSERVE_INT8_MATMUL fails here in one line, whatever the weights
    if args.decode_attention:
        os.environ["MESHSERVE_DECODE_ATTENTION"] = args.decode_attention  # read by decode_step when it is traced
    from meshserve.model.decode_attention import decode_attention_mode

    decode_attention_mode()  # a bad MESHSERVE_DECODE_ATTENTION fails here in one line, before any model is made
    if args.int8_tuning:
        os.environ["MESHSERVE_INT8_TUNING"] = str(args.int8_tuning)
    from meshserve.analytics.cli_helpers import model_from_args

    config = model_from_args(args)
    gen_given = args.gen_len is not None
    args.prompt_len, args.gen_len = lengths(config, args.prompt_len, args.gen_len)
    check_context(config, args.prompt_len, args.gen_len, gen_given)
    if args.plot and args.gen_len == 0:
        raise UserError("--plot draws decode steps: it needs --gen-len > 0")
    if args.peer:
        check_peer(config, args.gen_len)
    from meshserve.analytics.device_fit import available_bytes, check_rows_fit

    # Before the bandwidth probes and the first compile: a batch past the device's memory costs nothing.
    check_rows_fit(config, args.batch, args.weights, args.kv_cache_dtype, args.prompt_len, args.gen_len,
                   available_bytes())  # fmt: skip
    from meshserve.serving.bench import peer_row, run_bench

    rows: list[dict] = []

    def save(row=None) -> None:
        """Rewrite --out after every row (and peer), atomically: a run cut off keeps the rows it finished."""
        if row is not None:
            rows.append(row.to_dict())
        if args.out:
            from meshserve.analytics.output import write_atomic

            try:
                write_atomic(args.out, json.dumps(rows, indent=2) + "\n")
            except OSError as e:  # checked writable up front; the disk filled or the directory went meanwhile
                raise UserError(f"--out {args.out}: cannot write: {e.strerror or e}") from None

    run_bench(config, args.batch, args.weights, args.prompt_len, args.gen_len, layers=args.layers,
              repeats=args.repeats, progress=True, on_row=save, kv_cache_dtypes=args.kv_cache_dtype)  # fmt: skip
    if args.peer and args.gen_len > 0:
        for batch in args.batch:
            peer = peer_row(config, batch, args.prompt_len, args.gen_len, repeats=args.repeats)
            for r in rows:
                if r["batch"] == batch:
                    r.update(peer)
                    if r["decode_step_ms"]:
                        r["speedup_vs_peer"] = peer["peer_decode_step_ms"] / r["decode_step_ms"]
            save()
    if args.plot and args.gen_len > 0:
        from meshserve.serving.bench_plot import plot_bench

        try:
            print(f"plot: {plot_bench(rows, args.plot)}", file=sys.stderr)
        except OSError as e:
            raise UserError(f"--plot {args.plot}: cannot write: {e.strerror or e}") from None
    if args.json:
        json.dump(rows, sys.stdout)
        print()
    else:
        read = rows[0].get("read_gbps")
        int8 = next((r["int8_matmul"] for r in rows if r["weights"] == "int8"), None)
        attn = attention_note(rows)
        print(
            f"{config.name} on {rows[0]['device']}: prompt {args.prompt_len}, generate {args.gen_len}, "
            f"copy bandwidth {rows[0]['copy_gbps']:.1f} GB/s{f', read {read:.1f} GB/s' if read else ''}"
            f"{f', int8 matmul {int8}' if int8 else ''}{attn}"
        )
        print_table(rows)
    return 0


COMMANDS = {"bench": (add_arguments, run)}
