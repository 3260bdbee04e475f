"""The HTTP front's listening server (serving/http_server.py): a thread per connection up to a cap on open
connections (serve --http-max-connections), past which a new connection is answered 503 in OpenAI's error shape and
closed, and a connection that fails outside a request's own handling logged in one line; and a request handler's wire
I/O (`WireIO`): the JSON body (by Content-Length only: a Transfer-Encoding, with or without one, is refused and the
connection closed, so no proxy in front can read the body's end elsewhere than here), JSON answers, server-sent events
(HTTP/1.1 chunks, or to an HTTP/1.0 client, which knows no chunks, the bare stream ended by closing the connection),
the client's X-Request-Id echoed, and whether the client went away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshserve.serving.openai_protocol import HttpError
from meshserve.serving.openai_responses import error_body

__all__ = ["CappedHTTPServer", "WireIO"]

log = logging.getLogger("meshserve.http")
# A client's X-Request-Id that is echoed and logged: a proxy's or tracer's id, nothing that could forge a log field.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class CappedHTTPServer(ThreadingHTTPServer):
    """http.server's threading server with a cap on open connections and one-line logs of failed ones."""

    open_slots: threading.BoundedSemaphore | None = None
    max_connections = 0
    # The listen backlog: connections the kernel completes while the accept loop is busy. socketserver's default, 5,
    # reset one of a burst of 48 concurrent clients (a reviewer's run); the kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def process_request(self, request, client_address) -> None:
        """A thread for the connection, or (past max_connections) a 503 and the connection closed: a client that
        opens thousands of connections must not get thousands of threads."""
        if self.open_slots is not None and not self.open_slots.acquire(blocking=False):
            log.warning("HTTP connection from %s refused: %d connections open", client_address[0],
                        self.max_connections)  # fmt: skip
            if not isinstance(request, ssl.SSLSocket):  # a TLS answer needs a handshake, not here in the accept loop
                message = (f"too many open connections (the server's limit is {self.max_connections}, "
                           "--http-max-connections): close idle ones or retry")  # fmt: skip
                body = json.dumps(error_body(HttpError(503, message))).encode()
                with contextlib.suppress(OSError):
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            if self.open_slots is not None:
                self.open_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.open_slots is not None:
                self.open_slots.release()

    def handle_error(self, request, client_address) -> None:
        """A connection that fails outside a request's own handling (a plain-HTTP client at a TLS port, a reset):
        one log line, not socketserver's traceback on stderr. Anything else is a bug: logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # ssl.SSLError, ConnectionResetError, TimeoutError ...
            log.info("HTTP connection from %s failed: %s", client_address[0], error)
        else:
            log.exception("HTTP request from %s failed", client_address[0])


class WireIO(BaseHTTPRequestHandler):
    """A request handler's reads and writes on the wire; the handler (serving/http_server.py's) gives `front` (its
    max_body_bytes)."""

    _streaming = False  # headers of a stream sent: errors go out as a last event, not a status
    _chunked = True  # the stream's events go out as HTTP/1.1 chunks (False: to an HTTP/1.0 client, bare)

    @property
    def request_id(self) -> str | None:
        """The request's X-Request-Id header (as vLLM's): echoed on the answer and in its --log-requests line, so a
        proxy's or a tracer's id finds the request; None when absent or not a plain token of at most 128 characters."""
        given = self.headers.get("X-Request-Id") if getattr(self, "headers", None) is not None else None
        return given if given is not None and _REQUEST_ID.fullmatch(given) else None

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        if self.request_id is not None:
            self.send_header("X-Request-Id", self.request_id)

    def _body(self):
        """The request's JSON body. 411 without a Content-Length or with any Transfer-Encoding (RFC 9112 6.3: a
        message with both is to be handled as an error, as it may be a smuggling attempt), 413 past the limit."""
        length = self.headers.get("Content-Length")
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # where the body ends is in doubt: the connection cannot carry another request
            raise HttpError(411, "Transfer-Encoding: not supported (send the JSON body with a Content-Length alone)")
        if length is None or not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise HttpError(411, "Content-Length: required (a JSON body; chunked uploads are not supported)")
        size, limit = int(length), self.front.max_body_bytes  # type: ignore[attr-defined]
        if size > limit:
            self.close_connection = True  # not read: the connection cannot carry another request
            raise HttpError(413, f"request body: {size} bytes exceed the limit of {limit} (send fewer prompts per "
                            "request)")  # fmt: skip
        raw = self.rfile.read(size)
        try:
            return json.loads(raw)
        except RecursionError:
            raise HttpError(400, "request body: JSON nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise HttpError(400, f"request body: invalid JSON ({e})") from None

    def client_gone(self) -> bool:
        """Whether the client closed its end: readable with nothing to read (peeked, never read). Under TLS the peek
        is below the encryption, at the raw socket, while no decrypted byte waits: its end, or an alert (close_notify,
        or a fatal one), after which the client's TLS says nothing more. A pipelined request is no departure."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if not isinstance(sock, ssl.SSLSocket):
                return sock.recv(1, socket.MSG_PEEK) == b""
            if sock.pending():
                return False
            head = socket.socket.recv(sock, 5, socket.MSG_PEEK)  # a record's header (RFC 8446 5.1)
            # TLS 1.2 shows an alert's type, 21. TLS 1.3 hides it in an application-data record (23), told apart by
            # its size: 2 alert bytes, the inner type and a 16-byte AEAD tag; the smallest request is far longer.
            return head == b"" or head[0] == 21 or (len(head) == 5 and head[0] == 23 and head[3:5] == b"\x00\x13")
        except OSError:  # reset: the client closed with our bytes unread
            return True

    def send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        """`obj` as the JSON answer, with `headers` (e.g. a 405's Allow) beside the usual ones."""
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")
        self.send_body(status, "application/json", data, headers)

    def send_body(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """A whole answer: `data` of `content_type`, with `headers` beside the usual ones."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # say so: a client reusing the connection would meet a closed socket
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: GET's headers, Content-Length included, and no body (RFC 9110 9.3.2)
            self.wfile.write(data)

    def start_stream(self, on_error: Callable[[HttpError], None]) -> None:
        """A 200 answer of server-sent events; `on_error` sends an error that comes after it began."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx in front would otherwise hold tokens back in its buffers
        # HTTP/1.0 has no chunked coding (RFC 9112 6.1: never sent to it): its stream ends when the connection closes.
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")  # the connection stays open for the client's next request
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self._streaming, self._stream_error = True, on_error

    def sse(self, data: str, event: str | None = None) -> None:
        """One server-sent event (`event: <type>` first when given), as one HTTP chunk (to HTTP/1.0: bare)."""
        line = (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if self._chunked else line)
        self.wfile.flush()

    def end_stream(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")  # the last chunk
        self.wfile.flush()
        self._streaming = False
