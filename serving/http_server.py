"""The OpenAI-compatible HTTP front of `meshserve serve --http-port`: /v1/completions, /v1/chat/completions,
/v1/responses (served on the chat path: serving/openai_responses_api.py), /v1/models, /health and /metrics (the
server's Prometheus registry, as --metrics-port serves it; open without the bearer token, as vLLM's), beside the gRPC
API and over the same engine, queue, limits and metrics.

Standard library only (http.server, one thread per connection): a body is parsed by serving/openai_protocol.py,
validated by the same RequestParser as gRPC (so the limits and checks are the same, reported under the OpenAI field
names), queued all-or-none with Orchestrator.submit_many, and answered as OpenAI's API does: a JSON object, or with
"stream": true server-sent events ending in `data: [DONE]`. Errors are OpenAI's {"error": {"message", "type",
"param", "code"}} with 400 (bad field), 401 (bearer token), 404 (path or model), 405 (a known path, another method:
with an Allow header), 413 (body size), 429 (queue full), 503 (draining) or 500 (engine failed). A client that goes
away cancels its samples (their slots are freed at the engine's next step, a queued one leaves the queue): noticed
while it waits, a stream also while queued or holding text back, under TLS too (http_connections.WireIO.client_gone).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

from meshserve.errors import UserError
from meshserve.serving.guided_requests import submit_error
from meshserve.serving.http_connections import CappedHTTPServer, WireIO
from meshserve.serving.http_tokens import detokenize, echo_prompts, tokenize
from meshserve.serving.openai_protocol import (
    CHAT,
    COMPLETIONS,
    HttpError,
    ModelNotFound,
    OpenAIRequest,
    openai_error,
    param_of,
    parse_body,
)
from meshserve.serving.openai_responses import Choices, Echo, Unsent, chunk, error_body, final_response
from meshserve.serving.openai_responses_api import PATH as RESPONSES
from meshserve.serving.openai_responses_api import respond
from meshserve.serving.orchestrator import GRACE_ENDED, Orchestrator, ShuttingDownError
from meshserve.serving.reasoning import ChatOptions
from meshserve.serving.requests import ClientGone, sample_events
from meshserve.serving.scheduler import QueueFullError
from meshserve.serving.validation import Limits, RequestError, RequestParser

__all__ = ["HttpFront", "HttpError", "allowed_methods"]

log = logging.getLogger("meshserve.http")
_ROUTES = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT, RESPONSES: RESPONSES}
_TOKENIZERS = ("/tokenize", "/detokenize")  # vLLM's
# Each known path's methods (a 405's Allow header); any other path is 404 whatever the method.
_METHODS = {"/health": "GET, HEAD", "/metrics": "GET, HEAD", "/v1/models": "GET, HEAD",
            **{path: "POST" for path in (*_ROUTES, *_TOKENIZERS)}}  # fmt: skip
_CODES = {0: "CANCELLED", 200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
          411: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
          503: "UNAVAILABLE"}  # fmt: skip


def allowed_methods(path: str) -> str | None:
    """The methods `path` answers (an Allow header's value); None for a path this server does not know."""
    return "GET, HEAD" if path.startswith("/v1/models/") else _METHODS.get(path)


class HttpFront:
    """The HTTP server: bound in __init__ (a port in use fails before any compile), served by `start`."""

    def __init__(self, orchestrator: Orchestrator, model, limits: Limits, *, host: str, port: int, model_name: str,
                 token: str | None = None, tls: tuple[str, str] | None = None, max_connections: int = 0,
                 tool_parser: str | None = None, chat: ChatOptions | None = None):  # fmt: skip
        """max_connections: open connections (each holds a thread, idle keep-alive ones too) beyond which a new one
        is answered 503 and closed; 0 = no cap. tool_parser: chat tool calls' format (serve --tool-call-parser,
        serving/openai_tools.py PARSERS); None: a chat with tools is refused. chat: the reasoning parser and default
        template variables (serving/reasoning.py)."""
        self.orch, self.model, self.limits, self.model_name = orchestrator, model, limits, model_name
        self.tool_parser = tool_parser
        self.chat = chat or ChatOptions()
        self.parser = RequestParser(model, limits, tool_parser=tool_parser, chat=self.chat)
        self.metrics = orchestrator.metrics
        self._token = token.encode() if token else None
        self.created = int(time.time())
        self.serving = False  # /health answers 200 only while serving (not before start, not while draining)
        # A body holds at most the text limit (JSON may escape a character as 6 bytes), or a batch of token-id prompts
        # (up to a queue's worth of whole contexts, ~8 bytes an id), and some fields.
        prompts = max(1, min(limits.max_queue, 256))
        self.max_body_bytes = max(6 * limits.text_chars, 8 * limits.max_context * prompts) + 65536
        self._active = 0
        self._idle = threading.Condition()
        self.httpd = CappedHTTPServer((host, port), _Handler, bind_and_activate=True)
        self.httpd.daemon_threads = True  # an idle keep-alive connection must not hold the process at exit
        self.httpd.front = self  # type: ignore[attr-defined]
        self.httpd.open_slots = threading.BoundedSemaphore(max_connections) if max_connections else None
        self.httpd.max_connections = max_connections
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
            # The handshake happens on the connection's own thread (its first read), never in the accept loop.
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="meshserve-http", daemon=True)

    def start(self) -> HttpFront:
        self._thread.start()
        return self

    def stop(self, wait_s: float) -> None:
        """After the orchestrator drained: give handlers `wait_s` to write their last answers, then close."""
        deadline = time.monotonic() + wait_s
        with self._idle:
            while self._active and self._idle.wait(max(0.0, deadline - time.monotonic())):
                pass
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorized(self, header: str | None) -> bool:
        """`Authorization: Bearer <token>` (the scheme in any case, RFC 7235), or no token configured."""
        if self._token is None:
            return True
        scheme, _, given = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def models(self) -> dict:
        """GET /v1/models: the one model this server serves."""
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        """GET /v1/models/{id}: this server's model."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "meshserve",
                "max_model_len": self.limits.max_context}  # fmt: skip

    def count(self, path: str, status: int, handles: list = (), request_id: str | None = None) -> None:
        """Counted in the metrics and, with --log-requests, logged (with the client's X-Request-Id when it sent one)."""
        extra = {"request_id": request_id} if request_id else {}
        self.metrics.count_request(f"POST {path}", _CODES.get(status, str(status)), handles, **extra)

    # ----- a generation: parse, validate, queue, wait -----

    def submit(self, kind: str, body) -> tuple[OpenAIRequest, list, queue.SimpleQueue, list[Echo] | None]:
        """Parse and validate every prompt, score the prompts when echoed, then queue all their samples at once (all
        or none). Returns the parsed body, the samples' handles, their event queue and the echoed prompts."""
        if not self.serving:  # draining: refused from the moment /health says so, before the engine stops taking any
            raise HttpError(503, "server is shutting down; not accepting new requests")
        try:
            parsed = parse_body(kind, body, self.model_name, self.tool_parser, self.limits.max_new_tokens)
        except ModelNotFound as e:
            raise HttpError(404, str(e), "model") from None
        except RequestError as e:
            raise HttpError(400, str(e), param_of(str(e))) from None
        samples, stop = [], []
        for i, req in enumerate(parsed.requests):
            try:
                # Chat without max_tokens runs to the end of the context (OpenAI, vLLM); completions as gRPC (64).
                requests, stop = self.parser.samples(req, None, *([self.limits.max_context] if kind == CHAT else []))
            except RequestError as e:
                index = i if len(parsed.requests) > 1 else None
                message, param = openai_error(kind, e, parsed.max_tokens_field, index, parsed.guide_field)
                raise HttpError(400, message, param) from None
            samples += requests
        need = len(samples)
        if need > max(1, self.limits.max_queue):
            raise HttpError(400, f"prompt: {len(parsed.requests)} prompts x n={parsed.n} need {need} queue places, more "
                            f"than the server's max_queue={self.limits.max_queue}; send fewer prompts per request",
                            "prompt")  # fmt: skip
        echo = echo_prompts(self, parsed, samples[:: parsed.n]) if parsed.echo else None
        if parsed.score_only:  # nothing to generate: every choice is its prompt, finished
            return parsed, [Unsent(r) for r in samples], queue.SimpleQueue(), echo
        try:
            handles, events = self.orch.submit_many(samples, stop)
        except QueueFullError as e:
            raise HttpError(429, str(e)) from None
        except ShuttingDownError as e:
            raise HttpError(503, str(e)) from None
        except UserError as e:  # a guided format past its bounds, found while preparing its masks
            raise HttpError(400, *submit_error(str(e), parsed.guide_field)) from None
        return parsed, handles, events, echo

    def events(self, handles: list, events: queue.SimpleQueue, gone: Callable[[], bool]):
        """(choice index, Event) until every sample had its last (requests.sample_events); the client gone ->
        ClientGone; the engine refusing the prompt -> 400, the engine failing -> 500."""
        try:
            yield from sample_events(events, sum(not isinstance(h, Unsent) for h in handles), gone)
        except (ClientGone, GeneratorExit):  # GeneratorExit: the caller closed this generator
            raise
        except UserError as e:  # the engine refused this prompt at prefill (it goes on)
            raise HttpError(400, str(e)) from None
        except BaseException as e:  # the engine thread failed (what it put on the queue)
            raise HttpError(500, f"engine failed: {type(e).__name__}") from None

    def cancel(self, handles: list) -> None:
        for handle in handles:
            self.orch.cancel(handle)

    def shut_down_error(self, reasons: list[str | None]) -> HttpError | None:
        if "cancelled" in reasons and self.orch.grace_passed:
            return HttpError(503, GRACE_ENDED)
        return None

    def active(self, delta: int) -> None:
        with self._idle:
            self._active += delta
            self._idle.notify_all()


class _Handler(WireIO):
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI's clients expect

    def version_string(self) -> str:
        """The Server header: meshserve only (http.server's default adds the Python version, and with an empty
        sys_version a trailing space)."""
        return "meshserve"

    timeout = 300  # an idle keep-alive connection is closed after this many seconds

    @property
    def front(self) -> HttpFront:
        return self.server.front  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        if path == "/health":  # open without a token, for load balancers
            return self.send_json(
                200 if self.front.serving else 503, {"status": "ok" if self.front.serving else "draining"}
            )
        if path == "/metrics":  # open without a token, as vLLM's: a scraper holds no API key (counts, no text)
            return self._metrics()
        if allowed_methods(path) == "POST":
            return self.wrong_method()
        if not self._authorized():
            return
        if path == "/v1/models":
            return self.send_json(200, self.front.models())
        if path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            if name == self.front.model_name:
                return self.send_json(200, self.front.model_card())
            message = f"model: {name!r} is not served here (this server serves {self.front.model_name!r})"
            return self._error(HttpError(404, message, "model"))
        self._error(HttpError(404, f"GET {path}: not found (GET /v1/models, GET /health, GET /metrics)"))

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        kind = _ROUTES.get(path)
        front = self.front
        if kind is None and path not in _TOKENIZERS:
            self.close_connection = True  # the body is not read: the connection cannot carry another request
            if allowed_methods(path) is not None:
                return self.wrong_method()
            return self._error(HttpError(404, f"POST {path}: not found (POST /v1/completions, /v1/chat/completions, "
                                              "/v1/responses, /tokenize, /detokenize)"))  # fmt: skip
        if not self._authorized():
            self.close_connection = True
            return front.count(path, 401, request_id=self.request_id)
        if kind is None:
            return front.count(path, self._tokenizer(path), request_id=self.request_id)
        front.active(+1)
        self.handles: list = []  # the request's samples, once queued (cancelled on an error; the request log's)
        try:
            status = self._generate(kind, path)
        finally:
            front.active(-1)
        front.count(path, status, self.handles, self.request_id)

    def _tokenizer(self, path: str) -> int:
        try:
            body = self._body()
            self.send_json(200, (tokenize if path == "/tokenize" else detokenize)(self.front, body))
            return 200
        except HttpError as e:
            self._error(e)
            return e.status

    def _generate(self, kind: str, path: str) -> int:
        """Answer one completion; returns the status counted in the metrics (0: the client went away)."""
        front = self.front
        try:
            if kind == RESPONSES:
                return respond(self, self._body())
            parsed, self.handles, events, echo = front.submit(kind, self._body())
            if parsed.stream:
                return self._stream(parsed, self.handles, events)
            out = Choices(front.model.tokenizer, parsed, self.handles, echo, front.chat)
            for index, event in front.events(self.handles, events, self.client_gone):
                out.add(index, event)
            if error := front.shut_down_error(out.reasons):
                raise error
            self.send_json(200, final_response(out, front.model_name))
            return 200
        except HttpError as e:
            front.cancel(self.handles)
            self._error(e)
            return e.status
        except (ClientGone, BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            front.cancel(self.handles)
            self.close_connection = True
            return 0
        except Exception as e:  # a bug: answer (the client must not wait or retry blindly) and free the samples
            log.exception("%s failed", path)
            front.cancel(self.handles)
            self.close_connection = True
            if self._streaming:
                self._stream_error(HttpError(500, f"internal error: {type(e).__name__}"))
                self.end_stream()
            else:
                self._error(HttpError(500, f"internal error: {type(e).__name__}"))
            return 500

    def _stream(self, parsed: OpenAIRequest, handles: list, events) -> int:
        """Server-sent events: a chunk per engine event with new text (and per choice, its finish), the usage chunk
        when asked for, then `data: [DONE]`. An error after the first byte is sent as a last `data: {"error"}`."""
        front = self.front
        out = Choices(front.model.tokenizer, parsed, handles, chat=front.chat)
        self.start_stream(lambda e: self.sse(json.dumps(error_body(e))))
        if parsed.kind == CHAT:  # OpenAI's first chunk of each choice gives the role
            self._send(chunk(out, front.model_name, [out.role_delta(i) for i in range(len(handles))]))
        try:
            for index, event in front.events(handles, events, self.client_gone):  # not only at writes: queued
                piece = out.add(index, event)
                if piece is not None:
                    self._send(chunk(out, front.model_name, [piece]))
            if error := front.shut_down_error(out.reasons):
                raise error
            if parsed.include_usage:
                self._send(chunk(out, front.model_name, [], usage=True))
            self.sse("[DONE]")
            self.end_stream()
            return 200
        except HttpError as e:
            front.cancel(handles)
            self._stream_error(e)
            self.end_stream()
            return e.status

    def _send(self, obj: dict) -> None:
        self.sse(json.dumps(obj, ensure_ascii=False))

    def _authorized(self) -> bool:
        if self.front.authorized(self.headers.get("Authorization")):
            return True
        self._error(HttpError(401, "missing or invalid bearer token (header Authorization: Bearer <token>)"))
        return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unknown method such as OPTIONS, a malformed request line) in OpenAI's
        error shape instead of an HTML page."""
        self.close_connection = True
        what = f"{self.command} {urlsplit(self.path).path}" if getattr(self, "command", None) else "request"
        with contextlib.suppress(OSError):
            self.send_json(code, error_body(HttpError(code, f"{what}: {message or HTTPStatus(code).phrase}")))

    def do_HEAD(self) -> None:  # noqa: N802
        """HEAD of a GET path (RFC 9110 9.3.2; load balancers probe /health so): GET's status and headers, no body
        (WireIO.send_body writes none for HEAD). A POST path: 405."""
        if "HEAD" not in (allowed_methods(urlsplit(self.path).path) or ""):
            return self.wrong_method()
        self.do_GET()

    def wrong_method(self, why: str = "") -> None:
        """A method `path` does not answer: 405 with the Allow header (RFC 9110 15.5.6), or 404 for an unknown path.
        Any body is left unread, so the connection closes."""
        path = urlsplit(self.path).path
        self.close_connection = True
        allow = allowed_methods(path)
        if allow is None:
            return self._error(HttpError(404, f"{self.command} {path}: not found"))
        message = f"{self.command} {path}: method not allowed ({path} takes {allow}{why})"
        self._error(HttpError(405, message, headers={"Allow": allow}))

    def do_OPTIONS(self) -> None:  # noqa: N802
        self.wrong_method("; no CORS preflight: call from a server, not a browser page")

    do_PUT = do_DELETE = do_PATCH = wrong_method  # noqa: N815 (http.server's names; else 501, as for a made-up method)

    def _metrics(self) -> None:
        """GET /metrics: the Prometheus text exposition of the server's registry (serving/metrics.py)."""
        self.send_body(200, *self.front.metrics.exposition())

    def _error(self, error: HttpError) -> None:
        self.send_json(error.status, error_body(error), error.headers)
