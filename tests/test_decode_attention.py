"""The one-kernel decode attention (model/decode_attention.py; CUDA's default, MESHSERVE_DECODE_ATTENTION=pallas here).

No GPU here: interpret mode runs the kernel body on the CPU for the numbers (against `layers.attend_cached`, the XLA
path), and exporting for the `cuda` platform runs Pallas' Triton lowering without a device. Its speed is measured
on a GPU by `meshserve bench --decode-attention pallas` (benchmarks/gpu_bench.sh steps `kernel` and `attn`) and
benchmarks/attn_sweep.py, not here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.errors import UserError
from meshserve.model import decode_attention as da
from meshserve.model import layers, transformer
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params, unstack_layers


def _operands(B, H, K, Q, S, N=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, 1, H, Q), jnp.bfloat16)
    k_cache, v_cache = (jax.random.normal(keys[i], (N, B, S, K, Q), jnp.bfloat16) for i in (1, 2))
    k_new, v_new = (jax.random.normal(keys[i], (B, 1, K, Q), jnp.bfloat16) for i in (3, 4))
    return q, k_cache, v_cache, k_new, v_new


@pytest.mark.parametrize(
    ("B", "H", "K", "Q", "S", "context", "lengths", "split_positions"),
    [
        (1, 71, 1, 64, 136, 136, [100], 512),  # falcon-7b's heads: G = 71 padded to 128; S not a multiple of 64
        (3, 8, 2, 32, 80, 70, [0, 5, 69], 512),  # GQA; a row with no cached key (its own only); context < S
        (2, 8, 2, 32, 80, 80, [3, 79], 16),  # several splits (5): most of row 0's splits see no key at all
        (2, 4, 1, 16, 48, 48, [47, 20], 16),  # G = 4 -> 16 rows for Triton's dot
    ],
)
def test_kernel_equals_xla_attention(monkeypatch, B, H, K, Q, S, context, lengths, split_positions):
    monkeypatch.setattr(da, "_SPLIT_POSITIONS", split_positions)
    q, k_cache, v_cache, k_new, v_new = _operands(B, H, K, Q, S)
    pos = jnp.asarray(lengths, jnp.int32)
    layer = 1
    visible = jnp.arange(context)[None, :] < pos[:, None]
    ref = layers.attend_cached(q, k_cache[layer, :, :context], v_cache[layer, :, :context], visible, k_new, v_new)
    got = da.decode_attention(q, k_cache, v_cache, layer, pos, k_new, v_new, context, interpret=True)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    ref32 = np.asarray(ref, np.float32)
    # Both round to bf16 once at the end (and the probabilities once before the value contraction).
    np.testing.assert_allclose(np.asarray(got, np.float32), ref32, atol=2e-2, rtol=2e-2)
    # A row that sees no cached key returns its own value for every head.
    if 0 in lengths:
        row = lengths.index(0)
        own = np.repeat(np.asarray(v_new[row, 0], np.float32), H // K, axis=0)
        np.testing.assert_allclose(np.asarray(got[row, 0], np.float32), own, atol=1e-2)


@pytest.mark.parametrize("split_positions", [512, 16])
def test_out_heads_appends_zero_heads_written_by_the_kernel(monkeypatch, split_positions):
    """out_heads > H (one kv head): the first H heads are the plain call's, bit for bit, the rest zeros, with one
    split (the kernel writes them) and with several (XLA's combine pads). Fewer than H, or more with several kv
    heads, is refused."""
    monkeypatch.setattr(da, "_SPLIT_POSITIONS", split_positions)
    q, k_cache, v_cache, k_new, v_new = _operands(2, 7, 1, 16, 48)
    pos = jnp.asarray([40, 3], jnp.int32)
    plain = da.decode_attention(q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True)
    wide = da.decode_attention(q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True, out_heads=9)
    assert wide.shape == (2, 1, 9, 16) and wide.dtype == plain.dtype
    np.testing.assert_array_equal(np.asarray(wide[:, :, :7], np.float32), np.asarray(plain, np.float32))
    assert not np.asarray(wide[:, :, 7:], np.float32).any()
    with pytest.raises(ValueError, match="out_heads must be at least H = 7"):
        da.decode_attention(q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True, out_heads=6)
    q, k_cache, v_cache, k_new, v_new = _operands(2, 8, 2, 16, 48)
    with pytest.raises(ValueError, match="only with one kv head"):
        da.decode_attention(q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True, out_heads=10)


@pytest.mark.parametrize(("head_block", "split_positions", "out_heads"), [(16, 512, None), (64, 512, 72), (32, 16, 72)])
def test_head_blocks_compute_the_same_attention(monkeypatch, head_block, split_positions, out_heads):
    """head_block: falcon-7b's 71 query heads over several programs per row (one split, and several); the output is
    the one-program kernel's, bit for bit, zero heads included. Refused with several kv heads or a block that is
    not a power of two >= 16."""
    monkeypatch.setattr(da, "_SPLIT_POSITIONS", split_positions)
    q, k_cache, v_cache, k_new, v_new = _operands(2, 71, 1, 64, 48)
    pos = jnp.asarray([40, 0], jnp.int32)
    call = functools.partial(da.decode_attention, q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True,
                             out_heads=out_heads)  # fmt: skip
    whole, blocked = call(), call(head_block=head_block)
    assert blocked.shape == whole.shape
    np.testing.assert_array_equal(np.asarray(blocked, np.float32), np.asarray(whole, np.float32))
    for bad in (8, 24):
        with pytest.raises(ValueError, match="head_block must be a power of two >= 16"):
            call(head_block=bad)
    q, k_cache, v_cache, k_new, v_new = _operands(2, 8, 2, 16, 48)
    with pytest.raises(ValueError, match="with one kv head"):
        da.decode_attention(q, k_cache, v_cache, 1, pos, k_new, v_new, 48, interpret=True, head_block=16)


def test_splits_fill_the_chip_but_stay_long():
    assert da.splits_for(1, 1, 256) == 1  # the bench's 128 + 128: one program walks it all
    assert da.splits_for(1, 1, 4096) == 8  # batch 1 at long context: 8 programs of 512 positions
    assert da.splits_for(64, 1, 4096) == 2  # batch 64 fills the SMs by itself
    assert da.splits_for(256, 8, 8192) == 1


def test_kernel_lowers_to_triton_for_cuda():
    """Pallas' Triton lowering accepts the kernel (an unsupported op or block shape fails here), for one split and
    for several; the whole cache goes in (no slice of it, which XLA would copy for the custom call)."""
    q, k_cache, v_cache, k_new, v_new = _operands(2, 16, 2, 64, 4096, N=2)
    pos = jnp.asarray([7, 4000], jnp.int32)
    for context, calls in ((256, 1), (4096, 1)):
        fn = jax.jit(lambda *a, c=context: da.decode_attention(*a[:3], 1, a[3], *a[4:], c))
        exported = jax.export.export(
            fn,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, k_cache, v_cache, pos, k_new, v_new)
        text = exported.mlir_module()
        assert text.count("__gpu$xla.gpu.triton") == calls
        splits = da.splits_for(2, 2, context)
        assert f"grid_z = {splits}" in text and "grid_x = 2" in text and "grid_y = 2" in text
    # Head blocks: falcon-7b's 71 query heads, 16 per program: 5 programs per row on the grid's y axis.
    q, k_cache, v_cache, k_new, v_new = _operands(2, 71, 1, 64, 256, N=2)
    fn = jax.jit(lambda *a: da.decode_attention(*a[:3], 1, a[3], *a[4:], 256, head_block=16))
    text = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(q, k_cache, v_cache, pos, k_new, v_new).mlir_module()
    assert "grid_x = 2" in text and "grid_y = 5" in text and "grid_z = 1" in text


def test_bad_mode_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "flash")
    with pytest.raises(UserError, match="MESHSERVE_DECODE_ATTENTION must be one of xla, pallas, got 'flash'"):
        da.decode_attention_mode()
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "")  # set but empty: the default, as a shell user means it
    assert da.decode_attention_mode() == "xla"  # this CPU host's (tests/test_decode_attention_default.py: CUDA's)


def _decode(monkeypatch, mode, params, config, steps=4):
    """Prefill two prompts, then `steps` greedy decode steps: (logits [steps, 2, V], tokens [steps, 2])."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", mode)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, config.vocab_size)
    lengths = jnp.array([12, 7], jnp.int32)
    last, k, v = transformer.prefill(params, config, tokens, lengths)
    cache = transformer.insert(transformer.init_cache(config, 2, 32, k.dtype), k, v, lengths, jnp.arange(2))
    step = jax.jit(lambda p, t, c: transformer.decode_step(p, config, t, c, context=24))
    out, toks, tok = [], [], jnp.argmax(last, axis=-1).astype(jnp.int32)
    for _ in range(steps):
        logits, cache = step(params, tok, cache)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(logits)
        toks.append(tok)
    return np.asarray(jnp.stack(out), np.float32), np.asarray(jnp.stack(toks))


@pytest.mark.parametrize(("preset", "kv_heads"), [("tiny", 1), ("tiny", 2), ("tiny-gemma3", 1)])
def test_decode_steps_with_the_kernel_equal_xla_attention(monkeypatch, preset, kv_heads):
    """bf16 weights over unrolled layers: every decode step's logits match the XLA path's within bf16 rounding, so
    greedy picks the same tokens. tiny-gemma3's windowed layer stays on XLA, its global layer takes the kernel."""
    config = get_config(preset).replace(n_kv_heads=kv_heads)
    params = unstack_layers(cast_params(config, init_params(config, jax.random.key(4), jnp.float32), "bf16"))
    ref_logits, ref_tokens = _decode(monkeypatch, "xla", params, config)
    got_logits, got_tokens = _decode(monkeypatch, "pallas", params, config)
    scale = np.abs(ref_logits).max()
    assert np.abs(got_logits - ref_logits).max() <= 3e-2 * scale
    np.testing.assert_array_equal(got_tokens, ref_tokens)


def test_stacked_layers_and_an_int8_cache_keep_xla_attention(monkeypatch):
    """The kernel needs a static layer index and a 16-bit cache: a scan over stacked layers, or an int8 cache,
    traces no attention kernel (and still decodes); the norms' kernel (model/decode_norm.py) needs neither."""
    config = get_config("tiny")
    params = cast_params(config, init_params(config, jax.random.key(4), jnp.float32), "bf16")
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")

    def kernels(p, cache) -> tuple[int, int]:
        """The pallas_calls named decode_attention and decode_norm in a decode step's jaxpr."""
        jaxpr = str(
            jax.make_jaxpr(lambda p, c: transformer.decode_step(p, config, jnp.zeros(2, jnp.int32), c))(p, cache)
        )
        return jaxpr.count("name=decode_attention"), jaxpr.count("name=decode_norm")

    # Per platform branch (CUDA's and the interpreted default): one attention per layer, and the layers' norms and
    # the final one (tiny: a parallel block, one norm per layer; a scan traces its layer once).
    unrolled = unstack_layers(params)
    assert kernels(params, transformer.init_cache(config, 2, 32, jnp.bfloat16)) == (0, 2 * 2)
    assert kernels(unrolled, transformer.init_cache(config, 2, 32, "int8")) == (0, 2 * (config.n_layers + 1))
    assert kernels(unrolled, transformer.init_cache(config, 2, 32, jnp.bfloat16)) == (
        2 * config.n_layers,
        2 * (config.n_layers + 1),
    )


def test_device_check_script_passes_on_this_device(monkeypatch, capsys):
    """benchmarks/attn_check.py (run first in every gpu_bench.sh call) at its two batch-1 falcon cases and the one
    writing 72 heads (out_heads), each also with the rotation in the kernel (as is, and an int8 wqkv's scale applied
    in the kernel), its norm cases and gemma3-1b's post-norm seam, here interpreted: it prints one JSON line per
    check and passes."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attn_check.py"
    spec = importlib.util.spec_from_file_location("attn_check", path)
    attn_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attn_check)
    cases = [*attn_check.CASES[:2], next(c for c in attn_check.CASES if c[-1])]
    monkeypatch.setattr(attn_check, "CASES", cases)
    assert attn_check.main() == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    attention = [r for r in rows if "splits" in r]
    assert [r["splits"] for r in attention] == [1, 4, 1] and all(r["ok"] for r in rows)
    assert [r["out_heads"] for r in attention] == [71, 71, 72]
    rotating = [(r["context"], r["scaled"]) for r in rows if r.get("rotating")]
    assert rotating == [(256, False), (256, True), (2048, False), (2048, True), (256, False), (256, True)]
    assert [(r["norm"], r["rows"]) for r in rows if "norm" in r] == [("layernorm", 1), ("layernorm", 64),
                                                                      ("rmsnorm", 1)]  # fmt: skip
    assert [(r["add_norm"], r["E"]) for r in rows if "add_norm" in r] == [("rmsnorm", 1152)]
