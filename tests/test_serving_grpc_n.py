"""GenerateRequest.n over real gRPC (a `meshserve serve` subprocess, tiny checkpoint): n samples equal n separate
requests with seeds seed + i; streamed chunks tagged by index reassemble the unary choices; bad n answers
INVALID_ARGUMENT naming the limit; n past the queue is refused whole (RESOURCE_EXHAUSTED, nothing queued); cancelling
a stream cancels every sample; `meshserve generate --server --n` prints the choices.
"""

import json

import grpc
import numpy as np
import pytest
from cli_helpers import free_port, run_cli
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.client import Client, InvalidRequest
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.requests import ShuttingDownError
from meshserve.serving.scheduler import QueueFullError, Request, Scheduler
from test_serving_grpc import _counter, _metrics, _wait_for, _wait_idle
from test_serving_support import ServerProcess, make_checkpoint, slow_decode, slowed

MAX_N = 6  # --max-n: small, so max_n + 1 is cheap to refuse
MAX_QUEUE = 4  # --max-queue: n = 5 can never be queued whole, n = 4 just can
LIMIT = min(MAX_N, MAX_QUEUE)  # the server caps --max-n at --max-queue: a larger n could never be admitted


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    metrics_port = free_port()
    slow = tmp_path_factory.mktemp("slow") / "on"  # decode steps >= 50 ms more while a test holds slowed(server.slow)
    # --warm-up all: samples are compared token for token with separate requests (see test_serving_grpc.py).
    proc = ServerProcess(checkpoint, "--warm-up", "all", "--max-queue", str(MAX_QUEUE), "--max-n", str(MAX_N),
                         "--metrics-port", str(metrics_port),
                         python_code=slow_decode(0.05, while_exists=slow))  # fmt: skip
    proc.metrics_port = metrics_port
    proc.slow = slow
    yield proc
    proc.close()


def test_n_samples_equal_separate_requests_with_seeds_seed_plus_i(server, client):
    assert client.model_info().limits.max_n == LIMIT
    # 40 tokens: past the 32-token bucket, so samples 1 and 2 wait for sample 0's prefill and reuse its prompt.
    prompt = [int(t) for t in np.random.default_rng(21).integers(1, 256, 40)]
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=40, ignore_eos=True)
    before = _metrics(server)
    both = client.generate(prompt, n=3, seed=11, **kw)
    after = _metrics(server)
    ok = 'meshserve_requests_total{code="OK",method="Generate"}'
    assert after.get(ok, 0.0) - before.get(ok, 0.0) == 1  # one RPC, counted once
    tokens = "meshserve_generated_tokens_total"
    assert after[tokens] - before[tokens] == 24  # every sample's tokens
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert (both.tokens, both.text, both.logprobs, both.finish_reason) == ([], "", [], "")  # n > 1: choices only
    assert len({tuple(c.tokens) for c in both.choices}) > 1  # different seeds, different samples
    for i, choice in enumerate(both.choices):
        alone = client.generate(prompt, seed=11 + i, **kw)
        assert (choice.tokens, choice.text, choice.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
        np.testing.assert_allclose(choice.logprobs, alone.logprobs, atol=1e-5)
        assert alone.choices == []  # n = 1: the flat reply
    assert both.prompt_tokens == 40 and both.generated_tokens == 24
    # The prompt was prefilled once: each other sample reused all of it but its last token.
    assert both.cached_prompt_tokens >= 2 * 39
    hits = "meshserve_prefix_cache_hit_tokens_total"
    assert after[hits] - before[hits] == both.cached_prompt_tokens
    assert 0 <= both.queue_ms <= both.total_ms and 0 < both.time_to_first_token_ms <= both.total_ms


def test_streamed_chunks_by_index_reassemble_the_unary_choices(client):
    kw = dict(n=2, max_new_tokens=12, temperature=0.8, seed=5, top_logprobs=2, ignore_eos=True)
    prompt = [5, 6, 7, 200, 9]  # one 32-token bucket: nothing to reuse, both samples prefill alike
    unary = client.generate(prompt, **kw)
    chunks = list(client.stream_call(prompt, **kw))  # raw protos: which fields are set
    for choice in unary.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert [t for c in mine for t in c.tokens] == choice.tokens
        assert "".join(c.text for c in mine) == choice.text
        np.testing.assert_allclose([x for c in mine for x in c.logprobs], choice.logprobs, atol=1e-5)
        assert sum(len(c.top_logprobs) for c in mine) == len(choice.tokens) == 12
        ends = [c.finish_reason for c in mine if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
        assert ends == [pb.FINISH_REASON_LENGTH] and mine[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert {c.index for c in chunks} == {0, 1}
    # Usage and timing once, on the stream's last chunk, for the whole request.
    assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.generated_tokens == 24 and chunks[-1].usage.prompt_tokens == 5
    assert chunks[-1].usage.generated_tokens == unary.generated_tokens
    # The client's chunks carry the index too.
    assert {c.index for c in client.generate_stream(prompt, **kw)} == {0, 1}


def test_bad_n_answers_invalid_argument_naming_the_limit(client):
    for n in (-1, LIMIT + 1, MAX_N + 1):
        for stream in (False, True):
            with pytest.raises(grpc.RpcError) as err:
                if stream:
                    list(client.generate_stream("hi", n=n, max_new_tokens=2, validate=False))
                else:
                    client.generate("hi", n=n, max_new_tokens=2, validate=False)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"n must be in [1, {LIMIT}]" in err.value.details() and str(n) in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # the last sample's seed would be 2**63
        client.generate("hi", n=3, seed=2**63 - 2, max_new_tokens=2, validate=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "seed + n - 1" in err.value.details()
    for n in (0, -1):  # the client refuses before sending
        with pytest.raises(InvalidRequest, match="n must be an integer"):
            client.generate("hi", n=n)
    # n on the wire as 0 (unset) is one sample: the flat reply.
    assert client.stub.Generate(pb.GenerateRequest(text="hi", max_new_tokens=3, ignore_eos=True)).choices == []


def test_n_past_the_queue_is_refused_as_invalid_and_nothing_leaks(server, client):
    """--max-n 6 over --max-queue 4: n = 5 could never be queued whole, so it is invalid (not RESOURCE_EXHAUSTED,
    which clients retry); a queue with room for some but not all n is the orchestrator test below."""
    before = _counter(server, "meshserve_requests_total", method="Generate", code="INVALID_ARGUMENT")
    finished = _counter(server, "meshserve_finished_total", reason="cancelled")
    for stream in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            call = client.generate_stream if stream else client.generate
            out = call("hi", n=MAX_QUEUE + 1, max_new_tokens=4)
            list(out) if stream else out
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"n must be in [1, {MAX_QUEUE}]" in err.value.details()
    m = _wait_idle(server)
    assert m["meshserve_live_slots"] == 0 and m["meshserve_queue_depth"] == 0
    assert _counter(server, "meshserve_requests_total", method="Generate", code="INVALID_ARGUMENT") == before + 1
    assert _counter(server, "meshserve_finished_total", reason="cancelled") == finished  # none was ever queued
    # The server still serves, n = max_queue included.
    full = client.generate("hi", n=MAX_QUEUE, max_new_tokens=4, ignore_eos=True, temperature=0.5)
    assert [len(c.tokens) for c in full.choices] == [4] * MAX_QUEUE


def test_all_or_none_admission_in_the_orchestrator():
    """A queue with room for some but not all n samples queues none; a draining one queues none (the servicer's
    RESOURCE_EXHAUSTED and UNAVAILABLE). The engine thread is never started: admission is the caller's side."""
    scheduler = Scheduler(2, 4, [1], lambda n: 32, [2], 64)
    orch = Orchestrator(None, scheduler, ByteTokenizer())  # type: ignore[arg-type]
    orch.submit(Request([1, 2], 3))
    orch.submit(Request([1, 2], 3))
    with pytest.raises(QueueFullError, match=r"2 requests waiting, and n=3 samples need 3 places \(max_queue=4\)"):
        orch.submit_many([Request([1, 2], 3) for _ in range(3)])
    assert len(scheduler.queue) == 2 and len(orch._handles) == 2
    handles, events = orch.submit_many([Request([1, 2], 3) for _ in range(2)])
    assert len(scheduler.queue) == 4 and len({h.request.arrival for h in handles}) == 1
    handles[1].events.put("x")  # a sample's events arrive on the shared queue, tagged with its index
    assert events.get_nowait() == (1, "x")
    orch.drain(0.0)
    with pytest.raises(ShuttingDownError):
        orch.submit_many([Request([1, 2], 3) for _ in range(2)])
    assert len(scheduler.queue) == 4


def test_cancelling_an_n3_stream_cancels_every_sample(server, client):
    assert _wait_idle(server)["meshserve_live_slots"] == 0
    cancelled = _counter(server, "meshserve_requests_total", method="GenerateStream", code="CANCELLED")
    engine = _counter(server, "meshserve_finished_total", reason="cancelled")
    tokens = _counter(server, "meshserve_generated_tokens_total")
    # Slowed until the engine has ended the three samples: 120 tokens then take >= 6 s, so the cancel reaches them
    # mid-generation on any machine (unslowed, a fast one makes 120 tokens in ~20 ms, which can be over first).
    with slowed(server.slow):
        call = client.stream_call([1, 2, 3], n=3, max_new_tokens=120, ignore_eos=True, temperature=0.7)
        seen = set()
        for chunk in call:  # until every sample has produced a token (all three hold a slot)
            seen.add(chunk.index)
            if seen == {0, 1, 2}:
                break
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
        ended = lambda: _counter(server, "meshserve_finished_total", reason="cancelled") - engine  # noqa: E731
        assert _wait_for(lambda: ended() >= 3, timeout=30), ended()
    m = _wait_idle(server)
    assert m["meshserve_live_slots"] == 0 and m["meshserve_queue_depth"] == 0
    key = 'meshserve_requests_total{code="CANCELLED",method="GenerateStream"}'
    assert m.get(key, 0.0) - cancelled == 1  # one RPC
    assert m.get('meshserve_finished_total{reason="cancelled"}', 0.0) - engine == 3  # three samples, each ended
    assert m["meshserve_generated_tokens_total"] - tokens < 3 * 120
    assert len(client.generate("still serving", max_new_tokens=4, ignore_eos=True).tokens) == 4


def test_generate_cli_n2_with_server_and_in_process(server, client, checkpoint, capsys):
    flags = ["--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3", "--ignore-eos", "--json"]
    want = client.generate("hello", n=2, max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    for where in (["--server", server.target], ["--checkpoint", str(checkpoint)]):  # in process: the same samples
        code, out, err = run_cli(capsys, "generate", *where, "--n", "2", *flags, "hello")
        assert code == 0, err
        (line,) = [json.loads(x) for x in out.splitlines()]
        assert [c["index"] for c in line["choices"]] == [0, 1]
        assert [c["tokens"] for c in line["choices"]] == [c.tokens for c in want.choices], where
        assert [c["text"] for c in line["choices"]] == [c.text for c in want.choices]
        assert all(set(c) == {"index", "tokens", "text", "logprobs", "finish_reason"} for c in line["choices"])
    flags = flags[:-1]  # text output
    code, out, err = run_cli(capsys, "generate", "--server", server.target, "--n", "2", *flags, "hello")
    assert code == 0 and out.count("--- sample ") == 2 and "--- sample 1 ---" in out, out
    code, out, err = run_cli(capsys, "generate", "--server", server.target, "--n", str(LIMIT + 1), "hello")
    assert code == 2 and f"n must be in [1, {LIMIT}]" in err and "Traceback" not in err


# The server with gRPC's message limit lowered to 20 kB (from 4 MiB): a reply past it is as easy to ask for with n as
# a 4 MiB one is on a large model (n x max_new_tokens x top_logprobs).
_SMALL_MESSAGES = """
import sys
from meshserve.serving import server
server.MAX_MESSAGE_BYTES = 20000
from meshserve.serving.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_reply_past_the_message_limit_is_refused_naming_what_to_lower(checkpoint):
    proc = ServerProcess(checkpoint, "--warm-up", "all", "--max-score-tokens", "1000", python_code=_SMALL_MESSAGES)
    try:
        with Client(proc.target) as c:
            kw = dict(max_new_tokens=100, top_logprobs=20, ignore_eos=True, temperature=0.5)
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1, 2, 3], n=4, **kw)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = err.value.details()
            assert "exceeds the message limit of 20000 bytes" in details and "lower n (4)" in details, details
            streamed = list(c.generate_stream([1, 2, 3], n=4, **kw))  # no reply to fit: the stream has no limit
            assert sum(len(x.tokens) for x in streamed) == 400
            assert len(c.generate([1, 2, 3], max_new_tokens=4, top_logprobs=2).tokens) == 4  # small ones pass
    finally:
        proc.close()


def test_build_server_refuses_max_n_below_1():
    import jax
    import jax.numpy as jnp
    from meshserve.model.config import get_config
    from meshserve.model.loading import LoadedModel
    from meshserve.model.params import init_params
    from meshserve.model.tokenizer import ByteTokenizer
    from meshserve.serving.plan import make_plan
    from meshserve.serving.server import ServerError, ServerOptions, build_server

    config = get_config("tiny")
    model = LoadedModel(config, init_params(config, jax.random.key(0), jnp.float32), ByteTokenizer(), "f32", "x")
    plan = make_plan(config, max_batch=2, max_context=64, length_buckets=(16,), weights="f32")
    with pytest.raises(ServerError, match="max_n must be >= 1, got 0"):  # before any compile
        build_server(model, plan, ServerOptions(port=0, max_n=0))


def test_an_unset_seed_is_drawn_at_random_and_a_given_one_repeats(client):
    """No seed: the server draws one per request (OpenAI's and vLLM's servers), so asking again samples again;
    the same explicit seed repeats the output, 0 included (an explicit 0 is a seed, not "unset")."""
    kw = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    unseeded = [tuple(client.generate([5, 6, 7], **kw).tokens) for _ in range(3)]
    assert len(set(unseeded)) == 3  # 24 tokens at temperature 1 over 256 ids: a repeat would be a fixed seed
    for seed in (0, 12):
        assert client.generate([5, 6, 7], seed=seed, **kw).tokens == client.generate([5, 6, 7], seed=seed, **kw).tokens
    samples = client.generate([5, 6, 7], n=2, **kw).choices  # one random seed s, then s + 1
    assert samples[0].tokens != samples[1].tokens
