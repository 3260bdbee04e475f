"""Import a Hugging Face checkpoint directory (config.json + *.safetensors) as meshserve params.

Supported `model_type`s:
  llama, mistral, qwen2, qwen3: config from model/model_spec.py `llama_config` (serial block, RMSNorm, SwiGLU,
    grouped-query attention, rotate-half RoPE, tied or separate `lm_head`, Qwen2's q/k/v biases, Qwen3's per-head
    q/k RMSNorm; sliding windows per layer); tensor names in model/hf_llama.py. The BOS id is kept only
    when the HF tokenizer prepends it.
  gemma3_text, gemma3 (the text model of the multimodal checkpoints; vision tensors ignored): model/hf_gemma3.py
    (config and tensor names, with what differs from Llama as verified against transformers' modeling_gemma3.py).
  falcon: rotary positions, the original decoder (`new_decoder_architecture` false), multi-query (`multi_query`
    true: one k/v head) or multi-head attention, parallel or serial block, exact GELU, LayerNorm with bias,
    optional linear biases, tied or separate `lm_head`.
Anything else is refused with an error naming the config.json key, as is a pre-quantized checkpoint
(`quantization_config`: GPTQ, AWQ, FP8, bitsandbytes). The chat template (tokenizer_config.json's `chat_template` or
chat_template.jinja) comes along in HFCheckpoint.chat (model/chat.py `hf_chat_template`); generation_config.json's eos
ids and the template's eos token join the stop ids (model/hf_stops.py); model/hf_tensors.py says which safetensors
files are read.

Falcon stores q, k and v as one fused `query_key_value` weight [out, E] (torch Linear: y = x W^T + b).
Its output rows, as `FalconAttention._split_heads` reads them:
  multi_query:      (H + 2) x Q   = H query heads, then the one k head, then the one v head
  multi-head:       H x 3 x Q     = per head, its q, k and v interleaved
Weights are filled layer by layer into arrays stacked on the leading `layers` axis (N) of
model/params.py, so peak host memory is about one copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from meshserve.model import hf_gemma3, hf_llama, hf_stops
from meshserve.model.chat import ChatTemplate, hf_chat_template
from meshserve.model.config import ConfigError, ModelConfig
from meshserve.model.hf_tensors import HFImportError, HFTensors
from meshserve.model.model_spec import ModelSpecError, hf_model_name, llama_config
from meshserve.model.params import WEIGHT_DTYPES, Params, declare
from meshserve.model.tokenizer import TOKENIZER_FILES, load_tokenizer

__all__ = ["HFImportError", "HFCheckpoint", "falcon_config", "read_hf_config", "load_hf", "TENSOR_DTYPES"]

# safetensors dtype tags -> meshserve weight names; a checkpoint of only F32 converts to f32 by default.
# FP16 is its own tag: it is read as float32 (exact) and cast once to the stored dtype, never through bf16.
TENSOR_DTYPES = {"F32": "f32", "BF16": "bf16", "F16": "f16"}
_MODEL_TYPES = ("falcon", "RefinedWebModel")  # RefinedWebModel: the pre-transformers name of Falcon-7B
# Tensors Falcon checkpoints may carry that hold no weights (older exports saved rotary buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class HFCheckpoint:
    """An imported model: config, params (numpy, f32 or bf16), the dtype read, the tokenizer file and the chat
    template if any."""

    config: ModelConfig
    params: Params
    source_dtype: str  # what the files hold: f32, bf16, f16, or a mix such as "bf16+f32"
    tokenizer_file: Path | None
    n_tensors: int
    chat: ChatTemplate | None = None  # tokenizer_config.json's chat_template or chat_template.jinja (model/chat.py)

    @property
    def default_weights(self) -> str:
        """The stored dtype when none is asked for: f32 for an all-float32 source, else bf16."""
        return "f32" if self.source_dtype == "f32" else "bf16"


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as a dict."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HFImportError(f"Hugging Face directory not found: {directory}")
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{directory} has no config.json (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first present key (config.json spellings changed across transformers versions)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _refuse(key: str, value: Any, why: str) -> HFImportError:
    return HFImportError(f"unsupported config.json {key}={json.dumps(value)}: {why}")


def falcon_config(hf: dict[str, Any], name: str = "falcon-hf") -> ModelConfig:
    """The ModelConfig of a Falcon config.json; unsupported settings raise HFImportError naming the key."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise _refuse("model_type", model_type, f"meshserve converts {' / '.join(_MODEL_TYPES)} checkpoints only")
    if hf.get("alibi"):
        raise _refuse("alibi", hf["alibi"], "ALiBi position biases are not implemented (rotary only)")
    if hf.get("new_decoder_architecture"):
        raise _refuse("new_decoder_architecture", hf["new_decoder_architecture"], "the Falcon-40B/180B decoder")
    activation = hf.get("activation", "gelu")
    if activation != "gelu":
        raise _refuse("activation", activation, "only exact GELU ('gelu') is supported")
    if hf.get("num_ln_in_parallel_attn") not in (None, 1):
        raise _refuse("num_ln_in_parallel_attn", hf["num_ln_in_parallel_attn"], "only one norm per block")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _refuse("rope_parameters.rope_type", rope_type, "only the default rotary embedding")
    if hf.get("rope_scaling"):
        raise _refuse("rope_scaling", hf["rope_scaling"], "rotary scaling is not implemented")

    required = {
        "vocab_size": _get(hf, "vocab_size"),
        "hidden_size": _get(hf, "hidden_size", "n_embed"),
        "num_hidden_layers": _get(hf, "num_hidden_layers", "n_layer"),
        "num_attention_heads": _get(hf, "num_attention_heads", "n_head"),
    }
    for key, value in required.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFImportError(f"config.json {key} must be a positive integer, got {json.dumps(value)}")
    E, H = required["hidden_size"], required["num_attention_heads"]
    if E % H:
        raise HFImportError(f"config.json hidden_size={E} must be a multiple of num_attention_heads={H}")
    multi_query = bool(hf.get("multi_query", True))
    kv_heads = 1 if multi_query else _get(hf, "num_kv_heads", "n_head_kv", default=H)
    if kv_heads != H and not multi_query:
        # The original decoder's fused layout is per-head q,k,v: grouped kv needs new_decoder_architecture.
        raise _refuse("num_kv_heads", kv_heads, f"with multi_query=false it must equal num_attention_heads={H}")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    try:
        return ModelConfig(
            name=name,
            vocab_size=required["vocab_size"],
            d_model=E,
            d_ff=_get(hf, "ffn_hidden_size", default=4 * E),
            n_layers=required["num_hidden_layers"],
            n_heads=H,
            n_kv_heads=kv_heads,
            d_head=E // H,
            max_seq_len=_get(hf, "max_position_embeddings", default=2048),
            parallel_block=bool(hf.get("parallel_attn", True)),
            mlp="gelu",
            norm="layernorm",
            norm_bias=True,
            norm_eps=float(_get(hf, "layer_norm_epsilon", default=1e-5)),
            linear_bias=bool(hf.get("bias", False)),
            shared_embedding=bool(hf.get("tie_word_embeddings", True)),
            rope_base=float(_get(rope, "rope_theta", default=_get(hf, "rope_theta", default=10_000.0))),
            # Falcon's tokenizer adds no BOS: prompts are encoded exactly as transformers encodes them.
            bos_id=None,
            eos_id=eos if isinstance(eos, int) else None,
        )
    except ConfigError as e:
        raise HFImportError(f"config.json describes no model meshserve can run: {e}") from None


def _plan(config: ModelConfig, prefix: str) -> Iterator[tuple[str, tuple[int, ...], tuple[str, ...], Any]]:
    """(HF tensor name, expected HF shape, destination path in params, layer index or None) for every weight."""
    c = config
    E, F, H, Q, V = c.d_model, c.d_ff, c.n_heads, c.d_head, c.vocab_size
    qkv_rows = (H + 2) * Q if c.multi_query else 3 * H * Q
    yield f"{prefix}word_embeddings.weight", (V, E), ("embed",), None
    yield f"{prefix}ln_f.weight", (E,), ("final_norm", "scale"), None
    yield f"{prefix}ln_f.bias", (E,), ("final_norm", "bias"), None
    if not c.shared_embedding:
        yield "lm_head.weight", (V, E), ("unembed",), None
    for i in range(c.n_layers):
        h = f"{prefix}h.{i}."
        yield h + "input_layernorm.weight", (E,), ("attn_norm", "scale"), i
        yield h + "input_layernorm.bias", (E,), ("attn_norm", "bias"), i
        if not c.parallel_block:
            yield h + "post_attention_layernorm.weight", (E,), ("mlp_norm", "scale"), i
            yield h + "post_attention_layernorm.bias", (E,), ("mlp_norm", "bias"), i
        yield h + "self_attention.query_key_value.weight", (qkv_rows, E), ("qkv",), i
        yield h + "self_attention.dense.weight", (E, H * Q), ("wo",), i
        yield h + "mlp.dense_h_to_4h.weight", (F, E), ("w_up",), i
        yield h + "mlp.dense_4h_to_h.weight", (E, F), ("w_down",), i
        if c.linear_bias:
            yield h + "self_attention.query_key_value.bias", (qkv_rows,), ("qkv_bias",), i
            yield h + "self_attention.dense.bias", (E,), ("bo",), i
            yield h + "mlp.dense_h_to_4h.bias", (F,), ("b_up",), i
            yield h + "mlp.dense_4h_to_h.bias", (E,), ("b_down",), i


def _split_qkv(w: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused rows [(H+2)Q or 3HQ, ...] -> q [..., H, Q], k and v [..., K, Q] (trailing axes first: E or none)."""
    H, Q = config.n_heads, config.d_head
    rows_last = np.moveaxis(w, 0, -1)  # [E, rows] or [rows]
    lead = rows_last.shape[:-1]
    if config.multi_query:
        heads = rows_last.reshape(*lead, H + 2, Q)
        return heads[..., :H, :], heads[..., H : H + 1, :], heads[..., H + 1 :, :]
    heads = rows_last.reshape(*lead, H, 3, Q)
    return heads[..., 0, :], heads[..., 1, :], heads[..., 2, :]


def _place(params: Params, dest: tuple[str, ...], layer: int | None, value: np.ndarray, config: ModelConfig) -> None:
    """Write one HF tensor (torch layout) into the stacked meshserve arrays (Falcon's and hf_llama's plans)."""
    E, H, Q = config.d_model, config.n_heads, config.d_head
    lay = params["layers"]
    if layer is None:
        target = params
        for key in dest[:-1]:
            target = target[key]
        target[dest[-1]][...] = value.T if dest == ("unembed",) else value  # lm_head [V, E] -> unembed [E, V]
        return
    kind = dest[0]
    if kind == "qkv":
        lay["wq"][layer], lay["wk"][layer], lay["wv"][layer] = _split_qkv(value, config)
    elif kind == "qkv_bias":
        lay["bq"][layer], lay["bk"][layer], lay["bv"][layer] = _split_qkv(value, config)
    elif kind in ("wq", "wk", "wv"):
        lay[kind][layer] = value.T.reshape(E, -1, Q)  # separate projection [heads*Q, E] -> [E, heads, Q]
    elif kind in ("bq", "bk", "bv"):
        lay[kind][layer] = value.reshape(-1, Q)  # [heads*Q] -> [heads, Q]
    elif kind == "wo":
        lay["wo"][layer] = value.T.reshape(H, Q, E)  # dense / o_proj [E, H*Q] -> [H, Q, E]
    elif kind in ("w_up", "w_down", "w_gate"):
        lay[kind][layer] = value.T  # torch Linear [out, in] -> [in, out]
    elif len(dest) == 2:
        lay[dest[0]][dest[1]][layer] = value
    else:
        lay[kind][layer] = value


def load_hf(
    directory: str | Path, weights: str | None = None, *, progress: bool = False, require_tokenizer: bool = False
) -> HFCheckpoint:
    """Read a Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 / Falcon HF directory into numpy params: bf16 when bf16 is stored, else f32.

    Every tensor is checked against the shape config.json implies before any is read; a mismatch
    names the tensor and both shapes. int8 is left to the caller (`cast_params` after this). require_tokenizer: refuse
    a directory without tokenizer.json / tokenizer.model, or with one that cannot be read, before reading weights
    (`meshserve convert` without --no-tokenizer: a checkpoint without a tokenizer encodes text as raw bytes).
    """
    import ml_dtypes
    from meshserve.progress import progress as progress_bar

    if weights is not None and weights not in WEIGHT_DTYPES:
        raise HFImportError(f"weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
    directory = Path(directory)
    hf = read_hf_config(directory)
    name = hf_model_name(directory)
    model_type = hf.get("model_type")
    if model_type in hf_llama.MODEL_TYPES:
        try:
            config = llama_config(hf, name=name, source=str(directory / "config.json"))
        except ModelSpecError as e:  # already names the key and the file
            raise HFImportError(str(e)) from None
        if config.bos_id is not None and hf_llama.tokenizer_adds_bos(directory, config.bos_id) is False:
            config = config.replace(bos_id=None)  # e.g. a tokenizer_config.json with add_bos_token false
    elif model_type in hf_gemma3.MODEL_TYPES:
        try:
            config = hf_gemma3.gemma3_config(hf, name=name, source=str(directory / "config.json"))
        except ModelSpecError as e:
            raise HFImportError(str(e)) from None
        if config.bos_id is not None and hf_llama.tokenizer_adds_bos(directory, config.bos_id) is False:
            config = config.replace(bos_id=None)
    elif model_type in _MODEL_TYPES:
        config = falcon_config(hf, name=name)
    else:
        known = ", ".join(hf_llama.MODEL_TYPES + hf_gemma3.MODEL_TYPES + _MODEL_TYPES)
        raise _refuse("model_type", model_type, f"meshserve converts {known} checkpoints only")
    text_config = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    quantization = hf.get("quantization_config") or text_config.get("quantization_config")
    if quantization:  # GPTQ / AWQ / FP8 / bitsandbytes tensors (qweight, scales, ...) are not plain weights
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise _refuse("quantization_config.quant_method", method, "pre-quantized checkpoints cannot be read; convert "
                      "the unquantized (f32 / bf16 / f16) checkpoint and pass --weights int8")  # fmt: skip
    chat = hf_chat_template(directory)  # read before the tensors: a damaged tokenizer_config.json fails fast
    config = hf_stops.with_stop_ids(config, directory, chat)
    tensors = HFTensors(directory)
    if model_type in hf_llama.MODEL_TYPES:
        rows = hf_llama.llama_plan(config, "model." if any(n.startswith("model.") for n in tensors.files) else "")
    elif model_type in hf_gemma3.MODEL_TYPES:
        rows = hf_gemma3.gemma3_plan(config, hf_gemma3.text_prefix(tensors.files))
    else:
        rows = _plan(config, "transformer." if any(n.startswith("transformer.") for n in tensors.files) else "")

    plan = []  # checked row by row as generated: a typo such as num_hidden_layers=20000000 fails at the first
    for row in rows:  # missing tensor instead of listing a plan row for every layer (minutes and gigabytes)
        name, shape = row[0], row[1]
        if name not in tensors.files:
            raise HFImportError(f"tensor {name} is missing from {directory} (config.json implies shape {shape})")
        if tensors.shapes[name] != shape:
            raise HFImportError(
                f"tensor {name} has shape {tensors.shapes[name]} in {tensors.files[name].name}, but config.json "
                f"implies {shape} (hidden_size={config.d_model}, num_attention_heads={config.n_heads}, "
                f"kv heads={config.n_kv_heads}, head_dim={config.d_head}, ffn/intermediate_size={config.d_ff}, "
                f"vocab_size={config.vocab_size})"
            )
        plan.append(row)
    expected = {name for name, *_ in plan}
    tied_head = {"lm_head.weight"} if config.shared_embedding else set()
    extra = sorted(
        n
        for n in tensors.files
        if n not in (expected | tied_head)
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (model_type in hf_gemma3.MODEL_TYPES and hf_gemma3.ignored_tensor(n))
    )
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise HFImportError(f"tensors not used by this architecture (check config.json): {shown}")
    unsupported = sorted({tensors.dtypes[n] for n in expected} - set(TENSOR_DTYPES))
    if unsupported:
        raise HFImportError(f"unsupported tensor dtype(s) {unsupported}; supported: {sorted(TENSOR_DTYPES)}")

    tokenizer = next((directory / f for f in TOKENIZER_FILES if (directory / f).is_file()), None)
    if require_tokenizer and tokenizer is None:
        raise HFImportError(
            f"{directory} has no {' or '.join(TOKENIZER_FILES)}: copy the model's tokenizer files in, or convert with "
            "--no-tokenizer (text would then be encoded as raw bytes: prompts must be token ids, generate --tokens)"
        )
    if require_tokenizer:
        load_tokenizer(tokenizer)  # a damaged file fails here in one line (TokenizerError), not at every load

    source = "+".join(sorted({TENSOR_DTYPES[tensors.dtypes[n]] for n in expected}))
    # Read in bf16 only when bf16 is what is stored (or all the source holds); otherwise float32, exact for every
    # source dtype, so int8 is quantised by the caller from the source precision and FP16 is rounded only once.
    target = weights or ("f32" if source == "f32" else "bf16")
    dtype = ml_dtypes.bfloat16 if target == "bf16" or (target == "int8" and source == "bf16") else np.float32
    params = _empty_params(config, dtype)
    with progress_bar("reading tensors", "tensor", len(plan), disable=not progress, leave=False) as bar:
        for name, _, dest, layer in plan:
            # float16 -> float32 first (exact), then to the target: one rounding, never f16 -> bf16 directly.
            _place(params, dest, layer, tensors.get(name).astype(np.float32).astype(dtype), config)
            bar.update(1)
    return HFCheckpoint(config, params, source, tokenizer, len(plan), chat)


def _empty_params(config: ModelConfig, dtype: Any) -> Params:
    """Zeroed numpy arrays with the declared shapes of model/params.py (the structure the model reads)."""

    def build(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: build(v) for k, v in tree.items()}
        return np.zeros(tree.shape, dtype)

    return build(declare(config))
