"""Named model presets (`model.config.PRESETS`, `get_config`): tiny test models, the shipped demo, and the shapes of
published models (PaLM, Falcon, Llama 2, Qwen3, Gemma 3) for analytics, bench and the tests that need their sizes.

Split out of model/config.py, which re-exports PRESETS; each preset is a ModelConfig, validated when built.
"""

from __future__ import annotations

from meshserve.model.config import ModelConfig

__all__ = ["PRESETS"]

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
}
