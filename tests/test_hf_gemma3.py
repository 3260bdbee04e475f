"""Gemma 3 import (`model_type` gemma3_text; gemma3's text half) checked against transformers' Gemma3ForCausalLM
(tiny, random weights, float32), with real sliding-window attention.

Tiny models: 3 layers (sliding, full, sliding), a 4-token window, so the 8-token prompts and 32 generated tokens run
far past it; the two layer types rotate with different bases and query_pre_attn_scalar is not head_dim. Parity:
logits within 1e-4 relative (about 1e-6 seen) and 32 greedy tokens identical to transformers' `generate`, multi-query
tied and grouped-query untied, and with linear rope scaling on the global layers; the window, the local base and the
(1 + w) norms each move the logits (not no-ops); the parameter count is torch's; the gemma3-1b preset is what
google/gemma-3-1b-it's config.json maps to and has its 999,885,952 parameters; `meshserve convert` + `meshserve
generate` give transformers' tokens on one device and on the 2x2x2 mesh; a multimodal (gemma3) checkpoint's text
tensors import to the same model, vision tensors ignored. Refusals name the key or the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.hf_import import load_hf
from meshserve.model.params import param_count
from test_hf_import import (  # noqa: F401  (_torch_one_thread: an autouse fixture, active once imported)
    NEW_TOKENS,
    VOCAB,
    _cli,
    _convert_error,
    _edit_config,
    _torch_one_thread,
    assert_matches_transformers,
    prompts,
)
from test_hf_llama import hf_generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW = 4  # shorter than the 8-token prompts: every path crosses it


def make_gemma3(path: Path, *, kv_heads=1, tie=True, seed=4, rope_scaling=None, **extra):
    """Save a tiny Gemma3ForCausalLM whose greedy tokens vary: norms near their (1 + w) identity, the two post
    norms near 4 (so the layers outweigh the sqrt(E)-scaled embedding a tied head would echo back)."""
    full = {"rope_type": "default", "rope_theta": 500.0, **(rope_scaling or {})}
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
        query_pre_attn_scalar=12, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0}, "full_attention": full},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(3.0 if "post" in name else 0.0, 0.2)
            elif "embed" in name:
                p.normal_(0.0, 0.3)
            elif "lm_head" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 2.0 * p.shape[1] ** -0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "kv_heads,tie,rope_scaling",
    [(1, True, None), (2, False, None), (1, True, {"rope_type": "linear", "factor": 4.0})],
    ids=["mq-tied", "gqa-untied", "linear-rope-global"],
)
def test_logits_and_greedy_match_transformers(tmp_path, kv_heads, tie, rope_scaling):
    model = make_gemma3(tmp_path, kv_heads=kv_heads, tie=tie, rope_scaling=rope_scaling)
    imported = load_hf(tmp_path)
    c = imported.config
    assert (c.mlp, c.qk_norm, c.norm_scale_offset, c.post_norms, c.scale_embed, c.parallel_block) == (
        "geglu", True, True, True, True, False,
    )  # fmt: skip
    assert (c.sliding_window, c.global_layers, c.layer_windows) == (WINDOW, (1,), (WINDOW, 0, WINDOW))
    assert (c.rope_base, c.local_rope_base, c.attn_scale) == (500.0, 50.0, 12**-0.5)
    assert c.rope_scaling == ((4.0,) if rope_scaling else ()) and c.max_seq_len == 64
    assert (c.n_kv_heads, c.shared_embedding, c.bos_id, c.eos_id) == (kv_heads, tie, 1, 2)
    assert imported.n_tensors == len(model.state_dict()) - tie
    assert param_count(c) == sum(p.numel() for p in model.parameters())
    assert_matches_transformers(model, imported, f"gemma3 K={kv_heads} tie={tie} rope={rope_scaling}", hf_generate)


def test_the_window_the_local_base_and_the_norm_offset_move_the_logits(tmp_path):
    """Each Gemma switch changes the logits of the same weights: the parity above is not vacuous."""
    make_gemma3(tmp_path)
    imported = load_hf(tmp_path)
    params = jax.tree.map(jnp.asarray, imported.params)
    tokens, lengths = jnp.asarray(prompts(), jnp.int32), jnp.full((2,), prompts().shape[1], jnp.int32)
    want = transformer.prefill(params, imported.config, tokens, lengths, all_logits=True)[0]
    for change in (dict(sliding_window=0, global_layers=()), dict(local_rope_base=0.0), dict(norm_scale_offset=False)):
        got = transformer.prefill(params, imported.config.replace(**change), tokens, lengths, all_logits=True)[0]
        assert float(jnp.max(jnp.abs(got - want))) > 0.05 * float(jnp.max(jnp.abs(want))), change
    # Within the window a layer is plain causal: the first WINDOW positions are those of a window past the prompt.
    wide = transformer.prefill(params, imported.config.replace(sliding_window=64), tokens, lengths, all_logits=True)[0]
    np.testing.assert_array_equal(np.asarray(wide[:, :WINDOW]), np.asarray(want[:, :WINDOW]))
    assert not np.allclose(np.asarray(wide[:, WINDOW:]), np.asarray(want[:, WINDOW:]))


# google/gemma-3-1b-it's config.json as published (transformers 4.50 keys).
GEMMA3_1B_IT = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 262144,
}  # fmt: skip


def test_the_gemma3_1b_preset_is_the_published_config_and_its_size(tmp_path):
    """The preset equals what the published config.json maps to (name aside), and its parameter count is the
    model card's 1B: 999,885,952 (embedding 262,144 x 1,152 = 301,989,888, plus 26 layers of 26,842,112: q 1152 x
    1024, k and v 1152 x 256 each, o 1024 x 1152, gate/up/down 3 x 1152 x 6912, four norms of 1152 and two of 256,
    plus the final norm's 1,152)."""
    from meshserve.model.model_spec import resolve_model

    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B_IT))
    preset = get_config("gemma3-1b")
    assert resolve_model(str(tmp_path)).replace(name="gemma3-1b") == preset
    assert preset.layer_windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(26))
    layer = 1152 * 1024 + 2 * 1152 * 256 + 1024 * 1152 + 3 * 1152 * 6912 + 4 * 1152 + 2 * 256
    assert param_count(preset) == 262_144 * 1152 + 26 * layer + 1152 == 999_885_952
    # transformers' own count of the same shapes (meta device: no memory)
    with torch.device("meta"):
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_1B_IT))
    assert sum(p.numel() for p in hf.parameters()) == 999_885_952


def test_a_converted_gemma3_generates_the_same_tokens_on_a_mesh(tmp_path):
    """`meshserve convert` keeps the window and the Gemma switches in meshserve.json; `meshserve generate` on one
    device and on the 2x2x2 mesh gives transformers' greedy tokens, 32 of them past the 4-token window."""
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    model = make_gemma3(hf, kv_heads=2, tie=False)
    converted = _cli("convert", "--from-hf", str(hf), "--out", str(ckpt), "--no-tokenizer")
    assert converted.returncode == 0, converted.stderr
    saved = json.loads((ckpt / "meshserve.json").read_text())["model"]
    assert (saved["sliding_window"], saved["global_layers"], saved["mlp"]) == (WINDOW, [1], "geglu")
    prompt = list(prompts()[0])
    expected = hf_generate(model, prompt, NEW_TOKENS)
    assert len(set(expected)) > 3
    args = ["--json", "--ignore-eos", "--max-new-tokens", str(NEW_TOKENS), "--tokens", ",".join(map(str, prompt))]
    for mesh in ([], ["--mesh", "2x2x2"]):
        gen = _cli("generate", "--checkpoint", str(ckpt), *mesh, *args)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout.splitlines()[0])["tokens"] == expected, mesh


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_a_multimodal_checkpoint_imports_its_text_model(tmp_path, prefix):
    """A gemma3 config.json (text_config inside) with the text tensors under the multimodal prefix and vision
    tensors beside them imports to the text model's params exactly."""
    from safetensors.numpy import load_file, save_file

    text, mm = tmp_path / "text", tmp_path / "mm"
    make_gemma3(text)
    want = load_hf(text)
    mm.mkdir()
    text_config = json.loads((text / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config,
                                                "vision_config": {"model_type": "siglip_vision_model"}}))  # fmt: skip
    tensors = {prefix + k.removeprefix("model."): v for k, v in load_file(text / "model.safetensors").items()}
    tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((4, 32), np.float32)
    save_file(tensors, mm / "model.safetensors")
    got = load_hf(mm)
    assert got.config.replace(name=want.config.name) == want.config
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def test_refusals_name_the_key_or_the_tensor(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    hf, out = tmp_path / "hf", tmp_path / "out"
    make_gemma3(hf)
    pristine = (hf / "config.json").read_text()
    rope = json.loads(pristine)["rope_parameters"]
    for change, named in (
        ({"final_logit_softcapping": 30.0}, "config.json final_logit_softcapping=30.0"),
        ({"attn_logit_softcapping": 50.0}, "config.json attn_logit_softcapping=50.0"),
        ({"hidden_activation": "gelu"}, 'config.json hidden_activation="gelu"'),
        ({"use_bidirectional_attention": True}, "config.json use_bidirectional_attention=true"),
        ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "config.json layer_types"),
        ({"rope_parameters": {**rope, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 9.0}}},
         "rope_parameters.sliding_attention.rope_type"),
        ({"rope_parameters": {**rope, "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 9.0}}},
         'rope_parameters.full_attention.rope_type="yarn"'),
        ({"sliding_window": 0}, "config.json sliding_window=0"),
    ):  # fmt: skip
        (hf / "config.json").write_text(pristine)
        _edit_config(hf, **change)
        err = _convert_error(capsys, hf, out)
        assert named in err and "unsupported" in err, (change, err)
    (hf / "config.json").write_text(pristine)
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.2.post_feedforward_layernorm.weight"]
    save_file(tensors, hf / "model.safetensors")
    err = _convert_error(capsys, hf, out)
    assert "tensor model.layers.2.post_feedforward_layernorm.weight is missing" in err, err
