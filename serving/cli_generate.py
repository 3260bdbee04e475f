"""`meshserve generate`: generate text for one or more prompts, in process (one batch of different lengths), or
from a running server with `--server HOST:PORT` (same flags, same output; the prompts run concurrently there)."""

from __future__ import annotations

import argparse
import json
import sys

from meshserve.errors import UserError

__all__ = ["COMMANDS", "add_sampling_arguments"]


def _token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes comma-separated integers, got {text!r}") from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by in-process and client-side generation."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide (multiply if negative) the logits of tokens already in the prompt or output (1 = off)",
    )
    parser.add_argument(
        "--presence-penalty", type=float, default=0.0, help="subtract from tokens already generated, in [-2, 2]"
    )
    parser.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="subtract per occurrence in the output, in [-2, 2]"
    )
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    parser.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        metavar="N",
        help="also show the N most likely tokens at each step, in [0, 20] (one line per token; in --json too)",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per prompt, in input order: {"tokens", "text", "logprobs", "finish_reason"}',
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts (several run as one batch)")
    parser.add_argument(
        "--tokens",
        action="append",
        type=_token_list,
        default=[],
        metavar="1,2,3",
        help="a prompt as token ids instead of text; repeat for several prompts",
    )
    parser.add_argument("--checkpoint", help="a meshserve checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--model", metavar="PRESET", help="instead of a checkpoint: a preset with random weights")
    parser.add_argument(
        "--weights",
        choices=["f32", "bf16", "int8"],
        help="weight dtype (default: the checkpoint's; f32 computes in float32 for exact comparisons)",
    )
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="ask a running `meshserve serve` instead of loading a model"
    )
    parser.add_argument("--auth-token-file", help="with --server: a file holding the server's bearer token")
    parser.add_argument("--tls-ca", help="with --server: PEM root certificate to verify the server's TLS certificate")
    parser.add_argument("--timeout", type=float, default=300.0, help="with --server: seconds per request (default 300)")
    add_sampling_arguments(parser)
    from meshserve.serving.cli_serve import add_compile_cache_argument  # argparse only

    add_compile_cache_argument(parser)
    from meshserve.partition.cli_args import add_mesh_arguments  # argparse only: --help stays fast

    add_mesh_arguments(parser)


def _print(
    args: argparse.Namespace, prompt_text: str | None, tokens, text: str, logprobs, finish_reason: str, top=()
) -> None:
    """One result; top: per generated token, its alternatives as (id, text, logprob) (with --top-logprobs)."""
    if args.json:
        row = {"tokens": tokens, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if args.top_logprobs:
            row["top_logprobs"] = [[{"token": t, "text": s, "logprob": lp} for t, s, lp in alts] for alts in top]
        print(json.dumps(row))
        return
    shown = prompt_text or ""
    print(f"{shown}\033[1m{text}\033[0m" if sys.stdout.isatty() else f"{shown}{text}")
    for token, lp, alts in zip(tokens, logprobs, top, strict=False):  # one line per token: its pick, then the top n
        others = "  ".join(f"{s!r} {x:.2f}" for _, s, x in alts)
        print(f"  {token:>6} {lp:8.3f}  | {others}")
    print()


def _run_remote(args: argparse.Namespace) -> int:
    """Each prompt as one Generate call, all in flight at once; results printed in input order."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import grpc
    from meshserve.serving.client import Client

    if args.checkpoint or args.model or args.weights:
        raise UserError("--checkpoint, --model and --weights choose a local model; the server has its own (drop them)")
    token = None
    if args.auth_token_file:
        try:
            token = Path(args.auth_token_file).read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --auth-token-file {args.auth_token_file}: {e.strerror}") from None
    prompts = list(args.prompts) + [list(t) for t in args.tokens]
    kwargs = dict(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos, return_logprobs=True,
                  **_sampling_fields(args))  # fmt: skip
    with Client(args.server, token=token, tls_ca=args.tls_ca) as client:
        try:
            with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
                results = list(pool.map(lambda p: client.generate(p, timeout=args.timeout, **kwargs), prompts))
        except grpc.RpcError as e:
            raise UserError(f"server {args.server}: {e.code().name}: {e.details()}") from None
    for prompt, r in zip(prompts, results, strict=True):
        shown = prompt if isinstance(prompt, str) else None
        _print(args, shown, r.tokens, r.text, r.logprobs, r.finish_reason, r.top_logprobs)
    return 0


def _config_only(args: argparse.Namespace):
    """The model's config without loading its weights (a preset, or the checkpoint's metadata)."""
    from meshserve.model.checkpoint import read_checkpoint_info
    from meshserve.model.config import get_config
    from meshserve.model.loading import DEMO_CHECKPOINT

    if args.model is not None:
        return get_config(args.model)
    return read_checkpoint_info(args.checkpoint or DEMO_CHECKPOINT).config


def _sampling_fields(args: argparse.Namespace) -> dict:
    """The sampling flags as SamplingParams' (and Client.request's) keyword arguments."""
    names = ("temperature", "top_k", "top_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty")
    return {name: getattr(args, name) for name in (*names, "min_p", "top_logprobs")}


def run(args: argparse.Namespace) -> int:
    from meshserve.model.sampling import SamplingParams

    if not args.prompts and not args.tokens:
        raise UserError("give at least one PROMPT or --tokens")
    from meshserve.partition.cli_args import mesh_args

    on_mesh = mesh_args(args)  # layouts from --mesh/--prefill-layout/--decode-layout/--attention (None: one device)
    if args.server:
        if on_mesh is not None:
            raise UserError("--mesh and the layout flags place a local model; the server has its own (drop them)")
        return _run_remote(args)
    sampling = SamplingParams(**_sampling_fields(args))
    from meshserve.serving.cli_serve import setup_compile_cache

    setup_compile_cache(args.compile_cache)
    from meshserve.model.generate import generate
    from meshserve.model.loading import load_model

    mesh, shardings = None, None
    if on_mesh is not None:  # check the mesh and layouts on the config alone, before any weight is read
        from meshserve.model.sharded import check_model, check_phases, min_batch, param_shardings
        from meshserve.partition.mesh import make_mesh

        config = _config_only(args)
        mesh = make_mesh(on_mesh.mesh)
        check_phases(on_mesh.prefill, on_mesh.decode)
        for layout in (on_mesh.prefill, on_mesh.decode):
            check_model(config, mesh, layout, min_batch(layout, mesh))
        shardings = param_shardings(config, mesh, on_mesh.prefill.ffn)  # the checkpoint loads straight onto the mesh
    # A preset's random weights use a fixed seed: --seed is the sampling seed only.
    model = load_model(args.checkpoint, weights=args.weights, preset=args.model, shardings=shardings)
    prompts = [model.encode_prompt(p) for p in args.prompts] + list(args.tokens)
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampling=sampling,
                  stop_ids=[] if args.ignore_eos else model.stop_ids())  # fmt: skip
    if on_mesh is not None:
        from meshserve.model.sharded import generate_sharded

        results = generate_sharded(model.params, model.config, prompts, mesh=mesh,
                                   prefill_layout=on_mesh.prefill, decode_layout=on_mesh.decode, **kwargs)  # fmt: skip
    else:
        results = generate(model.params, model.config, prompts, **kwargs)
    texts = [p for p in args.prompts] + [None] * len(args.tokens)
    for prompt_text, result in zip(texts, results, strict=True):
        text = model.tokenizer.decode(result.tokens)
        decode = model.tokenizer.decode
        top = [[(t, decode([t]), lp) for t, lp in zip(ids, lps, strict=True)] for ids, lps in result.top_logprobs]
        _print(args, prompt_text, result.tokens, text, result.logprobs, result.finish_reason, top)
    return 0


COMMANDS = {"generate": (add_arguments, run)}
