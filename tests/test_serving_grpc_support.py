"""Support for tests/test_serving_grpc.py (no tests here): its module-scoped `meshserve serve` (a subprocess on a
free port, tiny checkpoint, bearer token, metrics, slowed on demand), a Client of it, the checkpoint's model in
process, and the metric and stream helpers (tests/test_serving_grpc_n.py imports some through test_serving_grpc).
The fixtures are imported by test_serving_grpc.py alone: a module-scoped fixture runs once per module that imports
it."""

import time

import pytest
from cli_helpers import free_port
from meshserve.serving.client import Client
from test_serving_support import ServerProcess, make_checkpoint, scrape_metrics, slow_decode

TOKEN = "s3cret-token"
SCORE_TOKENS = 20000  # --max-score-tokens: 160 full-context (128-token) items exceed it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    metrics_port = free_port()
    # Slowed (every decode step and Score chunk >= 50 ms more) only while a test holds `slowed(server.slow)`: for the
    # tests that must act while a request still runs; on a fast machine 120 tokens take ~20 ms.
    slow = tmp_path_factory.mktemp("slow") / "on"
    # --warm-up all: the tests below compare answers bit for bit, and while a background warm-up runs a request may
    # run in a larger bucket, the same up to float rounding (as between any two buckets; tests/test_warm_up.py).
    proc = ServerProcess(
        checkpoint, "--warm-up", "all",
        "--max-queue", "32", "--auth-token-file", str(token_file), "--metrics-port", str(metrics_port),
        "--max-score-tokens", str(SCORE_TOKENS), python_code=slow_decode(0.05, while_exists=slow, score=True),
    )  # fmt: skip
    proc.metrics_port = metrics_port
    proc.slow = slow
    proc.token_file = token_file
    yield proc
    assert TOKEN not in proc.output()  # the token never reaches the logs
    proc.close()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, token=TOKEN) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def model(checkpoint):
    from meshserve.model.loading import load_model

    return load_model(checkpoint)


def _metrics(server) -> dict[str, float]:
    return scrape_metrics(server.metrics_port)


def _wait_idle(server, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        if (m["meshserve_live_slots"] == 0 and m["meshserve_queue_depth"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def _wait_for(condition, timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` s pass (False); ends as soon as it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _stream(client, prompt, **kw):
    chunks = list(client.generate_stream(prompt, **kw))
    return (
        [t for c in chunks for t in c.tokens],
        "".join(c.text for c in chunks),
        [x for c in chunks for x in c.logprobs],
        chunks[-1].finish_reason,
    )


def _counter(server, name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    return _metrics(server).get(key, 0.0)
