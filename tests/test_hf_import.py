"""Falcon import checked against transformers' own FalconForCausalLM (tiny, random weights, float32).

Parity: logits within 1e-4 relative and 32 greedy tokens identical, for multi-query and multi-head,
parallel and serial blocks, biases and a separate lm_head; also through `meshserve convert` and
`meshserve generate` in subprocesses on a sharded (index file) save. Bad input: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import transformer
from meshserve.model.checkpoint import load_checkpoint, read_checkpoint_info
from meshserve.model.generate import generate
from meshserve.model.hf_import import HFImportError, load_hf
from meshserve.model.quant import QuantizedArray
from meshserve.serving.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PROMPT_LEN, NEW_TOKENS = 96, 8, 32
RTOL = 1e-4  # the parity bar: max |ours - transformers| / max |transformers| in float32


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch's default thread pool oversubscribes a 2-core CI box (64 tiny forwards: 4 s -> 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_falcon(path: Path, *, multi_query=True, parallel=True, bias=False, tie=True, shard=False, dtype=None):
    """Save a tiny FalconForCausalLM with weights scaled so logits are peaked (greedy tokens vary)."""
    config = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=64,
        multi_query=multi_query,
        parallel_attn=parallel,
        bias=bias,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},  # not 10k: the base must be carried over
    )
    torch.manual_seed(hash((multi_query, parallel, bias, tie)) % 1000)
    model = transformers.FalconForCausalLM(config).eval()
    return peak_and_save(model, path, ("layernorm", "ln_f"), "embeddings", dtype=dtype, shard=shard)


def peak_and_save(model, path: Path, norms: tuple[str, ...], embedding: str, *, dtype=None, shard=False):
    """Scale a tiny random transformers model's weights so its logits are peaked (greedy tokens vary), then
    save_pretrained it (in 16 KB shards with an index file when `shard`). Parameters whose name contains one of
    `norms` are norm scales near 1 (their biases near 0); `embedding` names the input embedding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in norms):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif embedding in name:
                p.normal_(0.0, 0.3)
            elif "lm_head" in name:
                p.normal_(0.0, 1.0)
            else:  # 2/sqrt(fan_in): layers outweigh the embedding, so greedy decoding does not just repeat a token
                p.normal_(0.0, 2.0 * p.shape[1] ** -0.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": "16KB"} if shard else {}))
    return model


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (no cache, no eos stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def prompts() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, (2, PROMPT_LEN))


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    "multi_query,parallel,bias,tie",
    [(True, True, False, True), (True, False, False, True), (False, True, False, True), (False, False, True, False)],
    ids=["mq-parallel", "mq-serial", "mh-parallel", "mh-serial-bias-untied"],
)
def test_logits_and_greedy_match_transformers(tmp_path, multi_query, parallel, bias, tie):
    model = make_falcon(tmp_path, multi_query=multi_query, parallel=parallel, bias=bias, tie=tie)
    imported = load_hf(tmp_path)
    config = imported.config
    assert (config.n_kv_heads == 1) == multi_query and config.parallel_block == parallel
    assert config.linear_bias == bias and config.shared_embedding == tie and config.rope_base == 500.0
    assert imported.source_dtype == "f32" and imported.n_tensors == len(model.state_dict()) - tie
    assert_matches_transformers(model, imported, config.name, hf_greedy)


def assert_matches_transformers(model, imported, label: str, greedy) -> None:
    """The imported model's logits on prompts() within RTOL of transformers' `model`, and NEW_TOKENS greedy tokens
    equal to `greedy(model, prompt, steps)` (transformers' own continuation)."""
    config, params = imported.config, jax.tree.map(jnp.asarray, imported.params)
    tokens = prompts()
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _, _ = transformer.prefill(
        params, config, jnp.asarray(tokens, jnp.int32), jnp.full((2,), PROMPT_LEN, jnp.int32), all_logits=True
    )
    err = rel_error(np.asarray(ours), ref)
    print(f"max relative logits error ({label}): {err:.2e}")
    assert err < RTOL
    assert np.abs(ref).max() > 1.0  # peaked logits, so argmax is a meaningful comparison

    results = generate(params, config, [list(t) for t in tokens], max_new_tokens=NEW_TOKENS)
    for row, result in zip(tokens, results, strict=True):
        expected = greedy(model, list(row), NEW_TOKENS)
        assert len(set(expected)) > 3  # not a degenerate repeat of one token
        assert result.tokens == expected


def test_bf16_safetensors_read_exactly(tmp_path):
    model = make_falcon(tmp_path, dtype=torch.bfloat16)
    imported = load_hf(tmp_path)
    assert imported.source_dtype == "bf16"
    embed = imported.params["embed"]
    assert embed.dtype.name == "bfloat16"
    np.testing.assert_array_equal(
        embed.astype(np.float32), model.transformer.word_embeddings.weight.float().detach().numpy()
    )
    assert load_hf(tmp_path, "f32").params["embed"].dtype == np.float32


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "meshserve.serving.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_convert_sharded_then_generate(tmp_path):
    from tokenizers import Tokenizer, models

    hf = tmp_path / "hf"
    model = make_falcon(hf, shard=True)
    assert (hf / "model.safetensors.index.json").exists() and len(list(hf.glob("*.safetensors"))) > 1
    # A word-level tokenizer.json whose ids are the model's ids, to check it travels with the checkpoint.
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")).save(str(hf / "tokenizer.json"))
    out = tmp_path / "ckpt"

    convert = _cli("convert", "--from-hf", str(hf), "--out", str(out), "--json")
    assert convert.returncode == 0, convert.stderr
    summary = json.loads(convert.stdout)
    assert summary["weights"] == "f32" and summary["tokenizer"] == "tokenizer.json"
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert read_checkpoint_info(out).weights == "f32" and (out / "tokenizer.json").exists()

    tokens = prompts()
    args = ["generate", "--checkpoint", str(out), "--weights", "f32", "--json", "--ignore-eos"]
    args += ["--max-new-tokens", str(NEW_TOKENS)] + [a for row in tokens for a in ("--tokens", ",".join(map(str, row)))]
    gen = _cli(*args)
    assert gen.returncode == 0, gen.stderr
    lines = [json.loads(line) for line in gen.stdout.splitlines()]
    assert len(lines) == 2
    for row, line in zip(tokens, lines, strict=True):
        assert line["tokens"] == hf_greedy(model, list(row), NEW_TOKENS)
        assert line["text"] == " ".join(f"w{i}" for i in line["tokens"])

    # Quantise at convert time: int8 stored, close to the f32 model.
    q_out = tmp_path / "ckpt-int8"
    assert main(["convert", "--checkpoint", str(out), "--out", str(q_out), "--weights", "int8"]) == 0
    info, params = load_checkpoint(q_out)
    assert info.weights == "int8" and isinstance(params["layers"]["wq"], QuantizedArray)
    assert (q_out / "tokenizer.json").exists()
    ours, _, _ = transformer.prefill(
        params, info.config, jnp.asarray(tokens, jnp.int32), jnp.full((2,), PROMPT_LEN, jnp.int32), all_logits=True
    )
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert rel_error(np.asarray(ours, np.float32), ref) < 0.05


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    result = _cli("convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not found" in result.stderr and not (tmp_path / "out").exists()


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _convert_error(capsys, hf: Path, out: Path, *extra: str) -> str:
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshserve convert: error: ") and "\n" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))  # nothing half-written
    return err


def test_bad_input(tmp_path, capsys):
    hf = tmp_path / "hf"
    make_falcon(hf)
    out = tmp_path / "out"
    pristine = {p.name: p.read_bytes() for p in hf.iterdir()}

    def reset() -> None:
        for p in hf.iterdir():
            p.unlink()
        for name, data in pristine.items():
            (hf / name).write_bytes(data)

    assert "no config.json" in _convert_error(capsys, tmp_path, out)
    (hf / "config.json").write_text("{not json")
    err = _convert_error(capsys, hf, out)
    assert "cannot read" in err and "config.json" in err
    reset()
    for key, value in [
        ("alibi", True),
        ("new_decoder_architecture", True),
        ("activation", "relu"),
        ("model_type", "gpt2"),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0}),
    ]:
        _edit_config(hf, **{key: value})
        err = _convert_error(capsys, hf, out)
        assert f"config.json {key}" in err and "unsupported" in err, err
        reset()
    # A config that does not match the weights names the tensor and both shapes.
    _edit_config(hf, ffn_hidden_size=48)
    err = _convert_error(capsys, hf, out)
    assert "transformer.h.0.mlp.dense_h_to_4h.weight" in err and "(64, 32)" in err and "(48, 32)" in err, err
    reset()
    _edit_config(hf, parallel_attn=False)  # serial needs post_attention_layernorm, which is absent
    assert "post_attention_layernorm" in _convert_error(capsys, hf, out)
    reset()
    _edit_config(hf, num_hidden_layers=1)  # layer 1's tensors left over
    assert "not used by this architecture" in _convert_error(capsys, hf, out)
    reset()

    weights = hf / "model.safetensors"
    weights.write_bytes(pristine["model.safetensors"][: len(pristine["model.safetensors"]) // 2])
    assert "cannot read safetensors file" in _convert_error(capsys, hf, out)
    weights.write_bytes(b"\x00" * 64)
    assert "cannot read safetensors file" in _convert_error(capsys, hf, out)
    weights.unlink()
    assert "no *.safetensors" in _convert_error(capsys, hf, out)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    assert "model-00001.safetensors" in _convert_error(capsys, hf, out)
    reset()

    # An existing --out is refused (and kept) unless --force, and --force replaces only a meshserve checkpoint.
    out.mkdir()
    (out / "keep").write_text("mine")
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep").read_text() == "mine"
    assert main(["convert", "--from-hf", str(hf), "--out", str(out), "--force"]) == 2
    assert "not a meshserve checkpoint" in capsys.readouterr().err and (out / "keep").read_text() == "mine"
    (out / "keep").unlink()
    out.rmdir()
    # No tokenizer: refused (text would be encoded as raw bytes), unless --no-tokenizer.
    assert "no tokenizer.json or tokenizer.model" in _convert_error(capsys, hf, out)
    assert main(["convert", "--from-hf", str(hf), "--out", str(out), "--weights", "f32", "--no-tokenizer"]) == 0
    assert (
        main(["convert", "--from-hf", str(hf), "--out", str(out), "--force", "--weights", "bf16", "--no-tokenizer"])
        == 0
    )
    assert read_checkpoint_info(out).weights == "bf16"
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(out), "--out", str(tmp_path / "o2")]) == 2
    assert "--weights" in capsys.readouterr().err


def test_load_hf_errors_are_user_errors(tmp_path):
    with pytest.raises(HFImportError, match="not found"):
        load_hf(tmp_path / "nope")


def test_falcon_7b_config_maps_to_preset():
    """tiiuae/falcon-7b's config.json (as published, transformers 4.27 keys) gives exactly the falcon-7b preset."""
    from meshserve.model.config import get_config
    from meshserve.model.hf_import import falcon_config

    published = {
        "alibi": False,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["FalconForCausalLM"],
        "bias": False,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_size": 4544,
        "layer_norm_epsilon": 1e-05,
        "model_type": "falcon",
        "multi_query": True,
        "new_decoder_architecture": False,
        "num_attention_heads": 71,
        "num_hidden_layers": 32,
        "parallel_attn": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 65024,
    }
    assert falcon_config(published, name="falcon-7b") == get_config("falcon-7b")


def test_fp16_safetensors_are_read_through_float32_and_reported_as_f16(tmp_path, capsys):
    import ml_dtypes

    model = make_falcon(tmp_path / "hf", dtype=torch.float16)
    exact = model.transformer.word_embeddings.weight.float().detach().numpy()  # f16 -> f32 is exact
    for weights in ("int8", "f32"):  # int8 is quantised by the caller: it must get the f16 values, not bf16's
        imported = load_hf(tmp_path / "hf", weights)
        assert imported.source_dtype == "f16" and imported.params["embed"].dtype == np.float32
        np.testing.assert_array_equal(imported.params["embed"], exact)
    imported = load_hf(tmp_path / "hf")
    assert imported.default_weights == "bf16" and imported.params["embed"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(imported.params["embed"], exact.astype(ml_dtypes.bfloat16))
    capsys.readouterr()
    assert (
        main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"), "--json", "--no-tokenizer"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["source_weights"] == "f16" and summary["weights"] == "bf16"
