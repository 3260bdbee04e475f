"""The HTTP front's listening server (serving/http_server.py): a thread per connection up to a cap on open
connections (serve --http-max-connections), past which a new connection is answered 503 in OpenAI's error shape and
closed, and a connection that fails outside a request's own handling logged in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import sys
import threading
from http.server import ThreadingHTTPServer

from meshserve.serving.openai_protocol import HttpError
from meshserve.serving.openai_responses import error_body

__all__ = ["CappedHTTPServer"]

log = logging.getLogger("meshserve.http")


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
