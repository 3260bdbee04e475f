"""Assemble and run the gRPC server: model -> plan -> engine (warmed up) -> scheduler -> orchestrator -> servicer.

Also the standard grpc.health.v1 service, server reflection, optional TLS, an optional bearer-token check
(UNAUTHENTICATED; health stays open so load balancers can probe), the Prometheus endpoint and the OpenAI-compatible
HTTP API (serving/http_server.py; same TLS, token, engine and limits).
"""

from __future__ import annotations

import hmac
import logging
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from meshserve.errors import UserError
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc
from meshserve.serving.engine import Engine, ModelSteps
from meshserve.serving.http_server import HttpFront
from meshserve.serving.metrics import ServerMetrics
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import EnginePlan
from meshserve.serving.reasoning import ChatOptions
from meshserve.serving.scheduler import Scheduler
from meshserve.serving.score_jobs import DEFAULT_MAX_SCORES
from meshserve.serving.servicer import DEFAULT_MAX_SCORE_TOKENS, InferenceServicer, Limits, score_reply_bytes
from meshserve.serving.speculative import speculator_for
from meshserve.serving.warm_up import BackgroundCompile, CompileJob

__all__ = ["ServerOptions", "InferenceServer", "build_server", "ServerError", "check_score_tokens"]

log = logging.getLogger("meshserve.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # meshserve.v1.Inference
# gRPC's own cap on one incoming message; larger ones answer RESOURCE_EXHAUSTED before reaching the servicer.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_HANDLER_GRACE_S = 2.0  # after the drain's grace: time for handlers to send the status of cancelled requests


class ServerError(UserError):
    """A server option that cannot work (port in use, unreadable TLS or token file)."""


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (see InferenceServer.port)
    max_queue: int = 256
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    metrics_port: int = 0  # 0 = no metrics endpoint
    max_new_tokens: int | None = None  # default: the whole context
    max_score_queue: int = DEFAULT_MAX_SCORES  # Score requests running + waiting before RESOURCE_EXHAUSTED
    max_score_tokens: int = DEFAULT_MAX_SCORE_TOKENS  # prompt + continuation tokens over one Score's items
    # "all": compile every step before serving. "background": compile each kind's largest bucket, serve, and compile
    # the other buckets on a background thread (requests of their shapes run padded to a larger one meanwhile).
    warm_up: str = "all"
    max_n: int = Limits.max_n  # samples per Generate request (GenerateRequest.n)
    http_port: int | None = None  # the OpenAI-compatible HTTP API (serving/http_server.py); None = off, 0 = any port
    served_model_name: str | None = None  # the model's id in the HTTP API (default: the config's name)
    http_max_connections: int | None = None  # open HTTP connections (default: as many as gRPC's worker threads)
    tool_call_parser: str | None = None  # chat tool calls' format, HTTP and gRPC (serving/openai_tools.py); None = off
    # chats' <think> blocks split from the answer, guided formats after them (serving/reasoning.py); None = off
    reasoning_parser: str | None = None
    chat_template_kwargs: dict | None = None  # template variables every chat gets (a request's own replace them)
    log_requests: bool = False  # a line per finished request on stderr (serving/access_log.py)


def chat_options(options: ServerOptions) -> ChatOptions:
    return ChatOptions(options.reasoning_parser, options.chat_template_kwargs)


class _AuthInterceptor(grpc.ServerInterceptor):
    """Every RPC but health checks needs `authorization: Bearer <token>`; the token is never logged."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny_stream if handler_call_details.method.endswith("Stream") else self._deny


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ServerError(f"cannot read {what} {path}: {e.strerror}") from None


class InferenceServer:
    """A running server. `port` is the bound port; `stop(grace)` drains and stops."""

    def __init__(self, model, engine: Engine, plan: EnginePlan, options: ServerOptions, mesh_info: dict | None = None):
        self.model, self.engine, self.plan, self.options = model, engine, plan, options
        self.metrics = ServerMetrics()
        if options.log_requests:
            self.metrics.request_log = sys.stderr
        self.metrics.compile_pending.set_function(engine.pending_steps)
        scheduler = Scheduler.for_plan(plan, options.max_queue)
        self.orchestrator = Orchestrator(engine, scheduler, model.tokenizer, self.metrics, options.max_score_queue,
                                         speculator_for(plan))  # fmt: skip
        limits = Limits(
            max_context=plan.max_context,
            max_batch=plan.max_batch,
            max_new_tokens=min(options.max_new_tokens or plan.max_context, plan.max_context),
            max_queue=options.max_queue,
            max_score_tokens=options.max_score_tokens,
            # Each sample takes a queue place and all n are queued at once: a larger n could never be admitted, and
            # should be refused as invalid (INVALID_ARGUMENT) rather than as busy (RESOURCE_EXHAUSTED, retried).
            max_n=min(options.max_n, max(1, options.max_queue)),
        )
        self.limits = limits
        self.servicer = InferenceServicer(self.orchestrator, model, plan, limits, mesh_info or {},
                                          tool_parser=options.tool_call_parser, chat=chat_options(options))  # fmt: skip
        interceptors = []
        token = None
        if options.auth_token_file:
            token = _read(options.auth_token_file, "auth token file").decode().strip()
            if not token:
                raise ServerError(f"auth token file {options.auth_token_file} is empty")
            interceptors.append(_AuthInterceptor(token))
        # Each open stream or Score holds a worker thread; RPCs beyond slots + queue + Score queue (+ a few for
        # info/health) answer RESOURCE_EXHAUSTED instead of waiting unseen inside gRPC.
        workers = plan.max_batch + options.max_queue + options.max_score_queue + 16
        from concurrent.futures import ThreadPoolExecutor

        self._grpc = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshserve-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a port in use must fail, not be shared with another server
            ],
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_InferenceServicer_to_server(self.servicer, self._grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        address = f"{options.host}:{options.port}"
        if (options.tls_cert or options.tls_key) and not (options.tls_cert and options.tls_key):
            raise ServerError("TLS needs both --tls-cert and --tls-key")
        try:
            if options.tls_cert:
                creds = grpc.ssl_server_credentials(
                    [(_read(options.tls_key, "TLS key"), _read(options.tls_cert, "TLS certificate"))]
                )
                bound = self._grpc.add_secure_port(address, creds)
            else:
                bound = self._grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio raises (older releases returned 0) when the address cannot be bound
            bound = 0
        if not bound:
            raise ServerError(f"cannot listen on {address} (port in use or address not available)")
        self.port = bound
        if options.metrics_port:
            # Bound here, before the caller's warm-up: a port in use fails in seconds, not after minutes of compiling.
            try:
                self.metrics.serve(options.metrics_port, options.host)
            except OSError as e:
                raise ServerError(f"cannot serve metrics on {options.host}:{options.metrics_port}: "
                                  f"{e.strerror or e}") from None  # fmt: skip
        self.http: HttpFront | None = None
        if options.http_port is not None:
            self.http = self._bind_http(options, token, workers)
        self._stopped = threading.Event()
        self._compiler: BackgroundCompile | None = None

    def _bind_http(self, options: ServerOptions, token: str | None, workers: int) -> HttpFront:
        tls = (options.tls_cert, options.tls_key) if options.tls_cert else None
        cap = workers if options.http_max_connections is None else options.http_max_connections
        try:
            return HttpFront(self.orchestrator, self.model, self.limits, host=options.host, port=options.http_port,
                             model_name=options.served_model_name or self.model.config.name, token=token, tls=tls,
                             max_connections=cap, tool_parser=options.tool_call_parser,
                             chat=chat_options(options))  # fmt: skip
        except (OSError, ssl.SSLError) as e:
            self._grpc.stop(None)  # the gRPC port is bound: free it, the server will not start
            where = f"{options.host}:{options.http_port}"
            raise ServerError(f"cannot serve HTTP on {where}: {getattr(e, 'strerror', None) or e}") from None

    def start(self, warm: Callable[[int, int], None] | None = None) -> InferenceServer:
        """Serve; with steps a deferred warm-up left, compile them on a background thread, then call
        warm(compiled steps, steps that failed to compile) (not when the server stops first)."""
        self.orchestrator.start()
        self._grpc.start()
        if self.http is not None:
            self.http.start()
        self.set_serving(True)
        # The vocabulary's table for guided decoding (a trie of every token's bytes: ~0.4 s for 90k tokens) is built
        # now, beside the first requests, rather than by the first guided request.
        threading.Thread(target=self.orchestrator.guides.prepare, name="guided-token-table", daemon=True).start()
        if self.engine.pending_steps():
            self._compiler = BackgroundCompile(
                self.engine,
                lambda job, e: log.error("background warm-up: %s failed to compile: %s: %s", job.label,
                                         type(e).__name__, e),
                None if warm is None else lambda failed: warm(self.engine.compiled_steps(), failed),
            ).start()  # fmt: skip
        return self

    def set_serving(self, serving: bool) -> None:
        """Health of the server and of meshserve.v1.Inference: SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        if self.http is not None:
            self.http.serving = serving

    def stop(self, grace: float = 30.0) -> bool:
        """Drain: NOT_SERVING, refuse new requests, let in-flight ones finish (up to `grace` s), then stop.

        Returns True when every in-flight request finished within the grace period.
        """
        if self._stopped.is_set():
            return True
        self.set_serving(False)
        if self._compiler is not None:
            self._compiler.stop(wait=False)  # a draining server needs no more buckets
        # gRPC refuses new RPCs from here on; the engine finishes what it holds and cancels the rest at `grace`,
        # whose handlers then end their RPCs with UNAVAILABLE. gRPC's own hard stop comes a little later, so it
        # only cuts an RPC whose handler did not end by then.
        stopped = self._grpc.stop(grace=grace + _HANDLER_GRACE_S)
        clean = self.orchestrator.drain(grace)
        if self.http is not None:
            self.http.stop(_HANDLER_GRACE_S)  # its handlers write their last answers (or 503s), then it closes
        stopped.wait()
        self._stopped.set()
        if self._compiler is not None:
            self._compiler.stop()  # waits for the step in flight
        return clean

    def wait(self) -> None:
        self._stopped.wait()


def check_score_tokens(
    max_score_tokens: int, max_items: int = Limits.max_score_items, name: str = "max_score_tokens"
) -> None:
    """Refuse a Score token limit whose largest valid reply would not fit gRPC's send limit. `name`: what the
    message calls the limit (the CLI passes its flag, --max-score-tokens)."""
    room = (MAX_MESSAGE_BYTES - 32 * max_items) // 9
    if not 1 <= max_score_tokens <= room or score_reply_bytes(max_items, max_score_tokens) > MAX_MESSAGE_BYTES:
        raise ServerError(
            f"{name} must be in [1, {room}] (a Score reply carries ~9 bytes per token and must fit "
            f"{MAX_MESSAGE_BYTES} bytes), got {max_score_tokens}"
        )


def build_server(
    model,
    plan: EnginePlan,
    options: ServerOptions,
    *,
    steps: ModelSteps | None = None,
    mesh_info: dict | None = None,
    progress: Callable[[CompileJob], None] | None = None,
) -> InferenceServer:
    """Bind the ports and read the TLS and token files, then compile the plan's steps (warm-up): all of them, or with
    options.warm_up "background" each kind's largest bucket, leaving the rest to a thread that `start` runs.

    The server is returned bound but not started (call `.start()`); a bad port or file fails before any compile.
    """
    if options.max_queue < 0:
        raise ServerError(f"max_queue must be >= 0, got {options.max_queue}")
    if options.max_score_queue < 1:
        raise ServerError(f"max_score_queue must be >= 1, got {options.max_score_queue}")
    check_score_tokens(options.max_score_tokens)
    if options.max_n < 1:
        raise ServerError(f"max_n must be >= 1, got {options.max_n}")
    if options.warm_up not in ("all", "background"):
        raise ServerError(f"warm_up must be 'all' or 'background', got {options.warm_up!r}")
    engine = Engine(model.params, model.config, plan, steps or ModelSteps())
    server = InferenceServer(model, engine, plan, options, mesh_info)
    engine.warm_up(progress, defer=options.warm_up == "background")
    return server
