"""`meshserve generate`: generate text for one or more prompts, in process (one batch of different lengths), or
from a running server with `--server HOST:PORT` (same flags, same output; the prompts run concurrently there).

`--n K` samples each prompt K times, sample i with seed + i (OpenAI's n; GenerateRequest.n with --server, where the
server's limits.max_n bounds it; in process the prompt is repeated in the batch, up to N_MAX_LOCAL). Text output
puts each sample under a `--- sample i ---` header; --json prints one line per prompt, {"choices": [{"index",
"tokens", "text", "logprobs", "finish_reason"}, ...]}. K = 1 (the default) prints exactly what it did before.

`--chat` makes each PROMPT the user message of its own conversation (after `--system TEXT` when given), rendered by
the model's chat template (model/chat.py; GenerateRequest.messages with --server); the reply alone is printed.

`--json-object` / `--json-schema FILE` / `--choice TEXT ...` / `--regex PATTERN` guide the output to a JSON object /
JSON the schema accepts / exactly one of the strings / a string the pattern matches whole (with --server:
GenerateRequest.response_format; in process the prompts run through the serving engine, cli_generate_guided.py,
since model.generate's on-device loop cannot follow a grammar)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from meshserve.analytics.cli_helpers import ints
from meshserve.errors import UserError
from meshserve.serving.cli_generate_guided import add_guided_arguments, guided_flag, guided_kwargs, guided_spec
from meshserve.serving.cli_sampling import (
    N_MAX_LOCAL,
    add_chat_arguments,
    add_sampling_arguments,
    chat_messages,
)

INT32_MAX = 2**31 - 1  # GenerateRequest.n is an int32 field

__all__ = ["COMMANDS", "TIMEOUT_S"]

TIMEOUT_S = 300.0  # --timeout's default: seconds per request to a server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="text prompts, not empty (several run as one batch)"
    )
    parser.add_argument(
        "--tokens",
        action="append",
        type=ints,
        default=[],
        metavar="1,2,3",
        help="a prompt as token ids instead of text; repeat for several prompts (default: none)",
    )
    parser.add_argument("--checkpoint", help="a meshserve checkpoint directory (default: the bundled demo model)")
    parser.add_argument(
        "--model", metavar="PRESET", help="instead of --checkpoint: a preset with random weights (default: none)"
    )
    parser.add_argument(
        "--weights",
        choices=["f32", "bf16", "int8"],
        help="weight dtype (default: the checkpoint's; f32 computes in float32 for exact comparisons)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8"],
        help="KV cache storage: auto (the compute dtype) or int8 (half of bf16's memory; see serve --help); "
        "default auto",
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="ask a running `meshserve serve` instead of loading a model (default: none, in process)",
    )
    parser.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="with --server: a file holding the server's bearer token (default: none)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="with --server: root certificate to verify the server's TLS certificate (default: none, plaintext)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"with --server: seconds per request, > 0 (default {TIMEOUT_S:g})",
    )
    add_sampling_arguments(parser)
    add_chat_arguments(parser)
    add_guided_arguments(parser)
    from meshserve.serving.cli_serve import add_compile_cache_argument  # argparse only

    add_compile_cache_argument(parser)
    from meshserve.partition.cli_args import add_mesh_arguments  # argparse only: --help stays fast

    add_mesh_arguments(parser)


class _Status:
    """A one-line status on stderr, rewritten in place, only when stderr is a terminal: stdout (--json) stays
    clean, and logs and pipes see nothing."""

    def __init__(self) -> None:
        self.on = sys.stderr.isatty()
        self.shown = False

    def __call__(self, text: str) -> None:
        if self.on:
            sys.stderr.write(f"\r\033[Kmeshserve generate: {text}")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _row(args: argparse.Namespace, tokens, text: str, logprobs, finish_reason: str, top=(), extra=None) -> dict:
    """One sample as --json prints it; top: per token, its alternatives as (id, text, logprob); extra: a server's
    "reasoning" (serve --reasoning-parser) where it returned one."""
    row = {"tokens": tokens, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **(extra or {})}
    if args.top_logprobs:
        from meshserve.serving.detok import alternatives_json

        row["top_logprobs"] = alternatives_json(top)
    return row


def _print_samples(args: argparse.Namespace, prompt_text: str | None, samples: list[tuple]) -> None:
    """One prompt's samples, each (tokens, text, logprobs, finish_reason, top[, extra]): one alone as `_print` does (the
    output from before --n existed); several as one --json line of "choices", or each under a text header."""
    if len(samples) == 1:
        _print(args, prompt_text, *samples[0])
    elif args.json:
        print(json.dumps({"choices": [{"index": i, **_row(args, *s)} for i, s in enumerate(samples)]}))
    else:
        for i, s in enumerate(samples):
            print(f"--- sample {i} ---")
            _print(args, prompt_text, *s)


def _print(
    args: argparse.Namespace,
    prompt_text: str | None,
    tokens,
    text: str,
    logprobs,
    finish_reason: str,
    top=(),
    extra=None,
) -> None:
    """One result; top: per generated token, its alternatives as (id, text, logprob) (with --top-logprobs); extra:
    see `_row` (the reasoning is printed before the answer)."""
    if args.json:
        print(json.dumps(_row(args, tokens, text, logprobs, finish_reason, top, extra)))
        return
    if extra:
        print(f"[reasoning] {extra['reasoning'].strip()}")
    shown = prompt_text or ""
    print(f"{shown}\033[1m{text}\033[0m" if sys.stdout.isatty() else f"{shown}{text}")
    for token, lp, alts in zip(tokens, logprobs, top, strict=False):  # one line per token: its pick, then the top n
        others = "  ".join(f"{s!r} {x:.2f}" for _, s, x in alts)
        print(f"  {token:>6} {lp:8.3f}  | {others}")
    print()


def _extra(result) -> dict:
    """A server's reasoning of one sample (client.Generation or Choice), where it returned one (generate sends no
    tools, so no calls come back)."""
    return {"reasoning": result.reasoning} if result.reasoning else {}


def _read_file(flag: str, path: str, binary: bool = False) -> str | bytes:
    """A --flag's file, or a one-line UserError naming the flag and the reason."""
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read {flag} {path}: {e.strerror}") from None


def _run_remote(args: argparse.Namespace, status: _Status) -> int:
    """Each prompt as one Generate call, all in flight at once; results printed in input order."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from meshserve.serving.client import Client

    if args.checkpoint or args.model or args.weights or args.kv_cache_dtype:
        raise UserError("--checkpoint, --model, --weights and --kv-cache-dtype choose a local model; the server has its "
                        "own (drop them)")  # fmt: skip
    token = _read_file("--auth-token-file", args.auth_token_file) if args.auth_token_file else None
    tls_ca = _read_file("--tls-ca", args.tls_ca, binary=True) if args.tls_ca else None
    prompts = list(args.prompts) + [list(t) for t in args.tokens]
    kwargs = dict(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos, return_logprobs=True,
                  stop_token_ids=args.stop_token_ids, n=args.n, stop=args.stop,
                  include_stop_str_in_output=args.include_stop_str, **guided_kwargs(args),
                  **_sampling_fields(args))  # fmt: skip
    # --chat: each prompt goes as messages (the server renders its model's chat template).
    chat = {"chat_template_kwargs": args.chat_template_kwargs} if args.chat_template_kwargs else {}
    inputs = [{"messages": chat_messages(p, args.system), **chat} if args.chat else {"prompt": p} for p in prompts]
    for one in inputs:  # every value the request's fields cannot hold is refused before anything is sent
        Client.request(**one, **kwargs)
    timeout = TIMEOUT_S if args.timeout is None else args.timeout
    status(f"asking {args.server} ({len(prompts)} prompt{'s' * (len(prompts) > 1)}) ...")
    with Client(args.server, token=token, tls_ca=tls_ca) as client:
        try:
            with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
                results = list(pool.map(lambda one: client.generate(**one, timeout=timeout, **kwargs), inputs))
        except grpc.RpcError as e:
            raise UserError(f"server {args.server}: {e.code().name}: {e.details()}") from None
    status.clear()
    for prompt, r in zip(prompts, results, strict=True):
        shown = prompt if isinstance(prompt, str) and not args.chat else None  # --chat: the reply alone
        samples = [(c.tokens, c.text, c.logprobs, c.finish_reason, c.top_logprobs, _extra(c)) for c in r.choices]
        samples = samples or [(r.tokens, r.text, r.logprobs, r.finish_reason, r.top_logprobs, _extra(r))]
        _print_samples(args, shown, samples)
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
    return {name: getattr(args, name) for name in (*names, "min_p", "top_logprobs", "logit_bias", "min_tokens")}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations and values that would be ignored or fail later (one line each, nothing loaded)."""
    if not args.prompts and not args.tokens:
        raise UserError("give at least one PROMPT or --tokens")
    for i, text in enumerate(args.prompts, 1):
        if text == "":  # the server refuses it too ("input: empty prompt"); BOS alone is not a prompt
            raise UserError(f"PROMPT {i} of {len(args.prompts)} is empty: give it some text, or drop it")
    if args.system is not None and not args.chat:
        raise UserError("--system applies with --chat only (add --chat, or drop --system)")
    if args.chat_template_kwargs is not None and not args.chat:
        raise UserError("--chat-template-kwargs applies with --chat only (add --chat, or drop it)")
    if args.chat and args.tokens:
        raise UserError("--chat takes text PROMPTs (each a user message); --tokens are token ids already (drop one)")
    if args.checkpoint and args.model:
        raise UserError(
            "give --checkpoint or --model, not both: drop --model to run the checkpoint, or --checkpoint for the "
            f"preset {args.model!r} with random weights"
        )
    if not args.server:
        given = [flag for flag, value in (("--auth-token-file", args.auth_token_file), ("--tls-ca", args.tls_ca),
                                          ("--timeout", args.timeout)) if value is not None]  # fmt: skip
        if given:
            verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise UserError(f"{' and '.join(given)} only {verb} with --server HOST:PORT (add it, or drop {them})")
    if not args.server and (flag := guided_flag(args)) and args.mesh:
        raise UserError(f"{flag} runs in process on one device (the serving engine); drop --mesh, or ask a server "
                        "started with --mesh (--server HOST:PORT)")  # fmt: skip
    if "" in args.stop:
        raise UserError("--stop must be a non-empty string (an empty one would end every text at once)")
    if args.include_stop_str and not args.stop:
        raise UserError("--include-stop-str applies with --stop only (add --stop TEXT, or drop it)")
    if args.min_tokens > args.max_new_tokens > 0:  # as vLLM: it could never be met (bad values: checked later)
        raise UserError(f"--min-tokens must be <= --max-new-tokens ({args.max_new_tokens}), got {args.min_tokens}")
    guided_kwargs(args)  # a missing or bad --json-schema file, a bad --choice or --regex: reported before anything
    if args.timeout is not None and not (0 < args.timeout < math.inf):
        raise UserError(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    # With --server the server checks n against its own max_n (INVALID_ARGUMENT names it); in process every
    # sample is a batch row.
    top = INT32_MAX if args.server else N_MAX_LOCAL
    if not 1 <= args.n <= top:
        where = "the server's max_n bounds it" if args.server else "samples of one prompt in process"
        raise UserError(f"--n must be in [1, {top}] ({where}), got {args.n}")
    if args.n > 1 and args.seed + args.n - 1 >= 2**63:
        raise UserError(
            f"--seed + --n - 1 must be below 2**63 (sample i uses seed + i), got {args.seed} + {args.n} - 1"
        )


def run(args: argparse.Namespace) -> int:
    from meshserve.model.sampling import SamplingParams
    from meshserve.partition.cli_args import mesh_args

    _check_flags(args)
    mesh_flags = ("mesh", "prefill_layout", "decode_layout", "attention", "collective_matmul")
    if args.server and any(getattr(args, name) for name in mesh_flags):
        raise UserError("--mesh and the layout flags place a local model; the server has its own (drop them)")
    on_mesh = mesh_args(args)  # layouts from --mesh/--prefill-layout/--decode-layout/--attention (None: one device)
    # The same checks in process and with --server; min_tokens' entries (one per stop id) count against the bias
    # table: --stop-token-ids here, the end-of-sequence id once the model (or server) is known.
    held = args.stop_token_ids if args.min_tokens else ()
    sampling = SamplingParams(**_sampling_fields(args), stop_ids=[t for t in held if t >= 0])
    status = _Status()
    try:
        if args.server:
            return _run_remote(args, status)
        return _run_local(args, on_mesh, sampling, status)
    finally:
        status.clear()  # before an error line or the results


def _run_local(args: argparse.Namespace, on_mesh, sampling, status: _Status) -> int:
    """Load the model (onto the mesh when given), generate all prompts as one batch, print in input order."""
    from meshserve.serving.compile_cache import setup_compile_cache

    setup_compile_cache(args.compile_cache, max_gb=args.compile_cache_max_gb)
    from meshserve.model.config import vocab_error
    from meshserve.model.decode_attention import decode_attention_mode
    from meshserve.model.generate import GenerationResult, generate
    from meshserve.model.loading import load_model
    from meshserve.model.quant import int8_matmul_mode, int8_rows_layout
    from meshserve.model.sampling import SamplingParams

    int8_matmul_mode()  # a bad MESHSERVE_INT8_MATMUL fails here in one line, whatever the weights (as serve, bench)
    decode_attention_mode()  # and a bad MESHSERVE_DECODE_ATTENTION, whatever the layers and cache
    mesh, shardings = None, None
    if on_mesh is not None:  # check the mesh and layouts on the config alone, before any weight is read
        from meshserve.model.sharded import check_model, check_phases, mesh_config, min_batch, param_shardings
        from meshserve.partition.mesh import make_mesh

        mesh = make_mesh(on_mesh.mesh)
        # As generate_sharded runs it: grouped-query kv heads the heads split does not divide are replicated.
        config = mesh_config(_config_only(args), mesh, on_mesh.prefill.ffn)
        check_phases(on_mesh.prefill, on_mesh.decode)
        for layout in (on_mesh.prefill, on_mesh.decode):
            check_model(config, mesh, layout, min_batch(layout, mesh))
        shardings = param_shardings(config, mesh, on_mesh.prefill.ffn)  # the checkpoint loads straight onto the mesh
    status(f"loading {f'preset {args.model}' if args.model else args.checkpoint or 'the demo model'} ...")
    # A preset's random weights use a fixed seed: --seed is the sampling seed only.
    model = load_model(args.checkpoint, weights=args.weights, preset=args.model, shardings=shardings)
    if args.chat:  # the template writes BOS itself; a model without one is refused here, before compiling
        extra = args.chat_template_kwargs
        prompts = [model.encode_chat(chat_messages(p, args.system), None, extra) for p in args.prompts]
    else:
        prompts = [model.encode_prompt(p) for p in args.prompts] + list(args.tokens)
    n = args.n
    if n > 1:  # every prompt n times in the batch, sample i with seed + i (as the server's n)
        import dataclasses

        prompts = [p for p in prompts for _ in range(n)]
        sampling = [dataclasses.replace(sampling, seed=sampling.seed + i) for _ in range(len(prompts) // n)
                    for i in range(n)]  # fmt: skip
    if error := vocab_error(model.config, args.stop_token_ids, "--stop-token-ids"):
        raise UserError(error)
    stop_ids = [*args.stop_token_ids, *([] if args.ignore_eos else model.stop_ids())]
    # generate() adds stop_ids to the ids min_tokens holds back, and checks logit_bias against the vocabulary.
    kv_cache_dtype = args.kv_cache_dtype or "auto"
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                  kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    texts = [None if args.chat else p for p in args.prompts] + [None] * len(args.tokens)  # --chat: the reply alone
    # One jit holds prefill and the whole decode loop: compiling it is most of a first run's time.
    k = len(prompts) // n
    status(f"compiling and generating {k} prompt{'s' * (k > 1)}{f' x {n} samples' if n > 1 else ''} ...")
    if (spec := guided_spec(args)) is not None:  # guided: the serving engine (cli_generate_guided.py)
        from meshserve.serving.cli_generate_guided import generate_guided

        rows = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else sampling
        results = [GenerationResult(*r) for r in generate_guided(model, prompts, rows, stop_ids, args.max_new_tokens,
                                                                 spec, status, kv_cache_dtype)]  # fmt: skip
    elif on_mesh is not None:
        from meshserve.model.sharded import generate_sharded

        results = generate_sharded(model.params, model.config, prompts, mesh=mesh,
                                   prefill_layout=on_mesh.prefill, decode_layout=on_mesh.decode, **kwargs)  # fmt: skip
    else:
        import jax
        from meshserve.model.params import unstack_layers

        # On a GPU the unrolled layer loop decodes 2.7x faster than lax.scan over stacked weights (BUILD.md); the
        # stacked arrays are deleted as they are sliced, so the weights are held once.
        if jax.default_backend() == "gpu":
            model.params = unstack_layers(model.params, consume=True, int8_rows=int8_rows_layout())
        results = generate(model.params, model.config, prompts, **kwargs)
    status.clear()
    _print_rows(args, model, texts, results, n)
    return 0


def _print_rows(args: argparse.Namespace, model, texts: list, results, n: int) -> None:
    """Print every prompt's n samples (results: row j * n + i is prompt j's sample i)."""
    from meshserve.serving.detok import alternatives_with_text, cut_at_stop

    rows = []
    for r in results:  # --stop: the tokens and text a server gives (generate itself knows no stop strings)
        kept, text, stopped = cut_at_stop(model.tokenizer, r.tokens, args.stop, args.include_stop_str, args.min_tokens)
        rows.append((r.tokens[:kept], text, r.logprobs[:kept], "stop" if stopped else r.finish_reason,
                     alternatives_with_text(model.tokenizer, r.top_logprobs[:kept])))  # fmt: skip
    for j, prompt_text in enumerate(texts):  # prompt j's samples are rows j * n .. (j + 1) * n - 1
        _print_samples(args, prompt_text, rows[j * n : (j + 1) * n])


COMMANDS = {"generate": (add_arguments, run)}
