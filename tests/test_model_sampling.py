"""Sampling: greedy, temperature, top-k, top-p and seeds, checked against the distributions they define."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshserve.model.sampling import SamplingError, SamplingParams, sample, stack_sampling

LOGITS = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))


def _draw(params: SamplingParams, n: int, logits=LOGITS) -> np.ndarray:
    """n draws for one request: steps 0..n-1 fold distinct keys from the same seed."""
    s = {k: jnp.asarray(v) for k, v in stack_sampling([params]).items()}
    step_fn = jax.jit(jax.vmap(lambda step: sample(logits, s, step)[0][0]))
    return np.asarray(step_fn(jnp.arange(n)))


def test_greedy_is_argmax_with_its_model_logprob():
    tokens, logprobs = sample(LOGITS, {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams()]).items()}, 0)
    assert int(tokens[0]) == 1
    assert float(logprobs[0]) == pytest.approx(np.log(0.4), abs=1e-6)


def test_temperature_one_samples_the_model_distribution():
    counts = np.bincount(_draw(SamplingParams(temperature=1.0, seed=3), 20000), minlength=5) / 20000
    np.testing.assert_allclose(counts, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.015)


def test_low_temperature_sharpens_towards_argmax():
    counts = np.bincount(_draw(SamplingParams(temperature=0.2, seed=3), 4000), minlength=5) / 4000
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 5
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)


def test_top_k_keeps_only_the_k_most_likely():
    counts = np.bincount(_draw(SamplingParams(temperature=1.0, top_k=2, seed=1), 8000), minlength=5) / 8000
    np.testing.assert_allclose(counts, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.02)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Sorted: 0.4, 0.3, 0.15, ... ; p = 0.6 needs {0.4, 0.3} (the token crossing p is kept).
    counts = np.bincount(_draw(SamplingParams(temperature=1.0, top_p=0.6, seed=2), 8000), minlength=5) / 8000
    np.testing.assert_allclose(counts, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.02)
    tiny_p = _draw(SamplingParams(temperature=1.0, top_p=0.01, seed=2), 200)
    assert set(tiny_p.tolist()) == {1}


def test_same_seed_same_tokens_other_seed_other_tokens():
    a = _draw(SamplingParams(temperature=1.0, seed=7), 64)
    b = _draw(SamplingParams(temperature=1.0, seed=7), 64)
    c = _draw(SamplingParams(temperature=1.0, seed=8), 64)
    assert (a == b).all() and (a != c).any()


def test_rows_sample_independently_with_their_own_settings():
    logits = jnp.concatenate([LOGITS, LOGITS])
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=5)]
    s = {k: jnp.asarray(v) for k, v in stack_sampling(rows).items()}
    tokens, _ = sample(logits, s, 3)
    assert tokens.tolist() == [1, 1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_k": -1}, r"top_k must be an integer in \[0, 2147483647\]"),
        ({"top_k": 99_999_999_999}, r"top_k must be an integer in \[0, 2147483647\]"),  # was an int32 OverflowError
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"seed": -3}, "seed must be"),
    ],
)
def test_out_of_range_values_are_refused(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)


def test_generate_cli_huge_top_k_is_one_line_exit_2(capsys):
    from meshserve.serving.cli import main

    code = main(["generate", "--top-k", "99999999999", "--max-new-tokens", "1", "--tokens", "1,2"])
    err = capsys.readouterr().err
    assert code == 2 and "top_k" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_top_p_one_keeps_every_token_next_to_a_filtering_row():
    from meshserve.model.sampling import _top_k_top_p

    # 32k random logits: float32 cumsum of the sorted probabilities reaches 1.0 before the tail for this draw
    # (2800 tokens were masked in row 0 before the fix), and row 1 makes the filter run for the whole batch.
    logits = jax.random.normal(jax.random.key(0), (2, 32000)) * 4
    s = {"top_k": jnp.array([0, 0]), "top_p": jnp.array([1.0, 0.5], jnp.float32)}
    out = np.asarray(_top_k_top_p(logits, s))
    assert np.isfinite(out[0]).all()
    assert 0 < np.isfinite(out[1]).sum() < 32000  # the filtering row still filters


def test_seeds_differing_only_in_the_high_32_bits_draw_differently():
    a = _draw(SamplingParams(temperature=1.0, seed=1), 64)
    b = _draw(SamplingParams(temperature=1.0, seed=2**32), 64)  # folded to the same 32 bits before the fix
    c = _draw(SamplingParams(temperature=1.0, seed=2**32 + 1), 64)
    assert (a != b).any() and (a != c).any() and (b != c).any()
    # seeds below 2**32 keep their jax.random.key(seed) streams
    s = stack_sampling([SamplingParams(temperature=1.0, seed=7)])
    assert s["seed"].tolist() == [[0, 7]]


def _primitives(jaxpr, *, into_cond: bool = False) -> set[str]:
    """Primitive names in a jaxpr and its nested jits (and cond branches only with into_cond)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "cond" and not into_cond:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner, into_cond=into_cond)
    return names


def test_per_row_steps_draw_what_each_row_draws_alone():
    """sample(logits, sampling, steps [B]) row r == sample(row r alone, step steps[r]): the serving engine's rows."""
    B, V = 6, 50
    logits = jax.random.normal(jax.random.key(1), (B, V)) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in [(0.0, 0, 1.0, 0), (0.9, 0, 1.0, 7), (1.2, 5, 1.0, 8), (0.7, 0, 0.8, 9),
                                 (1.0, 3, 0.5, 2**40), (0.0, 4, 0.3, 3)]]  # fmt: skip
    arrays = {k: jnp.asarray(v) for k, v in stack_sampling(params).items()}
    steps = jnp.array([0, 1, 5, 17, 2, 9], jnp.int32)
    tokens, logprobs = jax.jit(sample)(logits, arrays, steps)
    for r in range(B):
        alone = {k: jnp.asarray(v) for k, v in stack_sampling([params[r]]).items()}
        tok, lp = sample(logits[r : r + 1], alone, steps[r])
        assert int(tokens[r]) == int(tok[0]) and float(logprobs[r]) == pytest.approx(float(lp[0]), abs=1e-6)


def test_vocabulary_sort_runs_only_inside_a_branch():
    """The batch-wide conditions stay real branches with per-row steps (a vmap over rows would turn them into
    selects that sort the vocabulary for every row on every step, greedy or not)."""
    B, V = 4, 64
    arrays = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams()] * B).items()}
    jaxpr = jax.make_jaxpr(sample)(jnp.zeros((B, V)), arrays, jnp.zeros((B,), jnp.int32)).jaxpr
    assert "sort" not in _primitives(jaxpr)  # outside every branch
    assert "sort" in _primitives(jaxpr, into_cond=True)  # ...but there, behind `any row filters`


def test_engine_decode_step_sorts_the_vocabulary_only_behind_a_branch():
    """The serving engine's compiled decode step keeps sampling's branches (a vmap over rows there would not)."""
    from meshserve.model.config import get_config
    from meshserve.model.params import init_params
    from meshserve.serving.engine_steps import ModelSteps, decode_rows, fresh_state

    config = get_config("tiny")
    params = init_params(config, jax.random.key(0), jnp.float32)
    state = fresh_state(config, 2, 32, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, s: decode_rows(ModelSteps(), config, 2, 32, p, s))(params, state).jaxpr
    assert "sort" not in _primitives(jaxpr)
    assert "sort" in _primitives(jaxpr, into_cond=True)


def _history(B: int, V: int):
    from meshserve.model.sampling import TokenHistory

    prompts = jax.random.randint(jax.random.key(3), (B, 6), 0, V)
    history = TokenHistory.of_prompts(prompts, jnp.full((B,), 6, jnp.int32), V)
    return history.add(jax.random.randint(jax.random.key(4), (B,), 0, V))


@pytest.mark.parametrize("knobs", ["none", "mixed"])
def test_cuda_runs_every_branch_and_draws_the_same_tokens(monkeypatch, knobs):
    """On CUDA (a conditional there is a host sync) the bias table, penalties, guided masks and the draw run
    unconditionally, relying on each being the identity where its condition is false; forcing that branch here
    (platform_dependent's `cuda=`) gives the branched path's tokens and log-probs, with every knob off and on."""
    from meshserve.model.sampling import guide_arrays

    B, V = 5, 64
    logits = jax.random.normal(jax.random.key(2), (B, V)) * 3
    if knobs == "none":
        params = [SamplingParams()] * B
    else:
        params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3, logit_bias={5: 30.0, 9: -100.0}),
                  SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
                  SamplingParams(temperature=1.1, top_k=4, seed=11),
                  SamplingParams(min_tokens=3, stop_ids=(1, 2))]  # fmt: skip
    arrays = {k: jnp.asarray(v) for k, v in stack_sampling(params).items()}
    mask = np.zeros(-(-V // 32), np.uint32)
    mask[0] = 0b1010  # tokens 1 and 3 only
    arrays |= {k: jnp.asarray(v) for k, v in guide_arrays(V, B, [None, mask] if knobs == "mixed" else []).items()}
    steps = jnp.array([0, 1, 2, 3, 1], jnp.int32)
    history = _history(B, V)
    branched = sample(logits, arrays, steps, history)
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: cuda(*args))
    always = sample(logits, arrays, steps, history)
    np.testing.assert_array_equal(always[0], branched[0])
    np.testing.assert_array_equal(always[1], branched[1])
    if knobs == "mixed":
        assert int(branched[0][1]) in (1, 3)  # the guided row drew an allowed token under both


def test_cuda_branches_are_bitwise_identities_where_off(monkeypatch):
    """What the CUDA path relies on, bit for bit: with every knob off (no live bias entry, penalties 1 and 0 with
    tokens seen and counted, no guided row) `_adjust` returns its input, NaN, infinities and -0.0 included; and a
    batch past ALWAYS_MAX_ELEMENTS keeps its branches even on CUDA."""
    from meshserve.model import sampling
    from meshserve.model.sampling import _adjust, guide_arrays

    B, V = 3, 64
    logits = jax.random.normal(jax.random.key(6), (B, V)) * 5
    logits = logits.at[0, :4].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.0]))
    arrays = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams(min_tokens=2, stop_ids=(7,))] * B).items()}
    arrays |= {k: jnp.asarray(v) for k, v in guide_arrays(V, B).items()}
    steps = jnp.full((B,), 5, jnp.int32)  # past min_tokens: its entries have expired
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: cuda(*args))
    out = _adjust(logits, arrays, steps, _history(B, V))
    assert (np.asarray(out).view(np.uint32) == np.asarray(logits).view(np.uint32)).all()

    calls = []
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: calls.append(1) or cuda(*args))
    monkeypatch.setattr(sampling, "ALWAYS_MAX_ELEMENTS", B * V - 1)
    sample(logits, arrays, steps, _history(B, V))
    assert calls == []  # too large: neither _adjust nor the draw asked for the CUDA path


@pytest.mark.parametrize("asked", [False, True])
def test_top_logprobs_on_cuda_is_the_branched_result(monkeypatch, asked):
    """On CUDA top_logprobs computes without its branch (one host sync fewer per server step) and selects zeros
    where no row asked: bit for bit the branched result, the alternatives themselves where one row asked."""
    from meshserve.model.sampling import top_logprobs

    B, V = 3, 64
    logits = jax.random.normal(jax.random.key(8), (B, V)) * 4
    arrays = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams(top_logprobs=2 if asked else 0),
                                                            SamplingParams(), SamplingParams()]).items()}  # fmt: skip
    branched = top_logprobs(logits, arrays)
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cuda, default: cuda(*args))
    always = top_logprobs(logits, arrays)
    for a, b in zip(always, branched, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(np.asarray(branched[1]).any()) == asked  # zeros unless a row asked; the log-probs otherwise
