"""Shared by the analytics commands' CLIs (analytics/cli.py, analytics/cli_speculate.py): list flags, positive checks,
the --model/--set arguments, the plain-text table and analyze's note when nothing fits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from meshserve.errors import UserError
from meshserve.model.model_spec import MODEL_HELP, SET_HELP

__all__ = [
    "numbers",
    "ints",
    "floats",
    "positive",
    "model_args",
    "model_from_args",
    "chip_from_args",
    "kv_cache_dtype_arg",
    "fmt_s",
    "count",
    "gib",
    "table",
    "say_unfit",
]

KV_CACHE_DTYPE_HELP = (
    "the KV cache's storage, as `meshserve serve --kv-cache-dtype` stores it: bf16 (2 bytes per element; auto is "
    "the same, as serve's auto stores bf16 for bf16 and int8 weights) or int8 "
    "(int8 values and one power-of-two exponent per token and kv head: 1 + 1/d_head bytes per element, about half "
    "the cache's memory and of the cache bytes a decode step reads) (default bf16)"
)


def numbers(text: str, convert: Callable[[str], Any], what: str) -> list:
    """A comma-separated list flag's values (argparse `type=`), each through `convert`. An empty item ("1,,2",
    "1,") is refused: it is a typo more often than a choice, and skipping it would run a different sweep silently."""
    items = str(text).split(",")
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    if any(not v.strip() for v in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r} (an empty item)")
    try:
        return [convert(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}") from None


def ints(text: str) -> list[int]:
    """`1,64,512` -> [1, 64, 512]."""
    return numbers(text, int, "integer")


def floats(text: str) -> list[float]:
    """`0.5,0.9` -> [0.5, 0.9]."""
    return numbers(text, float, "number")


def positive(name: str, values: list[int] | int | None) -> None:
    """A UserError naming the flag unless every value is >= 1."""
    for v in [values] if isinstance(values, int) else values or []:
        if v < 1:
            raise UserError(f"{name} must be positive, got {v}")


def model_args(p: argparse.ArgumentParser, default: str) -> None:
    """--model SPEC (default `default`) and --set KEY=VALUE."""
    p.add_argument("--model", default=default, help=f"{MODEL_HELP} (default {default})")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help=SET_HELP)


def model_from_args(args: argparse.Namespace) -> Any:
    """The ModelConfig of --model with --set applied (a one-line UserError for a bad spec or override; a name
    close to a preset's says which one)."""
    from pathlib import Path

    from meshserve.model.config import near_names
    from meshserve.model.model_spec import parse_overrides, resolve_model
    from meshserve.model.presets import PRESETS

    path_like = "/" in args.model or args.model.endswith(".json")  # a path: resolve_model's own message fits it
    unknown = args.model not in PRESETS and not path_like and not Path(args.model).expanduser().exists()
    if unknown and (near := near_names(args.model, PRESETS)):
        raise UserError(f"--model {args.model!r}: no such preset, file or directory{near} "
                        f"(presets: {', '.join(PRESETS)})")  # fmt: skip
    return resolve_model(args.model, parse_overrides(args.set))


def chip_from_args(flag: str, name: str) -> Any:
    """analytics.chips.get_chip(name), with an unknown name refused naming `flag` and the chip it most likely meant."""
    from meshserve.analytics.chips import CHIPS, chip_names, get_chip
    from meshserve.model.config import near_names

    if name != "local" and name not in CHIPS:
        raise UserError(
            f"{flag} {name!r}: unknown hardware{near_names(name, CHIPS)} (known: {', '.join(chip_names())})"
        )
    return get_chip(name)


def kv_cache_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype {bf16,int8} (default bf16): the KV cache's storage the cost or memory model prices."""
    from meshserve.analytics.sizes import KV_DTYPES

    # serve's "auto" (the compute dtype) is bf16 here: the cost model prices bf16 activations.
    p.add_argument("--kv-cache-dtype", type=lambda s: "bf16" if s == "auto" else s, choices=list(KV_DTYPES),
                   default="bf16", help=KV_CACHE_DTYPE_HELP)  # fmt: skip


def fmt_s(s: float) -> str:
    """Seconds as "12.34 ms" below a second, else "1.23 s"."""
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def count(n: float) -> str:
    """A parameter count people read: 102.6K, 2.3M, 8.63B (never 0.000B, nor 1000M for Gemma 3 1B's 999.9M)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale * 0.9995:  # what rounds to 1000 of the unit below reads as 1 of this one
            return f"{n / scale:.3g}{suffix}" if n < 100 * scale else f"{n / scale:.0f}{suffix}"
    return f"{n:.0f}"


def gib(n: float) -> str:
    """Bytes in GiB (2**30, the unit `analyze` and the fit line use), with MiB precision for small models."""
    return f"{n / 2**30:10.2f} GiB" if n >= 2**30 or n == 0 else f"{n / 2**30:10.2f} GiB ({n / 2**20:.2f} MiB)"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Any]]) -> str:
    """Right-aligned text columns: (header, row key, formatter) each."""
    cells = [[h for h, _, _ in columns]] + [[fmt(r[key]) for _, key, fmt in columns] for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def say_unfit(rows: list[dict[str, Any]], chip: Any, weights: str) -> None:
    """One stderr line naming the (phase, batch) groups where no layout fits (their rows have no *), with the least
    memory any of their rows needs: a table of NO alone does not say how far off the question is."""
    unfit = [(p, b) for p, b in dict.fromkeys((r["phase"], r["batch"]) for r in rows)
             if not any(r["chosen"] for r in rows if (r["phase"], r["batch"]) == (p, b))]  # fmt: skip
    if not unfit:
        return
    least = min(r["memory_per_chip_bytes"] for r in rows if (r["phase"], r["batch"]) in unfit)
    groups = ", ".join(f"{p} b{b}" for p, b in unfit)
    tries = ["more --chips", *(["--weights int8"] if weights != "int8" else []),
             *(["a smaller --batch"] if any(b > 1 for _, b in unfit) else [])]  # fmt: skip
    print(f"note: nothing fits {chip.hbm_bytes / 2**30:.0f} GiB per {chip.name} at {groups} (the least a row there "
          f"needs: {least / 2**30:.1f} GiB per chip); try {' or '.join(tries)}", file=sys.stderr)  # fmt: skip
