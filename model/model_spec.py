"""`--model SPEC [--set key=value,...]`: a ModelConfig from a preset, a meshserve checkpoint or a Hugging Face config.json.

Resolution order of `resolve_model(spec)`:
  1. a preset name (`model/config.py` PRESETS): a bare preset name is always the preset, even when a file or
     directory of that name exists in the current directory; write `./tiny` (any path with a separator) for the path;
  2. a directory holding `meshserve.json` (or that file itself): a meshserve checkpoint (only its metadata is read,
     never the weights);
  3. a directory holding `config.json`, or a JSON file (any name): a Hugging Face config. `model_type` picks the
     mapping: falcon / RefinedWebModel through `model.hf_import.falcon_config`; llama, mistral, qwen2 and qwen3 through
     `llama_config` below; gemma3_text and gemma3 through `model.hf_gemma3.gemma3_config`; anything else is refused;
  4. anything else is an error naming the spec and the known presets.
A directory with both `meshserve.json` and `config.json` is read as the meshserve checkpoint (step 2 first).

Overrides (`--set`, model/model_overrides.py) then replace ModelConfig fields by name, each value parsed to the
field's type; the result is checked by ModelConfig itself (e.g. n_heads must be a multiple of n_kv_heads) and named
`base[key=value,...]`.

A config for analytics (analyze, memory, plan) only needs shapes and switches, and bench and calibrate time random
weights of that shape; `meshserve convert --from-hf` (model/hf_import.py) imports the weights of the same mapping.
Llama-style configs map to a serial block (two RMSNorms, scale only), SwiGLU MLP (silu(x W_gate) * (x W_up), as
layers.mlp), rotate-half RoPE, bias-free projections and a tied or untied output embedding; that is the math of
transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (which adds biases on q, k and v only:
`qkv_bias`) and Qwen3ForCausalLM (no biases; an RMSNorm over each head's q and k before RoPE: `qk_norm`), so the
parameter count is exact. Llama's `attention_bias` and `mlp_bias` map to `linear_bias` when both
are set (one without the other is refused). A sliding window (Mistral's `sliding_window` on every layer, Qwen2's
and Qwen3's with `use_sliding_window` on the layers `layer_types` / max_window_layers name) maps to
ModelConfig.sliding_window / global_layers, computed by the attention mask (model/layers.py), so max_seq_len stays
max_position_embeddings. Gemma 3 (`gemma3_text`, `gemma3`) maps through model/hf_gemma3.py. Llama 3.1's `llama3` rope scaling maps to ModelConfig.rope_scaling (applied
by layers.rope_frequencies). Settings that change the architecture beyond that (other rope scaling types, mixture of
experts, another activation) are refused with an error naming the config.json key and value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshserve.errors import UserError
from meshserve.model.config import PRESETS, ConfigError, ModelConfig, near_names
from meshserve.model.model_overrides import SET_HELP, ModelSpecError, apply_overrides, parse_overrides

__all__ = [
    "resolve_model",
    "parse_overrides",
    "apply_overrides",
    "llama_config",
    "hf_config_file",
    "hf_model_name",
    "window_layers",
    "ModelSpecError",
    "MODEL_HELP",
    "SET_HELP",
]

MODEL_HELP = "a preset name, a meshserve checkpoint directory or a Hugging Face config.json"

_CHECKPOINT_META = "meshserve.json"  # model/checkpoint.py META_FILE (that module imports JAX; this one must not)
_FALCON_TYPES = ("falcon", "RefinedWebModel")  # what model.hf_import.falcon_config accepts
_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_GEMMA_TYPES = ("gemma3_text", "gemma3")  # model/hf_gemma3.py
# transformers' defaults when a config.json leaves max_position_embeddings out (LlamaConfig, MistralConfig, Qwen2Config,
# Qwen3Config).
_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
# Keys whose presence (with a non-empty value) means mixture-of-experts layers, which ModelConfig cannot describe.
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def resolve_model(spec: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig `spec` names (a preset, a checkpoint directory, a HF config.json or its directory),
    with `overrides` (field -> value or its text, as from `--set`) applied. See the module docstring for the order."""
    config = _resolve(spec)
    return apply_overrides(config, overrides) if overrides else config


def _resolve(spec: str) -> ModelConfig:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model must be {MODEL_HELP}, got {spec!r}")
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / _CHECKPOINT_META).is_file():
            from meshserve.model.checkpoint import read_checkpoint_info  # imports JAX: only for checkpoints

            return read_checkpoint_info(path).config
        if (path / "config.json").is_file():
            return hf_config_file(path / "config.json")
        raise ModelSpecError(
            f"model directory {path} holds neither {_CHECKPOINT_META} (a meshserve checkpoint) nor config.json "
            "(a Hugging Face model)"
        )
    if path.is_file():
        if path.name == _CHECKPOINT_META:
            return _resolve(str(path.parent))
        return hf_config_file(path)
    if path.exists():
        raise ModelSpecError(f"model {spec!r} is neither a file nor a directory")
    raise ModelSpecError(
        f"unknown model preset {spec!r} and no such file or directory{near_names(spec, PRESETS)} (known presets: "
        f"{', '.join(PRESETS)}; or give a meshserve checkpoint directory or a Hugging Face config.json)"
    )


def hf_config_file(path: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (llama, mistral, qwen2, qwen3 or falcon `model_type`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{path} is not JSON ({e}): expected a Hugging Face config.json") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path}: expected a JSON object (a Hugging Face config.json), got {type(data).__name__}")
    # A model directory names the model (…/Llama-2-7b-hf/config.json); a loose file is named by its stem.
    name = hf_model_name(path.parent) if path.name == "config.json" else (path.stem or "hf-model")
    model_type = data.get("model_type")
    if model_type in _LLAMA_TYPES:
        return llama_config(data, name=name, source=str(path))
    if model_type in _GEMMA_TYPES:
        from meshserve.model.hf_gemma3 import gemma3_config  # no JAX: config mapping only

        return gemma3_config(data, name=name, source=str(path))
    if model_type in _FALCON_TYPES:
        from meshserve.model.hf_import import falcon_config  # imports JAX (through model/params.py)

        try:
            return falcon_config(data, name=name)
        except UserError as e:  # HFImportError: already names the key; add the file
            raise ModelSpecError(f"{path}: {e}") from None
    if model_type is None:
        raise ModelSpecError(f"{path} has no model_type key: not a Hugging Face config.json")
    supported = ", ".join(_LLAMA_TYPES + _GEMMA_TYPES + _FALCON_TYPES)
    raise _refuse(str(path), "model_type", model_type, f"supported: {supported}")


def hf_model_name(directory: str | Path) -> str:
    """The model's name for a Hugging Face directory: its name as given (a symlink's own name, not its target's), or
    for a Hub cache snapshot (…/models--ORG--NAME/snapshots/<commit hash>) the repository's NAME, not the hash (the
    name `meshserve serve` answers to by default)."""
    path = Path(directory).absolute()
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--", 2)[-1] or "hf-model"
    return path.name or "hf-model"


def _refuse(source: str, key: str, value: Any, why: str) -> ModelSpecError:
    return ModelSpecError(f"{source}: unsupported config.json {key}={json.dumps(value)}: {why}")


def _positive_int(source: str, hf: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelSpecError(f"{source}: config.json {key} must be a positive integer, got {json.dumps(value)}")
    return value


def _token_ids(value: Any) -> list[int]:
    """bos/eos ids as a list: one id, or Llama 3's several eos ids; anything else is none."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_id(value: Any) -> int | None:
    """bos/eos as one id: the first of a list (the others of an eos list go to extra_eos_ids)."""
    ids = _token_ids(value)
    return ids[0] if ids else None


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: Mapping[str, Any], source: str) -> tuple[dict[str, Any], tuple[float, ...]]:
    """The rotary settings (transformers 5's `rope_parameters`, or the older `rope_scaling` with a top-level
    `rope_theta`) and ModelConfig.rope_scaling: () for the default rotary embedding, Llama 3.1's four numbers for
    `rope_type` llama3; every other type (linear, dynamic, yarn, longrope, ...) is refused naming the key."""
    legacy = hf.get("rope_scaling")
    key, rope = ("rope_scaling", legacy) if legacy else ("rope_parameters", hf.get("rope_parameters") or {})
    if not isinstance(rope, dict):
        raise _refuse(source, key, rope, "expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return rope, ()
    if rope_type != "llama3":
        raise _refuse(source, f"{key}.rope_type", rope_type, "only the default and Llama 3's (llama3) rotary embedding")
    values = [rope.get(k) for k in _LLAMA3_KEYS]
    for k, v in zip(_LLAMA3_KEYS, values, strict=True):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise _refuse(source, f"{key}.{k}", v, "llama3 rope scaling needs a positive number")
    if values[2] <= values[1]:
        raise _refuse(source, f"{key}.high_freq_factor", values[2], f"must exceed low_freq_factor={values[1]}")
    return rope, tuple(float(v) for v in values)


def llama_config(hf: Mapping[str, Any], name: str = "llama-hf", source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Llama-, Mistral-, Qwen2- or Qwen3-style config.json; unsupported settings raise
    ModelSpecError
    naming the key. `source` (the file) prefixes every message. A sliding window shorter than max_position_embeddings
    becomes sliding_window (see the module docstring)."""
    model_type = hf.get("model_type")
    if model_type not in _LLAMA_TYPES:
        raise _refuse(source, "model_type", model_type, f"llama_config maps {', '.join(_LLAMA_TYPES)} only")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", hf["hidden_act"], "only SiLU-gated MLPs (SwiGLU) are supported")
    for key in _MOE_KEYS:
        if hf.get(key):
            raise _refuse(source, key, hf[key], "mixture-of-experts layers are not supported")
    # Qwen3's attention_bias puts biases on q, k, v and o but none on the MLP: no ModelConfig describes that.
    if model_type == "qwen3" and hf.get("attention_bias"):
        raise _refuse(source, "attention_bias", hf["attention_bias"], "Qwen3 attention biases are not supported")
    # Only LlamaConfig reads these two keys (Mistral and Qwen2 hard-code their projections' biases).
    attention_bias = model_type == "llama" and bool(hf.get("attention_bias"))
    mlp_bias = model_type == "llama" and bool(hf.get("mlp_bias"))
    if attention_bias != mlp_bias:
        key = "attention_bias" if attention_bias else "mlp_bias"
        raise _refuse(
            source, key, hf[key], "biases on the attention or the MLP projections alone are not supported (both are)"
        )
    rope, rope_scaling = _rope(hf, source)
    max_pos = _positive_int(source, hf, "max_position_embeddings", _MAX_POSITIONS[model_type])
    window = hf.get("sliding_window")
    # Qwen2 and Qwen3 carry a sliding_window they do not use unless use_sliding_window; Mistral always uses it.
    # transformers' Qwen2Config and Qwen3Config default use_sliding_window to False; Mistral has no such key; Llama
    # reads no window at all.
    uses_window = (
        model_type != "llama"
        and window is not None
        and hf.get("use_sliding_window", model_type not in ("qwen2", "qwen3"))
    )
    full = ("full_attention", "sliding_attention") if uses_window else ("full_attention",)
    other = sorted({t for t in hf.get("layer_types") or [] if t not in full})
    if other:
        raise _refuse(source, "layer_types", other, "only full attention layers are supported")
    N = _positive_int(source, hf, "num_hidden_layers")
    sliding_window, global_layers = window_layers(hf, N, source, model_type) if uses_window else (0, ())
    if sliding_window >= max_pos:  # every key of any context is within the window: plain causal attention
        sliding_window, global_layers = 0, ()

    E = _positive_int(source, hf, "hidden_size")
    H = _positive_int(source, hf, "num_attention_heads")
    K = _positive_int(source, hf, "num_key_value_heads", H)
    if H % K:
        raise ModelSpecError(
            f"{source}: config.json num_attention_heads={H} must be a multiple of num_key_value_heads={K}"
        )
    # Qwen3Config's head_dim defaults to 128 (Qwen3-0.6B: 16 heads of 128 over hidden_size 1024), the others' to E / H.
    default_head_dim = 128 if model_type == "qwen3" else E // H
    if hf.get("head_dim") is None and model_type != "qwen3" and E % H:
        raise ModelSpecError(
            f"{source}: config.json hidden_size={E} must be a multiple of num_attention_heads={H} (or give head_dim)"
        )
    Q = _positive_int(source, hf, "head_dim", default_head_dim)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    eps = hf.get("rms_norm_eps", 1e-6)
    for key, value in (("rope_theta", theta), ("rms_norm_eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ModelSpecError(f"{source}: config.json {key} must be a positive number, got {json.dumps(value)}")
    # Read before the try below: its ConfigError handler would wrap these messages (which name the key) twice.
    V, F = (_positive_int(source, hf, key) for key in ("vocab_size", "intermediate_size"))
    try:
        return ModelConfig(
            name=name,
            vocab_size=V,
            d_model=E,
            d_ff=F,
            n_layers=N,
            n_heads=H,
            n_kv_heads=K,
            d_head=Q,
            max_seq_len=max_pos,
            parallel_block=False,  # Llama: x += attn(norm(x)); x += mlp(norm(x))
            mlp="swiglu",
            norm="rmsnorm",
            norm_bias=False,
            norm_eps=float(eps),
            linear_bias=attention_bias and mlp_bias,
            shared_embedding=bool(hf.get("tie_word_embeddings", False)),
            rope_base=float(theta),
            # Qwen's tokenizers prepend nothing (its config's bos_token_id is <|endoftext|>, never put first).
            bos_id=None if model_type in ("qwen2", "qwen3") else _token_id(hf.get("bos_token_id")),
            eos_id=_token_id(hf.get("eos_token_id")),
            extra_eos_ids=tuple(_token_ids(hf.get("eos_token_id"))[1:]),
            qkv_bias=model_type == "qwen2",  # Qwen2Attention: q, k and v with bias, o without
            qk_norm=model_type == "qwen3",  # Qwen3Attention: RMSNorm over each head's q and k before RoPE
            rope_scaling=rope_scaling,
            sliding_window=sliding_window,
            global_layers=global_layers,
        )
    except ConfigError as e:  # e.g. an odd head_dim (RoPE rotates pairs)
        raise ModelSpecError(f"{source}: config.json describes no model meshserve can run: {e}") from None


def window_layers(hf: Mapping[str, Any], n_layers: int, source: str, model_type: str) -> tuple[int, tuple[int, ...]]:
    """(sliding_window, global_layers) of a config.json whose window is in use: which layers slide, as transformers
    builds them. Mistral: every layer. Otherwise `layer_types` ("sliding_attention" / "full_attention", one per
    layer) when given, else Qwen2 / Qwen3's default: layers from max_window_layers on slide (Qwen2Config's
    layer_types); Gemma 3 passes its own default pattern in as layer_types."""
    window = hf.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise _refuse(source, "sliding_window", window, "expected a positive integer or null")
    types = hf.get("layer_types")
    if model_type == "mistral":  # MistralModel applies sliding_window to every layer (it ignores layer_types)
        return window, ()
    if types is None:
        first = hf.get("max_window_layers", 28)  # Qwen2Config / Qwen3Config default
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise _refuse(source, "max_window_layers", first, "expected a non-negative integer")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise _refuse(source, "layer_types", types, f"expected one entry per layer (num_hidden_layers={n_layers})")
    if "sliding_attention" not in types:
        return 0, ()
    return window, tuple(i for i, t in enumerate(types) if t == "full_attention")
