"""`resolve_model` and `--set` overrides: presets, meshserve checkpoints and Hugging Face config.json files written by
transformers itself, with parameter counts checked against the transformers model built from the same config."""

import json

import jax
import pytest
from meshserve.errors import UserError
from meshserve.model.checkpoint import save_checkpoint
from meshserve.model.config import PRESETS, get_config
from meshserve.model.model_spec import ModelSpecError, apply_overrides, parse_overrides, resolve_model
from meshserve.model.params import init_params, param_count

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8)


def _torch_count(model) -> int:
    """Parameters of a torch model; tied weights are one tensor, counted once (as meshserve's shared embedding)."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "extra",
    [
        dict(num_key_value_heads=2, tie_word_embeddings=False),  # grouped-query, untied (Llama 2 70B's switches)
        dict(num_key_value_heads=1, tie_word_embeddings=True),  # multi-query, tied
        dict(num_key_value_heads=8, head_dim=16),  # multi-head with head_dim != hidden / heads
    ],
    ids=["gqa-untied", "mqa-tied", "mha-head_dim"],
)
def test_llama_config_json_maps_every_field_and_counts_like_transformers(tmp_path, extra):
    cfg = transformers.LlamaConfig(
        **TINY, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500_000.0, bos_token_id=5,
        eos_token_id=[6, 7], **extra,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path / "My-Llama")
    config = resolve_model(str(tmp_path / "My-Llama"))
    assert config == resolve_model(str(tmp_path / "My-Llama" / "config.json"))  # the directory or the file
    assert config.name == "My-Llama"
    assert (config.vocab_size, config.d_model, config.d_ff, config.n_layers, config.n_heads) == (128, 64, 96, 2, 8)
    assert config.n_kv_heads == extra["num_key_value_heads"]
    assert config.d_head == extra.get("head_dim", 64 // 8)
    assert config.max_seq_len == 256 and config.norm_eps == 1e-5 and config.rope_base == 500_000.0
    assert (config.parallel_block, config.mlp, config.norm, config.norm_bias, config.linear_bias) == (
        False, "swiglu", "rmsnorm", False, False,
    )  # fmt: skip
    assert config.shared_embedding == extra.get("tie_word_embeddings", False)
    assert (config.bos_id, config.eos_id) == (5, 6)  # a list of eos ids keeps the first
    assert param_count(config) == _torch_count(transformers.LlamaForCausalLM(cfg))


def test_mistral_config_json_and_its_sliding_window(tmp_path):
    cfg = transformers.MistralConfig(**TINY, num_key_value_heads=4, max_position_embeddings=512, sliding_window=None)
    cfg.save_pretrained(tmp_path / "mistral")
    config = resolve_model(str(tmp_path / "mistral" / "config.json"))
    assert (config.n_kv_heads, config.max_seq_len, config.parallel_block, config.norm) == (4, 512, False, "rmsnorm")
    assert param_count(config) == _torch_count(transformers.MistralForCausalLM(cfg))
    # A window as long as the context changes nothing (no window); a shorter one (Mistral 7B v0.1: 4096 of 32768) is
    # computed on every layer, and the context stays max_position_embeddings.
    transformers.MistralConfig(**TINY, max_position_embeddings=512, sliding_window=512).save_pretrained(tmp_path / "w")
    config = resolve_model(str(tmp_path / "w"))
    assert (config.max_seq_len, config.sliding_window, config.windowed) == (512, 0, False)
    transformers.MistralConfig(**TINY, max_position_embeddings=512, sliding_window=128).save_pretrained(tmp_path / "s")
    config = resolve_model(str(tmp_path / "s"))
    assert (config.max_seq_len, config.sliding_window, config.layer_windows) == (512, 128, (128, 128))


def test_qwen2_windows_follow_max_window_layers_or_layer_types(tmp_path):
    """Qwen2 with use_sliding_window: the layers from max_window_layers on slide (Qwen2Config's layer_types), or
    those layer_types names; without use_sliding_window none does."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)  # fmt: skip
    transformers.Qwen2Config(**base, use_sliding_window=True, max_window_layers=2).save_pretrained(tmp_path / "a")
    assert resolve_model(str(tmp_path / "a")).layer_windows == (0, 0, 16, 16)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    transformers.Qwen2Config(**base, use_sliding_window=True, layer_types=types).save_pretrained(tmp_path / "b")
    assert resolve_model(str(tmp_path / "b")).layer_windows == (16, 0, 16, 0)
    transformers.Qwen2Config(**base).save_pretrained(tmp_path / "c")
    assert not resolve_model(str(tmp_path / "c")).windowed


@pytest.mark.parametrize(
    "extra",
    [dict(multi_query=True), dict(multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False)],
    ids=["mqa-parallel", "mha-serial-bias"],
)
def test_falcon_config_json_goes_through_hf_import(tmp_path, extra):
    cfg = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, **extra)
    cfg.save_pretrained(tmp_path / "falcon")
    config = resolve_model(str(tmp_path / "falcon"))
    assert config.mlp == "gelu" and config.norm_bias and config.n_kv_heads == (1 if extra["multi_query"] else 8)
    assert config.parallel_block == extra.get("parallel_attn", True) and config.linear_bias == extra.get("bias", False)
    assert param_count(config) == _torch_count(transformers.FalconForCausalLM(cfg))


def test_checkpoint_directory_resolves_to_its_stored_config(tmp_path):
    stored = get_config("tiny").replace(n_layers=1, max_seq_len=64, name="mine")
    path = tmp_path / "ck"
    save_checkpoint(path, stored, init_params(stored, jax.random.key(0)), "f32")
    assert resolve_model(str(path)) == stored
    assert resolve_model(str(path / "meshserve.json")) == stored  # the metadata file names its checkpoint
    # meshserve.json is read before config.json: a checkpoint with a stray HF config is still the checkpoint
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    assert resolve_model(str(path)) == stored


def test_a_preset_name_wins_over_a_local_path_of_that_name(tmp_path, monkeypatch):
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") is PRESETS["tiny"]
    path_config = resolve_model("./tiny")  # a path separator means the path
    assert path_config.mlp == "swiglu" and path_config.d_model == 64 and path_config.n_layers == 2
    assert path_config.name == "tiny" and path_config != PRESETS["tiny"]


def _llama(**changes):
    data = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 256, **TINY}
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "data,needle",
    [
        (_llama(model_type="gpt2"), 'model_type="gpt2"'),
        ({k: v for k, v in _llama().items() if k != "model_type"}, "no model_type"),
        (_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}), 'rope_scaling.rope_type="linear"'),
        (_llama(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_parameters.factor=null"),
        (_llama(num_local_experts=8), "num_local_experts=8"),
        (_llama(hidden_act="gelu"), 'hidden_act="gelu"'),
        (_llama(attention_bias=True), "attention_bias=true"),
        (_llama(model_type="mistral", sliding_window=0), "sliding_window=0"),
        (_llama(num_key_value_heads=3), "num_key_value_heads=3"),
        (_llama(hidden_size=None), "hidden_size"),
        (_llama(intermediate_size="96"), "intermediate_size"),
        (_llama(head_dim=7), "d_head"),
        (_llama(rms_norm_eps=-1), "rms_norm_eps"),
        (
            {
                "model_type": "falcon",
                "vocab_size": 128,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "alibi": True,
            },
            "alibi=true",
        ),  # fmt: skip
        ([1, 2], "JSON object"),
    ],
)
def test_unsupported_config_json_is_a_one_line_error_naming_the_key(tmp_path, data, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as info:
        resolve_model(str(path))
    assert needle in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_paths_and_non_json_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "nowhere"), "no such file or directory"),
        ("gpt-9", "known presets: tiny"),
        (str(tmp_path / "bad.json"), "is not JSON"),
        (str(tmp_path / "empty"), "neither meshserve.json"),
        ("", "a preset name"),
    ]
    for spec, needle in cases:
        with pytest.raises(ModelSpecError) as info:
            resolve_model(spec)
        assert needle in str(info.value) and "\n" not in str(info.value), spec


def test_set_overrides_parse_to_each_fields_type_and_name_the_result():
    overrides = parse_overrides(["n_kv_heads=8,max_seq_len=8_192", "parallel_block=yes,mlp=gelu,eos_id=none"])
    assert overrides == dict(n_kv_heads="8", max_seq_len="8_192", parallel_block="yes", mlp="gelu", eos_id="none")
    config = resolve_model("llama-2-7b", overrides)
    assert (config.n_kv_heads, config.max_seq_len, config.parallel_block, config.mlp, config.eos_id) == (
        8, 8192, True, "gelu", None,
    )  # fmt: skip
    assert config.name.startswith("llama-2-7b[") and "n_kv_heads=8" in config.name
    assert config.d_model == PRESETS["llama-2-7b"].d_model  # untouched fields stay
    typed = apply_overrides(get_config("tiny"), {"rope_base": 5e5, "norm_eps": "1e-5", "name": "t2"})
    assert typed.rope_base == 5e5 and typed.norm_eps == 1e-5 and typed.name == "t2"
    assert resolve_model("tiny", {}) is PRESETS["tiny"]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("n_kv=8", "valid keys: name, vocab_size"),
        ("n_layers", "is not key=value"),
        ("n_layers=2.5", "n_layers='2.5': expected an integer"),
        ("n_layers=true", "expected an integer"),
        ("mlp=relu", "expected one of swiglu, gelu"),
        ("shared_embedding=maybe", "expected true or false"),
        ("rope_base=-1", "expected a positive number"),
        ("bos_id=x", "expected an integer or none"),
        ("n_layers=2,n_layers=3", "given twice"),
        ("n_kv_heads=3", "n_heads (32) must be a multiple of n_kv_heads (3)"),  # ModelConfig's own rule
        ("d_head=7", "d_head must be even"),
    ],
)
def test_bad_overrides_are_one_line_errors(text, needle):
    with pytest.raises(ModelSpecError) as info:
        resolve_model("llama-2-7b", parse_overrides(text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_set_global_layers_and_other_tuple_fields_take_comma_separated_elements():
    # a part without `=` continues the tuple field before it, in the same --set item only
    overrides = parse_overrides(["n_layers=12,sliding_window=64,global_layers=5,11", "extra_eos_ids=7, 8"])
    assert overrides == dict(n_layers="12", sliding_window="64", global_layers="5,11", extra_eos_ids="7,8")
    config = resolve_model("tiny", overrides)
    assert (config.global_layers, config.extra_eos_ids) == ((5, 11), (7, 8))
    assert config.layer_windows == tuple(0 if i in (5, 11) else 64 for i in range(12))
    assert config.name == "tiny[n_layers=12,sliding_window=64,global_layers=5,11,extra_eos_ids=7,8]"
    assert resolve_model("tiny", parse_overrides("rope_scaling=8,1,4,64")).rope_scaling == (8.0, 1.0, 4.0, 64.0)
    assert resolve_model("tiny", {"global_layers": [1]}).global_layers == (1,)  # typed values too
    windowed = resolve_model("tiny", parse_overrides("sliding_window=8,global_layers=1"))
    assert apply_overrides(windowed, {"global_layers": "none"}).global_layers == ()
    assert apply_overrides(windowed, parse_overrides("global_layers=")).global_layers == ()


@pytest.mark.parametrize(
    "text,needle",
    [
        ("global_layers=5,x", "global_layers='5,x': expected a comma-separated list of integers"),
        ("global_layers=5.5", "global_layers='5.5': expected a comma-separated list of integers"),
        ("global_layers=true", "expected a comma-separated list of integers"),
        ("global_layers=1,40", "global_layers must be increasing layer indices in [0, n_layers=32), got (1, 40)"),
        ("global_layers=3,1", "global_layers must be increasing layer indices"),
        ("rope_scaling=8,1,-4,8192", "rope_scaling='8,1,-4,8192': expected a comma-separated list of positive"),
        ("n_layers=2,3", "'3' is not key=value"),  # only a tuple field takes more elements
        ("global_layers=1,2,global_layers=1", "global_layers is given twice ('1,2' and '1')"),
    ],
)
def test_bad_tuple_overrides_name_the_field(text, needle):
    with pytest.raises(ModelSpecError) as info:
        resolve_model("llama-2-7b", parse_overrides(text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def _llama_count(c) -> int:
    """Llama by hand: per layer q and o (E·HQ each), k and v (E·KQ each), three E·F MLP matrices, two RMSNorm scales;
    untied input and output embeddings (2VE) and the final norm."""
    E, F, H, K, Q = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.d_head
    return c.n_layers * (2 * E * H * Q + 2 * E * K * Q + 3 * E * F + 2 * E) + 2 * c.vocab_size * E + E


@pytest.mark.parametrize("name,billions", [("llama-2-7b", 6.74), ("llama-2-70b", 68.98)])
def test_llama_2_presets_match_the_published_sizes(name, billions):
    config = get_config(name)
    assert param_count(config) == _llama_count(config)
    assert abs(param_count(config) / 1e9 - billions) < 0.005
    assert config.group_size == (1 if name == "llama-2-7b" else 8)
