"""Presets, overrides and parameter counts from the declared shapes (no allocation)."""

import pytest
from meshserve.model.config import PRESETS, ConfigError, ModelConfig, get_config
from meshserve.model.params import abstract_params, declare, logical_axes, param_count


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_declares_consistent_weights(name):
    config = get_config(name)
    specs = declare(config)
    axes = logical_axes(config)
    assert set(axes) == set(specs)
    # Every declared weight names one logical axis per dim.
    for layer_name, spec in specs["layers"].items():
        if hasattr(spec, "shape"):
            assert len(spec.shape) == len(spec.axes), layer_name
    assert param_count(config) > 0


def _paper_count(c: ModelConfig) -> int:
    """PAPER.md: per layer E(2F + HQ) + E·2Q + (F + HQ)E, plus one V·E embedding (norm scales added)."""
    E, F, H, Q = c.d_model, c.d_ff, c.n_heads, c.d_head
    per_layer = E * (2 * F + H * Q) + E * 2 * Q + (F + H * Q) * E + E  # + the layer norm scale
    return c.n_layers * per_layer + c.vocab_size * E + E  # + final norm scale


@pytest.mark.parametrize("name,billions", [("palm-8b", 8.63), ("palm-62b", 62.50), ("palm-540b", 540.35)])
def test_palm_parameter_counts_match_the_paper(name, billions):
    count = param_count(get_config(name))
    assert abs(count / 1e9 - billions) <= 0.01
    assert count == _paper_count(get_config(name))


def test_falcon_7b_count_and_abstract_shapes_without_allocation():
    config = get_config("falcon-7b")
    assert abs(param_count(config) / 1e9 - 6.92) < 0.01
    shapes = abstract_params(config)
    assert shapes["layers"]["wq"].shape == (32, 4544, 71, 64)
    assert shapes["layers"]["wk"].shape == (32, 4544, 1, 64)


def test_qwen3_8b_counts_match_its_card():
    """Qwen3-8B's card: 8.2B parameters, 6.95B without the embeddings (input embedding and untied lm_head)."""
    config = get_config("qwen3-8b")
    count = param_count(config)
    assert abs(count / 1e9 - 8.19) < 0.01
    assert abs((count - 2 * config.vocab_size * config.d_model) / 1e9 - 6.95) < 0.01
    assert abstract_params(config)["layers"]["q_norm"]["scale"].shape == (36, 128)


def test_palm_540b_pads_48_heads_to_64_for_inference():
    config = get_config("palm-540b")
    padded = config.padded_heads(64)
    assert (padded.n_heads, padded.real_heads) == (64, 48)
    assert param_count(padded) - param_count(config) == 118 * 2 * 16 * 256 * 18432
    with pytest.raises(ConfigError, match="cannot pad"):
        config.padded_heads(40)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: tiny, tiny-falcon, demo, palm-8b"):
        get_config("gpt-5")


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config field"):
        get_config("tiny", hidden_size=10)
    assert get_config("tiny", n_layers=3).n_layers == 3


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_heads", 0, "n_heads must be a positive integer"),
        ("n_kv_heads", 3, "multiple of n_kv_heads"),
        ("d_head", 15, "d_head must be even"),
        ("mlp", "relu", "mlp must be"),
        ("extra_eos_ids", (5, 256), r"extra_eos_ids must be token ids in \[0, vocab_size=256\), got 256"),
        ("extra_eos_ids", ("7",), r"extra_eos_ids must be token ids .* got '7'"),
        ("rope_scaling", (8.0, 1.0), r"rope_scaling must be \(\), \(factor,\) \(linear\) or \(factor, low_freq"),
        ("sliding_window", -1, r"sliding_window must be 0 \(none\) or a positive integer"),
        ("global_layers", (1, 2), r"global_layers must be increasing layer indices in \[0, n_layers=2\), got \(1, 2\)"),
        ("global_layers", (1, 0), r"global_layers must be increasing layer indices"),
        ("attn_scale", -0.5, r"attn_scale must be 0 \(unset\) or a positive number"),
        ("post_norms", True, "post_norms needs the serial block"),
    ],
)
def test_invalid_config_fields_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        get_config("tiny", **{field: value})


def test_config_round_trips_through_a_dict():
    config = get_config("falcon-7b")
    assert ModelConfig.from_dict(config.to_dict()) == config
