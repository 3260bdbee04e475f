"""Score jobs on the real engine (tiny preset, one device) share the engine thread with decoding: one compiled
score bucket call per loop iteration, streams receive tokens between a Score's chunks, and a cancelled or expired
Score stops between chunks instead of running to the end. Also: the engine packs prefill prompts with Batch.pack."""

import queue
import threading
import time

import jax
import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import make_plan
from meshserve.serving.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def engine():
    config = get_config("tiny")
    # Two slots, one 32-token bucket: score batches (1, 2), so a Score of n items runs n / 2 chunks.
    plan = make_plan(config, max_batch=2, max_context=32, length_buckets=(32,), decode_buckets=(2,), weights="f32")
    engine = Engine(init_params(config, jax.random.key(0)), config, plan)
    engine.warm_up()
    return engine


class Recorder:
    """Wraps the engine's compiled score calls and the orchestrator's delivery, logging both in engine order."""

    def __init__(self, engine: Engine, orch: Orchestrator, on_score=None):
        self.log: list[str] = []
        self.compiled = dict(engine._score)
        self.engine = engine

        def wrap(fn):
            def call(*args):
                self.log.append("score")
                if on_score is not None:
                    on_score(self.log.count("score"))
                return fn(*args)

            return call

        engine._score = {k: wrap(f) for k, f in self.compiled.items()}
        deliver = orch._deliver

        def logged(updates):
            self.log.extend("token" for u in updates if u.tokens)
            deliver(updates)

        orch._deliver = logged

    def restore(self) -> None:
        self.engine._score = self.compiled


def _orchestrator(engine, **kw) -> Orchestrator:
    p = engine.plan
    scheduler = Scheduler(p.max_batch, 8, p.prefill_batches, p.length_bucket, p.decode_batches, p.prefill_token_budget)
    return Orchestrator(engine, scheduler, ByteTokenizer(), **kw)


def _items(n):
    rng = np.random.default_rng(n)
    return [([int(x) for x in rng.integers(1, 255, 6)], [int(x) for x in rng.integers(1, 255, 8)]) for _ in range(n)]


def test_stream_gets_tokens_between_the_chunks_of_a_long_score(engine):
    engine.reset()
    orch = _orchestrator(engine)
    rec = Recorder(engine, orch)
    items = _items(16)  # 8 chunks of 2
    # Both queued before the engine thread starts, so the 28-token stream outlasts the Score on any machine.
    handle = orch.submit(Request([65, 66, 67], 28, SamplingParams(), frozenset()))
    result = {}
    scorer = threading.Thread(target=lambda: result.setdefault("out", orch.score(items, timeout=60)))
    scorer.start()
    deadline = time.monotonic() + 10
    while orch.scores.queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    orch.start()
    try:
        scorer.join(60)
        out = result["out"]
        events = [handle.events.get(timeout=30)]
        while events[-1].finish_reason is None:
            events.append(handle.events.get(timeout=30))
    finally:
        orch.stop()
        rec.restore()
    log = rec.log
    chunks = [i for i, e in enumerate(log) if e == "score"]
    assert len(chunks) == 8, log
    # Between every two chunks of the Score, the stream received a token (the engine decoded in between).
    gaps = [log[a + 1 : b] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all("token" in g for g in gaps), log
    assert len(handle.request.tokens) == 28 and events[-1].finish_reason == "length"
    ref = engine.score(items)  # the same answers as scoring alone, in the caller's order
    for a, b in zip(out.token_logprobs, ref.token_logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [g.tolist() for g in out.greedy] == [g.tolist() for g in ref.greedy]


def test_cancelled_score_stops_between_chunks(engine):
    from meshserve.serving.orchestrator import ScoreCancelledError

    engine.reset()
    orch = _orchestrator(engine)
    cancel = threading.Event()
    rec = Recorder(engine, orch, on_score=lambda n: cancel.set() if n == 2 else None)
    orch.start()
    try:
        with pytest.raises(ScoreCancelledError, match="cancelled after 4 of 64 items"):
            orch.score(_items(64), timeout=60, cancel=cancel)  # 32 chunks; the client goes away in the second
        assert rec.log.count("score") == 2
        assert len(orch.score(_items(2), timeout=60).token_logprobs) == 2  # the engine serves the next Score
    finally:
        orch.stop()
        rec.restore()
    assert orch.error is None


def test_score_past_its_deadline_stops_on_the_engine_thread(engine):
    engine.reset()
    orch = _orchestrator(engine)
    rec = Recorder(engine, orch, on_score=lambda n: time.sleep(0.05))  # each chunk takes >= 50 ms
    orch.start()
    try:
        # No caller timeout (nothing on the caller's side sets `cancel`): only the engine's deadline check ends it.
        with pytest.raises(TimeoutError, match=r"Score deadline passed after \d+ of 128 items"):
            orch.score(_items(128), timeout=None, deadline=time.monotonic() + 0.3)  # 64 chunks: >= 3.2 s of work
        time.sleep(0.3)
        ran = rec.log.count("score")
        time.sleep(0.3)
        assert rec.log.count("score") == ran < 64  # stopped at the deadline, not still scoring for nobody
    finally:
        orch.stop()
        rec.restore()


def test_drain_fails_a_score_the_engine_thread_is_taking_off_the_queue(engine):
    """drain must see a Score between the engine thread's taking it off the queue and its becoming the running job:
    the queue below holds the engine thread right there until drain has been called."""
    from meshserve.serving.orchestrator import ShuttingDownError

    taken, release = threading.Event(), threading.Event()

    class HeldQueue(queue.SimpleQueue):
        def get_nowait(self):
            job = super().get_nowait()
            taken.set()
            release.wait(5)  # drain runs meanwhile
            return job

    engine.reset()
    orch = _orchestrator(engine)
    orch.scores.queue = HeldQueue()
    orch.start()
    result = {}

    def score():
        try:
            result["out"] = orch.score(_items(64), timeout=60)  # 32 chunks
        except Exception as e:
            result["error"] = e

    scorer = threading.Thread(target=score)
    scorer.start()
    assert taken.wait(30)
    drain = threading.Thread(target=lambda: result.setdefault("clean", orch.drain(0.0)))
    drain.start()
    time.sleep(0.3)  # drain reads the running job now (unfixed: None, the job is in neither place)
    release.set()
    drain.join(60)
    scorer.join(60)
    assert isinstance(result.get("error"), ShuttingDownError), result
    assert "the drain's grace period (--grace) ended" in str(result["error"])  # as a request's UNAVAILABLE says
    assert result["clean"] is False and orch.error is None


def test_engine_prefill_packs_prompts_with_batch_pack(engine):
    from meshserve.model.generate import Batch, GenerateError, generate

    b = Batch.pack(engine.config, [[1, 2, 3], [4, 5]], 1, None, (), shape=(2, 32))  # the engine's exact bucket
    assert b.tokens.shape == (2, 32) and b.lengths.tolist() == [3, 2] and b.tokens[1, :3].tolist() == [4, 5, 0]
    assert b.sampling["seed"].shape[0] == 2
    with pytest.raises(GenerateError, match=r"2 prompts of up to 1 tokens do not fit shape=\(1, 32\)"):
        Batch.pack(engine.config, [[1], [2]], 1, None, (), shape=(1, 32))
    engine.reset()
    prompts = [[65, 66, 67], [10, 20, 30, 40, 50]]
    out = engine.prefill_insert(prompts, [0, 1], [SamplingParams()] * 2, 2, 32)
    ref = generate(engine.params, engine.config, prompts, max_new_tokens=1)
    assert out.tokens.tolist() == [r.tokens[0] for r in ref]
    np.testing.assert_allclose(out.logprobs, [r.logprobs[0] for r in ref], atol=1e-5)
