"""`meshserve serve`: run the gRPC inference server (the bundled demo model by default).

Loads the model, chooses the plan, compiles the largest step of each kind (every step with --warm-up all; a
progress bar on stderr), then listens and compiles the rest in the background. Prints
`meshserve serve: listening on HOST:PORT` on stderr once requests are answered. SIGTERM or Ctrl-C drains: new
requests are refused, in-flight ones finish within --grace seconds (those still running then end with UNAVAILABLE),
and the process exits 0; a second signal while draining stops at once (130 for Ctrl-C, 143 for SIGTERM). If the
engine thread dies, health turns NOT_SERVING and the process exits 1.

Before `listening` (loading, compiling: minutes on a large model) there is nothing to drain, so a signal stops the
process at once (within the step being compiled): Ctrl-C prints `meshserve serve: interrupted` and exits 130 like
every other command; SIGTERM prints `meshserve serve: terminated before listening` and exits 143 (128 + SIGTERM, the
shell's code for a process ended by SIGTERM), not 0, so a supervisor or script can tell a server that never served
from one that drained cleanly.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from meshserve.errors import UserError

# Moved to serving/compile_cache.py and serving/cli_model.py; imported back so `from meshserve.serving.cli_serve
# import ...` keeps working.
from meshserve.serving.cli_model import add_model_arguments, add_warm_up_argument, load_for_serving, parse_mesh
from meshserve.serving.compile_cache import add_compile_cache_argument, default_compile_cache, setup_compile_cache
from meshserve.serving.signals import SignalLatch, run_interruptibly

__all__ = [
    "COMMANDS",
    "parse_mesh",
    "add_model_arguments",
    "add_compile_cache_argument",
    "default_compile_cache",
    "setup_compile_cache",
    "load_for_serving",
]


SIGNALS_EPILOG = """signals:
  before `listening on` (loading, compiling): Ctrl-C stops at once and exits 130; SIGTERM stops at once and exits
  143 (128 + SIGTERM: the server never served, so a supervisor does not read it as a clean drain).
  after `listening on`: Ctrl-C or SIGTERM drains (new requests refused, in-flight ones get --grace seconds; a
  background warm-up finishes the step it is compiling) and exits 0; a second Ctrl-C or SIGTERM stops at once
  (exit 130 or 143, streams still open are cut); a dead engine thread exits 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SIGNALS_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API on this port: /v1/completions, /v1/chat/completions, "
        "/v1/responses, /v1/models, /tokenize, /detokenize, /health and /metrics (Prometheus, as --metrics-port; "
        "like /health open without --auth-token-file's token, as vLLM's); a known path with another method answers "
        "405 with Allow (default: off; 8000 is usual; 0 = any free port)",
    )
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="the model's id in the HTTP API (default: the model's name)"
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=("hermes", "llama3_json"),  # serving/openai_tools.py PARSERS (not imported: --help stays fast)
        help="tool calling in chats (vLLM's --enable-auto-tool-choice --tool-call-parser): `tools` are rendered by "
        "the chat template and the model's calls come back as the HTTP API's message.tool_calls and gRPC's "
        "GenerateResponse.tool_calls: hermes reads <tool_call>{...}</tool_call> blocks (Qwen2.5, Qwen3, Hermes 2/3), "
        'llama3_json bare {"name": ..., "parameters": {...}} calls, several joined by ";" (Llama 3.1-3.3) '
        "(default: off; an HTTP chat with tools answers 400, a gRPC one gets its text as generated)",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=("qwen3", "deepseek_r1"),  # serving/reasoning.py PARSERS (not imported: --help stays fast)
        help="thinking models (vLLM's --reasoning-parser): a chat's <think>...</think> block comes back as the HTTP "
        "API's message.reasoning_content (streamed: delta.reasoning_content) and gRPC's reasoning, the answer after it "
        "as content (and read for tool calls); where the block starts is read from the chat template's generation "
        "prompt, so both names work for either family (default: off, the text comes back as generated)",
    )
    parser.add_argument(
        "--default-chat-template-kwargs",
        metavar="JSON",
        help="template variables every chat gets, a JSON object, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "(vLLM's; a request's chat_template_kwargs replace them key by key; default: none)",
    )
    parser.add_argument(
        "--http-max-connections",
        type=int,
        metavar="N",
        help="open HTTP connections (idle keep-alive ones too) beyond which a new one is answered 503 (default: "
        "max batch + max queue + max score queue + 16, as many as gRPC's worker threads)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for a slot before RESOURCE_EXHAUSTED (default 256)"
    )
    parser.add_argument(
        "--max-new-tokens-limit", type=int, help="largest max_new_tokens accepted (default: the context)"
    )
    from meshserve.serving.validation import DEFAULT_MAX_N, max_n_flag  # no JAX: --help stays fast

    parser.add_argument(
        "--max-n",
        type=max_n_flag,
        default=DEFAULT_MAX_N,
        help=f"largest n (samples per Generate request) accepted; each sample takes a queue place, so it is capped at "
        f"--max-queue (default {DEFAULT_MAX_N})",
    )
    parser.add_argument(
        "--max-score-queue",
        type=int,
        default=16,
        help="Score requests running or waiting before RESOURCE_EXHAUSTED (default 16)",
    )
    parser.add_argument(
        "--max-score-tokens",
        type=int,
        default=262144,
        help="prompt + continuation tokens over all items of one Score request, beyond which it answers "
        "INVALID_ARGUMENT (default 262144 = 256 items x 1024; its reply, ~9 bytes a token, fits the 4 MiB limit)",
    )
    parser.add_argument(
        "--objective",
        choices=["latency", "throughput"],
        default="latency",
        help="plan for low latency (default) or high throughput",
    )
    add_warm_up_argument(parser, "serving", "listening")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--auth-token-file",
        help="require `authorization: Bearer <token>` (over HTTP on every path but /health and /metrics); the "
        "file holds the token",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics on this port at /metrics (default 0: off; 9090 is usual); --http-port serves "
        "them at its /metrics too",
    )
    parser.add_argument(
        "--log-requests",
        action="store_true",
        help="write a line per finished request to stderr (gRPC and HTTP): method, status, samples, prompt, cached "
        "and generated tokens, finish reasons, queue / first-token / total ms, id; counts and times only, never "
        "the text (default: off)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on SIGTERM; then they end with UNAVAILABLE (default 30)",
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise UserError(f"--http-port must be in [0, 65535], got {args.http_port}")
    if args.http_max_connections is not None and args.http_max_connections < 1:
        raise UserError(f"--http-max-connections must be >= 1, got {args.http_max_connections}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name must not be empty")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.grace < 0:
        raise UserError(f"--grace must be >= 0, got {args.grace}")
    if args.max_score_queue < 1:
        raise UserError(f"--max-score-queue must be >= 1, got {args.max_score_queue}")
    if args.max_new_tokens_limit is not None and args.max_new_tokens_limit < 1:
        raise UserError(f"--max-new-tokens-limit must be >= 1, got {args.max_new_tokens_limit}")
    from meshserve.serving.server import ServerOptions, build_server, check_score_tokens

    # Before loading the model: a bad flag fails in one line, naming the flag.
    check_score_tokens(args.max_score_tokens, name="--max-score-tokens")
    from meshserve.model.decode_attention import decode_attention_label
    from meshserve.model.quant import int8_matmul_label
    from meshserve.progress import progress

    # Signals only record themselves (serving/signals.py); the main thread acts on them: before `listening`
    # (nothing to drain yet) they end the process at once (run_interruptibly), after it they drain (the loop below).
    latch = SignalLatch("serve")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token_file=args.auth_token_file,
        metrics_port=args.metrics_port,
        max_new_tokens=args.max_new_tokens_limit,
        max_score_queue=args.max_score_queue,
        max_score_tokens=args.max_score_tokens,
        warm_up=args.warm_up,
        max_n=args.max_n,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
        http_max_connections=args.http_max_connections,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        chat_template_kwargs=_template_kwargs(args.default_chat_template_kwargs),
        log_requests=args.log_requests,
    )

    from meshserve.serving.warm_up import PHASES, upfront_steps

    def load_and_warm_up():
        model, plan, steps, mesh_info = load_for_serving(args, args.objective)
        total = upfront_steps(plan, PHASES, defer=args.warm_up == "background")
        with progress("compiling", "step", total, leave=False) as bar:  # a log gets lines, not redraws
            server = build_server(model, plan, options, steps=steps, mesh_info=mesh_info,
                                  progress=lambda job: bar.update(job.units))  # fmt: skip
        return model, plan, server

    model, plan, server = run_interruptibly(load_and_warm_up, latch, "terminated before listening")
    compiled, pending = server.engine.compiled_steps(), server.engine.pending_steps()
    listening, announced = time.monotonic(), threading.Event()

    def warm(n_compiled: int, failed: int) -> None:
        announced.wait()  # after the `listening on` line, even when the last steps came from the compile cache
        failures = f", {failed} failed to compile (see above; their shapes run padded)" if failed else ""
        print(f"meshserve serve: warm-up done, {n_compiled} compiled steps{failures} ({time.monotonic() - listening:.0f}"
              " s in the background)", file=sys.stderr, flush=True)  # fmt: skip

    server.start(warm)
    steps = f"{compiled} of {compiled + pending} steps compiled, the rest in the background" if pending else (
        f"{compiled} compiled steps"
    )  # fmt: skip
    unrolled = isinstance(model.params["layers"], list)
    int8 = f", int8 matmul {int8_matmul_label(unrolled)}" if model.weights == "int8" else ""
    cache_dtype = "int8" if plan.kv_cache_dtype == "int8" else model.params["embed"].dtype  # the compute dtype's cache
    attn = decode_attention_label(model.config, unrolled, cache_dtype)
    # Speculative verify steps (several tokens per row) attend through XLA: only plain decode steps take the kernel.
    verify = " in plain decode steps, XLA's in speculative verify steps" if plan.speculative_tokens else ""
    attn = f", decode attention {attn}{verify}" if attn != "xla" else ""
    print(
        f"meshserve serve: {model.source} ({model.weights}{int8}, {plan.objective}, max_batch {plan.max_batch}, "
        f"{steps}, {'unrolled' if unrolled else 'scan'} layers, "
        f"prefix caching {'on' if plan.prefix_caching else 'off'}, prefill chunk {plan.prefill_chunk or 'off'}"
        f"{', int8 KV cache' if plan.kv_cache_dtype == 'int8' else ''}{attn})",
        file=sys.stderr,
    )
    if server.http is not None:
        scheme = "https" if args.tls_cert else "http"
        print(f"meshserve serve: OpenAI-compatible API on {scheme}://{args.host}:{server.http.port}/v1 (model "
              f"{server.http.model_name!r})", file=sys.stderr)  # fmt: skip
    print(f"meshserve serve: listening on {args.host}:{server.port}", file=sys.stderr, flush=True)
    announced.set()
    while not latch.event.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        if server.orchestrator.error is not None:
            break
    error = server.orchestrator.error
    if error is not None:
        # The engine thread died (a bug; its traceback is above): every request would fail, so do not look
        # healthy to a load balancer; stop and exit non-zero so a supervisor restarts the server.
        server.set_serving(False)
        print(
            f"meshserve serve: engine failed ({type(error).__name__}: {error}); stopping", file=sys.stderr, flush=True
        )
        server.stop(0.0)
        return 1
    print(f"meshserve serve: draining (a second {'Ctrl-C' if latch.interrupted else 'signal'} stops at once)",
          file=sys.stderr, flush=True)  # fmt: skip
    clean = server.stop(args.grace)
    print(
        f"meshserve serve: stopped ({'all requests finished' if clean else 'some requests cancelled'})",
        file=sys.stderr,
        flush=True,
    )
    return 0


COMMANDS = {"serve": (add_arguments, run)}


def _template_kwargs(text: str | None) -> dict:
    """--default-chat-template-kwargs: a JSON object of template variables; a UserError (ChatError) naming the flag
    otherwise."""
    from meshserve.model.chat import read_template_kwargs

    return read_template_kwargs(text or "", "--default-chat-template-kwargs")
