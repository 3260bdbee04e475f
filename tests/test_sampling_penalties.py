"""Repetition, presence and frequency penalties and min-p: against transformers' own logits processors and a
reference decode loop, through `generate` and through the serving engine (slots reused between requests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_helpers import serve_requests
from meshserve.model import transformer
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingError, SamplingParams, TokenHistory, sample, stack_sampling
from meshserve.serving.engine import Engine
from meshserve.serving.plan import make_plan
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

CONFIG = get_config("tiny")


def _arrays(rows: list[SamplingParams]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in stack_sampling(rows).items()}


def _reference_logits(logits: np.ndarray, seen_ids: list[int], output_ids: list[int], p: SamplingParams) -> np.ndarray:
    """One row [V] penalized as Hugging Face (repetition) and vLLM / OpenAI (presence, frequency) define it."""
    scores = torch.tensor(logits[None], dtype=torch.float32)
    if seen_ids:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen_ids]), scores)
    out = scores[0].numpy().astype(np.float64)
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=len(logits))
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_greedy_token_is_the_argmax_of_the_penalized_logits():
    """Rows with different penalties, prompts and outputs: each row's greedy pick is the reference's argmax, and
    the returned log-prob stays the model's own (unpenalized) one."""
    B, V = 6, 40
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    prompts = [rng.integers(0, V, size=n).tolist() for n in (5, 1, 9, 3, 7, 4)]
    outputs = [rng.integers(0, V, size=n).tolist() for n in (0, 6, 3, 11, 2, 8)]
    for i in (1, 3, 4, 5):  # each of these rows has already produced its raw argmax: a penalty must act on it
        outputs[i].append(int(np.argmax(logits[i])))
    rows = [SamplingParams(repetition_penalty=r, presence_penalty=pp, frequency_penalty=f)
            for r, pp, f in [(1.0, 0.0, 0.0), (1.8, 0.0, 0.0), (0.6, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 2.0),
                             (1.3, -0.7, 0.9)]]  # fmt: skip
    tokens_arr = np.zeros((B, 9), np.int32)
    for i, p in enumerate(prompts):
        tokens_arr[i, : len(p)] = p
    history = TokenHistory.of_prompts(jnp.asarray(tokens_arr), jnp.asarray([len(p) for p in prompts]), V)
    for i, out in enumerate(outputs):
        for t in out:
            history = history.add(jnp.asarray([t if r == i else 0 for r in range(B)]), jnp.arange(B) == i)
    tokens, logprobs = jax.jit(sample)(jnp.asarray(logits), _arrays(rows), jnp.int32(0), history)
    model_logprobs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    changed = 0
    for i in range(B):
        ref = _reference_logits(logits[i], prompts[i] + outputs[i], outputs[i], rows[i])
        assert int(tokens[i]) == int(np.argmax(ref)), i
        assert float(logprobs[i]) == pytest.approx(float(model_logprobs[i, int(tokens[i])]), abs=1e-6)
        changed += int(np.argmax(ref)) != int(np.argmax(logits[i]))
    assert changed >= 3  # the penalties really moved some picks (else this test would prove nothing)


def test_min_p_samples_what_transformers_min_p_warper_keeps():
    """min_p draws follow the distribution left by transformers' MinPLogitsWarper (after temperature)."""
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    for temperature, min_p in [(1.0, 0.3), (0.7, 0.2)]:
        scaled = torch.tensor(np.log(probs)[None] / temperature, dtype=torch.float32)
        kept = MinPLogitsWarper(min_p)(torch.zeros((1, 1), dtype=torch.long), scaled)
        expected = torch.softmax(kept, dim=-1)[0].numpy()
        arrays = _arrays([SamplingParams(temperature=temperature, min_p=min_p, seed=4)])
        draw = jax.vmap(lambda step, a=arrays: sample(logits, a, step)[0][0])
        draws = np.asarray(jax.jit(draw)(jnp.arange(8000)))
        counts = np.bincount(draws, minlength=5) / len(draws)
        assert (counts[expected == 0] == 0).all()  # the dropped tokens never come
        np.testing.assert_allclose(counts, expected, atol=0.02)


def _reference_greedy(params, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    """Greedy decoding the slow way: a full prefill per token, penalties applied by the reference above."""
    seq, out = list(prompt), []
    width = len(prompt) + n  # one padded shape for every step: one compile (prefill reads row lengths)
    prefill = jax.jit(lambda tokens, lengths: transformer.prefill(params, CONFIG, tokens, lengths)[0])
    for _ in range(n):
        logits = prefill(jnp.asarray([seq + [0] * (width - len(seq))]), jnp.asarray([len(seq)]))
        tok = int(np.argmax(_reference_logits(np.asarray(logits[0]), seq, out, p)))
        seq.append(tok)
        out.append(tok)
    return out


def test_generate_with_penalties_equals_a_reference_decode_loop():
    params = init_params(CONFIG, jax.random.key(3), jnp.float32)
    prompt = [7, 8, 9, 7, 8]
    settings = [SamplingParams(repetition_penalty=2.0), SamplingParams(presence_penalty=1.0, frequency_penalty=0.6),
                SamplingParams(repetition_penalty=1.4, frequency_penalty=-0.5)]  # fmt: skip
    plain = generate(params, CONFIG, [prompt], max_new_tokens=12)[0].tokens
    got = generate(params, CONFIG, [prompt] * 3, max_new_tokens=12, sampling=settings)  # one batch, per-row settings
    for p, result in zip(settings, got, strict=True):
        assert result.tokens == _reference_greedy(params, prompt, 12, p), p
    assert any(r.tokens != plain for r in got)  # the tiny model's plain greedy output is really changed


def test_engine_penalties_equal_generate_and_reset_when_a_slot_is_reused():
    """Three requests on two slots: the third reuses a slot whose previous request generated tokens; its counts
    must start from zero again (its tokens equal `generate` of it alone)."""
    params = init_params(CONFIG, jax.random.key(4), jnp.float32)
    plan = make_plan(CONFIG, max_batch=2, max_context=64, length_buckets=(16,), decode_buckets=(1, 2),
                     context_buckets=(64,), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    cases = [
        ([3, 4, 5, 3, 4], 20, SamplingParams(frequency_penalty=2.0)),
        ([9, 9, 9], 6, SamplingParams(temperature=0.9, seed=11, repetition_penalty=1.5, min_p=0.1)),
        ([3, 4, 5, 3, 4], 14, SamplingParams(repetition_penalty=1.7, presence_penalty=0.5)),
    ]
    got = [r.tokens for r in serve_requests(engine, cases)]
    for (prompt, n, sampling), tokens in zip(cases, got, strict=True):
        assert tokens == generate(params, CONFIG, [prompt], max_new_tokens=n, sampling=sampling)[0].tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \(0, 10000\]"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=float("inf")), "frequency_penalty"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(min_p=-0.1), "min_p"),
    ],
)
def test_out_of_range_penalties_are_refused(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)


def test_sampled_presence_and_frequency_penalties_come_before_temperature():
    """Draws follow softmax((logits - penalties) / T), vLLM's order: penalizing after the temperature division
    would give another distribution (for a repetition penalty, a scaling, the order would not show)."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0]])
    p = SamplingParams(temperature=0.5, presence_penalty=2.0, frequency_penalty=0.5, seed=9)
    history = TokenHistory.of_prompts(jnp.asarray([[3]]), jnp.asarray([1]), 4).add(jnp.asarray([0]))
    arrays = _arrays([p])
    draw = jax.jit(jax.vmap(lambda step: sample(logits, arrays, step, history)[0][0]))
    counts = np.bincount(np.asarray(draw(jnp.arange(8000))), minlength=4) / 8000
    penalized = np.array([2.0 - 2.0 - 0.5, 1.5, 1.0, 0.0])  # token 0 generated once; token 3 only in the prompt
    expected = np.exp(penalized / 0.5) / np.exp(penalized / 0.5).sum()
    np.testing.assert_allclose(counts, expected, atol=0.02)


def test_a_reused_slot_forgets_the_previous_prompt():
    """One slot, two requests: A's prompt is B's plain greedy output, so a slot that kept A's prompt tokens would
    penalize exactly the tokens B picks; B must get what it gets alone."""
    params = init_params(CONFIG, jax.random.key(6), jnp.float32)
    plan = make_plan(CONFIG, max_batch=1, max_context=64, length_buckets=(16,), decode_buckets=(1,),
                     context_buckets=(64,), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    prompt_b = [30, 31, 32]
    plain_b = generate(params, CONFIG, [prompt_b], max_new_tokens=8)[0].tokens
    penalized = SamplingParams(repetition_penalty=3.0)
    alone = generate(params, CONFIG, [prompt_b], max_new_tokens=8, sampling=penalized)[0].tokens
    leaked = generate(params, CONFIG, [plain_b + prompt_b], max_new_tokens=8, sampling=penalized)[0].tokens
    assert alone != leaked or alone != plain_b  # the scenario can tell a leak apart (else this test proves nothing)
    got = serve_requests(engine, [(plain_b[:12], 4, SamplingParams()), (prompt_b, 8, penalized)])
    assert got[1].tokens == alone


def test_a_freed_slot_gets_default_sampling_back():
    """A finished request's penalties, filters and top_logprobs leave its slot (else they would keep the batch-wide
    penalty, sort and top-k branches running on every later step that covers the slot)."""
    params = init_params(CONFIG, jax.random.key(7), jnp.float32)
    plan = make_plan(CONFIG, max_batch=2, max_context=64, length_buckets=(16,), decode_buckets=(2,),
                     context_buckets=(64,), weights="f32")  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == plan.compile_count(("generate",))
    asks = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.5, frequency_penalty=0.3, top_logprobs=4)
    serve_requests(engine, [([5, 6, 7], 6, asks)])
    defaults = {k: v[0] for k, v in stack_sampling([SamplingParams()]).items()}
    state = jax.device_get(engine._state.sampling)
    for name, value in defaults.items():
        np.testing.assert_array_equal(state[name][0], value, err_msg=name)
