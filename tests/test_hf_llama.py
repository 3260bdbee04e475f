"""Llama / Mistral / Qwen2 import checked against transformers' own models (tiny, random weights, float32).

Parity: logits within 1e-4 relative and 32 greedy tokens identical to transformers' `generate`, for grouped-query and
multi-head attention, tied and untied embeddings, Qwen2's q/k/v biases, a Mistral sliding window (4 tokens, computed:
prompts and greedy tokens run past it) and a sharded save with an index file; the same through `meshserve convert` and `meshserve generate` in
subprocesses with a tokenizer that prepends BOS. Refusals: exit 2 and one line naming the config.json key or tensor.
On the 2x2x2 mesh: `meshserve generate` and `meshserve serve` give the one-device tokens (serial block, rope
scaling); 2 kv heads on a heads split of 4 are replicated at load and give the one-device tokens too.
Helpers (thread pinning, prompts, greedy reference, CLI runners) come from test_hf_import.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.checkpoint import read_checkpoint_info
from meshserve.model.generate import generate
from meshserve.model.hf_import import load_hf
from test_hf_import import (  # noqa: F401  (_torch_one_thread: an autouse fixture, active once imported)
    NEW_TOKENS,
    PROMPT_LEN,
    RTOL,
    VOCAB,
    _cli,
    _convert_error,
    _edit_config,
    _torch_one_thread,
    assert_matches_transformers,
    hf_greedy,
    peak_and_save,
    prompts,
    rel_error,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),  # tests/test_hf_qwen3.py
}


def make_model(
    path: Path, family: str, *, kv_heads=2, tie=False, shard=False, dtype=None, rope=None, positions=64, **extra
):
    """Save a tiny transformers model of `family` with weights scaled so logits are peaked (greedy tokens vary)."""
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        # rope_theta not 10k: the base must be carried over
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, **(rope or {})},
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(sum(map(ord, family)) + 10 * kv_heads + tie)  # not hash(): str hashes vary per process
    model = model_cls(config).eval()
    return peak_and_save(model, path, ("norm",), "embed_tokens", dtype=dtype, shard=shard)


def hf_generate(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' `generate`: greedy, its KV cache, no early stop at eos."""
    ids = torch.tensor([prompt])
    with (
        torch.no_grad()
    ):  # an explicit mask: without one, generate takes prompt tokens equal to pad_token_id as padding
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "family,kv_heads,tie,shard,extra",
    [
        ("llama", 2, False, True, {}),
        ("llama", 4, True, False, {}),
        ("mistral", 1, False, False, {"sliding_window": 4}),
        ("qwen2", 2, True, False, {}),
    ],
    ids=["llama-gqa-untied-sharded", "llama-mha-tied", "mistral-mq-window", "qwen2-gqa-tied-qkv-bias"],
)
def test_logits_and_greedy_match_transformers(tmp_path, family, kv_heads, tie, shard, extra):
    model = make_model(tmp_path, family, kv_heads=kv_heads, tie=tie, shard=shard, **extra)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    imported = load_hf(tmp_path)
    config = imported.config
    assert (config.n_heads, config.n_kv_heads, config.d_head, config.shared_embedding) == (4, kv_heads, 8, tie)
    assert (config.parallel_block, config.mlp, config.norm, config.rope_base) == (False, "swiglu", "rmsnorm", 500.0)
    assert config.qkv_bias == (family == "qwen2") and not config.linear_bias
    # Mistral's 4-token window is computed (every layer; the 8-token prompts and 32 new tokens run past it), so the
    # context stays the 64 positions; Qwen2's tokenizers prepend no BOS.
    assert config.max_seq_len == 64 and config.sliding_window == extra.get("sliding_window", 0)
    assert config.global_layers == ()
    assert (config.bos_id, config.eos_id) == (None if family == "qwen2" else 1, 2)
    assert imported.source_dtype == "f32" and imported.n_tensors == len(model.state_dict()) - tie
    assert_matches_transformers(model, imported, f"{family}, K={kv_heads}, tie={tie}", hf_generate)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1's rope scaling with original_max_position_embeddings=64, so the 4 frequencies of head_dim 8 fall in
    all three bands (kept, blended, stretched by `factor`), and a 100-token prompt runs past the original length."""
    from meshserve.model.layers import rope_frequencies

    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = make_model(tmp_path, "llama", rope={"rope_type": "llama3", **llama3}, positions=256)
    config = load_hf(tmp_path).config
    assert config.rope_scaling == (8.0, 1.0, 4.0, 64.0)
    scaled, plain = np.asarray(rope_frequencies(4, 500.0, config.rope_scaling)), np.asarray(rope_frequencies(4, 500.0))
    np.testing.assert_allclose(scaled, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert scaled[0] == plain[0] and plain[1] / 8 < scaled[1] < plain[1] and np.allclose(scaled[2:], plain[2:] / 8)
    # The Hub's Llama 3.1 config.json form (transformers 4.x keys): rope_scaling plus a top-level rope_theta.
    data = json.loads((tmp_path / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_hf(tmp_path).config == config

    params = jax.tree.map(jnp.asarray, load_hf(tmp_path).params)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 100))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _, _ = transformer.prefill(
        params, config, jnp.asarray(tokens, jnp.int32), jnp.full((2,), 100, jnp.int32), all_logits=True
    )
    err = rel_error(np.asarray(ours), ref)
    print(f"max relative logits error (llama3 rope scaling, 100 tokens): {err:.2e}")
    assert err < RTOL
    row = list(prompts()[0])
    [result] = generate(params, config, [row], max_new_tokens=NEW_TOKENS)
    assert result.tokens == hf_generate(model, row, NEW_TOKENS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_sources_map_each_projection_exactly(tmp_path, dtype):
    model = make_model(tmp_path, "qwen2", dtype=getattr(torch, dtype))
    imported = load_hf(tmp_path, "f32")  # float32: every 16-bit value exactly
    assert imported.source_dtype == {"bfloat16": "bf16", "float16": "f16"}[dtype]
    attn = model.model.layers[1].self_attn
    layer = {k: v[1] for k, v in imported.params["layers"].items() if not isinstance(v, dict)}

    def t(x):
        return x.detach().float().numpy()

    # torch Linear [heads*Q, E] -> [E, heads, Q]; o_proj [E, H*Q] -> [H, Q, E]; biases [heads*Q] -> [heads, Q].
    np.testing.assert_array_equal(layer["wq"], t(attn.q_proj.weight).T.reshape(32, 4, 8))
    np.testing.assert_array_equal(layer["wk"], t(attn.k_proj.weight).T.reshape(32, 2, 8))
    np.testing.assert_array_equal(layer["wo"], t(attn.o_proj.weight).T.reshape(4, 8, 32))
    np.testing.assert_array_equal(layer["bv"], t(attn.v_proj.bias).reshape(2, 8))
    np.testing.assert_array_equal(layer["w_gate"], t(model.model.layers[1].mlp.gate_proj.weight).T)
    assert "bo" not in layer and "b_up" not in layer  # Qwen2: no o or MLP biases


def _word_tokenizer(path: Path, *, adds_bos: bool) -> None:
    """A word-level tokenizer.json whose ids are the model's (<unk> 0, <s> 1, </s> 2, w3 ... w95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:  # as Llama's tokenizer.json: "<s> $A"
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))


def test_bos_kept_only_when_the_tokenizer_prepends_it(tmp_path):
    make_model(tmp_path, "llama")
    _word_tokenizer(tmp_path, adds_bos=False)
    assert load_hf(tmp_path).config.bos_id is None
    _word_tokenizer(tmp_path, adds_bos=True)
    assert load_hf(tmp_path).config.bos_id == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))  # transformers obeys it
    assert load_hf(tmp_path).config.bos_id is None


def test_cli_convert_then_generate_text_with_bos(tmp_path):
    from tokenizers import Tokenizer

    hf, out = tmp_path / "hf", tmp_path / "ckpt"
    model = make_model(hf, "llama", shard=True)
    _word_tokenizer(hf, adds_bos=True)
    convert = _cli("convert", "--from-hf", str(hf), "--out", str(out), "--json")
    assert convert.returncode == 0, convert.stderr
    summary = json.loads(convert.stdout)
    assert summary["weights"] == "f32" and summary["tokenizer"] == "tokenizer.json"
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert read_checkpoint_info(out).config.bos_id == 1

    text = "w5 w17 w40 w9 w77 w3 w61"
    expected_ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids  # transformers' encoding
    assert expected_ids[0] == 1
    args = ["generate", "--checkpoint", str(out), "--json", "--ignore-eos", "--max-new-tokens", str(NEW_TOKENS), text]
    gen = _cli(*args)
    assert gen.returncode == 0, gen.stderr
    line = json.loads(gen.stdout.splitlines()[0])
    assert line["tokens"] == hf_greedy(model, expected_ids, NEW_TOKENS)


def test_refusals_are_one_line_naming_the_key(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    hf, out = tmp_path / "hf", tmp_path / "out"
    make_model(hf, "llama")
    pristine = (hf / "config.json").read_text()
    for key, value in [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0}),
        ("model_type", "gpt2"),
        ("hidden_act", "gelu"),
        ("attention_bias", True),  # without mlp_bias
        ("mlp_bias", True),  # without attention_bias
    ]:
        _edit_config(hf, **{key: value})
        err = _convert_error(capsys, hf, out)
        assert f"config.json {key}" in err and "unsupported" in err, err
        (hf / "config.json").write_text(pristine)
    _edit_config(hf, model_type="qwen2", use_sliding_window=True, sliding_window=0)
    assert "config.json sliding_window=0" in _convert_error(capsys, hf, out)
    (hf / "config.json").write_text(pristine)

    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf / "model.safetensors")
    err = _convert_error(capsys, hf, out)
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in err and "(64, 32)" in err, err
    # Qwen2 needs q/k/v biases a Llama checkpoint lacks: the first missing one is named.
    _edit_config(hf, model_type="qwen2")
    assert "tensor model.layers.0.self_attn.q_proj.bias is missing" in _convert_error(capsys, hf, out)
    # Through the real entry point: exit 2 and one line.
    result = _cli("convert", "--from-hf", str(hf), "--out", str(out))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "q_proj.bias" in result.stderr


def test_every_eos_id_of_a_llama3_style_list_ends_generation(tmp_path):
    """Llama 3 lists several eos ids (eos_token_id: [128001, 128008, 128009]; chats end on <|eot_id|>, not the
    first): the first is the config's eos_id, the others extra_eos_ids, and each stops generation."""
    from meshserve.model.checkpoint import save_checkpoint
    from meshserve.model.loading import load_model

    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    model = make_model(hf, "llama")
    prompt = list(prompts()[0])
    greedy = hf_generate(model, prompt, NEW_TOKENS)
    at = next(i for i in range(3, NEW_TOKENS) if greedy[i] not in greedy[:i] and greedy[i] != 2)  # first at i
    meta = json.loads((hf / "config.json").read_text())
    meta["eos_token_id"] = [2, greedy[at], 3]
    (hf / "config.json").write_text(json.dumps(meta))
    imported = load_hf(hf)
    assert (imported.config.eos_id, imported.config.extra_eos_ids) == (2, (greedy[at], 3))
    save_checkpoint(ckpt, imported.config, imported.params, "f32")
    loaded = load_model(ckpt)
    assert loaded.config.extra_eos_ids == (greedy[at], 3)  # through meshserve.json (a list there)
    assert loaded.stop_ids() == [2, greedy[at], 3]
    result = generate(loaded.params, loaded.config, [prompt], max_new_tokens=NEW_TOKENS, stop_ids=loaded.stop_ids())
    assert result[0].tokens == greedy[: at + 1] and result[0].finish_reason == "stop"


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # fmt: skip


def _llama_checkpoint(tmp_path: Path, kv_heads: int):
    """A converted tiny Llama 3.1 (serial block, rope scaling from 16 positions on): (transformers model, path)."""
    from meshserve.model.checkpoint import save_checkpoint

    model = make_model(tmp_path / "hf", "llama", kv_heads=kv_heads, rope=LLAMA31_ROPE)
    imported = load_hf(tmp_path / "hf")
    save_checkpoint(tmp_path / "ckpt", imported.config, imported.params, "f32")
    return model, imported, tmp_path / "ckpt"


def test_a_llama_checkpoint_runs_on_a_mesh(tmp_path):
    """The serial block on the 2x2x2 mesh (4 kv heads split over ws2d's y·z = 4; rope scaling past position 16):
    `meshserve generate --mesh 2x2x2` gives the one-device tokens (= transformers' greedy ones), and `meshserve
    serve --mesh 2x2x2` starts and answers a request with them too."""
    from meshserve.serving.client import Client
    from test_serving_support import ServerProcess

    model, imported, ckpt = _llama_checkpoint(tmp_path, kv_heads=4)
    assert not imported.config.parallel_block and imported.config.rope_scaling
    prompt = list(prompts()[0]) * 3  # 24 tokens: with 32 new ones, positions run past the original 16
    expected = hf_generate(model, prompt, NEW_TOKENS)
    params = jax.tree.map(jnp.asarray, imported.params)
    assert generate(params, imported.config, [prompt], max_new_tokens=NEW_TOKENS)[0].tokens == expected
    assert len(set(expected)) > 3  # not a degenerate repeat of one token

    args = ["--json", "--ignore-eos", "--max-new-tokens", str(NEW_TOKENS), "--tokens", ",".join(map(str, prompt))]
    gen = _cli("generate", "--checkpoint", str(ckpt), "--mesh", "2x2x2", *args)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.splitlines()[0])["tokens"] == expected

    server = ServerProcess(ckpt, "--mesh", "2x2x2")
    try:
        with Client(server.target) as client:
            client.wait_ready()
            reply = client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert reply.tokens == expected
    finally:
        server.close()


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_kv_heads_the_mesh_does_not_divide_are_replicated(tmp_path, command):
    """2 kv heads over ws2d's heads split of y·z = 4 chips (2x2x2), once refused, are repeated twice at load for
    the mesh (model.sharded_specs.replicate_for_mesh; serve via the plan, generate via generate_sharded): both
    commands give the one-device greedy tokens."""
    _, imported, ckpt = _llama_checkpoint(tmp_path, kv_heads=2)
    prompt = list(prompts()[0])
    params = jax.tree.map(jnp.asarray, imported.params)
    expected = generate(params, imported.config, [prompt], max_new_tokens=8)[0].tokens
    if command == "generate":
        args = ["--json", "--ignore-eos", "--max-new-tokens", "8", "--tokens", ",".join(map(str, prompt))]
        gen = _cli("generate", "--checkpoint", str(ckpt), "--mesh", "2x2x2", *args)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout.splitlines()[0])["tokens"] == expected
        return
    from meshserve.serving.client import Client
    from test_serving_support import ServerProcess

    server = ServerProcess(ckpt, "--mesh", "2x2x2", "--max-batch", "2", "--length-buckets", "16")
    try:
        with Client(server.target) as client:
            client.wait_ready()
            reply = client.generate(prompt, max_new_tokens=8, ignore_eos=True)
        assert reply.tokens == expected
    finally:
        server.close()
