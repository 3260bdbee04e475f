"""Deferred warm-up: the order steps compile in, which compiled step serves a shape, and an engine (and a real gRPC
server) answering correctly while only each kind's largest bucket is compiled, with the rest compiling behind it."""

from __future__ import annotations

import itertools
import json
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import checkpoint_fixture, free_port, run_cli
from engine_helpers import assert_equal_to_generate, run_prefix_scenario, wait_finished
from meshserve.model.config import get_config
from meshserve.model.loading import LoadedModel
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import make_plan
from meshserve.serving.scheduler import Request, Scheduler
from meshserve.serving.server import ServerError, ServerOptions, build_server
from meshserve.serving.warm_up import compile_order, covering
from test_serving_support import scrape_metrics

CONFIG = get_config("tiny")
checkpoint = checkpoint_fixture(seed=4)


def _plan(**kw):
    return make_plan(CONFIG, max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,),
                     decode_buckets=(1, 4), weights="f32", prefix_caching=True, **kw)  # fmt: skip


def test_compile_order_puts_each_kinds_largest_bucket_first_and_covers_the_plan_once():
    plan = _plan()
    jobs = compile_order(plan)
    first = [(j.kind, j.key) for j in jobs if j.first]
    assert first == [("release", ()), ("prefill", (4, 128)), ("extend", (4, 64, 128)), ("decode", (4, 128)),
                     ("score", (4, 128))]  # fmt: skip
    assert all(j.first for j in jobs[: len(first)])  # the covering steps come before every other
    keys = [(j.kind, j.key) for j in jobs]
    assert len(keys) == len(set(keys))
    assert sum(j.units for j in jobs) == plan.compile_count()
    prefill = [j.key for j in jobs if j.kind == "prefill" and not j.first]
    assert prefill == sorted(prefill, key=lambda k: k[0] * k[1])  # smallest first: the buckets light traffic uses
    assert jobs[len(first)].kind != jobs[len(first) + 1].kind  # kinds take turns
    # Guided rows' resample steps last (until one is in, guided steps read the previous step first): G = 1, 4.
    assert [(j.kind, j.key) for j in jobs[-2:]] == [("resample", (1,)), ("resample", (4,))]
    assert [j.kind for j in compile_order(plan, ("score",))] == ["score"] * 6
    with pytest.raises(ValueError, match="phases"):
        compile_order(plan, ("train",))


def test_covering_takes_the_own_bucket_else_the_smallest_larger_one():
    table = {(4, 64): "a", (1, 128): "b", (8, 128): "c"}
    assert covering(table, (4, 64), "prefill") == ((4, 64), "a")
    assert covering(table, (1, 16), "prefill") == ((1, 128), "b")  # the fewest padded elements: 128 of 256, 1024
    assert covering(table, (1, 100), "prefill") == ((1, 128), "b")
    assert covering(table, (2, 100), "prefill") == ((8, 128), "c")
    with pytest.raises(KeyError, match="no compiled prefill step covers"):
        covering(table, (16, 16), "prefill")


def test_an_engine_with_only_covering_steps_gives_the_tokens_of_a_full_warm_up():
    """The prefix scenario (plain prefills, extends, decode at batch 1 and 4) on the covering steps alone, then again
    once the rest compiled: every request equals model.generate on its own; scoring too."""
    params = init_params(CONFIG, jax.random.key(9), jnp.float32)
    plan = _plan()
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(defer=True)
    assert engine.compiled_steps() == sum(j.units for j in compile_order(plan) if j.first) == 6
    assert engine.pending_steps() == plan.compile_count() - 6
    requests, _ = run_prefix_scenario(engine)
    assert_equal_to_generate(params, CONFIG, requests)
    items = [([1, 5, 9], [4, 4]), ([2] * 20, [7, 8, 9])]
    padded = engine.score(items)
    assert engine.compiled_steps() == 6  # nothing compiled on the request path
    engine.compile_pending()
    assert engine.pending_steps() == 0 and engine.compiled_steps() == plan.compile_count()
    exact = engine.score(items)
    for a, b in zip(padded.token_logprobs + padded.greedy, exact.token_logprobs + exact.greedy, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    engine.reset()
    requests, _ = run_prefix_scenario(engine)
    assert_equal_to_generate(params, CONFIG, requests)


def test_covering_decode_steps_free_slots_holding_prefixes_and_chunked_prompts_unharmed():
    """Only the covering steps: a long request decodes at batch 1 in the 4-wide step, which also steps slot 1 (a
    finished request's cached prefix, reused afterwards) and the slot of a prompt being prefilled in chunks beside it;
    every request equals model.generate."""
    params = init_params(CONFIG, jax.random.key(5), jnp.float32)
    engine = Engine(params, CONFIG, _plan(prefill_chunk=16))
    engine.warm_up(phases=("generate",), defer=True)
    rng = np.random.default_rng(0)
    ids = lambda n: [int(t) for t in rng.integers(3, CONFIG.vocab_size, n)]  # noqa: E731
    # The 20th decode step waits until `follow` and `chunked` are queued: `long` then has ~70 of its 90 tokens to go
    # and decodes beside both of them on any machine (unheld, a fast one decodes 90 tokens in ~30 ms).
    steps, queued, decode = itertools.count(), threading.Event(), engine.decode_async

    def held_decode(batch, context=None):
        if next(steps) == 20:
            assert queued.wait(60), "follow and chunked were not queued"
        return decode(batch, context)

    engine.decode_async = held_decode
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    greedy = SamplingParams()
    run = lambda p, n, s=greedy: orch.submit(Request(list(p), n, sampling=s)).request  # noqa: E731
    try:
        long = run(ids(10), 90)  # slot 0, decoding throughout
        short = run(ids(30), 3, SamplingParams(repetition_penalty=1.3))  # slot 1: finishes, keeps its prefix
        wait_finished([short])
        while len(long.tokens) < len(short.tokens) + 10:  # decode steps run over slot 1 while it is free
            time.sleep(0.01)
        follow = run(short.prompt + short.tokens + ids(5), 6)  # reuses slot 1's prefix
        chunked = run(ids(100), 5, SamplingParams(0.9, top_k=20, seed=3))  # 7 chunks of 16, decode between
        queued.set()
        wait_finished([long, follow, chunked])
    finally:
        queued.set()
        orch.stop()
    assert orch.error is None
    assert long.finish_time > max(follow.finish_time, chunked.finish_time)  # long decoded beside both throughout
    assert follow.cached_tokens == len(short.prompt) + len(short.tokens) - 1
    assert engine.compiled_steps() == 5  # generate's covering steps only: nothing compiled on the request path
    assert_equal_to_generate(params, CONFIG, [long, short, follow, chunked])


def test_a_step_that_fails_to_compile_leaves_the_others_compiling(monkeypatch):
    engine = Engine(init_params(CONFIG, jax.random.key(1), jnp.float32), CONFIG, _plan())
    engine.warm_up(phases=("score",), defer=True)
    compile_one = engine._compile

    def flaky(job, state, progress):
        if job.key == (1, 64):
            raise RuntimeError("out of memory")
        compile_one(job, state, progress)

    monkeypatch.setattr(engine, "_compile", flaky)
    failed = engine.compile_pending()
    assert [(job.key, str(e)) for job, e in failed] == [((1, 64), "out of memory")]
    assert engine.pending_steps() == 0 and engine.compiled_steps() == 5  # 6 score buckets, one failed
    out = engine.score([([1, 2, 3] * 10, [4, 5])])  # 32 tokens: bucket (1, 64) is missing, (4, 64) covers it
    assert len(out.token_logprobs[0]) == 2


def test_compile_pending_stops_between_steps_when_asked():
    engine = Engine(init_params(CONFIG, jax.random.key(1), jnp.float32), CONFIG, _plan())
    engine.warm_up(phases=("score",), defer=True)
    stop = threading.Event()
    seen = []
    engine.compile_pending(lambda job: seen.append(job.label) or stop.set(), stop)
    assert seen == ["score b=1 T=16"]  # one step, then it saw the event
    assert engine.pending_steps() == 4


def _generate(stub, prompt: list[int], n: int) -> list[int]:
    req = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt), max_new_tokens=n)
    return list(stub.Generate(req, timeout=60).tokens)


def test_a_server_answers_while_its_background_warm_up_compiles():
    """A real gRPC server with warm_up="background": requests (concurrent, while the other buckets compile) get the
    tokens model.generate gives; the metrics gauge counts the steps left, and reaches 0."""
    from meshserve.model.generate import generate

    params = init_params(CONFIG, jax.random.key(2), jnp.float32)
    model = LoadedModel(CONFIG, params, ByteTokenizer(), "f32", "random:tiny")
    plan = _plan()
    metrics_port = free_port()
    options = ServerOptions(port=0, metrics_port=metrics_port, warm_up="background")
    server = build_server(model, plan, options)
    pending = server.engine.pending_steps()
    assert pending > 0
    # Hold the compile thread before its first step until the answers are in: they must come from the covering steps.
    gate, compile_one = threading.Event(), server.engine._compile
    server.engine._compile = lambda *a: gate.wait(300) and compile_one(*a)
    done = []
    server.start(lambda *counts: done.append(counts))
    gauge = lambda: _scrape(metrics_port, "meshserve_compile_pending_steps")  # noqa: E731
    try:
        prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9] * 3, [2, 7]]
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            results: dict[int, list[int]] = {}
            threads = [threading.Thread(target=lambda i=i: results.update({i: _generate(stub, prompts[i], 6)}))
                       for i in range(len(prompts))]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, p in enumerate(prompts):
                assert results[i] == list(generate(params, CONFIG, [p], max_new_tokens=6)[0].tokens)
            assert server.engine.compiled_steps() == 6 and gauge() == pending
            gate.set()
            deadline = time.monotonic() + 300
            while not done:
                assert time.monotonic() < deadline, "the background warm-up did not finish"
                time.sleep(0.2)
            assert done == [(plan.compile_count(), 0)] and gauge() == 0
            assert _generate(stub, prompts[0], 6) == results[0]
            # Guided decoding's token table was built at start, on its own thread, for every byte of the vocabulary.
            assert server.orchestrator.guides._table is not None
    finally:
        gate.set()
        server.stop(0)


def _scrape(port: int, name: str) -> float:
    return scrape_metrics(port)[name]


def test_build_server_refuses_an_unknown_warm_up():
    model = LoadedModel(CONFIG, init_params(CONFIG, jax.random.key(0), jnp.float32), ByteTokenizer(), "f32", "x")
    with pytest.raises(ServerError, match="warm_up must be 'all' or 'background', got 'lazy'"):
        build_server(model, _plan(), ServerOptions(port=0, warm_up="lazy"))


def test_batch_generate_with_a_background_warm_up_writes_what_a_full_one_does(checkpoint, tmp_path, capsys):
    """The offline job starts on the covering steps while the rest compile (f32: the same tokens as --warm-up all)."""
    rows = [{"id": i, "prompt": "ab" * (1 + 5 * i), "max_new_tokens": 6, "temperature": 0.7, "seed": i}
            for i in range(10)]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = {}
    for mode in ("background", "all"):
        out = tmp_path / f"{mode}.jsonl"
        code, _, err = run_cli(capsys, "batch-generate", str(src), "-o", str(out), "--checkpoint", checkpoint,
                               "--max-batch", "4", "--length-buckets", "16,64", "--warm-up", mode)  # fmt: skip
        assert code == 0, err
        outputs[mode] = {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}
    assert len(outputs["all"]) == 10 and outputs["background"] == outputs["all"]
