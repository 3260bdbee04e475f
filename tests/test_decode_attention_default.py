"""The decode attention's default (model/decode_attention.py): the Pallas kernel where the steps are lowered for CUDA,
XLA's attention elsewhere, MESHSERVE_DECODE_ATTENTION over both; and the deviceless tools (benchmarks/decode_hlo.py
--target) taking the GPU target's default, not this CPU host's.

No GPU here: a CUDA host is stood in for by replacing `quant.on_cuda`, which the default asks when it is not told."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from meshserve.errors import UserError
from meshserve.model import decode_attention as da
from meshserve.model import quant, transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_hlo.py"


def _on_cuda(monkeypatch, cuda: bool, hopper: bool = True) -> None:
    """This process's devices as the default sees them: a CUDA GPU first (of compute capability 9.0 or more, or
    not), or no CUDA GPU."""
    monkeypatch.setattr(quant, "on_cuda", lambda: cuda)
    monkeypatch.setattr(da, "_hopper_or_newer", lambda: hopper)


def test_cuda_gpus_before_hopper_keep_xla_attention(monkeypatch):
    """The kernel was checked and timed on H100 and H200 only; an older CUDA GPU (less shared memory per SM) keeps
    XLA's attention unless the variable asks for the kernel."""
    monkeypatch.delenv("MESHSERVE_DECODE_ATTENTION", raising=False)
    _on_cuda(monkeypatch, True, hopper=False)
    assert da.decode_attention_mode() == "xla"
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    assert da.decode_attention_mode() == "pallas"


@pytest.mark.parametrize(("capability", "hopper"), [("9.0", True), ("10.0", True), ("8.9", False), (None, False)])
def test_hopper_is_read_from_the_devices_compute_capability(monkeypatch, capability, hopper):
    class Device:  # what jax.devices()[0] reports on a CUDA GPU; a CPU device has no compute_capability
        if capability is not None:
            compute_capability = capability

    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    assert da._hopper_or_newer() is hopper


def test_the_default_is_the_kernel_on_cuda_only():
    assert da.default_decode_attention(cuda=True) == "pallas"
    assert da.default_decode_attention(cuda=False) == "xla"
    assert da.default_decode_attention() == "xla"  # this CPU host (tests/conftest.py: JAX_PLATFORMS=cpu)


def test_unset_takes_the_default_and_the_variable_overrides_it_both_ways(monkeypatch):
    monkeypatch.delenv("MESHSERVE_DECODE_ATTENTION", raising=False)
    assert da.decode_attention_mode() == "xla"  # this CPU host, not faked
    _on_cuda(monkeypatch, True)
    assert da.decode_attention_mode() == "pallas"
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "")  # set but empty: the default, as a shell user means it
    assert da.decode_attention_mode() == "pallas"
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "xla")
    assert da.decode_attention_mode() == "xla"
    _on_cuda(monkeypatch, False)
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    assert da.decode_attention_mode() == "pallas"
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "flash")
    for cuda in (False, True):  # a bad value is refused whatever the default would be
        _on_cuda(monkeypatch, cuda)
        with pytest.raises(UserError, match="^MESHSERVE_DECODE_ATTENTION must be one of xla, pallas, got 'flash'$"):
            da.decode_attention_mode()


@pytest.mark.parametrize(
    ("cuda", "env", "label"),
    [(True, None, "pallas"), (False, None, "xla"), (True, "xla", "xla"), (False, "pallas", "pallas-interpret")],
)
def test_a_cuda_host_traces_the_kernel_unless_told_not_to(monkeypatch, cuda, env, label):
    """The default reaches what decode_step traces and what bench rows and serve's start line say
    (`decode_attention_label`), with the kernel's own conditions still applied (an int8 cache stays XLA's)."""
    if env is None:
        monkeypatch.delenv("MESHSERVE_DECODE_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", env)
    _on_cuda(monkeypatch, cuda)
    config = get_config("tiny")  # head dim 16: the kernel's smallest
    assert da.decode_attention_label(config, True, jnp.bfloat16, 12) == label
    assert da.decode_attention_label(config, True, jnp.int8, 12) == "xla"
    assert da.kernel_enabled(config.d_head, jnp.bfloat16) == (label != "xla")
    params = jax.eval_shape(
        lambda: unstack_layers(cast_params(config, init_params(config, jax.random.key(0), jnp.float32), "bf16"))
    )
    cache = jax.eval_shape(lambda: transformer.init_cache(config, 1, 12, jnp.bfloat16))
    jaxpr = jax.make_jaxpr(lambda p, c: transformer.decode_step(p, config, jnp.zeros(1, jnp.int32), c))(params, cache)
    assert ("pallas_call" in str(jaxpr)) == (label != "xla")


def _decode_hlo():
    """benchmarks/decode_hlo.py as a module, loaded once per process (tests/test_decode_hlo.py loads it likewise)."""
    if "decode_hlo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("decode_hlo", SCRIPT)
        sys.modules["decode_hlo"] = importlib.util.module_from_spec(spec)  # before running it: its dataclasses look
        spec.loader.exec_module(sys.modules["decode_hlo"])  # their module up
    return sys.modules["decode_hlo"]


@pytest.mark.parametrize(("env", "want"), [(None, "pallas"), ("", "pallas"), ("xla", "xla"), ("pallas", "pallas")])
def test_deviceless_compiles_take_the_targets_default_attention(monkeypatch, env, want):
    """`--target` compiles for a CUDA GPU on this CPU host: unset, the attention is the GPU's default (the kernel),
    not this host's (XLA's); a value the user set stays. The int8 matmul is left to its own default (xla
    everywhere), not set."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # jax is imported already: the function needs the platform set
    # Set, then deleted: monkeypatch records the variable either way, so what the function sets is undone after
    # (a bare delenv of an absent variable records nothing, and the kernel leaked into every later test).
    for name in ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "MESHSERVE_INT8_MATMUL", "MESHSERVE_DECODE_ATTENTION"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    if env is not None:
        monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", env)
    assert _decode_hlo().deviceless_environment("test") is True
    assert os.environ["MESHSERVE_DECODE_ATTENTION"] == want
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    assert "MESHSERVE_INT8_MATMUL" not in os.environ
