"""Model and plan flags shared by `meshserve serve` and the offline jobs (batch-generate, score), and loading the
model and its plan from them (`load_for_serving`)."""

from __future__ import annotations

import argparse

from meshserve.errors import UserError
from meshserve.serving.compile_cache import add_compile_cache_argument, setup_compile_cache

__all__ = ["parse_mesh", "add_model_arguments", "add_warm_up_argument", "load_for_serving"]


def parse_mesh(text: str) -> dict[str, int]:
    """'1', '8', '2x2x2' -> {'x': .., 'y': .., 'z': ..} (missing axes are 1)."""
    try:
        sizes = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise UserError(f"--mesh takes sizes like 1, 8 or 2x2x2, got {text!r}") from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise UserError(f"--mesh takes one to three positive sizes (X[xYxZ]), got {text!r}")
    sizes += [1] * (3 - len(sizes))
    return dict(zip("xyz", sizes, strict=True))


def _int_list(text: str) -> tuple[int, ...]:
    """`16,32,64` -> (16, 32, 64); an empty item (`16,,32`, `,`) is refused, not skipped: it is a typo, and a
    list that came out empty would silently mean the default grid."""
    items = text.split(",")
    if any(not t.strip() for t in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers with no empty item, got {text!r}")
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and plan flags shared by `serve` and the offline jobs."""
    parser.add_argument("--checkpoint", help="a meshserve checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--model", metavar="PRESET", help="instead of a checkpoint: a preset with random weights")
    parser.add_argument("--weights", choices=["f32", "bf16", "int8"], help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--mesh", default="1", help="device mesh XxYxZ (default 1: one device)")
    parser.add_argument(
        "--max-batch",
        type=int,
        help="decode slots, 1 to 4096 (default: 32 for latency, 128 for throughput, or fewer on one GPU or TPU when "
        "fewer fit its free memory after the weights, less 10%% for the steps' buffers)",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        help="prompt + generated tokens per request, 2 to the model's max_seq_len (default: the max_seq_len)",
    )
    parser.add_argument(
        "--length-buckets",
        type=_int_list,
        metavar="16,64,...",
        help="prompt-length buckets to compile (default: powers of two from 16 to the context)",
    )
    parser.add_argument(
        "--decode-buckets",
        type=_int_list,
        metavar="1,8,...",
        help="decode batch buckets to compile (default: powers of two up to --max-batch)",
    )
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="reuse the keys and values of prompt prefixes still in the cache (a shared system prompt, the earlier "
        "turns of a chat), so only the rest is prefilled; compiles one extend step per prefill bucket and context "
        "below the largest prompt bucket (default: on, with one device or a mesh)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="TOKENS",
        help="prefill prompts longer than this in chunks (a prompt-length bucket), one per engine step with decode "
        "steps between, so a long prompt stalls the running streams for one chunk at a time (default: 512 for the "
        "latency objective when the context is longer, else 0 = off)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8"],
        default="auto",
        help="KV cache storage: auto (the compute dtype: bf16, or f32 for f32 weights) or int8 (one power-of-two "
        "scale per token and kv head: half of bf16's memory, so twice the slots or context fit, and half the cache "
        "bytes for a decode step to read; each key and value moves by at most 0.8%% of its vector's largest element, "
        "so answers can differ from auto's after a near tie; score reads no cache, so its log-probs do not change). "
        "Default auto",
    )
    parser.add_argument(
        "--layers",
        choices=["auto", "unrolled", "scan"],
        default="auto",
        help="layer loop: unrolled (per-layer weights: no per-step slice of the stacked weights, 2.7x faster decode "
        "on an H100, longer compiles) or scan (lax.scan over stacked weights: one compiled layer); default auto: "
        "unrolled on a GPU with one device, else scan (a mesh always runs scan)",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding by prompt lookup: draft up to K tokens per request from its own prompt and output "
        "(a repeated n-gram's continuation) and verify them in one step when that is expected to pay; the answers "
        "are plain decoding's token for token (greedy or seeded sampling; requests with penalties do not draft) up "
        "to float rounding (in bf16 a near-tie can flip now and then, as between two batch buckets), faster where "
        "text repeats (code edits, quoting, summaries) at low temperatures; default 0 = off, 4 is usual",
    )
    parser.add_argument(
        "--speculative-ngram",
        type=int,
        default=3,
        metavar="N",
        help="the longest suffix n-gram looked up for drafts (default 3; shorter ones are tried when it is not found)",
    )
    parser.add_argument(
        "--speculative-max-batch",
        type=int,
        default=8,
        metavar="B",
        help="speculate only while at most B requests decode (default 8: above, a step is no longer bound by loading "
        "the weights, and verifying drafts costs more than it saves); on a mesh every step runs all --max-batch "
        "slots, so there --max-batch must not exceed B",
    )
    add_compile_cache_argument(parser)


def add_warm_up_argument(parser: argparse.ArgumentParser, work: str, before: str) -> None:
    """--warm-up background|all (serving/warm_up.py), for serve (`work` "serving") and the offline jobs."""
    parser.add_argument(
        "--warm-up",
        choices=["background", "all"],
        default="background",
        help=f"background (default): compile the largest bucket of each step, start {work}, and compile the other "
        "buckets on a background thread, smallest first; until a bucket is in, requests of its shape run padded in a "
        "larger one (slower, several times so for the first seconds; the same answers up to float rounding, as "
        f"between any two buckets); all: compile every bucket before {before}",
    )


def load_for_serving(args: argparse.Namespace, objective: str):
    """(model, plan, steps, mesh_info) from the flags above; JAX is imported here, not at CLI start.

    steps is None on one device (the engine's default, model/transformer.py) and serving/sharding.py's sharded
    steps on a mesh, with params placed in the plan's weight storage and the plan as it will run."""
    import jax

    setup_compile_cache(args.compile_cache, max_gb=args.compile_cache_max_gb)
    from meshserve.model.loading import load_model
    from meshserve.model.quant import int8_matmul_mode, int8_rows_layout

    int8_matmul_mode()  # a bad MESHSERVE_INT8_MATMUL fails here in one line, whatever the weights
    from meshserve.model.decode_attention import decode_attention_mode

    decode_attention_mode()  # and a bad MESHSERVE_DECODE_ATTENTION, whatever the layers and cache
    from meshserve.serving.plan import make_plan

    mesh = parse_mesh(args.mesh)
    n = mesh["x"] * mesh["y"] * mesh["z"]
    if n > len(jax.devices()):
        raise UserError(f"--mesh {args.mesh} needs {n} devices; this machine has {len(jax.devices())}")
    if args.layers == "unrolled" and n > 1:
        raise UserError(f"--layers unrolled needs one device; --mesh {args.mesh} runs the stacked layers (scan)")
    prefix_caching = True if args.prefix_caching is None else args.prefix_caching
    model = load_model(args.checkpoint, weights=args.weights, preset=args.model)
    if n > 1:
        from meshserve.model.sharded_specs import check_supported

        check_supported(model.config)  # before the plan chooser, which would only say no layout fits
    if args.layers == "unrolled" or (args.layers == "auto" and n == 1 and jax.default_backend() == "gpu"):
        from meshserve.model.params import unstack_layers

        # Per-layer arrays: the decoder unrolls its layer loop (model/transformer.scan_layers). Each stacked array
        # is deleted once sliced, so the weights are never held twice.
        model.params = unstack_layers(model.params, consume=True, int8_rows=int8_rows_layout())
    context = args.max_context or model.config.max_seq_len
    chunk = args.prefill_chunk
    if chunk is None:
        chunk = 512 if objective == "latency" and context > 512 else 0
    max_batch = args.max_batch
    if max_batch is None and n == 1:
        max_batch = _default_slots_that_fit(model, objective, context, args.kv_cache_dtype)
    plan = make_plan(
        model.config,
        objective=objective,
        max_batch=max_batch,
        max_context=args.max_context,
        mesh_axes=mesh,
        length_buckets=args.length_buckets,
        decode_buckets=args.decode_buckets,
        weights=model.weights,
        device_kind=jax.devices()[0].device_kind,
        prefix_caching=prefix_caching,
        prefill_chunk=chunk,
        speculative_tokens=args.speculative_tokens,
        speculative_max_batch=args.speculative_max_batch,
        speculative_ngram=args.speculative_ngram,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    steps = None
    if n > 1:
        from meshserve.serving.plan import replicate_kv_for_plan
        from meshserve.serving.sharding import mesh_steps

        # Grouped-query kv heads the plan's heads split does not divide: repeated so each chip holds whole ones.
        model.config, model.params = replicate_kv_for_plan(model.config, model.params, plan)

        model.params, steps, plan = mesh_steps(model.config, model.params, plan)
    return model, plan, steps, {"device_kind": jax.devices()[0].device_kind, "device_count": n}


def _default_slots_that_fit(model, objective: str, context: int, kv_cache_dtype: str) -> int | None:
    """The default number of decode slots, or fewer when fewer fit the free memory of the device the weights sit on
    (one device; a note on stderr says so). None: the plan's default (no memory report, as on a CPU, or it fits,
    or not one slot fits: then the engine's check names the limits)."""
    import sys

    import jax
    import jax.numpy as jnp
    from meshserve.model.transformer import compute_dtype
    from meshserve.serving.engine_steps import fresh_state
    from meshserve.serving.memory_fit import free_bytes, slots_that_fit, state_bytes_per_device
    from meshserve.serving.plan import DEFAULT_MAX_BATCH

    devices = {d for leaf in jax.tree_util.tree_leaves(model.params) for d in leaf.devices()}
    memory = free_bytes(sorted(devices, key=lambda d: d.id))
    if memory is None:
        return None
    dtype = jnp.int8 if kv_cache_dtype == "int8" else compute_dtype(model.params)
    state = lambda B: state_bytes_per_device(jax.eval_shape(lambda: fresh_state(model.config, B, context, dtype)))  # noqa: E731
    default = DEFAULT_MAX_BATCH[objective]
    fit = slots_that_fit(state, default, memory)
    if not 1 <= fit < default:
        return None
    hint = "" if kv_cache_dtype == "int8" else "; --kv-cache-dtype int8 holds twice the slots"
    print(f"meshserve: max_batch {fit}, not the default {default}: {fit} slots x {context} tokens is what fits the "
          f"{memory[0] / 2**30:.1f} GiB free on {memory[2]} after the weights{hint}", file=sys.stderr)  # fmt: skip
    return fit
