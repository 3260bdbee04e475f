"""A tokenizer with more ids than the model's vocabulary: a text prompt whose ids fall outside [0, V) is refused
where it enters (gRPC INVALID_ARGUMENT naming the field; offline: the errors file), and a bad prompt that reaches
the engine thread anyway fails only its own prefill batch; the engine goes on serving.

The checkpoint is the tiny preset (V = 256) with a word-level tokenizer of 300 ids: "w261" encodes to id 261."""

import json

import grpc
import jax
import pytest
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.client import Client
from test_serving_support import ServerProcess

TOKENIZER_IDS = 300  # > tiny's vocab_size 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from meshserve.model.checkpoint import save_checkpoint
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    root = tmp_path_factory.mktemp("vocab")
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(TOKENIZER_IDS)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    config = get_config("tiny")
    return save_checkpoint(
        root / "tiny", config, init_params(config, jax.random.key(0)), "f32", root / "tokenizer.json"
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    from meshserve.model.loading import load_model

    m = load_model(checkpoint)
    assert m.tokenizer.vocab_size == TOKENIZER_IDS and m.config.vocab_size == 256 and m.encode_prompt("w261") == [261]
    return m


@pytest.fixture(scope="module")
def engine(model):
    from meshserve.serving.engine import Engine
    from meshserve.serving.plan import make_plan

    plan = make_plan(
        model.config, max_batch=2, max_context=32, length_buckets=(32,), decode_buckets=(2,), weights="f32"
    )
    engine = Engine(model.params, model.config, plan)
    engine.warm_up()
    return engine


def test_grpc_refuses_out_of_vocabulary_text_and_keeps_serving(checkpoint):
    server = ServerProcess(checkpoint)
    try:
        with Client(server.target) as client:
            client.wait_ready()
            for stream in (False, True):
                with pytest.raises(grpc.RpcError) as err:
                    call = lambda: client.generate("w65 w261", max_new_tokens=2)  # noqa: E731
                    list(client.generate_stream("w65 w261", max_new_tokens=2)) if stream else call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "text: token id 261 outside the vocabulary [0, 256)" in err.value.details()
            for items, field in [
                ([("w299", "w1")], "items[0].prompt_text: token id 299"),
                ([("w1", "w2"), ("w1", "w2 w256")], "items[1].continuation_text: token id 256"),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    client.score(items)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert field in err.value.details(), err.value.details()
            # The engine thread is alive: the next requests are answered.
            assert len(client.generate("w65 w66", max_new_tokens=3, ignore_eos=True).tokens) == 3
            assert len(client.score([("w1 w2", "w3 w4")])[0].token_logprobs) == 2
    finally:
        server.close()


def test_offline_jobs_send_out_of_vocabulary_lines_to_the_errors_file(model, engine, tmp_path):
    from meshserve.serving.offline import run_generate, run_score

    for job, lines in [
        (run_generate, [{"id": 1, "prompt": "w65 w66", "max_new_tokens": 2}, {"id": 2, "prompt": "w65 w270"}]),
        (
            run_score,
            [{"id": 1, "prompt": "w65", "continuation": "w66"}, {"id": 2, "prompt": "w1", "continuation": "w280"}],
        ),
    ]:
        src, out, errs = tmp_path / f"{job.__name__}.in", tmp_path / f"{job.__name__}.out", tmp_path / "errs"
        src.write_text("".join(json.dumps(x) + "\n" for x in lines))
        engine.reset()
        summary = job(model, engine, src, out, errs)
        assert (summary.done, summary.errors) == (1, 1), job.__name__
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1]
        (err,) = [json.loads(x) for x in errs.read_text().splitlines()]
        assert err["line"] == 2 and err["id"] == 2 and "outside the vocabulary [0, 256)" in err["error"], err


def test_bad_prompt_on_the_engine_thread_fails_only_its_batch(engine):
    from meshserve.errors import UserError
    from meshserve.model.tokenizer import ByteTokenizer
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.scheduler import Request, Scheduler

    engine.reset()
    p = engine.plan
    scheduler = Scheduler(p.max_batch, 8, p.prefill_batches, p.length_bucket, p.decode_batches, p.prefill_token_budget)
    orch = Orchestrator(engine, scheduler, ByteTokenizer()).start()
    try:
        bad = orch.submit(Request([65, 261], 4, SamplingParams(), frozenset()))
        event = bad.events.get(timeout=60)
        assert isinstance(event, UserError) and "token id 261 outside the vocabulary [0, 256)" in str(event), event
        good = orch.submit(Request([65, 66], 4, SamplingParams(), frozenset()))
        events = [good.events.get(timeout=60)]
        while not isinstance(events[-1], BaseException) and events[-1].finish_reason is None:
            events.append(good.events.get(timeout=60))
        assert events[-1].finish_reason == "length" and len(good.request.tokens) == 4, events[-1]
        assert orch.error is None and orch._thread.is_alive()
        assert orch.live_slots() == 0  # the failed batch's slot was freed
    finally:
        orch.stop()
