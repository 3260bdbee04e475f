"""logit_bias and min_tokens: `sample` against transformers' SequenceBiasLogitsProcessor,
MinNewTokensLengthLogitsProcessor and RepetitionPenaltyLogitsProcessor (in vLLM's order), the checks and their
messages, `generate` on the tiny model, and the serving engine against `generate` (slots and their steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_helpers import serve_requests
from meshserve.model.config import get_config
from meshserve.model.generate import GenerateError, generate
from meshserve.model.params import init_params
from meshserve.model.sampling import L_MAX, SamplingError, SamplingParams, TokenHistory, sample, stack_sampling
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

CONFIG = get_config("tiny")
EOS = 2  # the tiny preset has no end-of-sequence id: these tests pass this one as a stop id
_sample = jax.jit(sample)


def _arrays(rows: list[SamplingParams]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in stack_sampling(rows).items()}


def _reference(logits: np.ndarray, p: SamplingParams, step: int, seen: list[int]) -> np.ndarray:
    """One row [V] as transformers processes it: SequenceBias (logit_bias), MinNewTokensLength (min_tokens over
    stop_ids; `step` tokens generated after a 3-token prompt), then RepetitionPenalty over `seen`."""
    scores = torch.tensor(logits[None], dtype=torch.float32)
    ids = torch.zeros((1, 3 + step), dtype=torch.long)
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias])(ids, scores)
    if p.min_tokens and p.stop_ids:
        scores = MinNewTokensLengthLogitsProcessor(3, p.min_tokens, list(p.stop_ids))(ids, scores)
    if seen and p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen]), scores)
    return scores[0].numpy()


def test_greedy_picks_the_argmax_of_transformers_processed_logits():
    """Rows with different tables, steps and penalties (biases on the scale of the logits, so they move picks):
    each greedy pick is the reference's argmax; the reported log-prob stays the model's own."""
    B, V = 12, 48
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 2
    rows, steps, seen = [], [], []
    for i in range(B):
        top = np.argsort(logits[i])[::-1]
        bias = {int(top[0]): float(rng.uniform(-6, -1)), int(top[3]): float(rng.uniform(1, 6))}
        bias |= {int(t): float(rng.uniform(-3, 3)) for t in rng.choice(V, 4, replace=False) if int(t) not in bias}
        rows.append(SamplingParams(logit_bias=bias, min_tokens=int(rng.integers(0, 4)), stop_ids=(int(top[1]), EOS),
                                   repetition_penalty=1.0 if i % 3 else 1.7))  # fmt: skip
        steps.append(int(rng.integers(0, 5)))
        seen.append([int(top[3]), int(top[1])] if i % 3 == 0 else [])
    tokens_arr = np.zeros((B, 2), np.int32)
    for i, s in enumerate(seen):
        tokens_arr[i, : len(s)] = s
    history = TokenHistory.of_prompts(jnp.asarray(tokens_arr), jnp.asarray([len(s) for s in seen]), V)
    tokens, logprobs = _sample(jnp.asarray(logits), _arrays(rows), jnp.asarray(steps), history)
    model_logprobs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    moved = 0
    for i in range(B):
        ref = _reference(logits[i], rows[i], steps[i], seen[i])
        assert int(tokens[i]) == int(np.argmax(ref)), i
        assert float(logprobs[i]) == pytest.approx(float(model_logprobs[i, int(tokens[i])]), abs=1e-6)
        moved += int(np.argmax(ref)) != int(np.argmax(logits[i]))
    assert moved >= B // 2  # the tables really moved picks (else this test would prove nothing)


def test_plus_100_forces_minus_100_bans_and_rows_stay_apart():
    """+100 on a token makes greedy pick it; -100 on the argmax gives the runner-up; a row without entries gets
    its own argmax, and its temperature draws are those of a batch where no row has entries."""
    V = 64
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    order = np.argsort(logits, axis=-1)[:, ::-1]
    low = int(order[0, -1])  # row 0's least likely token
    rows = [SamplingParams(logit_bias={low: 100}), SamplingParams(logit_bias={int(order[1, 0]): -100}),
            SamplingParams(), SamplingParams(temperature=1.0, seed=5)]  # fmt: skip
    tokens, _ = _sample(jnp.asarray(logits), _arrays(rows), jnp.int32(0))
    assert tokens.tolist()[:3] == [low, int(order[1, 1]), int(order[2, 0])]
    plain = rows[2:]  # the same two rows in a batch with no entries at all
    for step in range(40):
        biased = _sample(jnp.asarray(logits), _arrays(rows), jnp.int32(step))
        alone = _sample(jnp.asarray(logits[2:]), _arrays(plain), jnp.int32(step))
        assert biased[0].tolist()[2:] == alone[0].tolist()
        np.testing.assert_array_equal(np.asarray(biased[1])[2:], np.asarray(alone[1]))


def test_no_live_entry_is_bit_identical_to_no_table():
    """A batch whose entries are unused or expired (min_tokens reached) samples exactly what a sampling dict
    without the table does: the false branch returns the logits untouched."""
    V = 64
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, V)).astype(np.float32) * 2)
    rows = [SamplingParams(temperature=0.9, seed=1, top_p=0.9), SamplingParams(temperature=1.3, seed=2, min_p=0.05),
            SamplingParams(temperature=0.7, seed=3, min_tokens=2, stop_ids=(5, EOS))]  # fmt: skip
    table = _arrays(rows)
    bare = {k: v for k, v in table.items() if not k.startswith("bias_")}
    for step in range(2, 60):  # row 2's entries expire at step 2
        got, want = _sample(logits, table, jnp.int32(step)), _sample(logits, bare, jnp.int32(step))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_a_step_with_a_history_has_the_branches_it_had_before_the_table():
    """The compiled sample step with a history has as many top-level conditionals with the table as without it:
    each copies the [B, V] logits on its pass-through branch, so one more would cost every plain decode step."""
    B, V = 4, 512
    history = TokenHistory.of_prompts(jnp.ones((B, 2), jnp.int32), jnp.full((B,), 2), V)
    table = _arrays([SamplingParams()] * B)
    bare = {k: v for k, v in table.items() if not k.startswith("bias_")}

    def branches(arrays) -> int:
        text = jax.jit(sample).lower(jnp.zeros((B, V)), arrays, jnp.int32(0), history).compile().as_text()
        return text[text.index("ENTRY") :].count(" conditional(")

    assert branches(table) == branches(bare) >= 2


def test_min_tokens_holds_eos_back_until_step_min_tokens():
    """min_tokens 3 with +100 on eos: eos is not drawn at steps 0..2 (greedy or not), and is at step 3."""
    V = 32
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, V)).astype(np.float32))
    rows = [SamplingParams(logit_bias={EOS: 100}, min_tokens=3, stop_ids=(EOS,)),
            SamplingParams(temperature=1.0, seed=9, logit_bias={EOS: 100}, min_tokens=3, stop_ids=(EOS,))]  # fmt: skip
    arrays = _arrays(rows)
    for step in range(6):
        tokens = _sample(logits, arrays, jnp.int32(step))[0].tolist()
        assert (tokens == [EOS, EOS]) == (step >= 3), (step, tokens)
        assert step >= 3 or EOS not in tokens
    # Per-row steps: each row's own count decides (a decode batch mixes requests at different steps).
    tokens = _sample(logits, arrays, jnp.asarray([3, 2]))[0].tolist()
    assert tokens[0] == EOS and tokens[1] != EOS


def test_checks_name_the_field_and_the_limit():
    cases = [
        (dict(logit_bias={5: 100.5}), "logit_bias[5] must be a number in [-100, 100]"),
        (dict(logit_bias={5: float("inf")}), "logit_bias[5] must be a number in [-100, 100]"),
        (dict(logit_bias={-1: 1.0}), "logit_bias: token id -1 is not an integer"),
        (dict(logit_bias={i: 1.0 for i in range(L_MAX + 1)}), f"logit_bias: {L_MAX + 1} entries exceed the limit"),
        (dict(logit_bias={i: 1.0 for i in range(L_MAX)}, min_tokens=1, stop_ids=(EOS,)),
         f"logit_bias: {L_MAX} entries + 1 for min_tokens (one per stop token id, end-of-sequence included) exceed"),
        (dict(min_tokens=-1), "min_tokens must be an integer in [0, "),
        (dict(min_tokens=2.5), "min_tokens must be an integer"),
        (dict(logit_bias=[(3, 1.0), (3, 2.0)]), "logit_bias: a token id is given more than once"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(SamplingError) as err:
            SamplingParams(**kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    # 64 entries without min_tokens are fine (min_tokens against max_new_tokens is the Request's check).
    SamplingParams(logit_bias={i: 1.0 for i in range(L_MAX)}, stop_ids=(EOS,))
    p = SamplingParams(logit_bias={7: 2, 3: -1}, min_tokens=5)
    assert p.logit_bias == ((3, -1.0), (7, 2.0)) and hash(p) == hash(SamplingParams(logit_bias=[(7, 2.0), (3, -1)],
                                                                                   min_tokens=5))  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0), jnp.float32)


def test_generate_obeys_both_knobs_and_checks_the_vocabulary(params):
    prompt = [5, 6, 7]
    forced = generate(params, CONFIG, [prompt], max_new_tokens=6, sampling=SamplingParams(logit_bias={77: 100}))[0]
    assert forced.tokens == [77] * 6
    plain = generate(params, CONFIG, [prompt], max_new_tokens=6)[0]
    # The log-probs stay the model's own: token 77 is not the model's pick, so its log-prob is far below plain's.
    assert max(forced.logprobs) < min(plain.logprobs)
    wants_eos = SamplingParams(logit_bias={EOS: 100}, min_tokens=3)
    for temperature in (0.0, 1.0):
        sampling = SamplingParams(temperature=temperature, seed=4, logit_bias={EOS: 100}, min_tokens=3)
        r = generate(params, CONFIG, [prompt], max_new_tokens=8, sampling=sampling, stop_ids=[EOS])[0]
        assert len(r.tokens) == 4 and r.tokens[-1] == EOS and EOS not in r.tokens[:3] and r.finish_reason == "stop"
    # ignore_eos (no stop ids): min_tokens has nothing to hold back, so the biased eos comes at once.
    assert generate(params, CONFIG, [prompt], max_new_tokens=3, sampling=wants_eos)[0].tokens == [EOS] * 3
    with pytest.raises(GenerateError, match=r"logit_bias: token id 256 outside the vocabulary \[0, 256\)"):
        generate(params, CONFIG, [prompt], max_new_tokens=2, sampling=SamplingParams(logit_bias={256: 1}))
    full = SamplingParams(logit_bias={i: 1.0 for i in range(10, 10 + L_MAX)}, min_tokens=1)
    with pytest.raises(SamplingError, match="entries \\+ 1 for min_tokens"):  # eos needs a 65th entry
        generate(params, CONFIG, [prompt], max_new_tokens=2, sampling=full, stop_ids=[EOS])


def test_engine_equals_generate_with_both_knobs(params):
    """Requests with logit_bias and min_tokens through the engine (prefill's step 0, then per-slot steps; a slot
    reused after a biased request) get `generate`'s tokens and log-probs."""
    plan = make_plan(CONFIG, max_batch=2, max_context=64, length_buckets=(16,), decode_buckets=(2,),
                     context_buckets=(64,), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    greedy_eos = SamplingParams(logit_bias={EOS: 100, 40: 3.0}, min_tokens=4, stop_ids=(EOS,))
    sampled = SamplingParams(temperature=0.8, seed=3, logit_bias={EOS: 8.0, 41: -100}, min_tokens=5, stop_ids=(EOS,))
    cases = [([5, 6, 7], 8, greedy_eos), ([9, 10], 9, sampled), ([11, 12, 13, 14], 6, SamplingParams()),
             ([15], 7, SamplingParams(logit_bias={33: 4.0, 34: 6.0}))]  # fmt: skip
    got = serve_requests(engine, cases)
    for (prompt, n, sampling), r in zip(cases, got, strict=True):
        ref = generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0]
        assert r.tokens == ref.tokens, (prompt, sampling)
    # The engine never stops (no Request.stop_ids here): eos comes right after min_tokens, and stays.
    assert got[0].tokens[:4].count(EOS) == 0 and got[0].tokens[4:] == [EOS] * 4
    state = jax.device_get(engine._state.sampling)
    assert (state["bias_ids"] == -1).all()  # every freed slot is back to an empty table
