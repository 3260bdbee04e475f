"""MESHSERVE_DECODE_ATTENTION through the CLIs: `meshserve bench --decode-attention`, each bench row's
`decode_attention` label (model/decode_attention.decode_attention_label) against what decode_step traces, bench's title,
benchmarks/report.py's layers cell, serve's start line, the offline jobs' settings record, and a bad value refused
in one line by bench, generate, serve and batch-generate before any model loads.

The variable is read when a step is traced and is not part of jit's cache key, so runs that need another value than
an earlier trace in this process had run in a subprocess here (as a user's process sets it once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from cli_helpers import run_cli
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.decode_attention import decode_attention_label
from meshserve.serving.bench import bench_params
from meshserve.serving.cli_bench import attention_note

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, mode: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MESHSERVE_DECODE_ATTENTION"}
    if mode is not None:
        env["MESHSERVE_DECODE_ATTENTION"] = mode
    return subprocess.run([sys.executable, "-m", "meshserve.serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def _traces_kernel(config, weights: str, kv: str, layers: str, context: int) -> bool:
    """Whether bench's decode step for these settings traces the attention kernel (a fresh trace: no jit cache in
    between; the norms' kernel, model/decode_norm.py, goes with the mode whatever the attention takes)."""
    params = jax.eval_shape(lambda: bench_params(config, weights, layers))
    dtype = jnp.int8 if kv == "int8" else transformer.compute_dtype(params)
    cache = jax.eval_shape(lambda: transformer.init_cache(config, 1, context, dtype))
    step = jax.make_jaxpr(lambda p, c: transformer.decode_step(p, config, jnp.zeros(1, jnp.int32), c))
    return "name=decode_attention" in str(step(params, cache))


@pytest.mark.parametrize(
    ("preset", "overrides", "weights", "kv", "layers", "context", "label"),
    [
        ("tiny", {}, "bf16", "auto", "unrolled", 12, "pallas-interpret"),
        ("tiny", {}, "int8", "auto", "unrolled", 12, "pallas-interpret"),  # int8 weights compute (and cache) in bf16
        ("tiny", {}, "bf16", "int8", "unrolled", 12, "xla"),  # an int8 cache's scales stay XLA's
        ("tiny", {}, "f32", "auto", "unrolled", 12, "xla"),  # a 32-bit cache
        ("tiny", {}, "bf16", "auto", "scan", 12, "xla"),  # no static layer index
        ("tiny-falcon", {}, "bf16", "auto", "unrolled", 12, "xla"),  # head dim 8: below Triton's 16
        ("tiny-gemma3", {}, "bf16", "auto", "unrolled", 12, "pallas-interpret"),  # its global layer takes the kernel
        ("tiny", {"sliding_window": 8}, "bf16", "auto", "unrolled", 12, "xla"),  # every layer gathers its window
        ("tiny", {"sliding_window": 16}, "bf16", "auto", "unrolled", 12, "pallas-interpret"),  # window >= context
    ],
)
def test_the_rows_label_says_what_the_decode_step_traces(monkeypatch, preset, overrides, weights, kv, layers,
                                                         context, label):  # fmt: skip
    config = get_config(preset, **overrides)
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    assert decode_attention_label(config, layers == "unrolled", jnp.int8 if kv == "int8" else (
        jnp.float32 if weights == "f32" else jnp.bfloat16), context) == label  # fmt: skip
    assert _traces_kernel(config, weights, kv, layers, context) == (label != "xla")
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "xla")
    assert decode_attention_label(config, layers == "unrolled", jnp.bfloat16, context) == "xla"
    assert not _traces_kernel(config, weights, kv, layers, context)


def test_a_server_label_counts_on_the_short_contexts_reading_whole(monkeypatch):
    """serve passes no context (its buckets vary): a model windowed in every layer still runs the kernel in the
    contexts up to its window."""
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    assert decode_attention_label(get_config("tiny", sliding_window=8), True, jnp.bfloat16) == "pallas-interpret"


def test_bench_flag_runs_the_kernel_and_labels_its_rows(tmp_path):
    """`--decode-attention pallas` over the env's xla: the bf16-cache rows run the kernel (interpreted on a CPU), the
    int8-cache and f32 rows XLA's attention, and the table's title says which rows ran it."""
    out = tmp_path / "rows.json"
    proc = _cli("bench", "--model", "tiny", "--batch", "2", "--prompt-len", "8", "--gen-len", "4", "--weights",
                "bf16,f32", "--kv-cache-dtype", "auto,int8", "--repeats", "1", "--decode-attention", "pallas",
                "--out", str(out), mode="xla")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    got = [(r["weights"], r["kv_cache_dtype"], r["decode_attention"]) for r in rows]
    assert got == [("bf16", "auto", "pallas-interpret"), ("bf16", "int8", "xla"), ("f32", "auto", "xla"),
                   ("f32", "int8", "xla")]  # fmt: skip
    # tiny's LayerNorm takes the norm kernel under the same switch, whatever the cache or the weights' dtype
    assert [r["decode_norm"] for r in rows] == ["pallas-interpret"] * 4
    assert all(r["decode_step_ms"] > 0 for r in rows)
    title = proc.stdout.splitlines()[0]
    assert title.endswith(", decode attention pallas-interpret (bf16/auto rows; xla in the others)"), title


def test_bench_rows_say_xla_by_default_off_cuda_and_the_title_says_nothing(tmp_path):
    """The variable unset on this CPU host: XLA's attention (on CUDA the default is the kernel,
    tests/test_decode_attention_default.py)."""
    proc = _cli("bench", "--model", "tiny", "--batch", "1", "--prompt-len", "8", "--gen-len", "2", "--weights", "bf16",
                "--repeats", "1", "--out", str(tmp_path / "rows.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["decode_attention"] == "xla" and "decode attention" not in proc.stdout


def test_title_note():
    row = {"weights": "bf16", "kv_cache_dtype": "auto"}
    assert attention_note([row | {"decode_attention": "xla"}, {"weights": "f32"}]) == ""  # older rows: no key
    assert attention_note([row | {"decode_attention": "pallas"}] * 2) == ", decode attention pallas"
    mixed = [row | {"decode_attention": "pallas"}, row | {"weights": "int8", "decode_attention": "pallas"},
             row | {"kv_cache_dtype": "int8", "decode_attention": "xla"}]  # fmt: skip
    assert attention_note(mixed) == ", decode attention pallas (bf16/auto, int8/auto rows; xla in the others)"


@pytest.mark.parametrize(
    "args",
    [
        ("bench", "--model", "tiny", "--batch", "1"),
        ("generate", "--model", "tiny", "--max-new-tokens", "2", "hi"),
        ("serve", "--model", "tiny", "--port", "0"),
    ],
)
def test_a_bad_value_is_one_line_before_loading(args):
    proc = _cli(*args, mode="flash", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"meshserve {args[0]}: error: MESHSERVE_DECODE_ATTENTION must be one of xla, " \
        "pallas, got 'flash'"  # fmt: skip


def test_a_bad_value_stops_a_batch_job_at_start(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "flash")
    code, _, err = run_cli(capsys, "batch-generate", str(src), "-o", str(out), "--model", "tiny")
    assert code == 2 and "MESHSERVE_DECODE_ATTENTION must be one of xla, pallas, got 'flash'" in err
    assert "Traceback" not in err and not out.exists()


def test_offline_jobs_record_the_attention_path_without_comparing_it(monkeypatch):
    """The kernel computes the same attention in another order (float rounding, as between buckets): a resume with
    the other path is not refused, and the record says which ran."""
    import argparse

    from meshserve.serving.cli_offline import COMMANDS
    from meshserve.serving.job_settings import differences, settings_from_args

    parser = argparse.ArgumentParser()
    COMMANDS["batch-generate"][0](parser)
    args = parser.parse_args(["in.jsonl", "-o", "out.jsonl", "--model", "tiny", "--weights", "bf16"])
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "xla")
    was = settings_from_args(args, "batch-generate")
    monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", "pallas")
    now = settings_from_args(args, "batch-generate")
    assert differences(was.compared, now.compared) == []
    assert (was.info["decode_attention"], now.info["decode_attention"]) == ("xla", "pallas")


def _report(tmp_path, rows: list[dict]) -> list[str]:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("| tiny ")]


def test_report_names_the_kernel_in_the_layers_cell_and_reads_older_rows(tmp_path):
    base = {"model": "tiny", "weights": "bf16", "layers": "unrolled", "batch": 1, "prompt_len": 8, "gen_len": 4,
            "device": "cpu", "prefill_ms": 1.0, "ttft_ms": 1.5, "decode_step_ms": 0.5, "tokens_per_s": 2000.0,
            "hbm_gbps": 1.0, "hbm_fraction": 0.1, "prefill_mfu": None, "peak_memory_bytes": 1 << 20,
            "peer_decode_step_ms": None, "speedup_vs_peer": None, "copy_gbps": 10.0}  # fmt: skip
    lines = _report(tmp_path, [base, base | {"decode_attention": "xla"}, base | {"decode_attention": "pallas"},
                               base | {"decode_attention": "pallas-interpret"}])  # fmt: skip
    cells = [line.split(" | ")[3] for line in lines]
    assert cells == ["unrolled", "unrolled", "unrolled, attn kernel", "unrolled, attn kernel (interpreted)"]


def test_serve_start_line_names_the_kernel_and_answers_as_xla_attention(tmp_path, monkeypatch):
    """`serve --weights bf16 --layers unrolled` under MESHSERVE_DECODE_ATTENTION=pallas says so in its start line,
    and a greedy request gets the tokens the same server gives with XLA's attention. (Not in-process generation
    over the stacked layers: with random bf16 weights the prompt's top two logits are 1e-3 apart, and the
    unrolled layers' other reduction order flips them.)"""
    from meshserve.serving.client import Client
    from test_serving_support import ServerProcess, make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    prompt, tokens, lines = [5, 17, 3, 9], {}, {}
    for mode in ("pallas", "xla"):
        monkeypatch.setenv("MESHSERVE_DECODE_ATTENTION", mode)
        server = ServerProcess(checkpoint, "--weights", "bf16", "--layers", "unrolled")
        try:
            lines[mode] = server.output()
            with Client(server.target) as client:
                tokens[mode] = client.generate(prompt, max_new_tokens=6, ignore_eos=True, timeout=120).tokens
        finally:
            server.close()
    assert "unrolled layers" in lines["pallas"] and ", decode attention pallas-interpret)" in lines["pallas"]
    assert "decode attention" not in lines["xla"]
    assert tokens["pallas"] == tokens["xla"] and len(tokens["xla"]) == 6
