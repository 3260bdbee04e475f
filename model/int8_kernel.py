"""Fused weight-only int8 matmuls for decode-sized token batches on GPUs (Pallas, Triton backend).

XLA lowers `x @ w_int8.astype(bf16)` by first writing the converted bf16 weights to memory and then running a bf16
GEMM, so an int8 weight costs 1 + 2 + 2 bytes of traffic per parameter instead of 1: at decode batch sizes, where
the step is bound by reading weights, int8 ran slower than bf16 (measured on an H100: BENCHMARKS.md). These kernels
read each int8 weight once, convert it in registers and accumulate in float32:

  out[M, N] = (x[M, K] @ w[K, N]) * scale[N]      x bf16/f16, w int8 [K, N] (N contiguous), scale [N]

Two forms, one grid: program (j, s) owns output columns [j*bn, (j+1)*bn) and the s-th of `split` slices of K
(split-K raises the number of programs in flight when N/bn alone leaves SMs idle; the partial sums [split, M, N]
are added by XLA, a few hundred KiB against tens of MiB of weights):
  - "reduce" (M <= REDUCE_MAX_ROWS): CUDA-core multiply-add into a [bk, bn] float32 tile per row, summed over bk
    once at the end. No tensor cores and no shared-memory staging of the int8 tile for an MMA operand layout;
    at M = 1 the step is pure streaming of w.
  - "mma": tensor-core dot of x [m_pad, bk] (M padded to 16) with the converted [bk, bn] tile.

Which block sizes stream fastest depends on the GPU and the shape, so `Int8KernelConfig` is explicit and
`benchmarks/int8_probe.py` times candidates on the device and writes a tuning file; MESHSERVE_INT8_TUNING=path makes
`int8_matmul` use it (`default_config` otherwise). Used by `quant.einsum` when MESHSERVE_INT8_MATMUL=pallas.

A third choice in the tuning file is no kernel at all: "colsum" (`COLSUM`, `colsum_matmul`, M <= COLSUM_MAX_ROWS),

  out[m, n] = (sum over k of float32(x[m, k]) * float32(w[k, n])) * scale[n]      (w as stored, [K, N])

written so that XLA fuses the convert into a column reduction and streams the int8 weights once (each extra row of x
re-reads w inside the fusion, hence tiny M only). The same expression on weights stored transposed [N, K] (a row
reduction, int8_probe.py's "rowsum" experiment) read 1529 / 1105 / 1022 GB/s of int8 bytes for falcon-7b's w_up /
w_down / wq at M = 1 on an H200 in one run (benchmarks/results/h200-2026-11-27/int8_probe.txt), against ~500 GB/s
for XLA's convert + GEMM and ~680 GB/s for these kernels; whether the column form on our [K, N] storage does as
well is what the probe measures, and the tuning file records {"form": "colsum"} for the shapes where it won.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from meshserve.errors import UserError

__all__ = [
    "COLSUM",
    "COLSUM_MAX_ROWS",
    "ColsumForm",
    "Int8Choice",
    "Int8KernelConfig",
    "MAX_TOKENS",
    "REDUCE_MAX_ROWS",
    "candidate_configs",
    "choose_config",
    "colsum_matmul",
    "default_config",
    "int8_matmul",
    "load_tuning",
    "tuning_key",
]

MAX_TOKENS = 64  # above this many rows a matmul is compute-bound and XLA's GEMM is the better choice
REDUCE_MAX_ROWS = 4  # the CUDA-core form keeps M [bk, bn] float32 tiles in registers; past a few rows use the MMA
_TARGET_PROGRAMS = 512  # ~4 programs per SM on an H100 (132 SMs): enough loads in flight to cover HBM latency
COLSUM_MAX_ROWS = 4  # the colsum fusion re-reads w once per row of x: only worth it for a few rows


@dataclass(frozen=True)
class Int8KernelConfig:
    """One kernel variant: form "reduce" | "mma", column block bn, K chunk bk, split-K slices, Triton warps/stages."""

    form: str
    bn: int
    bk: int
    split: int = 1
    warps: int = 4
    stages: int = 3

    def check(self, m: int, k: int, n: int) -> None:
        """Raise ValueError unless this config tiles x [m, k] @ w [k, n] exactly."""
        if self.form not in ("reduce", "mma"):
            raise ValueError(f"form must be 'reduce' or 'mma', got {self.form!r}")
        if self.form == "reduce" and m > REDUCE_MAX_ROWS:
            raise ValueError(f"the reduce form takes at most {REDUCE_MAX_ROWS} rows, got M={m}")
        for name, value in (("bn", self.bn), ("bk", self.bk)):  # Triton loads and stores power-of-two tiles
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.split < 1 or self.warps < 1 or self.stages < 1:
            raise ValueError(f"split, warps and stages must be >= 1, got {self}")
        if n % self.bn or k % (self.bk * self.split):
            raise ValueError(f"config {self} does not tile K={k}, N={n} (N % bn and K % (bk*split) must be 0)")
        if self.form == "mma" and min(self.bn, self.bk) < 16:
            raise ValueError(f"the mma form needs bn, bk >= 16 (tensor-core tiles), got bn={self.bn}, bk={self.bk}")


@dataclass(frozen=True)
class ColsumForm:
    """The tuning file's {"form": "colsum"}: not a kernel config but XLA's fused column reduction (`colsum_matmul`).
    `vars(COLSUM)` is the tuning-file entry."""

    form: str = "colsum"


COLSUM = ColsumForm()
Int8Choice = Int8KernelConfig | ColsumForm | None  # choose_config's answer: a kernel config, colsum, or None (XLA)


def colsum_matmul(
    x: jax.Array, w: jax.Array, scale: jax.Array, out_dtype: jax.typing.DTypeLike | None = None
) -> jax.Array:
    """x [M, K] (M <= COLSUM_MAX_ROWS), w int8 [K, N], scale [N] -> [M, N] in out_dtype (x's dtype by default).

    Written as a multiply and a sum over K rather than a dot, so that on a GPU XLA fuses the int8 -> float32 convert
    into one column reduction that reads each weight byte once (a dot would convert w to a bf16 copy first).
    Accumulates in float32; the per-column scale is applied after the sum (exact: it is constant along K).
    """
    (m, k), (k_w, n) = x.shape, w.shape
    if m > COLSUM_MAX_ROWS or k != k_w or scale.shape != (n,):
        raise ValueError(f"colsum takes x [M <= {COLSUM_MAX_ROWS}, K], w [K, N], scale [N]; got {x.shape}, "
                         f"{w.shape}, {scale.shape}")  # fmt: skip
    prod = x[:, :, None].astype(jnp.float32) * w.astype(jnp.float32)[None]  # [M, K, N]: inside the fusion on a GPU
    out = jnp.sum(prod, axis=1) * scale.astype(jnp.float32)[None, :]
    return out.astype(out_dtype or x.dtype)


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_config(m: int, k: int, n: int) -> Int8KernelConfig:
    """A config without tuning: reduce form for a few rows, enough programs (N/bn * split) to fill the GPU."""
    form = "reduce" if m <= REDUCE_MAX_ROWS else "mma"
    floor = 32 if form == "reduce" else 16
    bn = _pow2_divisor(n, 128)
    while bn > floor and n // bn < _TARGET_PROGRAMS:
        bn //= 2
    bk = _pow2_divisor(k, 32 if form == "reduce" else 64)
    split = 1
    while (n // bn) * split < _TARGET_PROGRAMS and k % (bk * split * 2) == 0 and k // (bk * split * 2) >= 8:
        split *= 2
    return Int8KernelConfig(form, bn, bk, split, warps=4, stages=3)


def _feasible(m: int, k: int, n: int) -> list[Int8KernelConfig]:
    """Every tiling worth considering (warps 4, stages 3): power-of-two bn, bk; split any divisor of K/bk <= 256."""
    form = "reduce" if m <= REDUCE_MAX_ROWS else "mma"
    out = []
    for bn in (16, 32, 64, 128, 256):
        for bk in (16, 32, 64) if form == "reduce" else (16, 32, 64, 128):
            if k % bk:
                continue
            for split in (d for d in range(1, min(k // bk, 256) + 1) if (k // bk) % d == 0):
                cfg = Int8KernelConfig(form, bn, bk, split, warps=4, stages=3)
                try:
                    cfg.check(m, k, n)
                except ValueError:
                    continue
                if form == "reduce" and max(m, 1) * bk * bn // (32 * 8) > 64:
                    continue  # float32 accumulators per thread even at 8 warps: spills
                out.append(cfg)
    return out


def candidate_configs(m: int, k: int, n: int, limit: int = 12) -> list[Int8KernelConfig]:
    """Configs worth timing for one shape: the default, then the largest tile at each grid size (programs = N/bn *
    split, from ~128 to ~8192, nearest the target first), then stage/warp variants of the best-placed ones."""
    by_size: dict[int, Int8KernelConfig] = {}
    for cfg in _feasible(m, k, n):
        programs = n // cfg.bn * cfg.split
        if not 96 <= programs <= 12288:
            continue
        bucket = round(math.log2(programs))
        best = by_size.get(bucket)
        if best is None or (cfg.bk * cfg.bn, -cfg.split) > (best.bk * best.bn, -best.split):
            by_size[bucket] = cfg
    target = math.log2(_TARGET_PROGRAMS)
    picks = [by_size[b] for b in sorted(by_size, key=lambda b: abs(b - target))]
    variants = [
        replace(cfg, warps=warps, stages=stages)
        for cfg in picks[:3]
        for warps, stages in ((4, 2), (4, 4), (8, 3), (8, 4))
        if not (cfg.form == "reduce" and m * cfg.bk * cfg.bn // (32 * warps) > 64)
    ]
    ordered = [default_config(m, k, n), *picks, *variants]
    return list(dict.fromkeys(ordered))[:limit]


def tuning_key(m: int, k: int, n: int) -> str:
    """Tuning-file key: rows are bucketed to the next power of two (decode batches are bucketed the same way)."""
    return f"{1 << max(m - 1, 0).bit_length()}x{k}x{n}"


def _tuning_entry(key: str, entry: dict) -> Int8Choice:
    """One tuning-file entry: {"form": "xla"} -> None, {"form": "colsum"} -> COLSUM, else an Int8KernelConfig."""
    form = entry["form"]
    if form == "xla":
        return None
    if form == "colsum":
        if int(key.split("x")[0]) > COLSUM_MAX_ROWS:  # the key's row bucket: colsum is for a few rows only
            raise ValueError(f"{key}: colsum is for at most {COLSUM_MAX_ROWS} rows")
        return COLSUM
    if form not in ("reduce", "mma"):
        raise ValueError(f"{key}: unknown form {form!r} (xla, colsum, reduce or mma)")
    return Int8KernelConfig(**entry)


@functools.cache
def load_tuning(path: str) -> dict[str, Int8Choice]:
    """{tuning_key: kernel config, COLSUM, or None where XLA's convert + GEMM won} from benchmarks/int8_probe.py
    --tune's file: {"model": ..., "device": ..., "configs": {key: {"form": ..., ...}}}."""
    try:
        with open(path) as f:
            table = json.load(f)["configs"]
        return {key: _tuning_entry(key, v) for key, v in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"MESHSERVE_INT8_TUNING={path}: not a tuning file from int8_probe.py --tune ({e})") from e


def choose_config(m: int, k: int, n: int) -> Int8Choice:
    """The choice for x [m, k] @ w [k, n]: a kernel config, COLSUM (`colsum_matmul`), or None for XLA's convert +
    GEMM. Only a tuning file chooses COLSUM.

    With a tuning file (MESHSERVE_INT8_TUNING) only measured winners run the kernel: a shape the file does not
    name takes XLA, since an untimed config may be slower or fail to compile. Without one, `default_config`.
    """
    path = os.environ.get("MESHSERVE_INT8_TUNING")
    if path:
        return load_tuning(path).get(tuning_key(m, k, n))
    return default_config(m, k, n)


def int8_matmul(
    x: jax.Array, w: jax.Array, scale: jax.Array, config: Int8KernelConfig | None = None, interpret: bool = False
) -> jax.Array:
    """x [M, K] (16-bit), w int8 [K, N], scale [N] -> [M, N] in x's dtype (float32 accumulation).

    Always the Pallas kernel: without a config, the tuned one, or `default_config` where the tuning file chose XLA
    or colsum (quant.einsum follows those choices before calling this)."""
    if isinstance(config, ColsumForm):
        raise ValueError("colsum is XLA's fused reduction, not a kernel config: call colsum_matmul")
    (m, k), n = x.shape, w.shape[1]
    chosen = config or choose_config(m, k, n)
    config = chosen if isinstance(chosen, Int8KernelConfig) else default_config(m, k, n)
    config.check(m, k, n)
    return _int8_matmul(x, w, scale, config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _int8_matmul(x, w, scale, *, config: Int8KernelConfig, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    (m, k), n = x.shape, w.shape[1]
    bn, bk, split = config.bn, config.bk, config.split
    k_part = k // split
    n_chunks = k_part // bk
    rows = m if config.form == "reduce" else max(16, 1 << (m - 1).bit_length())
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))

    def reduce_kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            wk = w_ref[pl.ds(i * bk, bk), :].astype(jnp.float32)  # [bk, bn]: int8 read once, converted in registers
            return tuple(acc[r] + x_ref[r, pl.ds(i * bk, bk)].astype(jnp.float32)[:, None] * wk for r in range(rows))

        init = tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(rows))
        acc = jax.lax.fori_loop(0, n_chunks, body, init)
        for r in range(rows):
            o_ref[0, r, :] = jnp.sum(acc[r], axis=0)  # the one cross-thread reduction, after the K loop

    def mma_kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xk = x_ref[:, pl.ds(i * bk, bk)]  # [rows, bk]
            wk = w_ref[pl.ds(i * bk, bk), :].astype(xk.dtype)  # [bk, bn]
            return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32)

        o_ref[0] = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((rows, bn), jnp.float32))

    partial = pl.pallas_call(
        reduce_kernel if config.form == "reduce" else mma_kernel,
        out_shape=jax.ShapeDtypeStruct((split, rows, n), jnp.float32),
        grid=(n // bn, split),
        in_specs=[
            pl.BlockSpec((rows, k_part), lambda j, s: (0, s)),
            pl.BlockSpec((k_part, bn), lambda j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((1, rows, bn), lambda j, s: (s, 0, j)),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=config.warps, num_stages=config.stages),
        interpret=interpret,
    )(xp, w)
    # [split, rows, N] partial sums -> [M, N]; the per-column scale is exact after the sum (constant along K).
    out = partial.sum(axis=0)[:m] * scale.astype(jnp.float32)[None, :]
    return out.astype(x.dtype)
