"""The orchestrator's pipelined loop over a hand-computable mock engine (no device): every request gets its own
tokens, a refused prefill batch fails its requests, stop strings and token metrics, Score jobs (the bounded queue,
an engine crash, drain with and without grace), and the servicer's handling of an RPC that already ended or whose
deadline passed. The scheduler alone is in tests/test_serving_scheduler.py."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import ScoreOutput, StepOutput
from meshserve.serving.orchestrator import Orchestrator, ShuttingDownError
from meshserve.serving.scheduler import Request
from test_serving_scheduler import make, req


def test_prefill_refusal_no_request_explains_fails_the_whole_batch():
    from meshserve.errors import UserError

    class RefusingEngine(MockEngine):
        config = get_config("tiny")  # every prompt below is one the model can take

        def prefill_insert(self, prompts, slots, sampling, batch, length, reuse=None):
            raise UserError("bucket refused")

    s = make(max_batch=4)
    orch = Orchestrator(RefusingEngine(4), s, ByteTokenizer())
    handles = [orch.submit(req()) for _ in range(2)]  # queued before the start: one prefill batch
    orch.start()
    try:
        errors = [h.events.get(timeout=10) for h in handles]
    finally:
        orch.stop()
    assert all(isinstance(e, UserError) and "refused with its prefill batch" in str(e) for e in errors), errors
    assert "bucket refused" in str(errors[0]) and s.idle() and len(s.free_slots) == 4 and orch.error is None


class MockEngine:
    """Next token = previous token + 1 per slot; first token = last prompt token + 1. Hand-computable."""

    def __init__(self, max_batch: int):
        self.last = np.zeros(max_batch, np.int32)
        self.calls = []

    def prefill_insert(self, prompts, slots, sampling, batch, length, reuse=None):
        first = np.array([p[-1] + 1 for p in prompts], np.int32)
        self.last[list(slots)] = first
        self.calls.append(("prefill", batch, length))
        return StepOutput(first, np.zeros(len(prompts), np.float32))

    def decode_async(self, batch, context=None):
        self.last[:batch] += 1
        self.calls.append(("decode", batch))
        return self.last[:batch].copy(), np.full(batch, -1.0, np.float32)

    @staticmethod
    def fetch(out, top=False, resampled=None):
        assert resampled is None  # no guided requests here
        return StepOutput(*out)

    def release(self, slots):
        pass  # no per-slot sampling state here

    def score(self, items):
        return ScoreOutput([np.zeros(len(c), np.float32) for _, c in items], [np.ones(len(c), bool) for _, c in items])

    score_chunk_size = 8

    def score_chunk(self, items):
        return self.score(items)


def test_orchestrator_pipelined_loop_over_mock_engine():
    s = make(max_batch=4, max_queue=64, decode_batches=(1, 2, 4))
    orch = Orchestrator(MockEngine(4), s, ByteTokenizer()).start()
    try:
        handles = [orch.submit(Request([100 + 10 * i], 3 + i)) for i in range(12)]
        for i, h in enumerate(handles):
            events = []
            deadline = time.monotonic() + 10
            while not events or events[-1].finish_reason is None:
                events.append(h.events.get(timeout=max(0.1, deadline - time.monotonic())))
            tokens = [t for e in events for t in e.tokens]
            assert tokens == list(range(101 + 10 * i, 101 + 10 * i + 3 + i)), i  # no token from another request
            assert events[-1].finish_reason == "length"
        assert orch.live_slots() == 0 and orch.queued() == 0
        assert len(orch.score([([1], [2, 3])]).token_logprobs[0]) == 2
    finally:
        orch.stop()
    assert orch.error is None


class BlockingScoreEngine(MockEngine):
    """Score waits until `release` is set (a long Score job); prefill can be made to fail (an engine bug)."""

    def __init__(self, max_batch: int, fail_prefill: bool = False):
        super().__init__(max_batch)
        self.release = threading.Event()
        self.scoring = threading.Event()
        self.fail_prefill = fail_prefill

    def score(self, items):
        self.scoring.set()
        assert self.release.wait(10)
        return super().score(items)

    def prefill_insert(self, prompts, slots, sampling, batch, length, reuse=None):
        if self.fail_prefill:
            raise RuntimeError("engine bug")
        return super().prefill_insert(prompts, slots, sampling, batch, length, reuse)


def _score_in_thread(orch, results, key, timeout=5.0):
    def run():
        try:
            results[key] = orch.score([([1], [2, 3])], timeout=timeout)
        except BaseException as e:  # noqa: BLE001 (the test inspects what the caller got)
            results[key] = e

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread re-raises
def test_engine_crash_fails_queued_score_jobs():
    engine = BlockingScoreEngine(4, fail_prefill=True)
    orch = Orchestrator(engine, make(max_batch=4), ByteTokenizer()).start()
    results = {}
    a = _score_in_thread(orch, results, "a")
    assert engine.scoring.wait(5)  # A runs on the engine thread; B and a request queue behind it
    b = _score_in_thread(orch, results, "b")
    deadline = time.monotonic() + 5
    while orch.scores.queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    h = orch.submit(req())
    engine.release.set()  # A finishes, then the prefill raises: B must fail with the engine's error, not hang
    a.join(10)
    b.join(10)
    assert isinstance(results["a"], ScoreOutput)
    assert isinstance(results["b"], RuntimeError) and str(results["b"]) == "engine bug", results["b"]
    assert isinstance(h.events.get(timeout=5), RuntimeError) and isinstance(orch.error, RuntimeError)
    with pytest.raises(ShuttingDownError):
        orch.score([([1], [2])], timeout=1)
    orch._thread.join(5)  # its re-raised error is reported (and filtered) within this test


def test_drain_waits_for_queued_score_jobs():
    engine = BlockingScoreEngine(4)
    orch = Orchestrator(engine, make(max_batch=4), ByteTokenizer()).start()
    results = {}
    a = _score_in_thread(orch, results, "a")
    assert engine.scoring.wait(5)
    b = _score_in_thread(orch, results, "b")
    deadline = time.monotonic() + 5
    while orch.scores.queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    drained = {}
    d = threading.Thread(target=lambda: drained.setdefault("clean", orch.drain(10.0)))
    d.start()
    time.sleep(0.2)
    assert d.is_alive()  # a Score in flight: the drain waits for it (the scheduler alone is idle)
    engine.release.set()
    d.join(10)
    a.join(10)
    b.join(10)
    assert isinstance(results["a"], ScoreOutput) and isinstance(results["b"], ScoreOutput), results
    assert drained["clean"] is True and orch.error is None


def test_drain_past_grace_fails_queued_score_jobs_and_score_times_out():
    engine = BlockingScoreEngine(4)
    orch = Orchestrator(engine, make(max_batch=4), ByteTokenizer()).start()
    with pytest.raises(TimeoutError):
        orch.score([([1], [2])], timeout=0.2)  # the engine holds it: the caller gets its deadline
    results = {}
    b = _score_in_thread(orch, results, "b")
    deadline = time.monotonic() + 5
    while orch.scores.queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The engine holds the first job until B has its answer (or 10 s): released by a fixed timer, a drain slower
    # than the timer (a loaded machine) found B already taken off the queue and scored.
    threading.Thread(target=lambda: (b.join(10), engine.release.set())).start()
    assert orch.drain(0.1) is False  # grace too short: B is failed, not left waiting
    b.join(10)
    assert isinstance(results["b"], ShuttingDownError), results
    assert not orch._thread.is_alive()


def _events_of(handle, timeout=10.0):
    events, deadline = [], time.monotonic() + timeout
    while not events or events[-1].finish_reason is None:
        events.append(handle.events.get(timeout=max(0.1, deadline - time.monotonic())))
    return events


def test_stop_string_completed_on_the_last_allowed_token_reports_stop():
    orch = Orchestrator(MockEngine(4), make(max_batch=4), ByteTokenizer()).start()
    try:
        # Tokens 101, 102, 103 = "e", "f", "g": the stop string "fg" completes on the third and last token.
        h = orch.submit(Request([100], 3), stop=["fg"])
        events = _events_of(h)
        assert events[-1].finish_reason == "stop" and h.request.finish_reason == "stop"
        assert h.text == "e"
    finally:
        orch.stop()


def test_token_metrics_count_every_generated_token_including_the_first():
    orch = Orchestrator(MockEngine(4), make(max_batch=4), ByteTokenizer()).start()
    try:
        handles = [orch.submit(Request([10 + i], 4)) for i in range(3)]
        for h in handles:
            _events_of(h)
    finally:
        orch.stop()
    generated = sum(len(h.request.tokens) for h in handles)
    assert generated == 12
    assert orch.metrics.registry.get_sample_value("meshserve_generated_tokens_total") == generated


class _EndedContext:
    """A gRPC context whose RPC already ended (the client left before the callback was registered)."""

    def time_remaining(self):
        return None

    def add_callback(self, callback):
        return False  # grpc's answer when the RPC has already terminated: the callback will never run

    def is_active(self):
        return False


@pytest.mark.parametrize("n", [1, 3])
def test_requests_of_an_rpc_that_already_ended_are_cancelled(n):
    from meshserve.protos import inference_pb2 as pb
    from meshserve.serving.servicer import InferenceServicer, Limits

    tok = ByteTokenizer()
    model = SimpleNamespace(config=get_config("tiny"), tokenizer=tok, encode_prompt=tok.encode, stop_ids=lambda: [])
    orch = Orchestrator(MockEngine(4), make(max_batch=4), tok)  # not started: the requests stay queued
    servicer = InferenceServicer(orch, model, None, Limits(128, 4, 128, 8), {})
    call = servicer._start(pb.GenerateRequest(text="hi", max_new_tokens=4, n=n), _EndedContext(), "Generate")
    assert len(call.handles) == n
    # Every sample is freed at the next step instead of generating for nobody.
    assert all(h.request.cancel_requested for h in call.handles)


class _AbortContext:
    """A live gRPC context whose abort raises like grpc's, keeping the status code."""

    def time_remaining(self):
        return None

    def add_callback(self, callback):
        return True

    def abort(self, code, details):
        raise RuntimeError(code, details)


def test_score_queue_is_bounded_and_a_full_one_answers_resource_exhausted():
    import grpc
    from meshserve.protos import inference_pb2 as pb
    from meshserve.serving.orchestrator import ScoreQueueFullError
    from meshserve.serving.servicer import InferenceServicer, Limits

    engine = BlockingScoreEngine(4)
    orch = Orchestrator(engine, make(max_batch=4), ByteTokenizer(), max_scores=2).start()
    results = {}
    a = _score_in_thread(orch, results, "a")
    assert engine.scoring.wait(5)  # A runs, B waits: 2 pending, the limit
    b = _score_in_thread(orch, results, "b")
    deadline = time.monotonic() + 5
    while orch.scores.queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ScoreQueueFullError, match=r"max_score_queue=2"):
        orch.score([([1], [2])], timeout=1)
    tok = ByteTokenizer()
    model = SimpleNamespace(config=get_config("tiny"), tokenizer=tok, encode_prompt=tok.encode, stop_ids=lambda: [])
    servicer = InferenceServicer(orch, model, None, Limits(128, 4, 128, 8), {})
    request = pb.ScoreRequest(items=[pb.ScoreItem(prompt_text="a", continuation_text="b")])
    with pytest.raises(RuntimeError) as err:
        servicer.Score(request, _AbortContext())
    assert err.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_score_queue=2" in err.value.args[1]
    engine.release.set()
    a.join(10)
    b.join(10)
    assert isinstance(results["a"], ScoreOutput) and isinstance(results["b"], ScoreOutput), results
    assert len(orch.score([([1], [2, 3])], timeout=5).token_logprobs[0]) == 2  # room again
    orch.stop()


class _DeadlineContext(_AbortContext):
    """An RPC with a deadline: `expire()` is gRPC ending it when the deadline passes (its callbacks run, and no
    time remains)."""

    def __init__(self):
        self.left, self.callbacks = 30.0, []

    def time_remaining(self):
        return self.left

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def expire(self):
        self.left = 0.0
        for callback in self.callbacks:
            callback()


def test_a_score_ended_by_its_deadline_answers_deadline_exceeded_not_cancelled():
    """gRPC ends an RPC whose deadline passed, which cancels its Score job; the engine can notice that cancel before
    the handler's own wait times out. That is still the deadline, not a client that went away (seen: a loaded
    cold-cache CI run counted it CANCELLED and the test of the deadline metric failed)."""
    import grpc
    from meshserve.protos import inference_pb2 as pb
    from meshserve.serving.servicer import InferenceServicer, Limits

    engine = BlockingScoreEngine(4)
    engine.score_chunk = engine.score  # each chunk blocks until released
    orch = Orchestrator(engine, make(max_batch=4), ByteTokenizer()).start()
    model = SimpleNamespace(config=get_config("tiny"), tokenizer=ByteTokenizer(), encode_prompt=ByteTokenizer().encode)
    servicer = InferenceServicer(orch, model, None, Limits(128, 4, 128, 8), {})
    items = [pb.ScoreItem(prompt_text="a" * (1 + i), continuation_text="b") for i in range(12)]  # two chunks of 8
    context, got = _DeadlineContext(), {}

    def call():
        try:
            servicer.Score(pb.ScoreRequest(items=items), context)
        except RuntimeError as e:
            got["code"] = e.args[0]

    worker = threading.Thread(target=call)
    worker.start()
    try:
        assert engine.scoring.wait(5)  # the first chunk runs
        context.expire()  # the deadline passes: gRPC ends the RPC, the job is cancelled at its next chunk
        engine.release.set()
        worker.join(10)
        assert got.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED, got
    finally:
        engine.release.set()
        orch.stop()
