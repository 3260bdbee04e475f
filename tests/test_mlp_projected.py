"""`layers.mlp_activation` with its input projections given (`projected`, what a decode step's merged input GEMM
hands the MLP: transformer._attend_rotating) equals the MLP computing its own, biases included; GeGLU's gate bias
is applied like SwiGLU's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model import layers
from meshserve.model.config import get_config


def _weights(E: int, F: int, seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "w_up": jax.random.normal(keys[0], (E, F)) / E**0.5,
        "w_gate": jax.random.normal(keys[1], (E, F)) / E**0.5,
        "b_up": 0.1 * jax.random.normal(keys[2], (F,)),
        "b_gate": 0.1 * jax.random.normal(keys[3], (F,)),
    }


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "geglu"])
def test_given_projections_equal_the_mlps_own(mlp):
    config = get_config("tiny").replace(mlp=mlp)
    E, F = config.d_model, config.d_ff
    p = _weights(E, F)
    h = jax.random.normal(jax.random.key(1), (2, 1, E))
    projected = {"up": h @ p["w_up"]} | ({"gate": h @ p["w_gate"]} if mlp != "gelu" else {})
    own = layers.mlp_activation(h, p, config)
    given = layers.mlp_activation(h, p, config, projected)
    np.testing.assert_allclose(np.asarray(given), np.asarray(own), rtol=1e-5, atol=1e-6)
    # A wrong projection shows: the given values are what the MLP uses.
    wrong = layers.mlp_activation(h, p, config, {k: v + 1.0 for k, v in projected.items()})
    assert np.abs(np.asarray(wrong) - np.asarray(own)).max() > 1e-2


def test_geglu_adds_its_gate_bias():
    config = get_config("tiny").replace(mlp="geglu")
    E, F = config.d_model, config.d_ff
    p = _weights(E, F)
    h = np.asarray(jax.random.normal(jax.random.key(2), (1, 1, E)), np.float64)
    gate = h @ np.asarray(p["w_gate"], np.float64) + np.asarray(p["b_gate"], np.float64)
    up = h @ np.asarray(p["w_up"], np.float64) + np.asarray(p["b_up"], np.float64)
    gelu_tanh = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    got = layers.mlp_activation(jnp.asarray(h, jnp.float32), p, config)
    np.testing.assert_allclose(np.asarray(got, np.float64), gelu_tanh * up, rtol=1e-4, atol=1e-5)
