"""Llama-family Hugging Face checkpoints (`model_type` llama, mistral, qwen2, qwen3): which tensor goes where.

The config is model/model_spec.py `llama_config` (the one mapping analytics uses too); model/hf_import.py `load_hf`
reads and checks the tensors and places them with its `_place`. Tensor names and layouts of LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (torch Linear weights are [out, in]: y = x W^T + b):

  model.embed_tokens.weight [V, E]                        -> embed [V, E]
  model.layers.{i}.input_layernorm.weight [E]             -> layers/attn_norm/scale [N, E]
  model.layers.{i}.self_attn.q_proj.weight [H*Q, E]       -> layers/wq [N, E, H, Q]   (k_proj, v_proj: K*Q rows)
  model.layers.{i}.self_attn.o_proj.weight [E, H*Q]       -> layers/wo [N, H, Q, E]
  model.layers.{i}.post_attention_layernorm.weight [E]    -> layers/mlp_norm/scale [N, E]
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, E]       -> layers/w_gate, w_up [N, E, F]
  model.layers.{i}.mlp.down_proj.weight [E, F]            -> layers/w_down [N, F, E]
  model.norm.weight [E]                                   -> final_norm/scale [E]
  lm_head.weight [V, E] (absent or ignored when tied)     -> unembed [E, V]
  q/k/v_proj.bias [H*Q or K*Q] (Qwen2; Llama with attention_bias) -> bq [N, H, Q], bk/bv [N, K, Q]
  self_attn.{q,k}_norm.weight [Q] (Qwen3)                -> layers/q_norm/scale, k_norm/scale [N, Q]

Rows of q_proj are head-major (head h owns rows h*Q .. h*Q + Q-1), and within a head HF checkpoints store the rotary
pairs as (i, i + Q/2): HF's conversion script permuted Meta's interleaved (2i, 2i+1) pairs into this order, which is
model/layers.py `rope`'s rotate-half convention. So the rows are taken as stored, with no permutation; the parity test
(tests/test_hf_llama.py, logits against transformers) is what checks it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshserve.model.config import ModelConfig

__all__ = ["MODEL_TYPES", "llama_plan", "tokenizer_adds_bos"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# (HF tensor name, HF shape, destination path in params, layer index or None): the rows load_hf checks and places.
PlanRow = tuple[str, tuple[int, ...], tuple[str, ...], Any]


# A layer's norms: (HF name, ours). Llama's second norm is the MLP's input norm (Gemma 3 has four: model/hf_gemma3.py).
LLAMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))


def llama_plan(
    config: ModelConfig,
    prefix: str = "model.",
    norms: tuple[tuple[str, str], ...] = LLAMA_NORMS,
    head: str = "lm_head.weight",
) -> Iterator[PlanRow]:
    """Every tensor a Llama-family checkpoint of `config` must hold, with its shape and destination. norms: each
    layer's norm tensors (HF name, ours); head: the untied output embedding's name."""
    c = config
    E, F, H, K, Q, V = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.d_head, c.vocab_size
    yield f"{prefix}embed_tokens.weight", (V, E), ("embed",), None
    yield f"{prefix}norm.weight", (E,), ("final_norm", "scale"), None
    if not c.shared_embedding:
        yield head, (V, E), ("unembed",), None
    for i in range(c.n_layers):
        layer = f"{prefix}layers.{i}."
        for hf_name, ours in norms:
            yield layer + f"{hf_name}.weight", (E,), (ours, "scale"), i
        for proj, rows in (("q", H * Q), ("k", K * Q), ("v", K * Q)):
            yield layer + f"self_attn.{proj}_proj.weight", (rows, E), (f"w{proj}",), i
            if c.linear_bias or c.qkv_bias:
                yield layer + f"self_attn.{proj}_proj.bias", (rows,), (f"b{proj}",), i
        if c.qk_norm:
            yield layer + "self_attn.q_norm.weight", (Q,), ("q_norm", "scale"), i
            yield layer + "self_attn.k_norm.weight", (Q,), ("k_norm", "scale"), i
        yield layer + "self_attn.o_proj.weight", (E, H * Q), ("wo",), i
        yield layer + "mlp.gate_proj.weight", (F, E), ("w_gate",), i
        yield layer + "mlp.up_proj.weight", (F, E), ("w_up",), i
        yield layer + "mlp.down_proj.weight", (E, F), ("w_down",), i
        if c.linear_bias:  # Llama with attention_bias and mlp_bias
            yield layer + "self_attn.o_proj.bias", (E,), ("bo",), i
            yield layer + "mlp.gate_proj.bias", (F,), ("b_gate",), i
            yield layer + "mlp.up_proj.bias", (F,), ("b_up",), i
            yield layer + "mlp.down_proj.bias", (E,), ("b_down",), i


def tokenizer_adds_bos(directory: Path, bos_id: int) -> bool | None:
    """Whether transformers' tokenizer of `directory` puts `bos_id` first; None when no tokenizer file says.

    meshserve encodes without special tokens and prepends config.bos_id itself (model/loading.py `encode_prompt`),
    so bos_id must be kept exactly when the HF tokenizer adds it: tokenizer_config.json's `add_bos_token` decides
    when present (transformers applies it over tokenizer.json), else tokenizer.json's post-processor.
    """
    try:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        settings = {}
    if isinstance(settings, dict) and isinstance(settings.get("add_bos_token"), bool):
        return settings["add_bos_token"]
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # the library raises a bare Exception; load_tokenizer reports it when the model is loaded
        return None
    special = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return special[: len(plain) + 1] == [bos_id, *plain]  # bos, then the text (an eos may follow)
