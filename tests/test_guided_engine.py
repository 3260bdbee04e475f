"""Guided decoding in the engine: a guided row draws only the tokens its packed mask allows, at prefill and at
each decode step (Engine.guide writes the next masks), and the other rows of the batch draw what they would
without it; a released slot forgets its mask."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.guided import GuideError, GuideSpec
from meshserve.serving.guided.grammar import MAX_OPEN
from meshserve.serving.guided.tracker import GuideTracker, PipelineChoice
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import make_plan
from meshserve.serving.requests import Request, RequestFailedError
from meshserve.serving.scheduler import Scheduler
from meshserve.serving.speculative import NgramSpeculator


def _mask(vocab_size: int, allowed) -> np.ndarray:
    """The packed uint32 [W] mask of the token ids in `allowed`."""
    bits = np.zeros(-(-vocab_size // 32) * 32, bool)
    bits[list(allowed)] = True
    return np.packbits(bits, bitorder="little").view("<u4")


@pytest.fixture(scope="module")
def engine():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(5))
    kw = dict(max_batch=4, max_context=128, length_buckets=(16,), decode_buckets=(4,), context_buckets=(128,))
    e = Engine(params, config, make_plan(config, **kw))
    e.warm_up(phases=("generate",))
    return e


def _run(engine: Engine, guides, masks_per_step, sampling, steps: int = 4) -> np.ndarray:
    """Prefill two prompts into slots 0 and 1 (guides: their first tokens' masks), then `steps` decode steps, each
    after writing masks_per_step(i) (slots, masks): -> tokens int [2, 1 + steps]."""
    engine.reset()
    prompts = [[3, 14, 15, 92], [65, 35, 89]]
    out = engine.prefill_insert(prompts, [0, 1], [sampling] * 2, 4, 16, guides=guides)
    tokens = [list(out.tokens)]
    for i in range(steps):
        slots, masks = masks_per_step(i)
        engine.guide(slots, masks)
        tokens.append(list(engine.decode(4, 128).tokens[:2]))
    return np.array(tokens).T


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_guided_row_draws_only_allowed_tokens_and_the_others_are_unchanged(engine, temperature):
    V = engine.config.vocab_size
    sampling = SamplingParams(temperature=temperature, seed=7)
    free = _run(engine, [None, None], lambda i: ([], []), sampling)
    allowed = [{7, 200}, {11}, {40, 41, 42}, {free[0, 3]}, {5, 6}]  # step 3 allows what it drew anyway
    guided = _run(engine, [_mask(V, allowed[0]), None], lambda i: ([0], [_mask(V, allowed[i + 1])]), sampling)
    for j, allowed_j in enumerate(allowed):
        assert guided[0, j] in allowed_j, (j, guided[0])
    np.testing.assert_array_equal(guided[1], free[1])  # the unguided row is untouched
    assert not all(free[0, j] in a for j, a in enumerate(allowed))  # the masks did change the output


def test_a_released_slot_forgets_its_mask(engine):
    V = engine.config.vocab_size
    sampling = SamplingParams()
    free = _run(engine, [None, None], lambda i: ([], []), sampling, steps=2)
    engine.reset()
    first = engine.prefill_insert([[1, 2, 3]], [0], [sampling], 4, 16, guides=[_mask(V, {9})])
    assert first.tokens[0] == 9
    assert engine.decode(4, 128).tokens[0] == 9  # the prefill's mask stays until the host writes another
    engine.release([0])
    # The next request in slot 0 is free text: it draws what it draws without guidance.
    out = engine.prefill_insert([[3, 14, 15, 92], [65, 35, 89]], [0, 1], [sampling] * 2, 4, 16)
    again = [list(out.tokens)] + [list(engine.decode(4, 128).tokens[:2]) for _ in range(2)]
    np.testing.assert_array_equal(np.array(again).T, free)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_sampled_again_under_its_late_mask_gets_what_the_mask_in_place_gives(engine, temperature):
    """The engine loop dispatches a step before it knows a guided row's mask (Engine.resample_async): the row
    sampled again from that step's logits gets the token and log-prob it would have drawn with the mask written
    before the step, and the next steps (whose input and penalty history it changed) go on alike."""
    V = engine.config.vocab_size
    # A frequency penalty: the history the step counted its first draw into must be put right.
    sampling = SamplingParams(temperature=temperature, seed=11, frequency_penalty=1.5)
    masks = [_mask(V, {21, 22, 23, 200}), _mask(V, {40, 41, 42})]

    def run(late: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        engine.reset()
        out = engine.prefill_insert([[3, 14, 15, 92], [65, 35, 89]], [0, 1], [sampling] * 2, 4, 16,
                                    guides=[_mask(V, range(V)), None])  # fmt: skip  # row 0 guided, anything first
        tokens, logprobs = [list(out.tokens)], [list(out.logprobs)]
        for mask in masks:
            if late:  # the step runs first (under the old mask), then the mask comes and row 0 is drawn again
                step = engine.decode_async(4, 128)
                again = engine.resample_async([0], [mask])
                got = engine.fetch(step, resampled=([0], again))
            else:
                engine.guide([0], [mask])
                got = engine.decode(4, 128)
            tokens.append(list(got.tokens[:2]))
            logprobs.append(list(got.logprobs[:2]))
        for _ in range(3):  # free steps after: the corrected token is the next input, and in the history
            got = engine.decode(4, 128)
            tokens.append(list(got.tokens[:2]))
            logprobs.append(list(got.logprobs[:2]))
        counts = np.asarray(engine._state.history.counts[:2])  # the penalties' history of generated tokens
        return np.array(tokens).T, np.array(logprobs).T, counts

    in_place, late = run(False), run(True)
    assert late[0][0, 1] in {21, 22, 23, 200} and late[0][0, 2] in {40, 41, 42}
    np.testing.assert_array_equal(late[0], in_place[0])
    np.testing.assert_allclose(late[1], in_place[1], rtol=1e-6)
    np.testing.assert_array_equal(late[2], in_place[2])
    assert late[2].sum() == 2 * 6  # prefill's token and five steps' per row, nothing counted twice


def _serve(
    engine: Engine, requests: list[Request], speculator=None, timeout: float = 60.0, way: bool | None = None
) -> list[tuple[str, str]]:
    """Serve the requests at once through a real Orchestrator (byte tokenizer): -> (text, finish reason) each.
    way: guided steps always pipelined (True) or read first (False); None: the server's own choice."""
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer(), speculator=speculator)
    orch.guides.choice = PipelineChoice(way)
    orch.start()
    try:
        handles = [orch.submit(r) for r in requests]
        out = []
        for h in handles:
            while (event := h.events.get(timeout=timeout)).finish_reason is None:
                pass
            out.append((h.text, event.finish_reason))
    finally:
        orch.stop()
    assert orch.error is None
    assert len(orch.guides) == 0  # every finished request's guide was dropped
    return out


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high", 3]}, "tag": {"type": "null"}},
    "required": ["ok", "level"],
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_requests_follow_their_schema_beside_free_ones(engine, temperature):
    """A random tiny model writes JSON its schema accepts (the request ends with the object: stop), while free
    requests in the same batch write what they write alone."""
    engine.reset()
    spec = GuideSpec("json_schema", schema=json.dumps(SCHEMA))
    # A random model spends its tokens on the whitespace JSON allows (a space, or a newline and 24 indentation bytes, between tokens): biased away.
    compact = {ord(c): -100 for c in " \t\n\r"}
    prompt = [3, 14, 15, 92]
    free_alone = _serve(engine, [Request(prompt, 12, SamplingParams(temperature=temperature, seed=1))])
    got = _serve(
        engine,
        [
            Request(prompt, 120, SamplingParams(temperature=temperature, seed=2, logit_bias=compact), guide=spec),
            Request(prompt, 12, SamplingParams(temperature=temperature, seed=1)),
            Request([9, 9], 120, SamplingParams(temperature=temperature, seed=3, logit_bias=compact), guide=spec),
        ],
    )
    for text, reason in (got[0], got[2]):
        value = json.loads(text)
        assert reason == "stop", text
        assert isinstance(value["ok"], bool) and value["level"] in ("low", "high", 3)
        assert set(value) <= {"ok", "level", "tag"} and value.get("tag") is None
    assert got[1] == free_alone[0]


def test_both_ways_of_running_guided_steps_give_the_same_tokens(engine):
    """Pipelined guided steps (rows sampled again once their masks are known) and steps that read the previous one
    first give every request exactly the same text: sampled, with a penalty, guided rows beside free ones."""
    engine.reset()
    spec = GuideSpec("json_schema", schema=json.dumps(SCHEMA))
    compact = {ord(c): -100 for c in " \t\n\r"}

    def requests():
        sampled = dict(temperature=1.0, frequency_penalty=0.5, logit_bias=compact)
        return [Request([3, 14, 15, 92], 60, SamplingParams(seed=2, **sampled), guide=spec),
                Request([9, 9], 24, SamplingParams(temperature=1.0, seed=1)),
                Request([9, 9], 60, SamplingParams(seed=3, **sampled), guide=GuideSpec("json_object"))]  # fmt: skip

    pipelined, read_first = _serve(engine, requests(), way=True), _serve(engine, requests(), way=False)
    assert pipelined == read_first
    assert json.loads(pipelined[0][0])["ok"] in (True, False)


@pytest.mark.parametrize(("pipelined_ms", "read_first_ms"), [(2.0, 3.0), (3.0, 2.0), (2.5, 3.0)])
def test_the_way_that_is_faster_step_for_step_wins_despite_the_switches(pipelined_ms, read_first_ms):
    """Dispatch intervals as the loop sees them: a step costs its way's time, except across a change of way (after
    a pipelined step a read-first one waits for it too; after a read-first one the next dispatch does not wait).
    Only same-way intervals count, so the faster way is found."""
    tracker = GuideTracker(None, None)
    cost = {True: pipelined_ms / 1e3, False: read_first_ms / 1e3}
    now, last = 0.0, None
    for _ in range(3000):
        way = tracker.choice.pipelined(8)
        if last is None or last == way:
            now += cost[way]
        elif last:  # pipelined -> read first: the step in flight, then the host's turn
            now += cost[True] + cost[False]
        else:  # read first -> pipelined: dispatched at once
            now += 1e-4
        tracker.dispatched(8, way, now)
        last = way
    assert tracker.choice.faster(8) is (pipelined_ms < read_first_ms)


def test_guided_steps_read_first_until_a_deferred_warm_up_compiles_their_resample_step():
    config = get_config("tiny")
    kw = dict(max_batch=4, max_context=128, length_buckets=(16,), decode_buckets=(4,), context_buckets=(128,))
    deferred = Engine(init_params(config, jax.random.key(5)), config, make_plan(config, **kw))
    deferred.warm_up(phases=("generate",), defer=True)
    assert not deferred.resamples(1) and deferred.pending_steps() > 0  # G = 1 and 4 left for the background
    spec = GuideSpec("json_object")
    compact = SamplingParams(temperature=1.0, seed=4, logit_bias={ord(c): -100 for c in " \t\n\r"})
    before = _serve(deferred, [Request([5, 5], 40, compact, guide=spec)], way=True)  # pipelined asked, not possible
    deferred.compile_pending()
    assert deferred.resamples(4) and not deferred.resamples(5)
    assert _serve(deferred, [Request([5, 5], 40, compact, guide=spec)], way=True) == before  # now pipelined


def test_the_faster_way_is_chosen_and_the_other_timed_again():
    choice = PipelineChoice()
    T, E = PipelineChoice.TRIAL, PipelineChoice.EXPLORE
    ways = [choice.pipelined(8) for _ in range(2 * T)]
    assert ways == [True] * T + [False] * T  # each way timed first
    assert choice.faster(8) is None
    for _ in range(T):
        choice.record(8, True, 0.003)
        choice.record(8, False, 0.002)
    assert choice.faster(8) is False and choice.faster(1) is None  # per bucket
    ways = [choice.pipelined(8) for _ in range(2 * E)]
    assert ways.count(True) == 2 * T  # the slower way only TRIAL steps in every EXPLORE
    assert all(not w for n, w in enumerate(ways, 2 * T) if n % E >= T)
    for _ in range(20):  # the machine changes: pipelining gets faster, and is chosen from then on
        choice.record(8, True, 0.001)
    assert choice.faster(8) is True
    assert PipelineChoice(fixed=False).pipelined(8) is False


def test_a_guided_request_runs_beside_speculation():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(5))
    kw = dict(max_batch=4, max_context=128, length_buckets=(16,), decode_buckets=(4,), context_buckets=(128,))
    spec_engine = Engine(params, config, dataclasses.replace(make_plan(config, **kw), speculative_tokens=3))
    spec_engine.warm_up(phases=("generate",))
    speculator = NgramSpeculator(k=3, gate=False)
    guide = GuideSpec("json_object")
    compact = SamplingParams(logit_bias={ord(c): -100 for c in " \t\n\r"})
    got = _serve(spec_engine, [Request([5, 5, 5, 5, 5, 5], 100, compact, guide=guide), Request([7] * 5, 30)],
                 speculator)  # fmt: skip
    text, reason = got[0]
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a random model may not close its object in 40 tokens: what it wrote is still a JSON prefix
        assert reason == "length" and text.lstrip().startswith("{")


def test_guided_rows_on_a_mesh_equal_one_device():
    """On an emulated 2x2x2 mesh (the masks replicated beside the sharded cache) a guided request gets exactly the
    one-device engine's tokens, and the masks' write keeps the decode state's split."""
    from meshserve.serving.sharding import mesh_steps

    config = get_config("tiny", n_kv_heads=8)
    params = init_params(config, jax.random.key(5), jnp.float32)
    kw = dict(max_batch=8, max_context=128, length_buckets=(16,), decode_buckets=(8,), weights="f32",
              prefix_caching=False)  # fmt: skip
    one = Engine(params, config, make_plan(config, **kw))
    placed, steps, plan = mesh_steps(config, params, make_plan(config, mesh_axes={"x": 2, "y": 2, "z": 2}, **kw))
    mesh = Engine(placed, config, plan, steps)
    compact = SamplingParams(temperature=0.8, seed=4, logit_bias={ord(c): -100 for c in " \t\n\r"})
    spec = GuideSpec("json_schema", schema=json.dumps(SCHEMA))
    got = []
    for engine in (one, mesh):
        engine.warm_up(phases=("generate",))
        got.append(_serve(engine, [Request([3, 14, 15], 100, compact, guide=spec), Request([6, 6], 20)]))
    assert got[0] == got[1]
    json.loads(got[0][0][0])
    kv = steps.decode_state_sharding.cache.k
    assert mesh._state.cache.k.sharding.is_equivalent_to(kv, 5)


def test_a_format_past_its_bounds_fails_its_request_alone(engine):
    """Overlapping anyOf branches under a recursive $ref, forced deeper with logit_bias on "[": the request fails
    (RequestFailedError naming the bound) once its alternatives pass MAX_OPEN, the free request beside it ends as
    it would alone, the guide is dropped and the slot freed."""
    engine.reset()
    schema = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}},
                                        {"type": "array", "maxItems": 5, "items": {"$ref": "#/$defs/x"}}]}},
              "$ref": "#/$defs/x"}  # fmt: skip
    spec = GuideSpec("json_schema", schema=json.dumps(schema))
    alone = _serve(engine, [Request([3, 14, 15], 30)])
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        hostile = orch.submit(Request([5, 6], 60, SamplingParams(logit_bias={ord("["): 100}), guide=spec))
        free = orch.submit(Request([3, 14, 15], 30))
        failure = None
        while failure is None:
            event = hostile.events.get(timeout=60)
            failure = event if isinstance(event, RequestFailedError) else None
            assert isinstance(event, RequestFailedError) or event.finish_reason is None
        assert f"more than {MAX_OPEN} alternatives open" in str(failure)
        while (event := free.events.get(timeout=60)).finish_reason is None:
            pass
        assert (free.text, event.finish_reason) == alone[0]
    finally:
        orch.stop()
    assert orch.error is None and len(orch.guides) == 0 and not orch.scheduler.active


def test_a_choice_request_answers_one_of_its_strings(engine):
    """vLLM's guided_choice: a random tiny model answers exactly one of the labels, ended by the format (stop)."""
    engine.reset()
    labels = ("positive", "negative", "neutral", "neg")
    spec = GuideSpec("choice", choices=labels)
    got = _serve(engine, [Request([3, 14, 15 + i], 40, SamplingParams(temperature=1.0, seed=i), guide=spec)
                          for i in range(6)])  # fmt: skip
    for text, reason in got:
        assert text in labels and (reason == "stop" or text == "neg"), (text, reason)


def test_a_regex_request_matches_its_pattern_and_a_bad_one_is_refused_at_submit(engine):
    """vLLM's guided_regex: random tiny-model answers the pattern matches whole (re.fullmatch), ended by the format;
    a pattern whose positions are too many to prepare is refused by submit, before it is queued."""
    engine.reset()
    pattern = r"(\d{3}-\d{4}|[A-Z][a-z]{2,5}!)"
    spec = GuideSpec("regex", pattern=pattern)
    got = _serve(engine, [Request([7, 8 + i], 30, SamplingParams(temperature=1.0, seed=i), guide=spec)
                          for i in range(4)])  # fmt: skip
    for text, reason in got:
        assert re.fullmatch(pattern, text) and reason == "stop", (text, reason)
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer())
    with pytest.raises(GuideError, match="more than 1024 positions"):
        orch.submit(Request([7], 30, guide=GuideSpec("regex", pattern=r".{0,300}")))
    assert len(orch.guides) == 0 and not orch.scheduler.queue


def test_guided_requests_are_counted_in_the_metrics(engine):
    engine.reset()
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 8), ByteTokenizer()).start()
    try:
        spec = GuideSpec("choice", choices=("a", "b"))
        handles = [orch.submit(Request([5, 6 + i], 10, guide=spec)) for i in range(2)]
        handles.append(orch.submit(Request([5, 9], 10)))
        for h in handles:
            while h.events.get(timeout=60).finish_reason is None:
                pass
    finally:
        orch.stop()
    value = orch.metrics.registry.get_sample_value
    assert value("meshserve_guided_requests_total", {"kind": "choice"}) == 2
    assert value("meshserve_guided_requests_total", {"kind": "json_object"}) is None
    assert 0 < value("meshserve_guided_seconds_total") == pytest.approx(orch.guides.seconds)
