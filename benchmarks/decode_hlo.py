"""What one decode step launches: the kernels of `meshserve bench`'s G-step decode loop, counted in XLA's optimized
HLO. The loop is compiled, never run, from abstract inputs (no weights are allocated: falcon-7b compiles on a CPU);
the counting itself is benchmarks/hlo_tally.py.

    python benchmarks/decode_hlo.py --model falcon-7b --weights bf16,int8 --prompt-len 128 --gen-len 64 --json
    python benchmarks/decode_hlo.py --model tiny-falcon --dump /tmp/hlo   # also write the optimized HLO text

The loop is serving/bench.py's own `_decode_loop` (`lax.fori_loop` over `transformer.decode_step` + greedy
`sampling.sample`), lowered with the shapes `bench_row` gives it. In the compiled module the loop is a `while`; its
body runs once per step (G / trip count steps per iteration, should XLA unroll it). Counted per step, in the body and
what it calls:
  kernels            fusions by kind (kLoop, kInput, kOutput, kCustom with its backend kind, e.g. __triton_gemm),
                     custom-calls by target (__cublas$gemm, cuDNN, Triton/Pallas kernels), and every other op that
                     runs as a kernel or copy (copy, sort, an unfused dynamic-update-slice, collectives' *-start).
                     Free ops (parameter, constant, tuple, get-tuple-element, bitcast) and *-done waits are not.
  command buffers    `call`s of XLA:GPU's outlined `command_buffer` computations (CUDA graphs): one graph launch
                     each; the kernels inside are counted as kernels too, and as "in graphs"
  host launches      what the host issues per step: kernels outside graphs + graph launches
  host syncs         conditionals outside graphs (XLA:GPU copies the predicate to the host and blocks on the stream:
                     the GPU idles until the host has launched what follows) and whiles of unknown trip count
  conditionals       sampling's `lax.cond`s: the bench's greedy rows take each one's pass-through branch, so the
                     step is counted at each conditional's smallest branch (kernels_max: at its largest)
  large outputs      kernels whose output is 4 MiB or more, but for in-place updates (the KV cache's), per step and
                     once per call outside the loop (a server's step is one call): at decode nothing that size should
                     be written, so one is a copy of a weight (a pad for split-K, a transpose, a dtype conversion) or a
                     split-K GEMM's float32 partial sums
On a CPU the counts are XLA:CPU's (other fusions, dots as library calls, no command buffers): a dry run of the
counting, not the GPU's kernels. A newer XLA may form command buffers after the HLO (at the thunk level): then none
show here whatever XLA_FLAGS asks, and gpu_bench.sh's `flags` step (timed runs per flag set) is the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hlo_tally beside this file, however this is loaded
from hlo_tally import LARGE_BYTES, count_step  # noqa: E402
from thunk_tally import count_loop_thunks  # noqa: E402

THUNK_DUMP: Path | None = None  # --target: where XLA dumps each compile's thunk sequence (set before jax starts)


def compile_decode_loop(config: Any, weights: str, batch: int, prompt_len: int, gen_len: int,
                        layers: str = "unrolled", kv_cache_dtype: str = "auto",
                        sharding: Any = None) -> Any:  # fmt: skip
    """The compiled (not run) `_decode_loop` of serving/bench.py for these shapes, lowered as `bench_row` lowers it:
    params from `bench_params` (as run_bench makes them, without consume), first token [B] and cache from
    `_prefill_and_insert` of prompts [B, P] into P + G slots, the greedy sampling rows; all abstract but the
    sampling rows (a few bytes). sharding: every input placed by it (a `target_sharding`: compiled for that GPU,
    deviceless); None: this host's default device."""
    import jax
    import jax.numpy as jnp
    from meshserve.model.sampling import SamplingParams, stack_sampling
    from meshserve.serving.bench import _decode_loop, _prefill_and_insert, bench_params

    params = jax.eval_shape(lambda: bench_params(config, weights, layers))
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    sampling = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams()] * batch).items()}
    context, int8_kv = prompt_len + max(gen_len, 1), kv_cache_dtype == "int8"
    first, cache = jax.eval_shape(
        lambda p, t, n, s: _prefill_and_insert(p, config, t, n, s, context, int8_kv), params, tokens, lengths, sampling
    )
    args = (params, first, cache, sampling)
    if sharding is not None:  # the sampling rows become abstract too: nothing may live on this host's CPU
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    params, first, cache, sampling = args
    return _decode_loop.lower(params, config, first, cache, sampling, gen_len).compile()


GPU_TARGETS = Path(__file__).resolve().parent / "gpu_targets"  # XLA GpuTargetConfig text protos, one per --target


def deviceless_environment(program: str) -> bool:
    """Set up this process to compile for a --target GPU without one, before jax is imported: the CUDA plugin must
    load without a driver and the default backend stay the CPU (nothing runs on a GPU), and decode attention takes
    the target's default (`decode_attention.default_decode_attention(cuda=True)`: the kernel), not this CPU host's,
    unless MESHSERVE_DECODE_ATTENTION says. False (with a one-line message) when jax was imported already."""
    if "jax" in sys.modules and "JAX_PLATFORMS" not in os.environ:
        print(f"{program}: --target must be set before jax is imported (run it as a program)", file=sys.stderr)
        return False
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    if not os.environ.get("MESHSERVE_DECODE_ATTENTION"):  # the target's default attention, not this host's
        from meshserve.model.decode_attention import default_decode_attention

        os.environ["MESHSERVE_DECODE_ATTENTION"] = default_decode_attention(cuda=True)
    return True


def target_sharding(target: str) -> Any:
    """A one-device NamedSharding on a deviceless CUDA topology described by gpu_targets/TARGET.txtpb: compiling for
    it runs XLA:GPU's whole pipeline (fusion, Triton/cuBLAS choices, command buffers) on a host with no GPU. Needs
    the CUDA plugin (`pip install 'jax[cuda13]'`) and JAX_PLATFORMS=cpu, JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 set
    before jax is imported (`main` does). Without a device XLA does not autotune: its gemm and fusion choices are
    its defaults, which a run on the GPU may revise."""
    import jax
    from jax.experimental import topologies
    from meshserve.errors import UserError

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=(GPU_TARGETS / f"{target}.txtpb").read_text(), topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:  # no CUDA plugin installed, or one too old for deviceless
        raise UserError(f"--target {target}: cannot compile for a GPU here ({str(e).splitlines()[0]}); install "
                        "the CUDA plugin beside jax: pip install 'jax[cuda13]==<your jax version>'") from e  # fmt: skip
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def decode_report(
    config: Any,
    weights: str,
    batch: int,
    prompt_len: int,
    gen_len: int,
    layers: str = "unrolled",
    kv_cache_dtype: str = "auto",
    dump: Path | None = None,
    layer_delta: bool = True,
    label: str = "",
    sharding: Any = None,
) -> dict[str, Any]:
    """One row: the shapes, the device and the per-step counts of `count_step` (dump: also write the HLO text, named
    after the model, weights, batch and `label`, which the row also carries: e.g. the XLA_FLAGS variant).

    layer_delta: also compile the model with 2 and with 3 layers (small compiles): kernels_per_added_layer is their
    difference, kernels_besides_layers the rest of a step (embedding, final norm, unembedding, sampling), where
    kernels_per_layer (per step / layers) spreads that rest over the layers. sharding: as `compile_decode_loop`."""
    import jax
    import jax.numpy as jnp
    from meshserve.model.decode_attention import decode_attention_label
    from meshserve.model.quant import int8_matmul_label

    shapes = (weights, batch, prompt_len, gen_len, layers, kv_cache_dtype, sharding)
    text = compile_decode_loop(config, *shapes).as_text()
    if dump is not None:
        name = f"decode_hlo.{config.name}.{weights}.b{batch}{'.' + label if label else ''}.txt"
        name = re.sub(r"[^\w.-]", "_", name)  # --set adds [k=v] to the model's name
        (dump / name).write_text(text)
    device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
    cuda = True if sharding is not None else None  # --target: lowered for CUDA whatever this host runs
    row = {"model": config.name, "weights": weights, "kv_cache_dtype": kv_cache_dtype, "batch": batch,
           "prompt_len": prompt_len, "gen_len": gen_len, "layers": layers, "n_layers": config.n_layers,
           "int8_matmul": int8_matmul_label(layers == "unrolled", cuda=cuda), "platform": device.platform,
           "decode_attention": decode_attention_label(config, layers == "unrolled", jnp.int8 if kv_cache_dtype == "int8"
                                                      else jnp.float32 if weights == "f32" else jnp.bfloat16,
                                                      prompt_len + gen_len, cuda=cuda),
           "device": device.device_kind, "jax": jax.__version__, "xla_flags": _user_xla_flags(),
           "label": label}  # fmt: skip
    row |= count_step(text, gen_len, config.n_layers)
    if sharding is not None and THUNK_DUMP is not None:  # the newest dump is this compile's
        dumps = sorted(THUNK_DUMP.glob("*decode_loop*.thunk_sequence_after_thunk_passes.txt"),
                       key=lambda f: f.stat().st_mtime)  # fmt: skip
        row["thunks_per_step"] = count_loop_thunks(dumps[-1].read_text()) if dumps else None
    if layer_delta:
        # 2 and 3, not 1 and 2: XLA inlines a scan of one iteration, so a 1-layer scan model compiles differently.
        two, three = (count_step(compile_decode_loop(config.replace(n_layers=n), *shapes).as_text(), gen_len, n)
                      for n in (2, 3))  # fmt: skip
        row["kernels_per_added_layer"] = three["kernels_per_step"] - two["kernels_per_step"]
        row["kernels_besides_layers"] = two["kernels_per_step"] - 2 * row["kernels_per_added_layer"]
    return row


def _user_xla_flags() -> str:
    """XLA_FLAGS as the user set them (without --target's dump flags)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if not f.startswith(("--xla_dump_to=", "--xla_dump_hlo_module_re=")))


def print_report(row: dict[str, Any]) -> None:
    print(
        f"{row['label'] + ': ' if row['label'] else ''}{row['model']} {row['weights']} batch {row['batch']}, prompt "
        f"{row['prompt_len']} + {row['gen_len']} "
        f"generated, {row['layers']} layers, {row['decode_attention']} decode attention, on {row['device']} "
        f"({row['platform']}), XLA_FLAGS={row['xla_flags']!r}"
    )
    if row["platform"] == "cpu":
        print("  XLA:CPU's counts: a dry run of the counting, not a GPU's kernels (no command buffers on a CPU)")
    if not row["loop_found"]:
        print(f"  no while loop left (XLA unrolled it): the whole program / {row['gen_len']} steps")
    r = row
    print(
        f"  per step: {r['kernels_per_step']:.1f} kernels ({r['kernels_per_layer']:.2f} per layer of {r['n_layers']}; "
        f"{r['kernels_max_per_step']:.1f} through the largest branches)"
        + ("" if r.get("thunks_per_step") else  # the thunk plan below says how they launch
           f", {r['host_launches_per_step']:.1f} host launches ({r['graph_launches_per_step']:.1f} command buffers "
           f"holding {r['kernels_in_graphs_per_step']:.1f} kernels), {r['host_syncs_per_step']:.1f} host syncs "
           f"({r['conditionals_per_step']:.0f} conditionals)")
    )  # fmt: skip
    if t := r.get("thunks_per_step"):
        print(
            f"  XLA:GPU's runtime plan (thunks) per step: {t['graph_launches']} command buffers (CUDA graphs) holding "
            f"{t['kernels_in_graphs']} kernels, {t['issued_alone']} thunks issued alone, {t['conditionals']} "
            f"conditionals outside graphs (host syncs): {t['host_launches']} host launches"
        )
    if "kernels_per_added_layer" in r:
        print(
            f"  each layer adds {r['kernels_per_added_layer']:.1f} kernels (2 vs 3 layers compiled); the rest of the "
            f"step (embedding, final norm, unembedding, sampling): {r['kernels_besides_layers']:.1f}"
        )
    print(f"  {'kind':<44} {'per step':>9} {'per layer':>9}")
    for kind, n in row["by_kind"].items():
        print(f"  {kind:<44} {n:>9.1f} {n / row['n_layers']:>9.2f}")
    print("  most frequent: " + ", ".join(f"{k} x{n:g}" for k, n in list(row["by_name"].items())[:8]))
    print(f"  outside the loop (once per call): {row['outside_loop_kernels']} kernels; command buffers in the module: "
          f"{row['command_buffers_in_module']}")  # fmt: skip
    mib = LARGE_BYTES >> 20
    for where, large in (("per step", row["large_outputs_per_step"]), ("per call", row["large_outputs_per_call"])):
        listed = ", ".join(f"{k} x{n:g}" for k, n in list(large.items())[:6]) + (", ..." if len(large) > 6 else "")
        written = f" ({row['large_output_bytes_per_step'] / 2**20:.0f} MiB)" if large and where == "per step" else ""
        print(f"  outputs of {mib} MiB or more {where}{written}, in-place updates aside: {listed or 'none'}")


def weights_arg(text: str) -> list[str]:
    """--weights: a comma list of bf16, int8, f32."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in ("bf16", "int8", "f32") for x in items):
        raise argparse.ArgumentTypeError(f"--weights takes a comma list of bf16, int8, f32; got {text!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    from meshserve.analytics.cli_helpers import ints
    from meshserve.model.model_spec import MODEL_HELP, SET_HELP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="falcon-7b", help=f"{MODEL_HELP} (default falcon-7b)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--batch", type=ints, default=[1], help="comma-separated batch sizes (default 1)")
    p.add_argument("--weights", type=weights_arg, default=["bf16"], help="comma list of bf16, int8, f32 (default bf16)")
    p.add_argument("--prompt-len", type=int, default=None, help="as `meshserve bench` (default 128, or half the "
                   "model's max_seq_len when that is less); sets the cache's size, P + G slots")  # fmt: skip
    p.add_argument("--gen-len", type=int, default=8, help="decode steps of the loop (default 8)")
    p.add_argument("--layers", choices=["unrolled", "scan"], default="unrolled", help="as bench (default unrolled)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto", help="as bench (default auto)")
    p.add_argument(
        "--int8-matmul",
        default=None,
        help="as bench: sets MESHSERVE_INT8_MATMUL (default: its value, else xla)",
    )
    p.add_argument("--no-layer-delta", action="store_true", help="skip the 2- and 3-layer compiles that give the "
                   "kernels each layer adds")  # fmt: skip
    p.add_argument("--dump", type=Path, help="also write each compiled module's HLO text into this folder")
    p.add_argument("--label", default="", help="a name for this run (e.g. its XLA_FLAGS variant): in each row and "
                   "in the --dump file names")  # fmt: skip
    targets = sorted(t.stem for t in GPU_TARGETS.glob("*.txtpb"))
    p.add_argument("--target", choices=targets, help="compile for this GPU without one (deviceless: needs the CUDA "
                   "plugin, pip install 'jax[cuda13]'; no autotuning) instead of for this host's device")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    p.add_argument("--out", type=Path, help="also write the rows as a JSON array to this file")
    args = p.parse_args(argv)
    if args.target:
        if not deviceless_environment("decode_hlo"):
            return 2
        # XLA forms CUDA graphs on thunks, after the HLO: its dumped thunk sequence shows them (thunk_tally.py).
        global THUNK_DUMP
        THUNK_DUMP = Path(tempfile.mkdtemp(prefix="decode_hlo-thunks-"))
        dump = f"--xla_dump_to={THUNK_DUMP} --xla_dump_hlo_module_re=.*decode_loop.*"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {dump}".strip()

    from meshserve.errors import UserError

    try:
        return _run(args)
    except UserError as e:
        print(f"decode_hlo: error: {e}", file=sys.stderr)
        return 2
    finally:
        if THUNK_DUMP is not None:
            shutil.rmtree(THUNK_DUMP, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    from meshserve.analytics.cli_helpers import model_from_args
    from meshserve.errors import UserError
    from meshserve.serving.cli_bench import check_context, lengths

    if args.gen_len < 1 or any(b < 1 for b in args.batch) or (args.prompt_len is not None and args.prompt_len < 1):
        raise UserError(f"--prompt-len, --gen-len and --batch must be >= 1, got {args.prompt_len}, {args.gen_len} "
                        f"and {args.batch}")  # fmt: skip
    if args.dump is not None:  # before the compiles, not after them
        if args.dump.exists() and not args.dump.is_dir():
            raise UserError(f"--dump {args.dump} is a file; it takes a folder")
        try:
            args.dump.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--dump {args.dump}: cannot make that folder ({e.strerror or e})") from e
    from meshserve.model.quant import int8_matmul_mode

    if args.int8_matmul:
        os.environ["MESHSERVE_INT8_MATMUL"] = args.int8_matmul  # read by model/quant.py when the step is traced

    int8_matmul_mode()  # a bad value fails here in one line
    from meshserve.analytics.output import check_output_path

    check_output_path("--out", args.out)
    config = model_from_args(args)
    prompt_len, gen_len = lengths(config, args.prompt_len, args.gen_len)
    check_context(config, prompt_len, gen_len)
    if config.global_layers and not args.no_layer_delta:  # its global layers' indices do not fit 2 or 3 layers
        print(f"decode_hlo: {config.name} has global layers {config.global_layers}: no per-added-layer count (as "
              "--no-layer-delta)", file=sys.stderr)  # fmt: skip
        args.no_layer_delta = True
    sharding = target_sharding(args.target) if args.target else None
    rows = []
    for weights in args.weights:
        for batch in args.batch:
            rows.append(decode_report(config, weights, batch, prompt_len, gen_len, args.layers, args.kv_cache_dtype,
                                      args.dump, not args.no_layer_delta, args.label, sharding))  # fmt: skip
            if not args.json:
                print_report(rows[-1])
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
