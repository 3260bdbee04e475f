"""The KV cache's storage in the analytics model (kv_dtype / --kv-cache-dtype): bf16 2 bytes per element, int8
1 + 1/Q (int8 values and one int8 exponent per (token, kv head) vector, model/kv_quant.py).

Expectations are derived here from the configs and the chip table (PAPER.md's memory-time arithmetic), not copied
from the model's output. Pure Python: no JAX compiles.
"""

import json

import pytest
from meshserve.analytics import choose_plan, estimate, get_chip, max_context_tokens, memory_estimate
from meshserve.analytics.memory import kv_bytes_per_token_per_chip
from meshserve.analytics.sizes import kv_bytes_per_element
from meshserve.analytics.speculation import speculation
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.partition.comm import MeshShape
from meshserve.serving.cli import main

FALCON = get_config("falcon-7b")  # multi-query: K = 1, Q = 64, N = 32
PALM = get_config("palm-540b").padded_heads(64)  # K = 1, Q = 256, N = 118
H100, TPU = get_chip("h100-sxm"), get_chip("tpu-v4")
ONE = MeshShape(1, 1, 1)


def _int8_ratio(config) -> float:
    return (1 + 1 / config.d_head) / 2  # int8 bytes per element over bf16's


def _decode(kv_dtype, batch, prompt_len, gen_len=64, config=FALCON):
    return estimate(config, H100, ONE, phase="decode", batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                    ffn_layout="ws2d", attention="heads", kv_dtype=kv_dtype)  # fmt: skip


def test_bytes_per_element():
    assert kv_bytes_per_element("bf16", 64) == 2
    assert kv_bytes_per_element("int8", 64) == 1 + 1 / 64
    assert kv_bytes_per_element("int8", 256) == 1 + 1 / 256
    with pytest.raises(UserError, match="kv-cache-dtype"):
        kv_bytes_per_element("fp8", 64)
    with pytest.raises(UserError, match="kv-cache-dtype must be one of bf16, int8"):
        _decode("int4", 1, 128)


@pytest.mark.parametrize("kv_dtype,per_element", [("bf16", 2.0), ("int8", 1 + 1 / 64)])
def test_decode_kv_read_and_cache_memory_by_hand(kv_dtype, per_element):
    """One chip, falcon-7b: a decode step reads 2 (K, V) · N · B · K · Q · S_mean elements; the cache holds
    S = prompt + gen positions."""
    B, prompt, gen = 256, 8192, 64
    e = _decode(kv_dtype, B, prompt, gen)
    N, K, Q = 32, 1, 64
    read = 2 * N * B * K * Q * (prompt + gen / 2) * per_element
    bw = H100.hbm_bandwidth * H100.hbm_efficiency * H100.kv_efficiency
    assert e.breakdown.kv_load_s == pytest.approx(read / bw, rel=1e-12)
    assert e.memory["kv_cache"] == pytest.approx(2 * N * B * K * Q * (prompt + gen) * per_element, rel=1e-12)
    assert e.kv_cache_dtype == kv_dtype and e.row()["kv_cache_dtype"] == kv_dtype


def test_int8_halves_the_kv_terms_and_nothing_else():
    bf16, int8 = _decode("bf16", 256, 8192), _decode("int8", 256, 8192)
    ratio = _int8_ratio(FALCON)  # 0.5078: half, plus the exponent's 1/Q
    assert int8.breakdown.kv_load_s == pytest.approx(ratio * bf16.breakdown.kv_load_s, rel=1e-12)
    assert int8.memory["kv_cache"] == pytest.approx(ratio * bf16.memory["kv_cache"], rel=1e-12)
    for term in ("compute_s", "weight_load_s", "comm_s", "step_comm_s"):
        assert getattr(int8.breakdown, term) == getattr(bf16.breakdown, term), term
    assert int8.memory["weights"] == bf16.memory["weights"]
    assert int8.memory["activations"] == bf16.memory["activations"]


def test_decode_step_barely_moves_at_batch_1_but_drops_at_large_batch_long_context():
    """Memory time per decode step = (weight bytes + KV bytes) / bandwidth (PAPER.md). Falcon-7B's weights are
    ~14.4 GB in bf16 (~7.2e9 parameters); its multi-query KV is 2·32·64·2 = 8 KiB per row and position.
    Batch 1, 160 positions: 1.3 MB of KV against 14.4 GB of weights, so int8 saves < 0.01% of the step.
    Batch 256 at 8224 mean positions: 17.2 GB of KV, more than the weights: int8 saves about half of it, a
    material share of the whole step (compute included)."""
    bw = H100.hbm_bandwidth * H100.hbm_efficiency * H100.kv_efficiency
    per_row_position = 2 * 32 * 1 * 64 * 2  # bf16 bytes
    weights = 2 * 7.2e9

    small_bf16, small_int8 = _decode("bf16", 1, 128), _decode("int8", 1, 128)
    kv_small = per_row_position * 1 * (128 + 32)
    assert kv_small / weights < 1e-4
    drop_small = (small_bf16.step_s - small_int8.step_s) / small_bf16.step_s
    assert 0 < drop_small < 1e-4
    # the saving is exactly the KV bytes not read
    saved = kv_small * (1 - _int8_ratio(FALCON)) / bw
    assert small_bf16.step_s - small_int8.step_s == pytest.approx(saved, rel=1e-6)

    big_bf16, big_int8 = _decode("bf16", 256, 8192), _decode("int8", 256, 8192)
    kv_big = per_row_position * 256 * (8192 + 32)
    assert kv_big > weights  # the KV cache's memory time dominates the weights'
    saved = kv_big * (1 - _int8_ratio(FALCON)) / bw
    assert big_bf16.step_s - big_int8.step_s == pytest.approx(saved, rel=1e-6)
    # the step is compute + weight load + KV load (+ small step collectives): a lower bound on the step from
    # first principles, so the drop is at least saved / that, and more than a sixth of the step here
    compute = 2 * 256 * 7.2e9 / (H100.peak_flops_bf16 * H100.matmul_efficiency)
    assert big_bf16.step_s > compute + (weights + kv_big) / bw
    drop_big = (big_bf16.step_s - big_int8.step_s) / big_bf16.step_s
    assert drop_big > 0.15 and drop_big > 1000 * drop_small
    assert big_int8.latency_s == pytest.approx(64 * big_int8.step_s)


def test_prefill_writes_int8_but_the_phase_switch_moves_bf16():
    """PaLM 540B on 4x4x4: a wg-xyz batch-sharded prefill into a ws2d batch-sharded decode cache (the paper's
    throughput pair). The prefill's cache writes shrink to 1 + 1/Q bytes per element; the switch, one all-to-all(xyz)
    per layer, moves the prefill's own bf16 k, v (the engine quantises only at the write into the cache)."""
    B, L, N, Q = 64, 2048, 118, 256
    kw = dict(phase="prefill", batch=B, prompt_len=L, gen_len=64, weights="bf16", ffn_layout="wg-xyz",
              attention="batch", decode_layout="ws2d", decode_attention="batch")  # fmt: skip
    mesh = MeshShape(4, 4, 4)
    bf16, int8 = (estimate(PALM, TPU, mesh, **kw, kv_dtype=d) for d in ("bf16", "int8"))
    assert bf16.breakdown.reshard_s > 0
    assert int8.breakdown.reshard_s == bf16.breakdown.reshard_s
    switch = [c for c in int8.once_collectives if c["what"] == "phase switch"]
    assert len(switch) == N and {c["bytes_per_chip"] for c in switch} == {2 * B * L * 1 * Q * 2}  # bf16 K and V
    assert int8.breakdown.kv_load_s == pytest.approx(_int8_ratio(PALM) * bf16.breakdown.kv_load_s, rel=1e-12)
    # batch-sharded over 64 chips: one row per chip, the one multi-query kv head, L positions written
    written = 2 * N * (B // 64) * 1 * Q * L * (1 + 1 / Q)
    assert int8.breakdown.kv_load_s == pytest.approx(written / (TPU.hbm_bandwidth * TPU.hbm_efficiency), rel=1e-12)


def test_memory_estimate_and_max_context_roughly_double():
    kw = dict(batch=128, context=2048, chips=64, chip=TPU, attention="batch", kv_fraction=0.3)
    bf16, int8 = (memory_estimate(get_config("palm-540b"), **kw, kv_dtype=d) for d in ("bf16", "int8"))
    assert bf16["kv_cache_bytes"] == 2 * 118 * 128 * 2048 * 256 * 2  # unchanged default
    assert int8["kv_cache_bytes"] == pytest.approx(2 * 118 * 128 * 2048 * 256 * (1 + 1 / 256), rel=1e-12)
    assert (bf16["kv_cache_dtype"], int8["kv_cache_dtype"]) == ("bf16", "int8")
    assert bf16["per_chip_bytes"] - int8["per_chip_bytes"] == pytest.approx(
        (bf16["kv_cache_bytes"] - int8["kv_cache_bytes"]) / 64, rel=1e-9
    )  # batch-sharded over 64 chips; weights and activations unchanged
    # max context: 0.3 · 32 GiB over 2 · 118 · (128 / 64 rows) · 256 · bytes per element, per position
    for d, per_element in (("bf16", 2), ("int8", 1 + 1 / 256)):
        m = bf16 if d == "bf16" else int8
        assert m["max_context_tokens"] == int(0.3 * 32 * 2**30 // (2 * 118 * 2 * 256 * per_element))
    ratio = int8["max_context_tokens"] / bf16["max_context_tokens"]
    assert ratio == pytest.approx(2 / (1 + 1 / 256), rel=1e-3) and 1.9 < ratio < 2
    # heads-sharded (replicated multi-query head) and the helper agree
    one = kv_bytes_per_token_per_chip(FALCON, 8, 4, "heads", "int8")
    assert one == pytest.approx(kv_bytes_per_token_per_chip(FALCON, 8, 4, "heads") * _int8_ratio(FALCON))
    assert max_context_tokens(FALCON, H100, 1, 8, "heads", 0.5, "int8") > 1.9 * max_context_tokens(
        FALCON, H100, 1, 8, "heads", 0.5
    )


def test_memory_estimate_refuses_int8_for_finetune():
    with pytest.raises(UserError, match="kv-cache-dtype int8 applies to --mode inference only"):
        memory_estimate(FALCON, mode="finetune", kv_dtype="int8")


def test_plan_and_speculation_take_kv_dtype():
    kw = dict(mesh="1x1x1", batch_buckets=(1, 256), prompt_len=8192, weights="bf16", storage="2d")
    bf16, int8 = (choose_plan(FALCON, H100, **kw, kv_dtype=d) for d in ("bf16", "int8"))
    assert (bf16.kv_cache_dtype, int8.kv_cache_dtype) == ("bf16", "int8")
    assert int8.to_dict()["kv_cache_dtype"] == "int8"
    big = {p.phase: p for p in bf16.phases if p.batch == 256}, {p.phase: p for p in int8.phases if p.batch == 256}
    assert big[1]["decode"].step_s < 0.9 * big[0]["decode"].step_s
    assert big[1]["decode"].memory_per_chip_bytes < big[0]["decode"].memory_per_chip_bytes
    with pytest.raises(UserError, match="kv-cache-dtype"):
        choose_plan(FALCON, H100, **kw, kv_dtype="fp8")
    rows = {d: speculation(FALCON, H100, ONE, batches=[256], context=8192, k=4, acceptances=[0.7], kv_dtype=d)[0]
            for d in ("bf16", "int8")}  # fmt: skip
    assert rows["int8"].decode_step_s < 0.9 * rows["bf16"].decode_step_s
    # the verify step reads the same (smaller) cache: the int8 saving is the same seconds in both steps
    saved_decode = rows["bf16"].decode_step_s - rows["int8"].decode_step_s
    assert rows["bf16"].verify_step_s - rows["int8"].verify_step_s == pytest.approx(saved_decode, rel=1e-9)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FALCON_ARGS = ("--model", "falcon-7b", "--hardware", "h100-sxm", "--mesh", "1x1x1")


def test_cli_analyze_json_and_header(capsys):
    argv = ("analyze", *FALCON_ARGS, "--batch", "256", "--prompt-len", "8192", "--phase", "decode",
            "--layout", "ws2d", "--attention", "heads")  # fmt: skip
    rows = {}
    for d in ("bf16", "int8"):
        code, out, _ = _run(capsys, *argv, "--kv-cache-dtype", d, "--json")
        assert code == 0
        [rows[d]] = json.loads(out)
        assert rows[d]["kv_cache_dtype"] == d
    assert rows["int8"]["memory"]["kv_cache"] == pytest.approx(_int8_ratio(FALCON) * rows["bf16"]["memory"]["kv_cache"])
    assert rows["int8"]["step_s"] < 0.9 * rows["bf16"]["step_s"]
    code, out, _ = _run(capsys, *argv)  # no flag: bf16, as before
    assert code == 0 and "kv cache bf16" in out.splitlines()[0]
    code, out, _ = _run(capsys, *argv, "--json")
    assert json.loads(out)[0] == rows["bf16"]
    code, out, _ = _run(capsys, *argv, "--kv-cache-dtype", "auto", "--json")  # serve's auto: bf16 here
    assert json.loads(out)[0] == rows["bf16"]
    code, out, _ = _run(capsys, *argv, "--kv-cache-dtype", "int8")
    assert code == 0 and "kv cache int8" in out.splitlines()[0]


def test_cli_plan_memory_speculate_json(capsys):
    code, out, _ = _run(capsys, "plan", *FALCON_ARGS, "--batch", "1,64", "--kv-cache-dtype", "int8", "--json")
    assert code == 0 and json.loads(out)["kv_cache_dtype"] == "int8"
    code, out, _ = _run(capsys, "plan", *FALCON_ARGS, "--batch", "1,64", "--kv-cache-dtype", "int8")
    assert code == 0 and "kv cache int8" in out.splitlines()[0]
    mem = {}
    for d in ("bf16", "int8"):
        code, out, _ = _run(capsys, "memory", "--model", "falcon-7b", "--batch", "64", "--hardware", "h100-sxm",
                            "--kv-fraction", "0.5", "--kv-cache-dtype", d, "--json")  # fmt: skip
        assert code == 0
        mem[d] = json.loads(out)
        assert mem[d]["kv_cache_dtype"] == d
    assert mem["int8"]["kv_cache_bytes"] == pytest.approx(_int8_ratio(FALCON) * mem["bf16"]["kv_cache_bytes"])
    assert 1.9 < mem["int8"]["max_context_tokens"] / mem["bf16"]["max_context_tokens"] < 2
    code, out, _ = _run(capsys, "memory", "--model", "falcon-7b", "--kv-cache-dtype", "int8")
    assert code == 0 and "kv cache int8" in out.splitlines()[0]
    code, out, _ = _run(capsys, "speculate", *FALCON_ARGS, "--batch", "1,64", "--kv-cache-dtype", "int8", "--json")
    assert code == 0 and json.loads(out)["kv_cache_dtype"] == "int8"


@pytest.mark.parametrize("command", ["analyze", "plan", "memory", "speculate"])
def test_cli_refuses_a_bad_value_naming_the_flag(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--kv-cache-dtype", "fp8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--kv-cache-dtype" in err and "fp8" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["analyze", "plan", "memory", "speculate"])
def test_cli_help_explains_the_flag(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert exc.value.code == 0 and "--kv-cache-dtype {bf16,int8}" in out and "1 + 1/d_head bytes" in out


def test_cli_memory_finetune_refuses_int8_in_one_line(capsys):
    code, _, err = _run(capsys, "memory", "--model", "falcon-7b", "--mode", "finetune", "--kv-cache-dtype", "int8")
    assert code == 2 and "--kv-cache-dtype int8" in err and err.count("\n") == 1 and "Traceback" not in err
