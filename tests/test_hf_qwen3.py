"""Qwen3 import (`model_type` qwen3: Llama's block plus an RMSNorm over each head's q and k before RoPE) checked
against transformers' Qwen3ForCausalLM (tiny, random weights, float32).

Parity: logits within 1e-4 relative and 32 greedy tokens identical to transformers' `generate`, grouped-query and
multi-query, tied and untied, with a head_dim that is not hidden_size / heads (as Qwen3-0.6B's 128 x 16 heads over
1024); the parameter count equals torch's; the q/k norm weights are what moves the logits (not a no-op); a saved
checkpoint loads back with qk_norm and generates the same tokens on one device and on the 2x2x2 mesh. Refusals:
attention_bias (q, k, v and o biases without MLP biases) and a missing q_norm tensor, each named.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.hf_import import load_hf
from meshserve.model.params import param_count
from test_hf_import import (  # noqa: F401  (_torch_one_thread: an autouse fixture, active once imported)
    NEW_TOKENS,
    _cli,
    _convert_error,
    _edit_config,
    _torch_one_thread,
    assert_matches_transformers,
    prompts,
)
from test_hf_llama import hf_generate, make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "kv_heads,tie,head_dim", [(1, True, 16), (2, False, 8)], ids=["mq-tied-wide-heads", "gqa-untied"]
)
def test_logits_and_greedy_match_transformers(tmp_path, kv_heads, tie, head_dim):
    model = make_model(tmp_path, "qwen3", kv_heads=kv_heads, tie=tie, head_dim=head_dim)
    imported = load_hf(tmp_path)
    config = imported.config
    assert config.qk_norm and not config.qkv_bias and not config.linear_bias
    assert (config.n_heads, config.n_kv_heads, config.d_head, config.shared_embedding) == (4, kv_heads, head_dim, tie)
    assert config.bos_id is None and config.eos_id == 2  # Qwen's tokenizers prepend nothing
    assert imported.n_tensors == len(model.state_dict()) - tie
    assert param_count(config) == sum(p.numel() for p in model.parameters())
    q_norm = model.model.layers[1].self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_array_equal(imported.params["layers"]["q_norm"]["scale"][1], q_norm)
    assert_matches_transformers(model, imported, f"qwen3, K={kv_heads}, tie={tie}, Q={head_dim}", hf_generate)


def test_the_qk_norms_move_the_logits(tmp_path):
    """Without its q/k norms the same weights give other logits: the parity above is not vacuous."""
    make_model(tmp_path, "qwen3")
    imported = load_hf(tmp_path)
    params = jax.tree.map(jnp.asarray, imported.params)
    tokens, lengths = jnp.asarray(prompts(), jnp.int32), jnp.full((2,), len(prompts()[0]), jnp.int32)
    want = transformer.prefill(params, imported.config, tokens, lengths, all_logits=True)[0]
    layers = {k: v for k, v in params["layers"].items() if k not in ("q_norm", "k_norm")}
    plain = imported.config.replace(qk_norm=False)
    got = transformer.prefill({**params, "layers": layers}, plain, tokens, lengths, all_logits=True)[0]
    assert float(jnp.max(jnp.abs(got - want))) > 0.1 * float(jnp.max(jnp.abs(want)))


def test_a_converted_qwen3_generates_the_same_tokens_on_a_mesh(tmp_path):
    """`meshserve convert` writes qk_norm into meshserve.json; `meshserve generate` on one device and on the 2x2x2
    mesh (4 kv heads over ws2d's y·z) gives transformers' greedy tokens."""
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    model = make_model(hf, "qwen3", kv_heads=4)
    converted = _cli("convert", "--from-hf", str(hf), "--out", str(ckpt), "--no-tokenizer")
    assert converted.returncode == 0, converted.stderr
    assert json.loads((ckpt / "meshserve.json").read_text())["model"]["qk_norm"] is True
    prompt = list(prompts()[0])
    expected = hf_generate(model, prompt, NEW_TOKENS)
    args = ["--json", "--ignore-eos", "--max-new-tokens", str(NEW_TOKENS), "--tokens", ",".join(map(str, prompt))]
    for mesh in ([], ["--mesh", "2x2x2"]):
        gen = _cli("generate", "--checkpoint", str(ckpt), *mesh, *args)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout.splitlines()[0])["tokens"] == expected, mesh


def test_refusals_name_the_key_or_the_tensor(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    hf, out = tmp_path / "hf", tmp_path / "out"
    make_model(hf, "qwen3")  # no head_dim given: Qwen3Config's 128
    pristine = (hf / "config.json").read_text()
    _edit_config(hf, attention_bias=True)
    err = _convert_error(capsys, hf, out)
    assert "config.json attention_bias" in err and "unsupported" in err, err
    (hf / "config.json").write_text(pristine)
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, hf / "model.safetensors")
    err = _convert_error(capsys, hf, out)
    # Qwen3Config's head_dim defaults to 128, not hidden_size / heads: the shape named is (128,).
    assert "tensor model.layers.1.self_attn.k_norm.weight is missing" in err and "(128,)" in err, err
    assert not out.exists()  # nothing half-written
    # A Qwen2 config over Qwen3 tensors: the norms are extra tensors, named.
    tensors["model.layers.1.self_attn.k_norm.weight"] = tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, hf / "model.safetensors")
    _edit_config(hf, model_type="qwen2", attention_bias=False)
    err = _convert_error(capsys, hf, out)
    assert "q_proj.bias is missing" in err, err


def test_a_qwen3_config_json_for_analytics(tmp_path):
    """`--model DIR` (analyze, plan, memory) reads a Qwen3 config.json: qk_norm, and head_dim 128 when the file
    leaves it out (Qwen3Config's default, not hidden_size / heads); the parameter count is torch's."""
    from meshserve.model.model_spec import resolve_model

    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("head_dim")
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = resolve_model(str(tmp_path))
    assert (config.qk_norm, config.d_head, config.n_kv_heads, config.bos_id) == (True, 128, 2, None)
    assert param_count(config) == sum(p.numel() for p in transformers.Qwen3ForCausalLM(cfg).parameters())
