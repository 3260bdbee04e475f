"""The HTTP API's connections, each test on a `meshserve serve --http-port` of its own (the tiny checkpoint): a
SIGTERM drain answers 503 to new requests (and to health) and lets a running stream finish; --tls-cert/--tls-key
serve gRPC and HTTPS with one certificate; past --http-max-connections a new connection is answered 503 and closed.
The API's answers on one shared server are in tests/test_serving_http.py.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import pytest
from meshserve.serving.client import Client
from test_serving_http_support import _health, _raw, _wait_for
from test_serving_support import SLOW_DECODE, ServerProcess, make_checkpoint

openai = pytest.importorskip("openai")


def test_drain_refuses_new_requests_and_finishes_running_ones(tmp_path):
    proc = ServerProcess(make_checkpoint(tmp_path / "tiny"), "--http-port", "0", python_code=SLOW_DECODE)
    try:
        client = openai.OpenAI(base_url=proc.http, api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, stream=True)
        first = next(iter(stream))
        proc.proc.send_signal(signal.SIGTERM)
        url = urlsplit(proc.http)
        assert _wait_for(lambda: _health(url) == 503), "health did not turn 503 while draining"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert refused.value.status_code == 503 and "shutting down" in str(refused.value)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) > 0
        assert proc.proc.wait(timeout=60) == 0
    finally:
        proc.close()


def test_tls_serves_grpc_and_https_with_one_certificate(tmp_path):
    """--tls-cert/--tls-key cover both APIs: gRPC over TLS and HTTPS answer; plain HTTP to the HTTPS port gets no
    answer, and the server goes on."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    proc = ServerProcess(make_checkpoint(tmp_path / "tiny"), "--http-port", "0", "--tls-cert", str(cert),
                         "--tls-key", str(key))  # fmt: skip
    try:
        assert proc.http.startswith("https://")
        with Client(proc.target, tls_ca=cert) as c:
            c.wait_ready()
            want = c.generate("hello", max_new_tokens=4)
        url = urlsplit(proc.http)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):  # TLS reads no plain HTTP
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            conn.request("GET", "/health")
            conn.getresponse()
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=30, context=context)
        body = json.dumps({"prompt": "hello", "max_tokens": 4, "temperature": 0})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["choices"][0]["text"] == want.text
        assert "Traceback" not in proc.output()
    finally:
        proc.close()


def test_connections_past_the_cap_are_answered_503_and_closed(tmp_path):
    """Each open connection holds a thread (an idle keep-alive one too): past --http-max-connections a new one gets
    a 503 in OpenAI's shape and is closed; once one closes, a new connection is served again."""
    proc = ServerProcess(make_checkpoint(tmp_path / "tiny"), "--http-port", "0", "--http-max-connections", "2")
    try:
        url = urlsplit(proc.http)
        idle = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(2)]
        time.sleep(0.5)  # both accepted, each a thread waiting for its request line
        status, headers, body = _raw(proc, b"GET /health HTTP/1.1\r\n\r\n")
        assert status == 503 and headers.get("Connection") == "close"
        assert "too many open connections (the server's limit is 2" in json.loads(body)["error"]["message"]
        idle.pop().close()
        assert _wait_for(lambda: _health(url) == 200), "a connection was not served after one closed"
        for sock in idle:
            sock.close()
        assert "Traceback" not in proc.output()
    finally:
        proc.close()


def test_a_burst_of_connections_waits_in_the_listen_backlog():
    """64 clients connecting at once while the accept loop is busy (here: not running) all connect, queued by the
    kernel: socketserver's default backlog of 5 completed 6 and left the rest retrying their SYNs (~29 s here)."""
    from http.server import BaseHTTPRequestHandler

    from meshserve.serving.http_connections import CappedHTTPServer

    server = CappedHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    clients = []
    try:
        for _ in range(64):
            s = socket.socket()
            clients.append(s)
            s.settimeout(2.0)
            s.connect(server.server_address)  # raises TimeoutError once the backlog is full
    finally:
        for s in clients:
            s.close()
        server.server_close()
    assert len(clients) == 64
