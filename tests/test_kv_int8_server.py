"""`meshserve serve --kv-cache-dtype int8` end to end: a real server answers over gRPC and HTTP with the tokens
`model.generate` gives on an int8 cache (greedy and seeded sampling), says so in its banner and ModelInfo's plan, and
refuses a bad value in one line."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from meshserve.model.generate import generate
from meshserve.model.loading import load_model
from meshserve.model.sampling import SamplingParams
from meshserve.serving.client import Client
from test_serving_support import ServerProcess, env, make_checkpoint, meshserve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess(checkpoint, "--kv-cache-dtype", "int8", "--http-port", "0")
    yield proc
    proc.close()


def test_a_server_on_an_int8_cache_answers_as_generate_does(server, checkpoint):
    model = load_model(checkpoint)
    assert "int8 KV cache" in server.output()
    cases = [([5, 6, 7, 200, 9], {}), ([40, 41, 42] * 4, dict(temperature=0.9, top_k=40, seed=7))]
    with Client(server.target) as client:
        assert json.loads(client.model_info().plan_json)["kv_cache_dtype"] == "int8"
        for prompt, kw in cases:
            got = client.generate(prompt, max_new_tokens=16, **kw)
            want = generate(model.params, model.config, [prompt], max_new_tokens=16, sampling=SamplingParams(**kw),
                            kv_cache_dtype="int8")[0]  # fmt: skip
            assert got.tokens == list(want.tokens)
    body = json.dumps({"prompt": "The fox", "max_tokens": 12, "temperature": 0}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{server.http}/completions", body)) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    want = generate(model.params, model.config, [model.encode_prompt("The fox")], max_new_tokens=12,
                    kv_cache_dtype="int8")[0]  # fmt: skip
    assert text == model.tokenizer.decode(want.tokens)


def test_a_bad_kv_cache_dtype_is_one_line(checkpoint):
    proc = subprocess.run(meshserve("serve", "--checkpoint", str(checkpoint), "--kv-cache-dtype", "fp8"),
                          capture_output=True, text=True, env=env(), timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--kv-cache-dtype" in proc.stderr and "'fp8'" in proc.stderr
    assert "Traceback" not in proc.stderr
