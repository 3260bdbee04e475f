"""top_logprobs: the n most likely tokens at each generated position, from `generate`, the serving engine and the
CLI, checked against the model's own full-sequence logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import serve_requests
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import TOP_LOGPROBS_MAX, SamplingParams, stack_sampling, top_logprobs
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(5), jnp.float32)


def _reference_top(params, prompt: list[int], generated: list[int], k: int) -> list[tuple[list[int], np.ndarray]]:
    """For each generated position: the k most likely ids and log-probs from one full prefill of prompt+generated."""
    seq = prompt + generated
    logits, _, _ = transformer.prefill(params, CONFIG, jnp.asarray([seq]), jnp.asarray([len(seq)]), all_logits=True)
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    out = []
    for j in range(len(generated)):
        row = logp[len(prompt) - 1 + j]
        ids = np.argsort(-row, kind="stable")[:k]
        out.append((ids.tolist(), row[ids]))
    return out


def test_top_logprobs_are_the_sorted_head_of_log_softmax_and_zero_when_nobody_asks():
    logits = jax.random.normal(jax.random.key(0), (3, 50)) * 2
    asked = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams(), SamplingParams(top_logprobs=4)] * 1 +
                                                           [SamplingParams()]).items()}  # fmt: skip
    ids, lps = top_logprobs(logits, asked)
    assert ids.shape == lps.shape == (3, TOP_LOGPROBS_MAX)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for r in range(3):
        order = np.argsort(-ref[r])[:TOP_LOGPROBS_MAX]
        assert np.asarray(ids[r]).tolist() == order.tolist()
        np.testing.assert_allclose(np.asarray(lps[r]), ref[r, order], atol=1e-6)
    none = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams()] * 3).items()}
    ids, lps = top_logprobs(logits, none)
    assert not np.asarray(ids).any() and not np.asarray(lps).any()


def test_generate_alternatives_match_the_full_sequence_logits(params):
    prompts = [[10, 11, 12, 13], [200, 3]]
    rows = [SamplingParams(top_logprobs=5), SamplingParams(temperature=0.8, seed=2, top_logprobs=3)]
    results = generate(params, CONFIG, prompts, max_new_tokens=8, sampling=rows)
    for prompt, p, r in zip(prompts, rows, results, strict=True):
        assert len(r.top_logprobs) == len(r.tokens) == 8
        ref = _reference_top(params, prompt, r.tokens, p.top_logprobs)
        for (ids, lps), (ref_ids, ref_lps), tok, lp in zip(r.top_logprobs, ref, r.tokens, r.logprobs, strict=True):
            assert list(ids) == ref_ids
            np.testing.assert_allclose(lps, ref_lps, atol=1e-4)
            if tok in ids:  # the pick's own log-prob is its entry among the alternatives
                assert lps[ids.index(tok)] == pytest.approx(lp, abs=1e-6)
        if p.temperature == 0:
            assert [ids[0] for ids, _ in r.top_logprobs] == r.tokens  # greedy picks the first alternative
    plain = generate(params, CONFIG, prompts[:1], max_new_tokens=8)[0]
    assert plain.top_logprobs == [] and plain.tokens == results[0].tokens  # asking changes nothing else


def test_engine_streams_the_alternatives_generate_gives(params):
    """Two requests in one decode batch, only one asking: its events carry one entry per token, equal to
    `generate`'s; the other's carry none."""
    plan = make_plan(CONFIG, max_batch=2, max_context=64, length_buckets=(16,), decode_buckets=(2,),
                     context_buckets=(64,), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    cases = [([4, 5, 6], 10, SamplingParams(top_logprobs=6)), ([7, 8], 10, SamplingParams())]
    received = serve_requests(engine, cases)
    assert all(r.aligned for r in received)
    got = [(r.tokens, r.top_logprobs) for r in received]
    for (prompt, n, sampling), (tokens, top) in zip(cases, got, strict=True):
        ref = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0]
        assert tokens == ref.tokens
        assert [ids for ids, _ in top] == [ids for ids, _ in ref.top_logprobs]
        for (_, lps), (_, ref_lps) in zip(top, ref.top_logprobs, strict=True):
            np.testing.assert_allclose(lps, ref_lps, atol=1e-4)
    assert len(got[0][1]) == 10 and got[1][1] == []


def test_generate_cli_json_carries_alternatives_per_token(capsys):
    from cli_helpers import run_cli

    code, out, err = run_cli(capsys, "generate", "--model", "tiny", "--tokens", "1,2,3", "--max-new-tokens", "4",
                             "--top-logprobs", "2", "--json")  # fmt: skip
    assert code == 0, err
    row = json.loads(out.splitlines()[-1])
    assert len(row["top_logprobs"]) == len(row["tokens"]) == 4
    for alts, tok in zip(row["top_logprobs"], row["tokens"], strict=True):
        assert len(alts) == 2 and alts[0]["logprob"] >= alts[1]["logprob"]
        assert alts[0]["token"] == tok  # greedy
        assert isinstance(alts[0]["text"], str)
