"""Would speculative decoding pay? The verify step against the decode step under the cost model.

A verify step (serve --speculative-tokens K) runs every row's last token and its K drafts over the row's cache:
the weights are read once, as in a decode step, but the matmuls, attention queries, logits and activation
collectives are K + 1 times a decode step's. Where a decode step is bound by reading the weights (small batches),
the extra tokens are nearly free; where it is bound by compute (large batches), a verify step costs about K + 1
decode steps and speculation cannot pay.

With each draft token accepted with probability `a` (independently; Leviathan et al.'s alpha), a verify step yields
E(a) = 1 + a + ... + a^K = (1 - a^(K+1)) / (1 - a) tokens (the accepted drafts and one of the model's own), so
speculation speeds decoding up by E(a) · t_decode / t_verify, and pays for a >= the break-even a* where
E(a*) = t_verify / t_decode. (The server reports its drafts as accepted / proposed: about (E - 1) / K when every
row carries K drafts.)

Pure arithmetic over analytics/cost.py, no devices. Host-side costs (drafting, the lost pipelining) are not priced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.analytics.chips import Chip
from meshserve.analytics.cost import estimate
from meshserve.analytics.plan import analysis_config, best_of, evaluate_layouts
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.partition.comm import MeshShape

__all__ = ["SpeculationRow", "expected_tokens", "break_even_acceptance", "speculation"]


@dataclass(frozen=True)
class SpeculationRow:
    """One batch size: its decode layout, both step times, their ratio, the break-even acceptance (None: no
    acceptance pays) and, per acceptance asked about, tokens per verify step and the speedup over plain decoding."""

    batch: int
    ffn_layout: str
    attention: str
    decode_step_s: float
    verify_step_s: float
    cost_ratio: float  # verify / decode
    break_even_acceptance: float | None
    tokens_per_step: dict[float, float]
    speedup: dict[float, float]
    memory_per_chip_bytes: float  # the decode layout's weights, KV cache and activations at this batch and context
    fits: bool


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verify step of k drafts yields when each draft is accepted with this probability (independently)."""
    a = acceptance
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def break_even_acceptance(cost_ratio: float, k: int) -> float | None:
    """The acceptance a* at which expected_tokens(a*, k) = cost_ratio (verify / decode step time): 0 when a verify
    step costs no more than a decode step, None when it costs more than k + 1 of them (no acceptance pays)."""
    if cost_ratio <= 1.0:
        return 0.0
    if cost_ratio > k + 1:
        return None
    lo, hi = 0.0, 1.0  # expected_tokens rises from 1 to k + 1 over [0, 1]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < cost_ratio else (lo, mid)
    return (lo + hi) / 2


def speculation(
    config: ModelConfig,
    chip: Chip,
    mesh: MeshShape,
    *,
    batches: Sequence[int],
    context: int,
    k: int,
    acceptances: Sequence[float],
    weights: str = "bf16",
    kv_dtype: str = "bf16",
) -> list[SpeculationRow]:
    """One row per batch: the fastest fitting decode layout at this context (as `meshserve analyze` picks it) and
    a verify step of k drafts in that same layout (the server verifies in the decode layout: serving/sharding.py).
    kv_dtype: the KV cache's storage (bf16 or int8), read by both steps alike."""
    if not 1 <= k <= 16:
        raise UserError(f"tokens (drafts per verify step) must be in [1, 16], got {k}")
    for a in acceptances:
        if not 0.0 <= a <= 1.0:
            raise UserError(f"acceptance must be in [0, 1], got {a}")
    rows = []
    for batch in batches:
        decode = best_of(evaluate_layouts(config, chip, mesh, phase="decode", batch=batch, prompt_len=context,
                                          gen_len=1, weights=weights, kv_dtype=kv_dtype))  # fmt: skip
        if decode is None:
            raise UserError(f"no layout splits batch {batch} of {config.name} on mesh {mesh}")
        verify = estimate(analysis_config(config, mesh, decode.ffn_layout), chip, mesh, phase="decode", batch=batch,
                          prompt_len=context, gen_len=1, weights=weights, ffn_layout=decode.ffn_layout,
                          attention=decode.attention, tokens_per_step=k + 1, kv_dtype=kv_dtype)  # fmt: skip
        ratio = verify.step_s / decode.step_s
        tokens = {a: expected_tokens(a, k) for a in acceptances}
        rows.append(SpeculationRow(
            batch=batch, ffn_layout=decode.ffn_layout, attention=decode.attention, decode_step_s=decode.step_s,
            verify_step_s=verify.step_s, cost_ratio=ratio, break_even_acceptance=break_even_acceptance(ratio, k),
            tokens_per_step=tokens, speedup={a: e / ratio for a, e in tokens.items()},
            memory_per_chip_bytes=decode.memory_per_chip_bytes, fits=decode.fits,
        ))  # fmt: skip
    return rows
