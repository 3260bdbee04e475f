"""benchmarks/decode_hlo.py: the kernels of one decode step, counted in the compiled decode loop's HLO.

The tiny model's loop is compiled on the CPU (XLA:CPU's kernels); the GPU-only shapes of the HLO (command buffers,
cuBLAS custom-calls, Triton fusions) are checked on a hand-written module whose counts are known."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_hlo.py"
_spec = importlib.util.spec_from_file_location("decode_hlo", SCRIPT)
decode_hlo = sys.modules.setdefault("decode_hlo", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(decode_hlo)


def _step_kernels(n_layers: int) -> dict:
    from meshserve.model.config import get_config

    config = get_config("tiny-falcon").replace(n_layers=n_layers)
    text = decode_hlo.compile_decode_loop(config, "bf16", batch=1, prompt_len=16, gen_len=4).as_text()
    return decode_hlo.count_step(text, steps=4, n_layers=n_layers)


def test_tiny_model_step_has_kernels_and_more_layers_launch_more():
    two, four = _step_kernels(2), _step_kernels(4)
    assert two["loop_found"] and two["loop_trip_count"] == 4
    assert two["kernels_per_step"] > 0
    assert four["kernels_per_step"] > two["kernels_per_step"]
    assert sum(two["by_kind"].values()) == two["kernels_per_step"]
    # Greedy sampling's conditionals are each counted at their smallest branch; the largest branches launch more.
    assert two["conditionals_per_step"] >= 1 and two["kernels_max_per_step"] > two["kernels_per_step"]
    assert two["graph_launches_per_step"] == 0  # no command buffers on a CPU


# One decode step as XLA:GPU could compile it: a command buffer (3 kernels), a layer loop (1 kernel x 2 layers), a
# conditional (a copy, or sort + 2 fusions), an unfused dynamic-update-slice; the step loop runs 4 iterations.
GPU_HLO = """HloModule jit__decode_loop, is_scheduled=true, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_add (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p0, %p0)
}

%command_buffer.2 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %loop_add_fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_add
  %gemm.1 = (f32[4]{0}, s8[8]{0}) custom-call(%loop_add_fusion.1), custom_call_target="__cublas$gemm"
  %gte.1 = f32[4]{0} get-tuple-element(%gemm.1), index=0
  ROOT %triton_gemm.2 = f32[4]{0} fusion(%gte.1), kind=kCustom, calls=%fused_add, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm"}}
}

%cmp (a: f32[], b: f32[]) -> pred[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %lt.1 = pred[] compare(%a, %b), direction=LT
}

%branch_sort (b: f32[4]) -> f32[4] {
  %b = f32[4]{0} parameter(0)
  %sort.1 = f32[4]{0} sort(%b), dimensions={0}, to_apply=%cmp
  %fusion.7 = f32[4]{0} fusion(%sort.1), kind=kLoop, calls=%fused_add
  ROOT %fusion.8 = f32[4]{0} fusion(%fusion.7), kind=kInput, calls=%fused_add
}

%branch_copy (b: f32[4]) -> f32[4] {
  %b = f32[4]{0} parameter(0)
  ROOT %copy.3 = f32[4]{0} copy(%b)
}

%layer_body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %norm_fusion.1 = f32[4]{0} fusion(%x), kind=kInput, calls=%fused_add
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %norm_fusion.1)
}

%layer_cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %two = s32[] constant(2)
  ROOT %lt.2 = pred[] compare(%i, %two), direction=LT
}

%step_body (t: (s32[], f32[4], pred[])) -> (s32[], f32[4], pred[]) {
  %t = (s32[], f32[4]{0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %p = pred[] get-tuple-element(%t), index=2
  %call.1 = f32[4]{0} call(%x), to_apply=%command_buffer.2
  %lt = (s32[], f32[4]{0}) tuple(%i, %call.1)
  %layers = (s32[], f32[4]{0}) while(%lt), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"2"}}
  %y = f32[4]{0} get-tuple-element(%layers), index=1
  %cond.1 = f32[4]{0} conditional(%p, %y, %y), branch_computations={%branch_sort, %branch_copy}
  %dynamic-update-slice.1 = f32[4]{0} dynamic-update-slice(%cond.1, %x, %i)
  ROOT %out = (s32[], f32[4]{0}, pred[]) tuple(%i, %dynamic-update-slice.1, %p)
}

%step_cond (t: (s32[], f32[4], pred[])) -> pred[] {
  %t = (s32[], f32[4]{0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(4)
  ROOT %wrapped_compare.1 = pred[] fusion(%i, %n), kind=kLoop, calls=%cmp
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %copy.0 = f32[4]{0} copy(%a)
  %zero = s32[] constant(0)
  %false = pred[] constant(false)
  %init = (s32[], f32[4]{0}, pred[]) tuple(%zero, %copy.0, %false)
  %while.9 = (s32[], f32[4]{0}, pred[]) while(%init), condition=%step_cond, body=%step_body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %res = f32[4]{0} get-tuple-element(%while.9), index=1
}
"""


def test_gpu_shaped_module_counts_graphs_library_calls_loops_and_branches():
    r = decode_hlo.count_step(GPU_HLO, steps=4, n_layers=2)
    assert r["loop_found"] and r["loop_trip_count"] == 4 and not r["loop_in_command_buffer"]
    # command buffer 3 + layers 1 x 2 + the copy branch 1 + dynamic-update-slice 1
    assert r["kernels_per_step"] == 7 and r["kernels_max_per_step"] == 9  # the sort branch: 3 instead of 1
    assert r["by_kind"] == {"fusion:kInput": 2, "fusion:kLoop": 1, "custom-call:__cublas$gemm": 1,
                            "fusion:kCustom:__triton_gemm": 1, "copy": 1, "dynamic-update-slice": 1}  # fmt: skip
    assert r["graph_launches_per_step"] == 1 and r["kernels_in_graphs_per_step"] == 3
    assert r["host_launches_per_step"] == 5  # 7 kernels - 3 in the graph + 1 graph launch
    assert r["host_syncs_per_step"] == 1 and r["conditionals_per_step"] == 1  # known trip counts: no condition reads
    assert r["outside_loop_kernels"] == 1 and r["command_buffers_in_module"] == 1
    assert r["kernels_per_layer"] == 3.5


def test_large_outputs_are_listed_per_step_and_per_call_but_in_place_updates(monkeypatch):
    """With the threshold at 16 bytes every f32[4] kernel output is "large": per step, each with its count (the
    layer loop's twice, the smallest branch's copy), the in-place dynamic-update-slice aside; outside the loop the
    entry's copy, once per call."""
    hlo_tally = sys.modules["hlo_tally"]
    monkeypatch.setattr(hlo_tally, "LARGE_BYTES", 16)
    r = decode_hlo.count_step(GPU_HLO, steps=4, n_layers=2)
    assert r["large_outputs_per_step"] == {
        "norm_fusion f32[4]": 2, "loop_add_fusion f32[4]": 1, "gemm (f32[4], s8[8])": 1, "triton_gemm f32[4]": 1,
        "copy f32[4]": 1,
    }  # fmt: skip
    assert r["large_output_bytes_per_step"] == 5 * 16 + 24
    assert r["large_outputs_per_call"] == {"copy f32[4]": 1}
    monkeypatch.setattr(hlo_tally, "LARGE_BYTES", 17)  # f32[4] is 16 bytes: only the gemm's tuple (24) is left
    assert decode_hlo.count_step(GPU_HLO, steps=4, n_layers=2)["large_outputs_per_step"] == {"gemm (f32[4], s8[8])": 1}


def test_a_whole_module_counts_as_one_step_with_its_loops_run_out():
    """whole=True (a server's step): no decode loop is looked for; the module's while runs its 4 known trips of 7
    kernels, plus the entry's copy."""
    r = decode_hlo.count_step(GPU_HLO, steps=1, n_layers=2, whole=True)
    assert not r["loop_found"] and r["kernels_per_step"] == 4 * 7 + 1


def test_unrolled_loop_and_unknown_trip_count():
    # XLA unrolled the step loop twice: 4 iterations make 8 steps, so each step is half an iteration.
    half = decode_hlo.count_step(GPU_HLO, steps=8, n_layers=2)
    assert half["kernels_per_step"] == 3.5 and half["host_syncs_per_step"] == 0.5
    # No known trip count on the step loop: its condition (1 fusion) runs and is read back by the host every step.
    unknown = GPU_HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    r = decode_hlo.count_step(unknown, steps=4, n_layers=2)
    assert r["kernels_per_step"] == 8 and r["host_syncs_per_step"] == 2


def test_unknown_model_is_one_line_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "no-such-model"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "no-such-model" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-len", "0"], "--prompt-len, --gen-len and --batch must be >= 1, got 0, 8 and [1]"),
        (["--dump", "FILE"], "is a file; it takes a folder"),
    ],
)
def test_bad_lengths_and_dump_paths_fail_before_compiling_in_one_line(tmp_path, args, message):
    file = tmp_path / "a-file.txt"
    file.write_text("kept\n")
    args = [str(file) if a == "FILE" else a for a in args]
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-falcon", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and not done.stdout
    assert "Traceback" not in done.stderr and message in done.stderr, done.stderr
    assert file.read_text() == "kept\n"


def _cuda_plugin() -> bool:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) if importlib.util.find_spec(
        "jax_plugins") else False  # fmt: skip


@pytest.mark.skipif(_cuda_plugin(), reason="the CUDA plugin is installed: --target compiles (the test below)")
def test_target_without_the_cuda_plugin_is_one_line_naming_the_install():
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-falcon", "--target", "h100"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and not done.stdout
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "--target h100: cannot compile for a GPU here" in done.stderr and "jax[cuda13]" in done.stderr


@pytest.mark.skipif(not _cuda_plugin(), reason="needs the CUDA plugin (pip install 'jax[cuda13]'), not in CI")
def test_target_compiles_the_step_for_an_h100_without_one(tmp_path):
    """Deviceless: XLA:GPU's own fusions and Triton GEMMs, counted on a host with no GPU."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-falcon", "--target", "h100", "--out",
                           str(out), "--no-layer-delta"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())
    assert row["platform"] == "gpu" and "H100" in row["device"]
    assert any("triton" in kind or "cublas" in kind for kind in row["by_kind"]), row["by_kind"]
    thunks = row["thunks_per_step"]  # the runtime plan: the step's kernels in CUDA graphs, a few host launches
    assert thunks["graph_launches"] >= 1 and thunks["kernels_in_graphs"] >= row["kernels_per_step"] / 2


@pytest.mark.skipif(not _cuda_plugin(), reason="needs the CUDA plugin (pip install 'jax[cuda13]'), not in CI")
def test_decode_attention_kernel_compiles_to_ptx_without_a_gpu():
    """benchmarks/triton_ptx.py runs Triton's own compiler (the CUDA plugin's) on the decode step's Pallas kernels: the
    attention at five shapes (one writing zero heads, one in head blocks), the attention rotating q and k itself at nine
    (three of them applying an int8 wqkv's scale, two q and k head norms), the norm at six and a post-norm block's seam
    at two. A kernel Triton rejects would otherwise pass every CPU test and fail on the GPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_ptx.py"
    done = subprocess.run([sys.executable, str(script), "--target", "h100"], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "sm_90 PTX" in line]
    kinds = [line.split()[0] for line in lines]
    counts = kinds.count("rotating"), kinds.count("decode_norm"), kinds.count("decode_add_norm"), len(lines)
    assert counts == (9, 6, 2, 22), done.stdout


# XLA:GPU's thunk sequence dump as jaxlib 0.10.2 prints it for the bench's loop (trimmed): the while's `condition:`
# at the while's own indent, `body:` deeper; a command buffer's kernels nested; a conditional's branches.
THUNKS = """001: kCopy  [source       | next=004 (3)] kCopy
004: kWhile [prev=003 (1) | sink        ]
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    000: kCommandBuffer [source       | next=071 (1)]
        006: kCustomKernel [source       | next=007 (1) ] loop_minimum_fusion_1 grid: [1, 1, 1]
        007: kCustomKernel [prev=006 (1) | sink         ] gemm_fusion_dot_47 grid: [1428, 1, 1]
        008: kCustomKernel [prev=007 (1) | sink         ] decode_attention grid: [1, 1, 1]
    071: kConditional   [prev=000 (1) | next=072 (1)]
      false_branch:
        000: kCommandBuffer [source | sink]
            043: kCopy         [source       | next=044 (1)] kCopy
            044: kCustomKernel [prev=043 (1) | next=045 (1)] sort_6_1 grid: [16, 1, 1]
            045: kCustomKernel [prev=044 (1) | next=046 (1)] sort_6_1__1 grid: [64, 1, 1]
      true_branch:
        070: kCopy [source | sink] kCopy
    072: kCustomKernel  [prev=071 (1) | next=073 (1)] loop_add_fusion_2 grid: [508, 1, 1]
    073: kCustomKernel  [prev=072 (1) | sink        ] loop_select_fusion_1 grid: [1, 1, 1]
"""


def test_thunk_plan_counts_graphs_lone_thunks_and_conditionals():
    from thunk_tally import count_loop_thunks  # benchmarks/, on the path decode_hlo put it on

    got = count_loop_thunks(THUNKS)
    # The body: one graph of 3 kernels, the conditional's cheaper branch (a copy, issued alone), 2 lone kernels.
    assert got == {"graph_launches": 1, "kernels_in_graphs": 3, "issued_alone": 3, "conditionals": 1,
                   "host_launches": 4, "host_launches_max": 4}  # fmt: skip
    assert count_loop_thunks(THUNKS.split("004:")[0]) is None  # no loop


PTX_SCRIPT = SCRIPT.parent / "triton_ptx.py"


@pytest.mark.parametrize("plugin_needed", [False, True])
def test_triton_ptx_refuses_an_unknown_target_and_a_missing_plugin_in_one_line(plugin_needed):
    """An unknown --target is argparse's choice error; without the CUDA plugin (CI) the known one says what to
    install. Either exits 2 with no traceback."""
    if plugin_needed and _cuda_plugin():
        pytest.skip("the CUDA plugin is installed: --target compiles")
    args = ["--target", "h100"] if plugin_needed else ["--target", "h999"]
    done = subprocess.run([sys.executable, str(PTX_SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout and "Traceback" not in done.stderr
    expected = "cannot compile for a GPU here" if plugin_needed else "invalid choice: 'h999'"
    assert expected in done.stderr, done.stderr


SERVER_STEP = SCRIPT.parent / "server_step_hlo.py"


def test_server_step_counts_the_engines_whole_decode_call_on_this_cpu():
    """XLA:CPU (a dry run): the engine's decode step for 4 of 16 slots compiles and counts as one step."""
    args = ["--model", "tiny-falcon", "--slots", "16", "--rows", "4,16", "--cache-len", "64", "--json"]
    done = subprocess.run([sys.executable, str(SERVER_STEP), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["rows"], r["slots"], r["context"], r["platform"]) for r in rows] == [
        (4, 16, 64, "cpu"),
        (16, 16, 64, "cpu"),
    ]
    assert all(r["kernels_per_step"] > 10 and "large_outputs_per_step" in r for r in rows)


@pytest.mark.parametrize(("args", "message"), [(["--rows", "0"], "--rows must be in [1, --slots=64]"),
                                               (["--rows", "65"], "--rows must be in [1, --slots=64]"),
                                               (["--context", "999"], "--context in [1, --cache-len=128]"),
                                               (["--cache-len", "0"], "--cache-len must be at least 1, got 0"),
                                               (["--context", "0"], "--context must be at least 1, got 0"),
                                               (["--slots", "0"], "--slots must be at least 1, got 0"),
                                               (["--model", "nope"], "nope")])  # fmt: skip
def test_server_step_refuses_bad_shapes_in_one_line(args, message):
    done = subprocess.run([sys.executable, str(SERVER_STEP), "--model", "tiny-falcon", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
