"""Support for the HTTP API's tests (no tests here): test_serving_http.py's module-scoped server (a tiny Llama with a
ChatML template, `meshserve serve --http-port` with a bearer token, metrics, slowed decode steps and request logs),
its gRPC and `openai` clients, and raw-HTTP, metric and polling helpers that test_serving_http_connections.py (and
test_serving_http_tools.py, through test_serving_http) use too. The fixtures are imported by test_serving_http.py
alone: a module-scoped fixture runs once per module that imports it."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cli_helpers import free_port
from meshserve.serving.cli import main
from meshserve.serving.client import Client
from test_chat import _chatml_tokenizer
from test_hf_llama import make_model
from test_serving_support import SLOW_DECODE, ServerProcess, scrape_metrics

openai = pytest.importorskip("openai")

TOKEN = "s3cret-http"
PROMPT = "w5 w6 w7 w8"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML template (as tests/test_chat.py builds), converted to meshserve."""
    directory = tmp_path_factory.mktemp("hf") / "llama-chat"
    make_model(directory, "llama")
    _chatml_tokenizer(directory)
    out = tmp_path_factory.mktemp("ckpt") / "llama-chat-ms"
    assert main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    # Decode steps slowed to >= 50 ms (SLOW_DECODE), so a client can leave while its request runs. --warm-up all:
    # answers are compared bit for bit with gRPC's, so both must run in the same compiled buckets.
    metrics_port = free_port()
    proc = ServerProcess(
        checkpoint, "--http-port", "0", "--auth-token-file", str(token_file), "--metrics-port", str(metrics_port),
        "--served-model-name", "chat-tiny", "--warm-up", "all", "--log-requests", python_code=SLOW_DECODE,
    )  # fmt: skip
    proc.metrics_port = metrics_port
    yield proc
    assert TOKEN not in proc.output()  # the token never reaches the logs
    proc.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target, token=TOKEN) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.http, api_key=TOKEN, max_retries=0, timeout=60)


def _post_to(oa, path: str, body) -> tuple[int, dict]:
    return _post_url(str(oa.base_url), path, body)


def _post(server, path: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    return _post_url(server.http, path, body, token, raw)


def _post_url(base: str, path: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    reply = conn.getresponse()
    status, data = reply.status, json.loads(reply.read())
    conn.close()
    return status, data


def _metric(server, name: str, **labels) -> float:
    """One labelled metric of `server`; 0 before it is first set. prometheus-client writes the labels sorted."""
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return scrape_metrics(server.metrics_port).get(key, 0.0)


def _cancelled(server) -> float:
    return _metric(server, "meshserve_finished_total", reason="cancelled")


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _health(url) -> int:
    try:
        return urllib.request.urlopen(f"http://{url.hostname}:{url.port}/health", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _raw(server, request: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes; (status, headers, body) of the answer."""
    url = urlsplit(server.http)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        while len(body) < int(headers.get("Content-Length", 0)):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _request_lines(server) -> list[dict[str, str]]:
    """The server's --log-requests lines as {field: value} (logfmt; quoted values unquoted)."""
    out = []
    for line in server.output().splitlines():
        if line.startswith("meshserve request: "):
            pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', line[len("meshserve request: ") :])
            out.append({k: v.strip('"') for k, v in pairs})
    return out
