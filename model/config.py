"""Model configuration: one frozen dataclass, and named presets (model/presets.py) from `tiny` (tests) to PaLM 540B.

Axis alphabet used throughout meshserve (einsum subscripts, names and shape comments), after PAPER.md:
  B batch, T query tokens in this pass (the paper's L), S cache/context length, E d_model, F d_ff,
  H query heads, K key/value heads (1 = multi-query), Q head dim, V vocab, N layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from meshserve.errors import UserError

# PRESETS (model/presets.py) is read through this module too: `from meshserve.model.config import PRESETS`.
__all__ = ["ModelConfig", "get_config", "ConfigError", "vocab_error", "kv_replication", "near_names"]


class ConfigError(UserError):
    """A configuration that cannot describe a model (bad field, unknown preset or override key)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    The switches cover PaLM (parallel block, SwiGLU, multi-query, shared embedding, no biases), Falcon (GELU MLP,
    LayerNorm with bias, optional linear biases), the Llama family (serial block, RMSNorm, grouped-query
    attention, Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm, Llama 3.1's rope scaling, several eos ids,
    Mistral's sliding window) and Gemma 3 (per-layer sliding windows with their own rotary base, (1 + w) RMSNorm
    scales, norms on both sublayers' outputs, GeGLU, embeddings scaled by sqrt(E), its own attention scale).
    Every default describes the models before these switches, unchanged.
    """

    name: str
    vocab_size: int  # V
    d_model: int  # E
    d_ff: int  # F
    n_layers: int  # N
    n_heads: int  # H (query heads as stored; see `true_heads` for padding)
    n_kv_heads: int  # K: 1 = multi-query, H = multi-head, between = grouped
    d_head: int  # Q
    max_seq_len: int = 2048  # S: the longest context (prompt + generated) the KV cache holds
    parallel_block: bool = True  # y = x + attn(ln(x)) + mlp(ln(x)); else serial with two norms
    mlp: Literal["swiglu", "gelu", "geglu"] = "swiglu"  # geglu: gelu_tanh(h W_gate) * (h W_up) (Gemma)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_bias: bool = False  # LayerNorm with a learned bias (Falcon) or scale only (PaLM)
    norm_eps: float = 1e-6
    linear_bias: bool = False  # biases on the attention and MLP projections
    shared_embedding: bool = True  # output projection = input embedding transposed
    rope_base: float = 10_000.0
    # Heads that carry real weights; the rest of n_heads are zero padding so heads divide the chips
    # (PaLM 540B: 48 heads padded to 64 for inference). 0 means all n_heads are real.
    true_heads: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    # Biases on the q, k and v projections only (Qwen2); linear_bias implies them with the o and MLP biases too.
    qkv_bias: bool = False
    # Llama 3.1's rotary scaling, (factor, low_freq_factor, high_freq_factor, original_max_len); () = none.
    # layers.rope_frequencies applies it.
    rope_scaling: tuple[float, ...] = ()
    # More ids that end generation as eos_id does (Llama 3 lists several: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
    extra_eos_ids: tuple[int, ...] = ()
    # KV heads that carry distinct weights; n_kv_heads is then a multiple, each true kv head repeated
    # n_kv_heads / true_kv_heads times in a row, so a heads split larger than the true count still gives every chip
    # whole kv heads (`replicate_kv_heads`; done at load for a mesh, never saved). 0 means not replicated.
    true_kv_heads: int = 0
    # RMSNorm over each head's Q on q and k after their projection (and biases), before RoPE (Qwen3's q_norm /
    # k_norm): layers q_norm / k_norm scale [N, Q], shared by the heads. Keeps attention logits bounded.
    qk_norm: bool = False
    # Sliding-window attention (model/layers.py `attention_scores_mask`): a layer with window W lets the query at
    # position t see the keys at positions s with t - W < s <= t (transformers' sliding_window_overlay). 0 = every
    # layer global. The KV cache still holds the whole context (no ring buffer); the window is a mask, and a decode
    # step reads only the window of a windowed layer (model/transformer.py decode_step).
    sliding_window: int = 0
    # Layers that attend globally although sliding_window is set (Gemma 3: every 6th, layer_types "full_attention");
    # () with a window = every layer windowed (Mistral). `layer_windows` gives each layer's window.
    global_layers: tuple[int, ...] = ()
    # Rotary base of the windowed layers (Gemma 3's rope_local_base_freq), applied without rope_scaling; 0 = the
    # windowed layers rotate as the global ones (rope_base, rope_scaling).
    local_rope_base: float = 0.0
    # RMSNorm scales stored as w and applied as (1 + w) in float32 (Gemma): folding the 1 into a bf16 weight would
    # round it, so the offset is applied at run time. Covers every norm (blocks, final, q/k).
    norm_scale_offset: bool = False
    # Serial block with a norm on each sublayer's output before its residual add (Gemma 3's post_attention_layernorm
    # and post_feedforward_layernorm): layers attn_out_norm / mlp_out_norm [N, E].
    post_norms: bool = False
    # Embeddings multiplied by sqrt(d_model), the factor cast to the compute dtype first (Gemma); the tied output
    # projection reads the table unscaled.
    scale_embed: bool = False
    # Attention logits' scale (Gemma 3's query_pre_attn_scalar ** -0.5); 0 = d_head ** -0.5.
    attn_scale: float = 0.0

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "d_model",
            "d_ff",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_head",
            "max_seq_len",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.d_head % 2:
            raise ConfigError(f"d_head must be even for rotary embeddings, got {self.d_head}")
        if self.mlp not in ("swiglu", "gelu", "geglu"):
            raise ConfigError(f"mlp must be 'swiglu', 'gelu' or 'geglu', got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if not 0 <= self.true_heads <= self.n_heads:
            raise ConfigError(f"true_heads must be in [0, n_heads={self.n_heads}], got {self.true_heads}")
        if self.true_kv_heads and (self.true_kv_heads > self.n_kv_heads or self.n_kv_heads % self.true_kv_heads):
            raise ConfigError(
                f"true_kv_heads must be 0 or divide n_kv_heads={self.n_kv_heads}, got {self.true_kv_heads}"
            )
        if not isinstance(self.rope_scaling, tuple):  # meshserve.json holds a list; a config must hash (jit static)
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if not isinstance(self.extra_eos_ids, tuple):  # as rope_scaling
            object.__setattr__(self, "extra_eos_ids", tuple(self.extra_eos_ids))
        bad = [i for i in self.extra_eos_ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"extra_eos_ids must be token ids in [0, vocab_size={self.vocab_size}), got {bad[0]!r}")
        scaling = self.rope_scaling
        if scaling and (
            len(scaling) not in (1, 4) or min(scaling) <= 0 or (len(scaling) == 4 and scaling[2] <= scaling[1])
        ):
            raise ConfigError(
                "rope_scaling must be (), (factor,) (linear) or (factor, low_freq_factor, high_freq_factor, "
                f"original_max_len) (llama3), all positive with high_freq_factor > low_freq_factor, got {scaling!r}"
            )
        self._check_gemma_fields()

    def _check_gemma_fields(self) -> None:
        """Validate the sliding-window and Gemma switches (each message names the field)."""
        if not isinstance(self.global_layers, tuple):  # as rope_scaling
            object.__setattr__(self, "global_layers", tuple(self.global_layers))
        if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be 0 (none) or a positive integer, got {self.sliding_window!r}")
        layers = self.global_layers  # without a window they change nothing (`--set sliding_window=0` turns it off)
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in layers) or list(layers) != sorted(
            set(layers)
        ):
            raise ConfigError(
                f"global_layers must be increasing layer indices in [0, n_layers={self.n_layers}), got {layers!r}"
            )
        for field in ("local_rope_base", "attn_scale"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{field} must be 0 (unset) or a positive number, got {value!r}")
        if self.post_norms and self.parallel_block:
            raise ConfigError(
                "post_norms needs the serial block (parallel_block false): it norms each sublayer's output"
            )

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's attention window W (0 = global), from sliding_window and global_layers: [N]."""
        globals_ = set(self.global_layers)
        return tuple(0 if i in globals_ else self.sliding_window for i in range(self.n_layers))

    @property
    def windowed(self) -> bool:
        """Whether some layer attends through a sliding window (the attention paths then build its mask)."""
        return any(self.layer_windows)

    @property
    def gated_mlp(self) -> bool:
        """Two input matmuls (W_gate and W_up: SwiGLU, GeGLU) rather than one (GELU)."""
        return self.mlp in ("swiglu", "geglu")

    @property
    def real_heads(self) -> int:
        """Heads with real weights (the rest are zero padding)."""
        return self.true_heads or self.n_heads

    @property
    def real_kv_heads(self) -> int:
        """KV heads with distinct weights (the rest of n_kv_heads are their repeats)."""
        return self.true_kv_heads or self.n_kv_heads

    @property
    def kv_replication(self) -> int:
        """How many times each true kv head is repeated in n_kv_heads (1: not replicated)."""
        return self.n_kv_heads // self.real_kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (H / K)."""
        return self.n_heads // self.n_kv_heads

    @property
    def multi_query(self) -> bool:
        return self.n_kv_heads == 1

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed; unknown keys are refused with the list of known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def padded_heads(self, n_heads: int) -> ModelConfig:
        """This model with query heads zero-padded to `n_heads` (so heads split evenly over chips)."""
        if n_heads < self.real_heads or n_heads % self.n_kv_heads:
            raise ConfigError(f"cannot pad {self.real_heads} heads to {n_heads} with {self.n_kv_heads} kv heads")
        return self.replace(n_heads=n_heads, true_heads=self.real_heads)

    def replicate_kv_heads(self, r: int) -> ModelConfig:
        """This model with each kv head repeated `r` times in a row (n_kv_heads K -> K·r, true_kv_heads = the true
        count). Exact: query head h reads kv head h // (H/K); after the repeat it reads h // (H/(K·r)), a copy of
        the same head. model.params.replicate_kv_params repeats the weights to match. r = 1 returns self."""
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"kv head replication must be a positive integer, got {r!r}")
        if r == 1:
            return self
        K = self.n_kv_heads * r
        if self.multi_query or self.n_heads % K:
            raise ConfigError(
                f"cannot repeat {self.n_kv_heads} kv heads {r} times: {K} must divide n_heads H = {self.n_heads}"
                + (" (a multi-query model keeps its one kv head whole on every chip)" if self.multi_query else "")
            )
        return self.replace(n_kv_heads=K, true_kv_heads=self.real_kv_heads)

    def for_kv_split(self, split: int) -> ModelConfig:
        """This model with its kv heads replicated the fewest times that `split` chips get whole kv heads each
        (`kv_replication`); unchanged when they already divide, for multi-query (never split over heads) and for
        multi-head models (every query head has its own kv head). ConfigError, naming H, K and the split, when no
        replication works."""
        if self.multi_query or self.n_kv_heads == self.n_heads:
            return self
        return self.replicate_kv_heads(kv_replication(self.n_heads, self.n_kv_heads, split))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def __getattr__(name: str) -> Any:
    """PRESETS lives in model/presets.py (it builds ModelConfigs, so it imports this module): read on first use."""
    if name == "PRESETS":
        from meshserve.model.presets import PRESETS

        return PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def near_names(name: str, known: Iterable[str]) -> str:
    """ "; did you mean A or B?" for a mistyped `name` (the known names it starts, then difflib's close matches), or
    "" when none is close."""
    import difflib

    known, low = list(known), str(name).strip().lower()
    close = [k for k in known if low and k.startswith(low)] + difflib.get_close_matches(low, known, n=2, cutoff=0.6)
    close = list(dict.fromkeys(close))[:2]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields overridden; unknown names list the known presets."""
    from meshserve.model.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}{near_names(name, PRESETS)} (known presets: {', '.join(PRESETS)})"
        )
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config


def kv_replication(n_heads: int, n_kv_heads: int, split: int) -> int:
    """The smallest r with (K·r) % split == 0 and H % (K·r) == 0: how many times to repeat each kv head so a heads
    split over `split` chips gives every chip whole kv heads, while K·r still divides H (grouped query stays exact).

    Every valid K·r is a common multiple of K and the split that divides H, so the answer is lcm(K, split) / K when
    lcm(K, split) divides H; ConfigError naming H, K and the split otherwise. (When H itself divides by the split,
    as every heads split needs, lcm(K, split) always divides H.)
    """
    for name, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("split", split)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    target = math.lcm(n_kv_heads, split)
    if n_heads % n_kv_heads or n_heads % target:
        raise ConfigError(
            f"n_kv_heads K = {n_kv_heads} cannot be replicated to split over {split} chips: K·r must be a multiple of "
            f"{split} that divides n_heads H = {n_heads}, and the smallest multiple of both K and {split} is {target}"
        )
    return target // n_kv_heads


def vocab_error(config: ModelConfig, ids: Iterable[int], field: str) -> str | None:
    """The message for the first id outside the model's vocabulary (`field: token id X outside the vocabulary
    [0, V)`), or None. A tokenizer may know more ids than the model embeds, so text prompts are checked too."""
    bad = next((t for t in ids if not 0 <= int(t) < config.vocab_size), None)
    return None if bad is None else f"{field}: token id {bad} outside the vocabulary [0, {config.vocab_size})"
