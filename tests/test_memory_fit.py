"""serving/memory_fit.py: the decode state's size per device (its shard on a mesh) and the refusal, naming
--max-batch and the slots that fit, when it would not fit a device's free memory; CPUs report no memory, so there
the engine allocates without a check, in the state's split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.serving.engine import Engine
from meshserve.serving.memory_fit import (
    STEP_RESERVE,
    MemoryFitError,
    check_state_fits,
    free_bytes,
    state_bytes_per_device,
)
from meshserve.serving.plan import make_plan

GIB = 2**30


def test_the_state_that_fits_passes_and_one_that_does_not_names_the_slots_that_fit():
    limit, free = 16 * GIB, 8 * GIB  # the weights took the other 8
    budget = free - STEP_RESERVE * limit  # 6.4 GiB
    check_state_fits(int(budget), GIB, 6, 2048, (free, limit, "cuda:0"))  # exactly the budget: fits
    with pytest.raises(MemoryFitError) as e:
        check_state_fits(10 * GIB, GIB, 10, 2048, (free, limit, "cuda:0"))
    message = str(e.value)
    assert message.startswith("max_batch: the decode state for 10 slots x 2048 tokens needs 10.00 GiB per device")
    assert "cuda:0 has 8.00 GiB free" in message and "at most 6 slots fit" in message and "--max-batch" in message
    with pytest.raises(MemoryFitError, match="not one slot fits"):
        check_state_fits(10 * GIB, 10 * GIB, 1, 2048, (GIB, limit, "cuda:0"))


def test_state_bytes_count_each_devices_shard():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    split = NamedSharding(mesh, P(None, "x"))
    cache = jax.ShapeDtypeStruct((2, 16, 128, 4, 8), jnp.bfloat16, sharding=split)  # B split 8 ways
    whole = jax.ShapeDtypeStruct((16, 100), jnp.int32)
    assert state_bytes_per_device([cache, whole]) == 2 * 2 * 128 * 4 * 8 * 2 + 16 * 100 * 4


def test_cpu_devices_report_no_memory_and_the_engine_allocates_without_a_check():
    assert free_bytes(jax.devices()) is None
    config = get_config("tiny")
    engine = Engine(init_params(config, jax.random.key(0)), config, make_plan(config, max_batch=4, max_context=64))
    engine.reset()
    k = engine._state.cache.k
    assert k.shape == (config.n_layers, 4, 64, config.n_kv_heads, config.d_head) and not np.asarray(k).any()


def _serve_args(*argv: str):
    import argparse

    from meshserve.serving.cli_serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "tiny", "--length-buckets", "32", "--compile-cache", "off", *argv])


def test_the_default_max_batch_is_what_fits_the_memory(monkeypatch, capsys):
    """With no --max-batch, serve sizes the slots to the device's free memory (a GPU's, faked here): the default
    32 when they fit, fewer when not, twice as many with an int8 cache; an explicit --max-batch is never changed."""
    from meshserve.serving import memory_fit
    from meshserve.serving.cli_model import load_for_serving
    from meshserve.serving.engine_steps import fresh_state

    config = get_config("tiny")
    S = config.max_seq_len

    def state(B: int, dtype=jnp.float32) -> int:
        return state_bytes_per_device(jax.eval_shape(lambda: fresh_state(config, B, S, dtype)))

    per_slot, limit = state(2) - state(1), 64 * GIB
    free = STEP_RESERVE * limit + state(1) + 9.5 * per_slot  # room for 10 slots (f32, the preset's weights)
    monkeypatch.setattr(memory_fit, "free_bytes", lambda devices: (free, limit, "cuda:0"))
    _, plan, _, _ = load_for_serving(_serve_args(), "latency")
    assert plan.max_batch == 10
    assert "max_batch 10, not the default 32" in capsys.readouterr().err
    _, plan, _, _ = load_for_serving(_serve_args("--kv-cache-dtype", "int8"), "latency")
    per_slot8 = state(2, jnp.int8) - state(1, jnp.int8)
    fit8 = int((free - STEP_RESERVE * limit - (state(1, jnp.int8) - per_slot8)) // per_slot8)
    assert plan.max_batch == min(32, fit8) > 10  # the cache's share halved (the token history [B, V] is not)
    _, plan, _, _ = load_for_serving(_serve_args("--max-batch", "16"), "latency")
    assert plan.max_batch == 16  # asked for: the engine's check refuses it if it does not fit, naming the limit
    monkeypatch.setattr(memory_fit, "free_bytes", lambda devices: (limit, limit, "cuda:0"))
    _, plan, _, _ = load_for_serving(_serve_args(), "latency")
    assert plan.max_batch == 32  # all fit: the default


def test_a_float_cache_too_large_names_the_int8_cache():
    with pytest.raises(MemoryFitError, match="--kv-cache-dtype int8: half the bytes"):
        check_state_fits(10 * GIB, GIB, 10, 2048, (8 * GIB, 16 * GIB, "cuda:0"), hint_int8=True)
