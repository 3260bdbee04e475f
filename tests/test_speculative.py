"""Speculative decoding by prompt lookup: the drafter and its n-gram index (serving/speculative.py), when drafts are
worth a verify step, the engine's verify step (greedy: every kept token is the model's argmax, whatever the drafts)
and serving through the orchestrator and batch-generate, whose answers, greedy or seeded samples, equal plain
decoding's with fewer steps."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from cli_helpers import checkpoint_fixture, run_cli
from engine_helpers import serve_requests
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan
from meshserve.serving.requests import Request
from meshserve.serving.speculative import (
    RECOVER_TOKENS,
    NgramIndex,
    NgramSpeculator,
    may_draft_sampling,
    propose,
)

K = 4  # draft tokens per verify step


def test_propose_follows_the_latest_earlier_occurrence():
    assert propose([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]  # the 3-gram 1 2 3 occurred at 0
    assert propose([5, 1, 2, 7, 1, 2, 8, 0, 1, 2], 2) == [8, 0]  # the latest of two occurrences
    assert propose([4, 6, 4, 7, 7, 6], 5, max_ngram=3) == [4, 7, 7, 6]  # only the 1-gram 6 matches
    assert propose([1, 2, 3, 4], 4) == [] and propose([7], 2) == []  # nothing repeats
    assert propose([3, 3, 3, 3], 2) == [3]  # the continuation stops at the end of the history
    assert propose([1, 2, 1, 2], 3, max_ngram=2, min_ngram=2) == [1, 2]


def test_the_ngram_index_proposes_what_a_scan_of_the_history_does():
    """NgramIndex (kept as a request grows) against propose (a scan of the whole history), after every token of
    random short-alphabet sequences (many repeats), for several k and n."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        max_ngram = 1 + trial % 4
        index = NgramIndex(max_ngram)
        history = rng.integers(0, 1 + trial % 6, 60).tolist()
        index.extend(history[:5])
        for end in range(5, len(history) + 1):
            for k in (1, 3, 8):
                assert index.propose(k) == propose(history[:end], k, max_ngram), (trial, end, k)
            assert index.propose(4, min_ngram=2) == propose(history[:end], 4, max_ngram, min_ngram=2)
            index.extend(history[end : end + 1])


def test_rows_with_penalties_or_top_logprobs_do_not_draft():
    for kept in (dict(), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3), dict(logit_bias={3: 1.0}),
                 dict(min_tokens=2, stop_ids=(1,))):  # fmt: skip
        assert may_draft_sampling(SamplingParams(**kept)), kept
    for changed in (dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=0.5),
                    dict(top_logprobs=2)):  # fmt: skip
        assert not may_draft_sampling(SamplingParams(**changed)), changed


@pytest.fixture(scope="module")
def engines():
    """A tiny f32 model: one engine plain, one with verify steps (k = 4), same buckets."""
    config = get_config("tiny")
    params = init_params(config, jax.random.key(3))
    kw = dict(max_batch=4, max_context=128, length_buckets=(16, 64), decode_buckets=(1, 4), context_buckets=(128,))
    plain = Engine(params, config, make_plan(config, **kw))
    spec = Engine(params, config, dataclasses.replace(make_plan(config, **kw), speculative_tokens=K))
    for e in (plain, spec):
        e.warm_up(phases=("generate",))
    return plain, spec


def _greedy_reference(engine: Engine, prompt: list[int], n: int, context: int = 128) -> list[int]:
    engine.reset()
    out = engine.prefill_insert([prompt], [0], [SamplingParams()], 1, 16)
    tokens = [int(out.tokens[0])]
    for _ in range(n - 1):
        tokens.append(int(engine.decode(1, context).tokens[0]))
    return tokens


def test_verify_keeps_exactly_the_greedy_tokens(engines):
    """Drafts that are the greedy continuation are all kept (k + 1 tokens a step); wrong drafts are cut at the
    first mismatch; either way the tokens are plain decoding's, and the cache stays consistent for what follows."""
    _verify_keeps_the_greedy_tokens(*engines)


def test_a_windowed_verify_keeps_exactly_the_greedy_tokens():
    """The same through tiny-gemma3's 5-token window (layer 0): the verify step's extend over the cache masks each
    draft's keys by its own position, so right drafts are all kept and the tokens are plain decoding's."""
    config = get_config("tiny-gemma3")
    params = init_params(config, jax.random.key(5))
    kw = dict(max_batch=1, max_context=32, length_buckets=(16,), decode_buckets=(1,), context_buckets=(32,))
    plain = Engine(params, config, make_plan(config, **kw))
    spec = Engine(params, config, dataclasses.replace(make_plan(config, **kw), speculative_tokens=K))
    for e in (plain, spec):
        e.warm_up(phases=("generate",))
    _verify_keeps_the_greedy_tokens(plain, spec, context=32)


def _verify_keeps_the_greedy_tokens(plain: Engine, spec: Engine, context: int = 128) -> None:
    prompt = [5, 9, 2, 7, 11, 3]
    want = _greedy_reference(plain, prompt, 1 + 3 * (K + 1), context)
    for label, corrupt in (("right", False), ("wrong", True)):
        spec.reset()
        got = [int(spec.prefill_insert([prompt], [0], [SamplingParams()], 1, 16).tokens[0])]
        steps = 0
        while len(got) < len(want):
            drafts = np.array([want[len(got) : len(got) + K]], np.int32)
            if corrupt:
                drafts[0, 2] = (drafts[0, 2] + 1) % spec.config.vocab_size  # the third draft is wrong
            drafts = np.pad(drafts, ((0, 0), (0, K - drafts.shape[1])), constant_values=-1)
            out = spec.verify(drafts, context)
            n = int(out.counts[0])
            assert n == (3 if corrupt else K + 1) or len(got) + n >= len(want), (label, n)
            got += out.tokens[0, :n].tolist()
            steps += 1
        assert got[: len(want)] == want, label
    # With no drafts a verify step is a decode step.
    spec.reset()
    spec.prefill_insert([prompt], [0], [SamplingParams()], 1, 16)
    out = spec.verify(np.full((1, K), -1, np.int32), context)
    assert out.counts.tolist() == [1] and int(out.tokens[0, 0]) == want[1]


LOOP = [7, 3, 9, 12, 4, 7, 3, 9, 12, 4, 7, 3]


def test_drafts_are_verified_only_when_expected_to_pay():
    """The verify step must beat the decode step in tokens per second: live rows + their expected kept drafts over
    the verify time against live rows over the decode time, both timed per bucket as the server runs them."""
    spec = NgramSpeculator(K)
    a, b = Request(list(LOOP), 1000), Request(list(LOOP), 1000)
    ticket = (2, (a, b))
    assert spec.drafts(ticket, 2048) is None  # nothing timed for the bucket: it decodes first
    for seconds in (0.5, 0.010, 0.011, 0.009):  # the first is dropped (a first run's one-off costs)
        assert spec.drafts(ticket, 2048) is None
        spec.costs.add("decode", 2, seconds)
    assert spec.costs.median("decode", 2) == 0.010
    for seconds in (0.9, 0.015, 0.015, 0.015):  # the verify step not timed yet: verify steps time it
        drafts = spec.drafts(ticket, 2048)
        assert drafts is not None and (drafts >= 0).any(axis=1).all()
        spec.costs.add("verify", 2, seconds)
    # 1.5x: pays when the two rows are expected to keep > 2 x 0.5 = 1 draft
    assert spec.drafts(ticket, 2048) is not None  # new rows expect KEPT_PRIOR (1) each: 2 > 1
    for _ in range(2):  # both keep nothing, twice: 0.5, then 0.25 expected each
        spec.record(ticket, drafts, np.array([1, 1]), [])
    assert spec.drafts(ticket, 2048) is None  # 0.5 < 1: a plain decode step is the better step
    spec.record(ticket, drafts, np.array([K + 1, 1]), [])  # row a kept all its drafts: (0.25 + 4) / 2
    assert spec.drafts(ticket, 2048) is not None  # 2.125 + 0.125 > 1
    # Rows that kept nothing drift back to KEPT_PRIOR as they generate without drafting: tried again.
    spec.record(ticket, drafts, np.array([1, 1]), [])  # a: 1.06, b: 0.06
    spec.record(ticket, drafts, np.array([1, 1]), [])  # a: 0.53, b: 0.03
    assert spec.drafts(ticket, 2048) is None
    for r in (a, b):
        r.tokens += [LOOP[(len(r.tokens) + i) % len(LOOP)] for i in range(RECOVER_TOKENS)]
    assert spec.drafts(ticket, 2048) is not None
    # A verify step of 5x a decode step: one new row is expected to keep 1 draft, less than 1 x (5 - 1).
    for _ in range(4):
        spec.costs.add("decode", 1, 0.010)
        spec.costs.add("verify", 1, 0.050)
    assert spec.drafts((1, (Request(list(LOOP), 1000),)), 2048) is None
    # Finished requests' records are dropped (an offline job keeps every request alive to its end).
    spec.forget(a)
    assert a not in spec._tracks and b in spec._tracks


def test_serving_with_speculation_equals_plain_decoding(engines):
    """Through the orchestrator: greedy requests (repetitive prompts, so drafts are found) get plain decoding's
    tokens in fewer engine steps; a request with a penalty beside them is unaffected (its own sampler, no drafts)."""
    plain, spec = engines
    cases = [
        (LOOP, 40, SamplingParams()),
        ([2, 8, 2, 8, 2, 8, 5], 30, SamplingParams()),
        (LOOP, 20, SamplingParams(temperature=0.9, seed=5, repetition_penalty=1.3)),
    ]
    want = serve_requests(plain, cases)
    speculator = NgramSpeculator(K, gate=False)  # verify steps whatever they cost here
    got = serve_requests(spec, cases, speculator=speculator)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert speculator.accepted > 0 and speculator.proposed >= speculator.accepted


def test_sampled_requests_draft_and_keep_their_seeded_tokens(engines):
    """Sampled requests draft too: each position of a verify step is sampled with the key plain decoding uses for
    that token, so seeded samples (filters, logit bias and min_tokens included) are token for token the same with
    speculation as without, and low-temperature rows keep some drafts."""
    plain, spec = engines
    cases = [
        (LOOP, 40, SamplingParams(temperature=0.3, seed=11)),
        (LOOP, 40, SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=12)),
        ([2, 8, 2, 8, 2, 8, 5], 30, SamplingParams(temperature=0.5, min_p=0.05, seed=13, logit_bias={3: 2.0})),
        ([5, 6, 5, 6, 5, 6], 24, SamplingParams(temperature=0.6, seed=14, min_tokens=20, stop_ids=(6,))),
    ]
    want = serve_requests(plain, cases)
    speculator = NgramSpeculator(K, gate=False)  # verify steps whatever they cost here
    got = serve_requests(spec, cases, speculator=speculator)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert 6 not in got[3].tokens[:20]  # min_tokens held in the verify steps' positions too
    assert speculator.accepted > 0 and speculator.proposed >= speculator.accepted


checkpoint = checkpoint_fixture(seed=4)


def test_batch_generate_with_speculation_writes_the_same_lines(tmp_path, capsys):
    """The CLI path, on the bundled demo model in f32 (bf16 rounds a verify step and a decode step apart enough to
    flip a near-tie now and then; trained: it continues repeated text, so drafts are kept and the
    cost gate lets them through on any machine): --speculative-tokens reaches the plan and the offline job's
    orchestrator; greedy lines are written exactly as without it, a seeded sampled line too, and the summary
    reports the drafts verified and kept."""
    src = tmp_path / "in.jsonl"
    lines = [{"id": "loop", "prompt": "one two three one two three one two", "max_new_tokens": 24},
             {"id": "code", "prompt": "def f(x):\n    return x\n\n\ndef f(x):\n", "max_new_tokens": 16},
             {"id": "sampled", "prompt": "hello", "max_new_tokens": 12, "temperature": 0.8, "seed": 3}]  # fmt: skip
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    outputs = {}
    for k in ("0", "4"):
        out = tmp_path / f"out{k}.jsonl"
        code, stdout, err = run_cli(capsys, "batch-generate", str(src), "-o", str(out), "--speculative-tokens", k,
                                    "--length-buckets", "16,64", "--decode-buckets", "1", "--max-batch", "1",
                                    "--max-context", "128", "--weights", "f32", "--json")  # fmt: skip
        assert code == 0, err
        report = json.loads(stdout)
        if k == "4":  # the drafts it verified and kept are reported
            assert 0 < report["accepted_draft_tokens"] <= report["draft_tokens"], report
            assert f"{report['accepted_draft_tokens']} of {report['draft_tokens']} draft tokens accepted" in err
        else:
            assert report["draft_tokens"] == 0 and "draft tokens" not in err
        outputs[k] = {(r := json.loads(line))["id"]: r["tokens"] for line in out.read_text().splitlines()}
    assert outputs["0"] == outputs["4"] and len(outputs["4"]["loop"]) == 24


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--speculative-tokens", "99"], "speculative tokens must be in [1, 16] (0 = off), got 99"),
        (["--speculative-tokens", "-1"], "speculative tokens must be in [1, 16] (0 = off), got -1"),
        (["--speculative-tokens", "4", "--speculative-ngram", "0"], "n-gram must be >= 1"),
        (["--speculative-tokens", "4", "--mesh", "2x2x2", "--max-batch", "16"], "speculation would never run"),
    ],
)
def test_bad_speculative_flags_fail_in_one_line(checkpoint, tmp_path, capsys, flags, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "ab"}\n')
    code, _, err = run_cli(capsys, "batch-generate", str(src), "-o", str(tmp_path / "o.jsonl"), "--checkpoint",
                           checkpoint, *flags)  # fmt: skip
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o.jsonl").exists()


def _generate_with_stop(engine: Engine, tokenizer, prompt: list[int], stop: list[str], speculator):
    """(tokens, text, finish reason) of one greedy request with stop strings, through an Orchestrator."""
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.scheduler import Request, Scheduler

    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 4), tokenizer, speculator=speculator).start()
    try:
        handle = orch.submit(Request(prompt, 48, SamplingParams()), stop)
        tokens, reason = [], None
        while reason is None:
            event = handle.events.get(timeout=60)
            tokens += event.tokens
            reason = event.finish_reason
        assert tokens == handle.request.tokens  # what was streamed is what the request holds
    finally:
        orch.stop()
    return tokens, handle.text, reason


def test_a_stop_string_inside_a_verify_step_ends_the_request_where_plain_decoding_does():
    """A verify step keeps several tokens at once; when a stop string completes on one of them, the tokens after it
    are dropped (tokens, log-probs, usage), so the answer is plain decoding's token for token, not only its text.
    The bundled demo model: its greedy text repeats itself, so most steps keep several drafts."""
    from meshserve.model.loading import load_model

    model = load_model(None)
    kw = dict(max_batch=1, max_context=128, length_buckets=(32,), decode_buckets=(1,), context_buckets=(128,))
    plain = Engine(model.params, model.config, make_plan(model.config, **kw))
    spec = Engine(model.params, model.config, make_plan(model.config, speculative_tokens=K, **kw))
    for e in (plain, spec):
        e.warm_up(phases=("generate",))
    prompt = model.encode_prompt("def area(width, height):\n    return width * height\n\n\ndef area(width, height):\n")
    free_tokens, free_text, _ = _generate_with_stop(plain, model.tokenizer, prompt, [], None)
    assert free_text.startswith("Return the widget with the w")  # so "with the w" completes inside a verify step
    for start in range(4, 60, 5):  # stop strings completing at different offsets within the verify steps
        stop = free_text[start : start + 10]
        want = _generate_with_stop(plain, model.tokenizer, prompt, [stop], None)
        got = _generate_with_stop(spec, model.tokenizer, prompt, [stop], NgramSpeculator(K))
        assert got == want, (stop, got, want)
        assert want[2] == "stop" and len(want[0]) < len(free_tokens)
