"""Model configuration: one frozen dataclass and named presets, from `tiny` (tests) to PaLM 540B.

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

__all__ = ["ModelConfig", "PRESETS", "get_config", "ConfigError", "vocab_error", "kv_replication"]


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
    # layer global. The KV cache still holds the whole context (no ring buffer); the window is a mask.
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
        layers = self.global_layers
        if layers and not self.sliding_window:
            raise ConfigError(f"global_layers {layers!r} needs sliding_window > 0 (without it every layer is global)")
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


_PALM = dict(
    parallel_block=True,
    mlp="swiglu",
    norm="layernorm",
    norm_bias=False,
    linear_bias=False,
    shared_embedding=True,
    n_kv_heads=1,
    d_head=256,
    vocab_size=256_128,
)

_LLAMA_2 = dict(
    vocab_size=32_000,
    d_head=128,
    max_seq_len=4096,
    parallel_block=False,
    mlp="swiglu",
    norm="rmsnorm",
    norm_bias=False,
    norm_eps=1e-5,
    linear_bias=False,
    shared_embedding=False,
    rope_base=10_000.0,
    bos_id=1,
    eos_id=2,
)

PRESETS: dict[str, ModelConfig] = {
    # Tiny shapes keep every test compile short; 8 heads and d_ff 128 split over 8 emulated devices.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=256,
        d_model=64,
        d_ff=128,
        n_layers=2,
        n_heads=8,
        n_kv_heads=1,
        d_head=16,
        max_seq_len=128,
    ),
    # Falcon-shaped tiny model: the CPU stand-in for falcon-7b in benchmark and import tests.
    "tiny-falcon": ModelConfig(
        name="tiny-falcon",
        vocab_size=256,
        d_model=64,
        d_ff=256,
        n_layers=2,
        n_heads=8,
        n_kv_heads=1,
        d_head=8,
        max_seq_len=128,
        mlp="gelu",
        norm_bias=True,
        norm_eps=1e-5,
    ),
    # Gemma-3-shaped tiny model: every Gemma 3 switch, a 5-token window on layer 0 (layer 1 global), so the tests'
    # prompts cross the window in every attention path.
    "tiny-gemma3": ModelConfig(
        name="tiny-gemma3",
        vocab_size=256,
        d_model=64,
        d_ff=128,
        n_layers=2,
        n_heads=8,
        n_kv_heads=1,
        d_head=16,
        max_seq_len=128,
        parallel_block=False,
        mlp="geglu",
        norm="rmsnorm",
        qk_norm=True,
        sliding_window=5,
        global_layers=(1,),
        local_rope_base=100.0,
        norm_scale_offset=True,
        post_norms=True,
        scale_embed=True,
        attn_scale=0.2,
    ),
    # The shipped model (model/demo/), trained by `python -m meshserve.model.demo_train` on Python's own docs.
    # 2.3 M parameters (4.7 MB in bf16, well under the 10 MB repository budget): sized for the ~1 M tokens
    # that ~20 minutes on 2 shared CPU cores can train on; a larger model would be undertrained.
    "demo": ModelConfig(
        name="demo",
        vocab_size=4096,
        d_model=192,
        d_ff=512,
        n_layers=4,
        n_heads=4,
        n_kv_heads=1,
        d_head=48,
        max_seq_len=512,
        bos_id=1,
        eos_id=2,
    ),
    "palm-8b": ModelConfig(name="palm-8b", d_model=4096, d_ff=16384, n_layers=32, n_heads=16, **_PALM),
    "palm-62b": ModelConfig(name="palm-62b", d_model=8192, d_ff=32768, n_layers=64, n_heads=32, **_PALM),
    # 48 real heads; `padded_heads(64)` gives the inference shape the paper ran.
    "palm-540b": ModelConfig(name="palm-540b", d_model=18432, d_ff=73728, n_layers=118, n_heads=48, **_PALM),
    # tiiuae/falcon-7b: multi-query, parallel block, GELU MLP 4E, LayerNorm with bias, tied embedding.
    "falcon-7b": ModelConfig(
        name="falcon-7b",
        vocab_size=65024,
        d_model=4544,
        d_ff=18176,
        n_layers=32,
        n_heads=71,
        n_kv_heads=1,
        d_head=64,
        parallel_block=True,
        mlp="gelu",
        norm="layernorm",
        norm_bias=True,
        norm_eps=1e-5,
        linear_bias=False,
        shared_embedding=True,
        eos_id=11,
    ),
    # Llama 2 (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Table 1 and section 2.2:
    # 4k context, grouped-query attention for 34B/70B) with the shapes and switches of the model cards' config.json
    # (meta-llama/Llama-2-7b-hf, -70b-hf): serial block, SwiGLU, RMSNorm eps 1e-5, no biases, untied embedding,
    # rope_theta 1e4, bos 1, eos 2. Shapes only: meshserve does not import Llama weights.
    "llama-2-7b": ModelConfig(
        name="llama-2-7b", d_model=4096, d_ff=11008, n_layers=32, n_heads=32, n_kv_heads=32, **_LLAMA_2
    ),
    # 8 kv heads shared by 64 query heads (groups of 8).
    "llama-2-70b": ModelConfig(
        name="llama-2-70b", d_model=8192, d_ff=28672, n_layers=80, n_heads=64, n_kv_heads=8, **_LLAMA_2
    ),
    # Qwen3-8B's shapes and switches (Qwen/Qwen3-8B config.json; its card: 8.2B parameters, 6.95B without the
    # embeddings, 36 layers, 32 query / 8 kv heads, 32,768 native context): Llama's block with an RMSNorm over each
    # head's q and k (qk_norm), head_dim 128, rope_theta 1e6, untied embedding, no BOS. Shapes only, for analytics and
    # bench; `meshserve convert --from-hf` imports the real weights.
    "qwen3-8b": ModelConfig(
        name="qwen3-8b",
        vocab_size=151_936,
        d_model=4096,
        d_ff=12288,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        d_head=128,
        max_seq_len=32_768,
        parallel_block=False,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-6,
        shared_embedding=False,
        rope_base=1_000_000.0,
        qk_norm=True,
        eos_id=151_645,
    ),
    # google/gemma-3-1b-it's config.json (Gemma3ForCausalLM, text only; model card: 1B parameters, 32K context):
    # 26 layers, 4 query heads and one kv head (multi-query) of 256, GeGLU d_ff 6912, vocab 262,144, tied embedding;
    # a 512-token window on every layer but each 6th (5 local : 1 global, sliding_window_pattern 6), the local layers
    # rotating with base 1e4 and the global ones 1e6; (1 + w) RMSNorms, post norms, q/k norms, sqrt(E) embedding
    # scale, query_pre_attn_scalar 256; bos 2, eos 1 and <end_of_turn> 106. 999,885,952 parameters.
    "gemma3-1b": ModelConfig(
        name="gemma3-1b",
        vocab_size=262_144,
        d_model=1152,
        d_ff=6912,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        d_head=256,
        max_seq_len=32_768,
        parallel_block=False,
        mlp="geglu",
        norm="rmsnorm",
        norm_eps=1e-6,
        shared_embedding=True,
        rope_base=1_000_000.0,
        bos_id=2,
        eos_id=1,
        extra_eos_ids=(106,),
        qk_norm=True,
        sliding_window=512,
        global_layers=(5, 11, 17, 23),
        local_rope_base=10_000.0,
        norm_scale_offset=True,
        post_norms=True,
        scale_embed=True,
        attn_scale=256**-0.5,
    ),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields overridden; unknown names list the known presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
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
