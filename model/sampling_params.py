"""Sampling settings without JAX: the per-request parameters, their ranges and the per-row arrays a compiled step
takes. The definitions of each knob are in model/sampling.py, which draws tokens with them; this module is what a
client checks a request against before sending it (no JAX import).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from meshserve.errors import UserError

__all__ = [
    "SamplingParams",
    "SamplingError",
    "stack_sampling",
    "validate_sampling",
    "TOP_K_MAX",
    "FREQUENCY_PENALTY_MAX",
    "REPETITION_PENALTY_MAX",
    "TOP_LOGPROBS_MAX",
    "SAMPLING_FIELDS",
]


class SamplingError(UserError):
    """A sampling value out of its range; the message names the field and the limit."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off; penalties 1, 0, 0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    top_logprobs: int = 0  # report the n most likely tokens at each step (not a sampling knob; vLLM keeps it here)

    def __post_init__(self) -> None:
        validate_sampling(
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_p=self.min_p,
            top_logprobs=self.top_logprobs,
        )


TOP_K_MAX = 2**31 - 1  # int32; any k >= the vocabulary keeps every token anyway
FREQUENCY_PENALTY_MAX = 2.0  # presence and frequency penalties in [-2, 2], as OpenAI's API and vLLM bound them
REPETITION_PENALTY_MAX = 1e4  # a finite bound: past it every seen token is excluded anyway
TOP_LOGPROBS_MAX = 20  # alternatives per token, OpenAI's bound; compiled steps always compute this many


def validate_sampling(
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int = 0,
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_p: float = 0.0,
    top_logprobs: int = 0,
) -> None:
    """Raise SamplingError naming the first field outside its range."""
    if not np.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or not 0 <= top_k <= TOP_K_MAX:  # stored as int32 per row (stack_sampling)
        raise SamplingError(f"top_k must be an integer in [0, {TOP_K_MAX}] (0 = off), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
    if int(seed) != seed or not (0 <= seed < 2**63):
        raise SamplingError(f"seed must be an integer in [0, 2**63), got {seed}")
    if not (0.0 < repetition_penalty <= REPETITION_PENALTY_MAX):
        raise SamplingError(
            f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX:g}] (1 = off), got {repetition_penalty}"
        )
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not (-FREQUENCY_PENALTY_MAX <= value <= FREQUENCY_PENALTY_MAX):
            raise SamplingError(
                f"{name} must be in [-{FREQUENCY_PENALTY_MAX:g}, {FREQUENCY_PENALTY_MAX:g}] (0 = off), got {value}"
            )
    if not (0.0 <= min_p <= 1.0):
        raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if int(top_logprobs) != top_logprobs or not 0 <= top_logprobs <= TOP_LOGPROBS_MAX:
        raise SamplingError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS_MAX}] (0 = off), got {top_logprobs}")


# The per-row arrays `stack_sampling` builds, in order: what a decode state carries for each slot.
SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "top_logprobs",
)
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")


def stack_sampling(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row arrays for `sample`: SAMPLING_FIELDS, float32 / int32 [B], and seed uint32 [B, 2] (high, low)."""
    out = {name: np.array([getattr(p, name) for p in params], np.float32) for name in _FLOAT_FIELDS}
    out["top_k"] = np.array([p.top_k for p in params], np.int32)
    out["top_logprobs"] = np.array([p.top_logprobs for p in params], np.int32)
    # Both 32-bit halves of the 63-bit seed: distinct seeds give distinct keys (folding them collided).
    out["seed"] = np.array([(p.seed >> 32, p.seed & 0xFFFFFFFF) for p in params], np.uint32).reshape(len(params), 2)
    return {name: out[name] for name in SAMPLING_FIELDS}
