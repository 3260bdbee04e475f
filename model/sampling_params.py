"""Sampling settings without JAX: the per-request parameters, their ranges and the per-row arrays a compiled step
takes. The definitions of each knob are in model/sampling.py, which draws tokens with them; this module is what a
client checks a request against before sending it (no JAX import).

logit_bias and min_tokens share one per-row table of L_MAX entries (token id, bias, until): the entry adds `bias` to
that token's logit while the row has generated fewer than `until` tokens. A logit_bias entry lasts the whole request
(until = BIAS_FOREVER); min_tokens adds one entry (id, -inf, until = min_tokens) per id in `stop_ids`, the ids that
end the request. Unused entries have id -1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
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
    "L_MAX",
    "LOGIT_BIAS_MAX",
    "MIN_TOKENS_MAX",
    "BIAS_FOREVER",
    "bias_entries",
]


class SamplingError(UserError):
    """A sampling value out of its range; the message names the field and the limit."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off; penalties 1, 0, 0 = off.

    logit_bias: {token id: bias in [-100, 100]} (a mapping or (id, bias) pairs; stored as sorted pairs, so the
    dataclass stays hashable); min_tokens: the ids in `stop_ids` cannot be sampled before the row has generated this
    many tokens (0 = off). stop_ids are the ids that end the request (its stop_token_ids and, unless ignore_eos, the
    model's end-of-sequence ids): sampling uses them only to hold them back for min_tokens, so whoever builds a
    request fills them from the set it stops on (`with_stop_ids`; model.generate adds its stop_ids itself).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    top_logprobs: int = 0  # report the n most likely tokens at each step (not a sampling knob; vLLM keeps it here)
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A mapping or pairs -> sorted pairs, stop ids sorted without repeats; checked, then stored as int / float.
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "stop_ids", _id_tuple(self.stop_ids))
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
            logit_bias=self.logit_bias,
            min_tokens=self.min_tokens,
            stop_ids=self.stop_ids,
        )
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))

    def with_stop_ids(self, stop_ids: Iterable[int]) -> SamplingParams:
        """A copy whose stop_ids are `stop_ids` (the set the request stops on): what min_tokens holds back."""
        return dataclasses.replace(self, stop_ids=tuple(stop_ids))


def _bias_pairs(value) -> tuple:
    """logit_bias as given (a mapping or (id, bias) pairs) -> sorted (id, bias) pairs, values kept as given for
    validate_sampling to judge (only whole-number ids and real biases are converted)."""
    if isinstance(value, Mapping):
        value = value.items()
    try:
        pairs = [tuple(p) for p in value]
    except TypeError:
        raise SamplingError(f"logit_bias must map token ids to biases, got {value!r}") from None
    if any(len(p) != 2 for p in pairs):
        raise SamplingError(f"logit_bias must map token ids to biases, got {value!r}")
    return tuple(sorted(pairs, key=lambda p: p[0] if _is_int(p[0]) else -1))


def _id_tuple(value) -> tuple:
    """Token ids -> a sorted tuple without repeats (non-integers kept for validate_sampling to name)."""
    ids = list(value)
    if all(_is_int(t) for t in ids):
        return tuple(sorted({int(t) for t in ids}))
    return tuple(ids)


def _is_int(x) -> bool:
    """A whole number (an int or a numpy integer; bool is not one)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


TOP_K_MAX = 2**31 - 1  # int32; any k >= the vocabulary keeps every token anyway
FREQUENCY_PENALTY_MAX = 2.0  # presence and frequency penalties in [-2, 2], as OpenAI's API and vLLM bound them
REPETITION_PENALTY_MAX = 1e4  # a finite bound: past it every seen token is excluded anyway
TOP_LOGPROBS_MAX = 20  # alternatives per token, OpenAI's bound; compiled steps always compute this many
# Bias table entries per row: logit_bias entries plus one per stop id when min_tokens > 0. Every compiled step carries
# [B, L_MAX] of them; 64 covers a classifier's label set (OpenAI allows up to 300 logit_bias entries, vLLM no bound).
L_MAX = 64
LOGIT_BIAS_MAX = 100.0  # |bias| bound of OpenAI's API and vLLM: +100 all but forces a token, -100 all but bans it
MIN_TOKENS_MAX = 2**31 - 1  # stored as an int32 `until` per entry
BIAS_FOREVER = 2**31 - 1  # the `until` of a logit_bias entry: past any step a row reaches


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
    logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] = (),
    min_tokens: int = 0,
    stop_ids: Iterable[int] = (),
) -> None:
    """Raise SamplingError naming the first field outside its range. Token ids are checked against the vocabulary
    where it is known (model.generate's Batch.pack, the gRPC parser, batch-generate), not here."""
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
    pairs = _bias_pairs(logit_bias)
    for token, bias in pairs:
        if not _is_int(token) or not 0 <= token < 2**31:
            raise SamplingError(f"logit_bias: token id {token!r} is not an integer in [0, vocabulary size)")
        if (
            not isinstance(bias, int | float | np.number)
            or isinstance(bias, bool)
            or not math.isfinite(bias)
            or not (-LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX)
        ):
            raise SamplingError(
                f"logit_bias[{token}] must be a number in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], got {bias!r}"
            )
    if len({t for t, _ in pairs}) != len(pairs):
        raise SamplingError("logit_bias: a token id is given more than once")
    if not _is_int(min_tokens) or not 0 <= min_tokens <= MIN_TOKENS_MAX:
        raise SamplingError(f"min_tokens must be an integer in [0, {MIN_TOKENS_MAX}] (0 = off), got {min_tokens!r}")
    stops = list(stop_ids)
    for token in stops:
        if not _is_int(token) or not 0 <= token < 2**31:
            raise SamplingError(f"stop_ids: token id {token!r} is not an integer in [0, vocabulary size)")
    held = len(set(stops)) if min_tokens > 0 else 0
    if len(pairs) + held > L_MAX:
        if held:
            raise SamplingError(
                f"logit_bias: {len(pairs)} entries + {held} for min_tokens (one per stop token id, end-of-sequence "
                f"included) exceed the limit of {L_MAX}"
            )
        raise SamplingError(f"logit_bias: {len(pairs)} entries exceed the limit of {L_MAX}")


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
    "bias_ids",  # int32 [B, L_MAX], -1 = unused (see the module docstring)
    "bias_values",  # float32 [B, L_MAX]
    "bias_until",  # int32 [B, L_MAX]: the entry applies while the row's generated count is below it
)
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")


def bias_entries(p: SamplingParams) -> list[tuple[int, float, int]]:
    """The row's bias table entries (id, bias, until): its logit_bias for the whole request, then -inf on each stop
    id until min_tokens tokens are generated (-inf, as transformers' MinNewTokensLengthLogitsProcessor: no bias can
    bring it back; the entries add, so a stop id that is also in logit_bias stays held back)."""
    entries = [(t, float(b), BIAS_FOREVER) for t, b in p.logit_bias]
    if p.min_tokens > 0:
        entries += [(t, -math.inf, p.min_tokens) for t in p.stop_ids]
    return entries


def stack_sampling(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row arrays for `sample`: SAMPLING_FIELDS, float32 / int32 [B], seed uint32 [B, 2] (high, low), and the
    bias table bias_ids, bias_values, bias_until [B, L_MAX]."""
    out = {name: np.array([getattr(p, name) for p in params], np.float32) for name in _FLOAT_FIELDS}
    out["top_k"] = np.array([p.top_k for p in params], np.int32)
    out["top_logprobs"] = np.array([p.top_logprobs for p in params], np.int32)
    # Both 32-bit halves of the 63-bit seed: distinct seeds give distinct keys (folding them collided).
    out["seed"] = np.array([(p.seed >> 32, p.seed & 0xFFFFFFFF) for p in params], np.uint32).reshape(len(params), 2)
    out["bias_ids"] = np.full((len(params), L_MAX), -1, np.int32)
    out["bias_values"] = np.zeros((len(params), L_MAX), np.float32)
    out["bias_until"] = np.zeros((len(params), L_MAX), np.int32)
    for i, p in enumerate(params):
        for j, (token, bias, until) in enumerate(bias_entries(p)):
            out["bias_ids"][i, j], out["bias_values"][i, j], out["bias_until"][i, j] = token, bias, until
    return {name: out[name] for name in SAMPLING_FIELDS}
