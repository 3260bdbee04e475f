"""Calibration: measure this machine's first device and store it as the `local` chip.

Measures (1) the f32 matmul rate, (2) streaming memory bandwidth (a matrix-vector product, the decode pattern),
(3) real prefill and decode step times of a model (random weights, f32) at several batch sizes. The cost model's
terms for each measured point (compute at the measured rate, memory at the measured bandwidth, layers) are then
fitted to the step times by non-negative least squares on relative error: measured ≈ compute/η_mm +
weights/η_hbm + kv/(η_hbm·η_kv) + layers·overhead, giving the local chip's efficiencies and per-layer fixed cost
(dispatch, small ops). η_kv absorbs what the KV cache costs beyond streaming it (CPU: bf16 cache, per-row updates).
JAX and numpy are imported only inside these functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshserve.analytics.chips import Chip
from meshserve.analytics.cost import estimate
from meshserve.model.config import ModelConfig
from meshserve.partition.comm import MeshShape

__all__ = [
    "CalibrationPoint",
    "measure",
    "calibrate",
    "check_sizes",
    "calibration_warnings",
    "local_base_chip",
    "PLAUSIBLE",
]

_MIN_COEF = 1e-3  # a fitted coefficient is kept >= this, so an efficiency is at most 1 / _MIN_COEF = 1000 (the clamp)
# Efficiencies outside this band are not a rate the device reached: measured rates (the probes) are within a few
# times of what a model's own kernels reach, so 10x faster means the term was too small to show in the step times.
PLAUSIBLE = (0.01, 10.0)


@dataclass(frozen=True)
class CalibrationPoint:
    phase: str
    batch: int
    prompt_len: int
    measured_s: float
    predicted_s: float
    held_out: bool = False  # measured but not used in the fit: an out-of-sample check of the model

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


def _min_times(fns: Sequence[Callable[[], Any]], rounds: int) -> list[float]:
    """Fastest run of each function over `rounds` interleaved rounds, after one warm-up (compile) each.

    Interleaving gives every point the same background load and the minimum drops the runs other processes slowed.
    """
    import jax

    for fn in fns:
        jax.block_until_ready(fn())
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _matmul_probe(size: int = 512) -> tuple[Callable[[], Any], float]:
    """A float32 [size, size] @ [size, size] matmul and its FLOPs."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(jnp.matmul)
    return (lambda: f(a, b)), 2.0 * size**3


def _bandwidth_probe(nbytes: int = 64 * 2**20) -> tuple[Callable[[], Any], float]:
    """Streaming a float32 matrix of `nbytes` through a matrix-vector product (what decode does), and its bytes."""
    import jax
    import jax.numpy as jnp

    cols = 4096
    w = jnp.ones((nbytes // (4 * cols), cols), jnp.float32)
    v = jnp.ones((1, w.shape[0]), jnp.float32)
    f = jax.jit(jnp.matmul)
    return (lambda: f(v, w)), float(nbytes)


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * 2**30


def local_base_chip(matmul_flops: float, bandwidth: float, device: str) -> Chip:
    """A one-device chip from measured rates (efficiencies 1: the measurements are already achieved rates)."""
    return Chip(
        name="local",
        peak_flops_bf16=matmul_flops,
        peak_flops_int8=matmul_flops,
        hbm_bytes=_memory_bytes(),
        hbm_bandwidth=bandwidth,
        link_bandwidth=bandwidth,  # devices of one host exchange through its memory
        links_per_axis=1,
        topology="switch",
        hop_latency_s=0.0,
        matmul_efficiency=1.0,
        hbm_efficiency=1.0,
        ici_efficiency=1.0,
        # Both peak fields hold the measured float32 matmul rate: calibration runs f32 weights (the CPU has no faster
        # bf16 path), so bf16/int8 predictions on `local` use the f32 rate.
        source=f"measured by `meshserve calibrate` on {device} (float32 matmul rate)",
    )


def measure(
    config: ModelConfig, batches: Sequence[int], prompt_len: int, rounds: int = 10
) -> tuple[float, float, list[tuple[str, int, float]]]:
    """(matmul FLOP/s, bandwidth bytes/s, [(phase, batch, seconds)]) of the real jitted prefill (B x prompt_len)
    and decode step (context prompt_len + 1), random float32 weights, on the default device."""
    import jax
    import jax.numpy as jnp
    from meshserve.model.params import init_params
    from meshserve.model.transformer import KVCache, decode_step, init_cache, prefill

    params = init_params(config, jax.random.key(0), jnp.float32)
    prefill_fn = jax.jit(prefill, static_argnums=1)
    decode_fn = jax.jit(decode_step, static_argnums=1)
    matmul, flops = _matmul_probe()
    stream, nbytes = _bandwidth_probe()
    fns: list[Callable[[], Any]] = [matmul, stream]
    labels = []
    for b in batches:
        tokens = jnp.ones((b, prompt_len), jnp.int32)
        lengths = jnp.full((b,), prompt_len, jnp.int32)
        fns.append(lambda t=tokens, n=lengths: prefill_fn(params, config, t, n))
        cache = init_cache(config, b, prompt_len + 1)
        cache = KVCache(k=cache.k, v=cache.v, lengths=jnp.full((b,), prompt_len, jnp.int32))
        step = jnp.ones((b,), jnp.int32)
        fns.append(lambda t=step, c=cache: decode_fn(params, config, t, c))
        labels += [("prefill", b), ("decode", b)]
    times = _min_times(fns, rounds)
    return flops / times[0], nbytes / times[1], [(p, b, t) for (p, b), t in zip(labels, times[2:], strict=True)]


def _terms(config: ModelConfig, chip: Chip, phase: str, batch: int, prompt_len: int) -> tuple[float, ...]:
    """(compute, weight load, KV load, layers) terms of the cost model for one point on one device."""
    e = estimate(config, chip, MeshShape(1, 1, 1), phase=phase, batch=batch, prompt_len=prompt_len, gen_len=1,
                 weights="f32", ffn_layout="ws2d", attention="heads")  # fmt: skip
    b = e.breakdown
    return b.compute_s, b.weight_load_s, b.kv_load_s, float(config.n_layers)


def _fit(features: list[tuple[float, ...]], measured: list[float]) -> tuple[float, ...]:
    """Non-negative least squares on relative error, by trying every subset of the coefficients."""
    import itertools

    import numpy as np

    a = np.array(features) / np.array(measured)[:, None]
    y = np.ones(len(measured))
    width = a.shape[1]
    best, best_err = (0.0,) * width, float("inf")
    for k in range(1, width + 1):
        for cols in itertools.combinations(range(width), k):
            coef, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(width)
            full[list(cols)] = coef
            err = float(np.sum((a @ full - y) ** 2))
            if err < best_err:
                best, best_err = tuple(float(c) for c in full), err
    return best  # type: ignore[return-value]


def check_sizes(batches: Sequence[int], held_out: Sequence[int]) -> None:
    """A UserError naming the flag unless the fit has 2 batch sizes at least (a prefill and a decode point each: 4
    points for the 4 coefficients; one size fits them exactly and predicts nothing) and no held-out size is fitted
    too (it would be reported as held out while the fit saw it; before, it was silently dropped from the check)."""
    from meshserve.errors import UserError

    if len(set(batches)) < 2:
        raise UserError(f"--batch needs at least 2 different sizes to fit from, got {','.join(map(str, batches))}")
    both = sorted(set(batches) & set(held_out))
    if both:
        raise UserError(f"--held-out {','.join(map(str, both))} is also in --batch: a fitted size is not held out")


def calibrate(
    config: ModelConfig,
    batches: Sequence[int] = (1, 4, 16),
    prompt_len: int = 64,
    rounds: int = 10,
    held_out: Sequence[int] = (8,),
) -> tuple[Chip, list[CalibrationPoint]]:
    """Measure, fit efficiencies and the per-layer fixed cost, and return the `local` chip with its points.

    The `held_out` batch sizes are measured too but left out of the fit, so their error is an out-of-sample test
    of the cost model on this machine rather than of the fit.
    """
    import jax

    device = str(jax.devices()[0].device_kind)
    extra = [b for b in held_out if b not in batches]
    flops, bandwidth, measured = measure(config, [*batches, *extra], prompt_len, rounds)
    base = local_base_chip(flops, bandwidth, device)
    fitted = [(phase, b, t) for phase, b, t in measured if b not in extra]
    features = [_terms(config, base, phase, b, prompt_len) for phase, b, _ in fitted]
    alpha, beta, kappa, gamma = _fit(features, [t for *_, t in fitted])
    # A coefficient fitted to 0 means that term never showed; keep a finite efficiency (the term is then ~free,
    # which calibration_warnings reports).
    chip = replace(
        base,
        matmul_efficiency=1.0 / max(alpha, _MIN_COEF),
        hbm_efficiency=1.0 / max(beta, _MIN_COEF),
        kv_efficiency=max(beta, _MIN_COEF) / max(kappa, _MIN_COEF),
        step_overhead_s=gamma,
        source=f"{base.source}; fitted on {config.name}",
    )
    points = []
    for phase, b, t in measured:
        e = estimate(config, chip, MeshShape(1, 1, 1), phase=phase, batch=b, prompt_len=prompt_len, gen_len=1,
                     weights="f32", ffn_layout="ws2d", attention="heads")  # fmt: skip
        points.append(CalibrationPoint(phase, b, prompt_len, t, e.step_s, held_out=b in extra))
    return chip, points


def calibration_warnings(chip: Chip, model: str = "the model") -> list[str]:
    """One sentence per fitted efficiency that sits at its clamp (the fit set the term to zero: free) or outside
    PLAUSIBLE, naming the field and value: `model`, the one timed, was too small for that term to show in its step
    times, so predictions on `local` will ignore or mis-price it. Empty when every coefficient looks like a real
    rate."""
    terms = (
        ("matmul_efficiency", chip.matmul_efficiency, "compute (matmul FLOPs)"),
        ("hbm_efficiency", chip.hbm_efficiency, "weight loading"),
        # the KV read runs at hbm_efficiency * kv_efficiency of the measured bandwidth; that product is what was fit
        ("kv_efficiency", chip.kv_efficiency, "KV-cache reads", chip.hbm_efficiency * chip.kv_efficiency),
    )
    out = []
    low, high = PLAUSIBLE
    for name, value, term, *effective in terms:
        rate = effective[0] if effective else value
        if rate >= (1 - 1e-9) / _MIN_COEF:
            why = f"at its clamp: the fit found no {term} time, so {term} is treated as free"
        elif not low <= value <= high:
            why = f"outside the plausible {low:g}..{high:g}"
        else:
            continue
        out.append(f"{name} = {value:.4g} is {why}; {model} is too small to measure that term here "
                   "(calibrate with a larger --model, e.g. demo)")  # fmt: skip
    return out
