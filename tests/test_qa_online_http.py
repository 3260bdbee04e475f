"""The HTTP API on the wire, as a chat product's clients and proxies meet it; one `meshserve serve --http-port` with
one slow slot (the tiny checkpoint):

- a stream whose client goes away while it waits in the queue leaves the queue then (before: it stayed queued, was
  prefilled and decoded a token before its first write failed: a wasted prefill per abandoned request, as in a retry
  storm of timed-out clients), under TLS too, whether the client just closes or says close_notify first (before: a
  TLS client's departure went unnoticed until the answer was written: a chat without max_tokens ran to the context);
- a body with a Transfer-Encoding is refused and its connection closed, also beside a Content-Length (before: the
  Content-Length was read and the rest taken as the next request, the desync request smuggling uses);
- an HTTP/1.0 client's stream comes without chunk framing and ends by closing (before: chunk sizes amid its events);
- an integer past int32 names the server's limit (before: "max_tokens must be in [-2147483648, 2147483647]");
- a client's X-Request-Id comes back on the answer and in the --log-requests line (a proxy's trace id finds the
  request); one that could forge a log field is ignored. Every stream says X-Accel-Buffering: no (nginx in front
  passes each token on at once). HEAD /health answers as GET does, without a body (before: 501);
- GET /metrics on the API port, as vLLM's (before: 404, only on --metrics-port); a known path with another method is
  405 with Allow (before: 404 or 501); stream_options.continuous_usage_stats (vLLM's) puts the usage so far on every
  chunk (before: 400 unknown field).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest
from meshserve.serving.client import Client
from prometheus_client import CONTENT_TYPE_LATEST
from test_serving_http_support import _request_lines, _wait_for
from test_serving_support import SLOW_DECODE, ServerProcess, make_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")
    proc = ServerProcess(checkpoint, "--http-port", "0", "--max-batch", "1", "--decode-buckets", "1",
                         "--log-requests", python_code=SLOW_DECODE)  # fmt: skip
    proc.url = urlsplit(proc.http)
    yield proc
    assert "Traceback" not in proc.output()
    proc.close()


def _send(url, head: str, body: bytes) -> socket.socket:
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def _post(url, body: dict, version: str = "1.1", extra: str = "") -> socket.socket:
    data = json.dumps(body).encode()
    return _send(url, f"POST /v1/completions HTTP/{version}\r\nHost: x\r\nContent-Length: {len(data)}\r\n{extra}", data)


@contextlib.contextmanager
def _two_leave_while_queued(proc, tls_ca=None):
    """Around a block whose two clients queue and leave: a long request holds the server's one slot (>= 60 steps of
    >= 50 ms: >= 3 s) from before the block; after it, both must be logged CANCELLED while that request still ran,
    with no token generated (dropped from the queue, never prefilled)."""
    with Client(proc.target, tls_ca=tls_ca) as client:
        client.wait_ready()
        long = threading.Thread(target=client.generate, args=("hello",),
                                kwargs={"max_new_tokens": 60, "ignore_eos": True})  # fmt: skip
        long.start()
        time.sleep(0.3)
        yield
        dropped = _wait_for(lambda: sum(r["code"] == "CANCELLED" for r in _request_lines(proc)) == 2, timeout=10)
        still_running = long.is_alive()
        long.join()
    assert dropped and still_running, f"not dropped while queued:\n{proc.output()[-3000:]}"
    cancelled = [r for r in _request_lines(proc) if r["code"] == "CANCELLED"]
    assert [r["method"] for r in cancelled] == ["POST /v1/completions"] * 2
    assert all(r["generated_tokens"] == "0" for r in cancelled), cancelled  # never reached a slot


def test_a_queued_stream_whose_client_left_is_dropped_without_a_prefill(server):
    with _two_leave_while_queued(server):
        queued = [_post(server.url, {"prompt": p, "max_tokens": 20, "stream": True}) for p in ("abc", "de")]
        for sock in queued:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream began: the request is queued
            sock.close()


def test_a_transfer_encoding_is_refused_and_the_connection_closed(server):
    smuggled = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    sock = _send(server.url, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Length: {len(body)}\r\n", body + b"\r\n0\r\n\r\n" + smuggled)  # fmt: skip
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 411") and b"Connection: close" in reply
    assert b"Transfer-Encoding: not supported" in reply and reply.count(b"HTTP/1.1") == 1  # nothing else answered


def test_an_http_1_0_stream_is_not_chunked_and_ends_by_closing(server):
    reply = _read_all(_post(server.url, {"prompt": "ab", "max_tokens": 3, "stream": True}, version="1.0"))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head and b"X-Accel-Buffering: no" in head
    events = [line for line in body.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]"
    texts = [json.loads(e.removeprefix(b"data: "))["choices"][0] for e in events[:-1]]
    assert 1 <= len(texts) <= 3 and texts[-1]["finish_reason"] == "length"  # bytes of a character come together


def test_out_of_range_integers_name_the_limit_that_applies(server):
    url = server.url
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/v1/models")
    limit = json.loads(conn.getresponse().read())["data"][0]["max_model_len"]
    cases = [
        ({"max_tokens": 10**12}, "max_tokens", f"max_tokens must be in [1, {limit}], got {10**12}"),
        ({"logprobs": -1}, "logprobs", "logprobs must be in [0, 20], got -1"),
        ({"n": 1000}, "n", "n must be in [1, 16], got 1000"),  # not gRPC's "(0 = 1)": n = 0 is refused here
    ]
    for body, param, message in cases:
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ab", **body}))
        reply = conn.getresponse()
        error = json.loads(reply.read())["error"]
        assert (reply.status, error["param"], error["message"]) == (400, param, message)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ab", "max_tokens": 2}))
    assert conn.getresponse().status == 200  # the server goes on


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/models/m", "/v1/models/other"])
def test_head_answers_as_get_without_a_body(server, path):
    # Before: HEAD /health answered with Content-Length 0, /metrics and /v1/models 405 (RFC 9110: a GET path takes
    # HEAD too; a load balancer probes /health so).
    conn = http.client.HTTPConnection(server.url.hostname, server.url.port, timeout=30)
    conn.request("GET", path)
    got = conn.getresponse()
    body = got.read()
    conn.request("HEAD", path)  # the same connection carries on
    reply = conn.getresponse()
    assert (reply.status, reply.getheader("Content-Type"), reply.read()) == (
        got.status,
        got.getheader("Content-Type"),
        b"",
    )
    if path != "/metrics":  # the exposition changes between the two (counts)
        assert int(reply.getheader("Content-Length")) == len(body)
    conn.request("GET", "/health")  # and on
    assert conn.getresponse().status == 200


def test_the_request_id_comes_back_and_is_logged(server):
    url = server.url
    for rid, echoed in (("trace-42.a", True), ('x" code=OK', False)):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        body = json.dumps({"prompt": "ab", "max_tokens": 1, "stream": rid == "trace-42.a"})
        conn.request("POST", "/v1/completions", body=body, headers={"X-Request-Id": rid})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200 and reply.getheader("X-Request-Id") == (rid if echoed else None)
    lines = [r for r in _request_lines(server) if r.get("request_id")]
    assert [r["request_id"] for r in lines] == ["trace-42.a"] and lines[0]["code"] == "OK"


def test_a_tls_client_that_left_is_noticed_while_queued(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)  # fmt: skip
    proc = ServerProcess(make_checkpoint(tmp_path / "tiny"), "--http-port", "0", "--max-batch", "1", "--decode-buckets",
                         "1", "--log-requests", "--tls-cert", str(cert), "--tls-key", str(key),
                         python_code=SLOW_DECODE)  # fmt: skip
    try:
        url, context = urlsplit(proc.http), ssl.create_default_context(cafile=str(cert))
        with _two_leave_while_queued(proc, tls_ca=cert):
            for notify in (False, True):  # a plain close, and close_notify first (as curl and browsers do)
                raw = socket.create_connection((url.hostname, url.port), timeout=30)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                data = json.dumps({"prompt": "abc", "max_tokens": 20}).encode()
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
                )
                time.sleep(0.2)
                if notify:
                    sock.settimeout(0.5)  # unwrap waits for the server's close_notify, which never comes
                    with contextlib.suppress(OSError):
                        sock.unwrap()
                sock.close()
        assert "Traceback" not in proc.output()
    finally:
        proc.close()


def _ask(server, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.url.hostname, server.url.port, timeout=30)
    conn.request(method, path, body=body or None)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, dict(reply.getheaders()), data


def test_metrics_are_served_on_the_api_port_too(server):
    assert _ask(server, "POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 1}).encode())[0] == 200
    status, headers, _ = _ask(server, "GET", "/metrics")  # before: 404 (only on --metrics-port)
    assert (status, headers["Content-Type"]) == (200, CONTENT_TYPE_LATEST)
    # A request is counted once its answer is written, so the client can scrape a moment before the count lands.
    key = 'meshserve_requests_total{code="OK",method="POST /v1/completions"}'
    assert _wait_for(lambda: key in _ask(server, "GET", "/metrics")[2].decode(), timeout=20)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"), ("POST", "/health", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"), ("DELETE", "/v1/models", "GET, HEAD"), ("PUT", "/v1/models/x", "GET, HEAD"),
    ("HEAD", "/tokenize", "POST"), ("GET", "/nowhere", None), ("DELETE", "/v1/nowhere", None), ("HEAD", "/x", None),
])  # fmt: skip
def test_a_wrong_method_on_a_known_path_is_405_with_allow(server, method, path, allow):
    # Before: GET /v1/completions and POST /health were 404 "not found", PUT and DELETE 501.
    status, headers, data = _ask(server, method, path, b"{}" if method in ("POST", "PUT") else b"")
    assert (status, headers.get("Allow")) == ((405, allow) if allow else (404, None))
    if method != "HEAD":
        error = json.loads(data)["error"]
        assert error["code"] == status and error["type"] == ("invalid_request_error" if allow else "not_found_error")
        assert error["message"].startswith(f"{method} {path}: " + ("method not allowed" if allow else "not found"))


def _events(server, body: dict) -> list[dict]:
    status, _, data = _ask(server, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200, data
    lines = [line.removeprefix("data: ") for line in data.decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(server):
    # 16 tokens, not 4: a stream sends what is ready when it writes, and under a loaded CI machine 4 tokens once
    # arrived in a single chunk (one usage figure), failing the several-chunks check below by timing alone.
    body = {"prompt": "ab", "max_tokens": 16, "ignore_eos": True, "stream": True, "n": 1}
    options = {"include_usage": True, "continuous_usage_stats": True}  # before: 400 unknown field
    chunks = _events(server, {**body, "stream_options": options})
    *pieces, last = chunks
    prompt = last["usage"]["prompt_tokens"]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 16 and prompt > 0
    done = [c["usage"]["completion_tokens"] for c in pieces]
    assert done == sorted(done) and done[-1] == 16 and len(set(done)) > 1
    assert all(c["usage"] == {"prompt_tokens": prompt, "completion_tokens": d, "total_tokens": prompt + d}
               for c, d in zip(pieces, done, strict=True))  # fmt: skip
    plain = _events(server, {**body, "stream_options": {"include_usage": True}})  # as before: null until the last
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 16
    alone = {**body, "stream_options": {"continuous_usage_stats": True}}
    status, _, data = _ask(server, "POST", "/v1/completions", json.dumps(alone).encode())
    error = json.loads(data)["error"]
    assert (status, error["param"]) == (400, "stream_options")
    assert error["message"] == "stream_options.continuous_usage_stats: needs include_usage: true"


def test_include_stop_str_in_output_ends_the_text_with_the_stop_string(server):
    """vLLM's include_stop_str_in_output over HTTP, whole and streamed (before: 400 unknown field)."""
    base = {"prompt": "ab", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    status, _, data = _ask(server, "POST", "/v1/completions", json.dumps(base).encode())
    text = json.loads(data)["choices"][0]["text"]
    k = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])  # a stop from the middle
    stop = text[k : k + 2]
    body = {**base, "stop": [stop], "include_stop_str_in_output": True}
    status, _, data = _ask(server, "POST", "/v1/completions", json.dumps(body).encode())
    choice = json.loads(data)["choices"][0]
    assert (status, choice["text"], choice["finish_reason"]) == (200, text[: text.find(stop)] + stop, "stop")
    events = _events(server, {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == choice["text"]
    status, _, data = _ask(
        server, "POST", "/v1/completions", json.dumps({**body, "include_stop_str_in_output": 1}).encode()
    )
    assert status == 400 and "include_stop_str_in_output" in json.loads(data)["error"]["message"]


def test_truncate_prompt_tokens_keeps_the_prompts_end(server):
    """vLLM's truncate_prompt_tokens over HTTP and gRPC: the answer is the truncated prompt's (before: 400 unknown
    field); -1 keeps what leaves room for max_tokens; out of range is a 400 naming the field and the range."""
    greedy = {"max_tokens": 4, "ignore_eos": True, "temperature": 0}

    def complete(**body):
        status, _, data = _ask(server, "POST", "/v1/completions", json.dumps({**greedy, **body}).encode())
        return status, json.loads(data)

    _, short = complete(prompt=[8, 9, 10])
    _, cut = complete(prompt=[5, 6, 7, 8, 9, 10], truncate_prompt_tokens=3)
    assert cut["choices"][0]["text"] == short["choices"][0]["text"] and cut["usage"]["prompt_tokens"] == 3
    status, echoed = complete(prompt="abcdef", truncate_prompt_tokens=2, echo=True, max_tokens=1)
    assert status == 200 and echoed["choices"][0]["text"].startswith("ef") and echoed["usage"]["prompt_tokens"] == 2
    assert "abcd" not in echoed["choices"][0]["text"]  # the prompt the model saw (before: the whole text)
    status, long = complete(prompt=list(range(3, 203)), truncate_prompt_tokens=-1)  # 200 ids, context 128
    assert status == 200 and long["usage"]["prompt_tokens"] == 128 - 4, long
    status, bad = complete(prompt=[5, 6], truncate_prompt_tokens=128)
    assert (status, bad["error"]["message"]) == (
        400,
        "truncate_prompt_tokens must be -1 or in [1, 127] (0 = off), got 128",
    )
    with Client(server.target) as client:
        got = client.generate([5, 6, 7, 8, 9, 10], truncate_prompt_tokens=3, max_new_tokens=4, ignore_eos=True)
        assert got.tokens == client.generate([8, 9, 10], max_new_tokens=4, ignore_eos=True).tokens
