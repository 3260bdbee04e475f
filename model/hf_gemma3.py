"""Gemma 3 Hugging Face checkpoints (`model_type` gemma3_text, and the text half of gemma3): config and tensor plan.

Verified against transformers' models/gemma3 (configuration_gemma3.py, modeling_gemma3.py), what differs from Llama:
  - RMSNorm computes x * (1 + w) in float32 (Gemma3RMSNorm; weights start at 0): ModelConfig.norm_scale_offset. The 1
    is not folded into the weight: stored in bf16, 1 + w would be rounded, and transformers adds it in float32.
  - four norms per block: input_layernorm (attn_norm), post_attention_layernorm on the attention's output before its
    residual add (attn_out_norm), pre_feedforward_layernorm (mlp_norm), post_feedforward_layernorm (mlp_out_norm):
    ModelConfig.post_norms;
  - q_norm / k_norm over each head's Q before RoPE (as Qwen3: qk_norm), also (1 + w);
  - GeGLU MLP: gelu_pytorch_tanh(x W_gate) * (x W_up) (mlp "geglu"; `hidden_activation` must be gelu_pytorch_tanh);
  - embeddings times sqrt(hidden_size), the factor cast to the weights' dtype (scale_embed); tied lm_head (unscaled);
  - attention logits scaled by query_pre_attn_scalar ** -0.5 (attn_scale), not head_dim ** -0.5;
  - `layer_types` (default: every 6th layer "full_attention", the others "sliding_attention", from
    sliding_window_pattern) with `sliding_window`: sliding_window / global_layers;
  - rotary base per layer type: `rope_parameters` {sliding_attention, full_attention} (transformers 5) or the older
    rope_theta (global, default 1e6) and rope_local_base_freq (sliding, default 1e4): rope_base / local_rope_base.
    The global layers may carry `linear` scaling (4B and larger: factor 8): rope_scaling (factor,); any other type,
    or scaling on the sliding layers, is refused by name.
Refused by name: final_logit_softcapping / attn_logit_softcapping not null, attention_bias, use_bidirectional_attention.
Missing keys take Gemma3TextConfig's defaults, as transformers does.

Tensors (Gemma3ForCausalLM; torch Linear weights are [out, in]):
  model.embed_tokens.weight [V, E] -> embed; model.norm.weight [E] -> final_norm/scale
  model.layers.{i}.input_layernorm / post_attention_layernorm / pre_feedforward_layernorm /
    post_feedforward_layernorm .weight [E] -> layers/attn_norm, attn_out_norm, mlp_norm, mlp_out_norm /scale [N, E]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, mlp.{gate,up,down}_proj.weight: as Llama (model/hf_llama.py)
  model.layers.{i}.self_attn.{q,k}_norm.weight [Q] -> layers/q_norm, k_norm /scale [N, Q]
A gemma3 (multimodal, Gemma3ForConditionalGeneration) checkpoint holds the same text tensors under
`language_model.model.` (the Hub's layout, which transformers renames on load) or `model.language_model.` (what
transformers 5 saves), its config under `text_config`; the vision tower and projector tensors are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

from meshserve.model.config import ConfigError, ModelConfig
from meshserve.model.hf_llama import llama_plan
from meshserve.model.model_spec import ModelSpecError, window_layers

__all__ = ["MODEL_TYPES", "gemma3_config", "gemma3_plan", "text_prefix", "ignored_tensor"]

MODEL_TYPES = ("gemma3_text", "gemma3")

# Gemma3TextConfig's defaults (transformers models/gemma3/configuration_gemma3.py), used for keys a config.json omits.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
}
_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta
_LEGACY_THETA = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}
# Tensors of a multimodal checkpoint that belong to the vision side (SigLIP tower, projector).
# A layer's four norms (HF name, ours): the attention's and the MLP's input and output norms.
_NORMS = (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "attn_out_norm"),
    ("pre_feedforward_layernorm", "mlp_norm"),
    ("post_feedforward_layernorm", "mlp_out_norm"),
)
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _refuse(source: str, key: str, value: Any, why: str) -> ModelSpecError:
    return ModelSpecError(f"{source}: unsupported config.json {key}={json.dumps(value)}: {why}")


def _number(source: str, key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ModelSpecError(f"{source}: config.json {key} must be a positive number, got {json.dumps(value)}")
    return float(value)


def _int(source: str, hf: Mapping[str, Any], key: str) -> int:
    value = hf.get(key)
    value = _DEFAULTS[key] if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelSpecError(f"{source}: config.json {key} must be a positive integer, got {json.dumps(value)}")
    return value


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _rotary(hf: Mapping[str, Any], source: str) -> tuple[float, float, tuple[float, ...]]:
    """(global base, sliding base, global rope_scaling) from rope_parameters per layer type, or the older keys."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise _refuse(source, "rope_parameters", params, "expected an object")
    per_type = params or {}
    if set(per_type) - set(_THETA):  # a flat dict: which layer type it meant is not clear from transformers' code
        raise _refuse(source, "rope_parameters", params, "expected one entry per layer type (sliding / full_attention)")
    legacy = hf.get("rope_scaling")
    out: dict[str, tuple[float, tuple[float, ...]]] = {}
    for kind, default in _THETA.items():
        rope = dict(per_type.get(kind) or {})
        if kind == "full_attention" and legacy:  # Gemma3TextConfig: rope_scaling updates the global layers' dict
            if not isinstance(legacy, dict):
                raise _refuse(source, "rope_scaling", legacy, "expected an object")
            rope.update(legacy)
        key = f"rope_parameters.{kind}" if kind in per_type else "rope_scaling"
        theta = _number(source, f"{key}.rope_theta", rope.get("rope_theta", hf.get(_LEGACY_THETA[kind], default)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            out[kind] = (theta, ())
        elif rope_type == "linear" and kind == "full_attention":
            out[kind] = (theta, (_number(source, f"{key}.factor", rope.get("factor")),))
        else:
            why = "Gemma 3's global layers take the default or linear rotary embedding, the sliding ones the default"
            raise _refuse(source, f"{key}.rope_type", rope_type, why)
    (base, scaling), (local, _) = out["full_attention"], out["sliding_attention"]
    return base, local, scaling


def gemma3_config(hf: Mapping[str, Any], name: str = "gemma3-hf", source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a gemma3_text config.json, or of a gemma3 one's `text_config`; ModelSpecError naming the
    key for anything the model cannot run (see the module docstring)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise _refuse(source, "model_type", model_type, f"gemma3_config maps {', '.join(MODEL_TYPES)} only")
    tie = hf.get("tie_word_embeddings", True)
    if model_type == "gemma3":
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise _refuse(source, "text_config", text, "a gemma3 checkpoint's text model is read from text_config")
        if text.get("model_type", "gemma3_text") != "gemma3_text":
            raise _refuse(source, "text_config.model_type", text["model_type"], "expected gemma3_text")
        hf, source = {"tie_word_embeddings": tie, **text}, f"{source} (text_config)"
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise _refuse(source, key, hf[key], "logit soft-capping is not implemented (Gemma 3 has none)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise _refuse(source, key, hf[key], "Gemma 3 as published has it false; it is not supported")
    act = hf.get("hidden_activation") or _DEFAULTS["hidden_activation"]
    if act != "gelu_pytorch_tanh":
        raise _refuse(source, "hidden_activation", act, "Gemma 3's GeGLU MLP uses gelu_pytorch_tanh only")
    N = _int(source, hf, "num_hidden_layers")
    pattern = _int(source, hf, "sliding_window_pattern")
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(N)
    ]  # Gemma3TextConfig's default
    bad = sorted({t for t in types if t not in _THETA}) if isinstance(types, list) else types
    if bad:
        raise _refuse(source, "layer_types", bad, "only sliding_attention and full_attention layers")
    window_hf = {"sliding_window": hf.get("sliding_window", _DEFAULTS["sliding_window"]), "layer_types": types}
    window, global_layers = window_layers(window_hf, N, source, "gemma3_text")
    base, local_base, scaling = _rotary(hf, source)
    eps = _number(source, "rms_norm_eps", hf.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"]))
    scalar = _number(
        source, "query_pre_attn_scalar", hf.get("query_pre_attn_scalar", _DEFAULTS["query_pre_attn_scalar"])
    )
    eos = _ids(hf.get("eos_token_id", _DEFAULTS["eos_token_id"]))
    bos = _ids(hf.get("bos_token_id", _DEFAULTS["bos_token_id"]))
    try:
        return ModelConfig(
            name=name,
            vocab_size=_int(source, hf, "vocab_size"),
            d_model=_int(source, hf, "hidden_size"),
            d_ff=_int(source, hf, "intermediate_size"),
            n_layers=N,
            n_heads=_int(source, hf, "num_attention_heads"),
            n_kv_heads=_int(source, hf, "num_key_value_heads"),
            d_head=_int(source, hf, "head_dim"),
            max_seq_len=_int(source, hf, "max_position_embeddings"),
            parallel_block=False,
            mlp="geglu",
            norm="rmsnorm",
            norm_eps=eps,
            shared_embedding=bool(tie),
            rope_base=base,
            rope_scaling=scaling,
            bos_id=bos[0] if bos else None,
            eos_id=eos[0] if eos else None,
            extra_eos_ids=tuple(eos[1:]),
            qk_norm=True,
            sliding_window=window,
            global_layers=global_layers,
            local_rope_base=local_base if window else 0.0,
            norm_scale_offset=True,
            post_norms=True,
            scale_embed=True,
            attn_scale=scalar**-0.5,
        )
    except ConfigError as e:
        raise ModelSpecError(f"{source}: config.json describes no model meshserve can run: {e}") from None


def text_prefix(names: Iterator[str] | list[str]) -> str:
    """Where a checkpoint's text model lives: `model.` (Gemma3ForCausalLM), `language_model.model.` (the Hub's
    multimodal files) or `model.language_model.` (transformers 5's multimodal saves)."""
    names = list(names)
    for prefix in ("language_model.model.", "model.language_model."):
        if any(n.startswith(prefix) for n in names):
            return prefix
    return "model."


def ignored_tensor(name: str) -> bool:
    """A multimodal checkpoint's vision-side tensor (never read) or a tied lm_head under the multimodal name."""
    return name.startswith(_VISION_PREFIXES) or name == "language_model.lm_head.weight"


def gemma3_plan(
    config: ModelConfig, prefix: str = "model."
) -> Iterator[tuple[str, tuple[int, ...], tuple[str, ...], Any]]:
    """(HF tensor name, HF shape, destination path in params, layer index or None) for every Gemma 3 weight:
    Llama's tensors (q/k norms always, no biases) with four norms a layer."""
    head = "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"
    return llama_plan(config, prefix, _NORMS, head)
