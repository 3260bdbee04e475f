"""Prefix caching in the serving path: the prefix index, the scheduler's choice of reuse, and the real engine.

A request whose prompt starts with tokens a decode slot still holds (the same system prompt, or the previous turn
of a conversation) must prefill only the rest and still produce exactly the tokens a whole prefill would.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import assert_equal_to_generate, run_prefix_scenario, wait_finished
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.engine import Engine
from meshserve.serving.orchestrator import Orchestrator
from meshserve.serving.plan import PlanError, make_plan
from meshserve.serving.prefix_cache import ExtendSteps, PrefixIndex
from meshserve.serving.scheduler import Request, Scheduler

CONFIG = get_config("tiny")
BUCKETS = (16, 64, 128)


def _scheduler(max_batch: int = 4, index: bool = True, chunk: int = 0) -> Scheduler:
    """Length buckets 16, 64, 128 (extend steps up to 64), context buckets 64, 128."""
    lengths = lambda n: next(b for b in BUCKETS if b >= n)  # noqa: E731
    extend = ExtendSteps(64, lambda n: 64 if n <= 64 else 128, chunk)
    prefixes = PrefixIndex(max_batch, 128) if index else None
    return Scheduler(max_batch, 8, (1, 4), lengths, (1, 2, 4), 1024, prefixes, extend)


def test_index_finds_the_longest_shared_prefix_and_leaves_the_last_token():
    index = PrefixIndex(3, 16)
    index.record(0, [1, 2, 3, 4])
    index.record(1, [1, 2, 3, 9, 9, 9])
    index.record(2, list(range(100)))  # cut to S - 1 = 15 tokens
    assert len(index.held(2)) == 15
    assert index.longest([1, 2, 3, 4, 5]) == (0, 4)
    assert index.longest([1, 2, 3, 9, 9, 9, 7]) == (1, 6)
    assert index.longest([1, 2, 3, 4]) == (0, 3)  # the last prompt token is always computed
    assert index.longest([1, 2, 7]) == (0, 2)  # a tie goes to the lowest slot
    assert index.longest([5, 6]) == (0, 0)
    assert index.longest(list(range(40))) == (2, 15)


def test_scheduler_reuses_a_prefix_only_when_the_rest_needs_a_smaller_bucket():
    s = _scheduler()
    system = list(range(1, 41))
    first = Request(system + [50, 51], 3)
    s.submit(first)
    batch = s.next_prefill(0.0)
    assert batch.reuse is None and batch.length == 64  # nothing cached yet
    s.record_prefill(batch, [60], [0.0], 0.0)
    assert list(s.prefix_index.held(0)) == first.prompt  # the slot holds the prompt while it runs
    # A second request with the same system prompt, while the first still runs: its rest (3 tokens) fits in 16.
    second = Request(system + [70, 71, 72], 2)
    # A short prompt sharing only 2 tokens: 16 either way, so it is prefilled whole.
    short = Request([1, 2, 99, 98], 2)
    s.submit(second)
    s.submit(short)
    batch = s.next_prefill(1.0)
    assert batch.requests == (second, short) and batch.slots == (1, 2)
    assert batch.reuse.sources == (0, 2) and batch.reuse.lengths == (40, 0) and batch.reuse.context == 64
    assert batch.length == 16 and second.cached_tokens == 40 and short.cached_tokens == 0
    s.record_prefill(batch, [80, 81], [0.0, 0.0], 1.0)
    # The first request ends after 3 tokens: its slot keeps the prompt and all but the last token.
    s.record_decode((4, (first, second, short, None)), [61, 82, 83, 0], [0.0] * 4, 2.0)
    s.record_decode((4, (first, second, short, None)), [62, 84, 85, 0], [0.0] * 4, 3.0)
    assert first.finished and list(s.prefix_index.held(0)) == first.prompt + [60, 61]
    # The next turn of that conversation reuses all of it, from the freed slot it lands in.
    turn = Request(first.prompt + first.tokens + [90, 91], 2)
    s.submit(turn)
    batch = s.next_prefill(4.0)
    assert batch.slots == (0,) and batch.reuse.sources == (0,) and batch.reuse.lengths == (44,)


def test_a_requeued_batch_leaves_the_index_as_it_was():
    s = _scheduler()
    done = Request(list(range(1, 30)), 1)
    s.submit(done)
    batch = s.next_prefill(0.0)
    s.record_prefill(batch, [5], [0.0], 0.0)  # one token: finished, slot 0 free, its prompt cached
    assert done.finished
    nxt = Request(list(range(1, 30)) + [7], 1)
    s.submit(nxt)
    batch = s.next_prefill(1.0)
    assert batch.reuse.lengths == (29,)
    s.requeue(batch.requests)  # the engine never ran it: slot 0 still holds the old prompt
    assert nxt.cached_tokens == 0 and list(s.prefix_index.held(0)) == done.prompt
    assert s.next_prefill(2.0).reuse.lengths == (29,)


def test_a_requeued_chunked_prompt_does_not_count_its_own_chunks_as_cache_hits():
    s = _scheduler(chunk=16)
    system = list(range(1, 21))
    s.prefix_index.record(0, system)  # free slot 0 holds a 20-token system prompt from an earlier request
    long = Request(system + list(range(100, 140)), 2)  # 60 tokens: 20 cached, then chunks [20, 36), [36, 52), ...
    s.submit(long)
    first = s.next_prefill(1.0)
    assert first.reuse.lengths == (20,) and first.ends == (36,) and long.cached_tokens == 20
    s.record_prefill(first, [0], [0.0], 1.0)
    second = s.next_prefill(2.0)
    assert second.requests == (long,) and second.ends == (52,)
    s.requeue(second.requests)  # the engine refused the step: [20, 36) is in the slot, computed by this request
    again = s.next_prefill(3.0)
    assert again.requests == (long,) and again.reuse.lengths == (36,)
    assert long.cached_tokens == 20  # the system prompt, not the request's own first chunk


def test_plan_counts_the_extend_steps_and_checks_the_chunk():
    grid = dict(max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,))
    plain, cached = make_plan(CONFIG, **grid), make_plan(CONFIG, **grid, prefix_caching=True)
    # prefill batches x lengths below the largest (16, 64) x contexts (64, 128)
    assert cached.extend_lengths == (16, 64) and cached.compile_count() - plain.compile_count() == 2 * 2 * 2
    chunked = make_plan(CONFIG, **grid, prefill_chunk=100)  # chunks use the extend steps too
    assert chunked.prefill_chunk == 64 and chunked.compile_count() == cached.compile_count()  # a whole bucket
    assert make_plan(CONFIG, **grid, prefill_chunk=5).prefill_chunk == 16  # at least the smallest bucket
    for bad in (-1, 128):
        with pytest.raises(PlanError, match=r"prefill chunk must be in \[1, max_context=128\)"):
            make_plan(CONFIG, **grid, prefill_chunk=bad)


def _run(orch: Orchestrator, prompt: list[int], n: int, sampling: SamplingParams) -> Request:
    return orch.submit(Request(list(prompt), n, sampling=sampling)).request


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma3"])
def test_engine_with_reused_prefixes_equals_whole_prefills(name):
    """tiny-gemma3: the extend steps over a reused prefix mask its 5-token window as a whole prefill does."""
    CONFIG = get_config(name)  # noqa: N806  (the module's name, per case)
    params = init_params(CONFIG, jax.random.key(7), jnp.float32)
    plan = make_plan(CONFIG, max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,),
                     decode_buckets=(4,), weights="f32", prefix_caching=True)  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == plan.compile_count(("generate",))
    requests, orch = run_prefix_scenario(engine)
    assert_equal_to_generate(params, CONFIG, requests)
    assert orch.metrics.prefix_hits._value.get() == sum(r.cached_tokens for r in requests)


def test_scheduler_prefills_a_long_prompt_in_chunks_between_decode_steps():
    s = _scheduler(index=False, chunk=16)
    running = Request([1, 2, 3], 10)
    s.submit(running)
    s.record_prefill(s.next_prefill(0.0), [9], [0.0], 0.0)
    long = Request(list(range(1, 51)), 3)  # 50 tokens: chunks [0, 16), [16, 32), [32, 48), [48, 50)
    s.submit(long)
    spans = []
    for step in range(4):
        batch = s.next_prefill(float(step))
        assert batch.requests == (long,) and batch.slots == (1,) and batch.length == 16
        start = batch.reuse.lengths[0] if batch.reuse else 0
        spans.append((start, batch.ends[0]))
        if start:
            assert batch.reuse.sources == (1,)  # continues from its own slot
        assert batch.prompts == [long.prompt[: batch.ends[0]]]
        updates = s.record_prefill(batch, [7], [0.0], float(step))
        # Until its last chunk it has no token, is not a decode owner, and the running request keeps decoding.
        ticket = s.decode_ticket()
        if step < 3:
            assert updates == [] and ticket == (1, (running,))
            s.record_decode(ticket, [5], [0.0], float(step))
        else:
            assert [u.tokens for u in updates] == [(7,)] and ticket == (2, (running, long))
    assert spans == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert long.prefill_start == 0.0 and long.first_token_time == 3.0 and long.cached_tokens == 0
    assert len(running.tokens) == 4  # three decode steps ran between the chunks


def test_a_cancelled_chunked_prompt_frees_its_slot():
    s = _scheduler(chunk=16)
    index = s.prefix_index
    long = Request(list(range(1, 51)), 3)
    s.submit(long)
    s.record_prefill(s.next_prefill(0.0), [7], [0.0], 0.0)
    s.cancel(long)
    assert [u.finish_reason for u in s.reap(1.0)] == ["cancelled"]
    assert s.free_slots == [0, 1, 2, 3] and s.next_prefill(2.0) is None
    assert list(index.held(0)) == long.prompt[:16]  # the chunk that ran stays reusable


def test_engine_chunked_prefill_equals_a_whole_prefill():
    params = init_params(CONFIG, jax.random.key(8), jnp.float32)
    plan = make_plan(CONFIG, max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,),
                     decode_buckets=(4,), weights="f32", prefill_chunk=16, prefix_caching=True)  # fmt: skip
    engine = Engine(params, CONFIG, plan)
    engine.warm_up(phases=("generate",))
    calls = []
    prefill, decode = engine.prefill_insert, engine.decode_async
    engine.prefill_insert = lambda prompts, *a, **kw: (
        calls.append(("prefill", len(prompts[0]))) or prefill(prompts, *a, **kw)
    )
    # The first decode step waits until `long` is queued: `short` (30 tokens) then still decodes between all of
    # long's chunks, on any machine (unheld, a fast one can decode 30 tokens before this thread sees the first).
    queued = threading.Event()

    def held_decode(*a):
        calls.append(("decode",))
        assert queued.wait(60), "long was not queued"
        return decode(*a)

    engine.decode_async = held_decode
    orch = Orchestrator(engine, Scheduler.for_plan(plan, 8), ByteTokenizer()).start()
    rng = np.random.default_rng(4)
    try:
        short = _run(orch, [5, 6, 7], 30, SamplingParams())
        while not short.tokens:
            time.sleep(0.005)
        text = [int(t) for t in rng.integers(1, CONFIG.vocab_size, 70)]
        long = _run(orch, text, 6, SamplingParams(repetition_penalty=1.3, temperature=0.5, seed=4))
        queued.set()
        wait_finished([short, long])
        # The same document again with another question: its first 70 tokens come from the chunked request's slot.
        again = _run(orch, text + [9, 9, 9], 4, SamplingParams())
        wait_finished([again])
    finally:
        queued.set()
        orch.stop()
    assert orch.error is None
    assert long.cached_tokens == 0 and again.cached_tokens >= 70
    for r in (short, long, again):
        ref = generate(params, CONFIG, [r.prompt], max_new_tokens=r.max_new_tokens, sampling=r.sampling)[0]
        assert r.tokens == list(ref.tokens)
        np.testing.assert_allclose(r.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
    chunks = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[1] > 3]
    assert [calls[i][1] for i in chunks] == [16, 32, 48, 64, 70, 73]  # each chunk's prompt end; then `again`
    assert all(("decode",) in calls[a:b] for a, b in zip(chunks, chunks[1:5], strict=False))  # decode between


def test_an_extend_batch_never_needs_the_largest_length_bucket():
    s = _scheduler()
    s.prefix_index.record(3, list(range(1, 41)))
    whole = Request([200 + i % 50 for i in range(100)], 2)  # nothing cached: a 128-token bucket
    reuse = Request(list(range(1, 41)) + [7, 8], 2)  # 40 cached, 2 to compute
    s.submit(whole)
    s.submit(reuse)
    first = s.next_prefill(0.0)  # one (T=128) extend step is not compiled: the reusing request waits
    assert first.requests == (whole,) and first.reuse is None and first.length == 128
    second = s.next_prefill(0.0)
    assert second.requests == (reuse,) and second.reuse.lengths == (40,) and second.length == 16
    # The other order: a batch that reuses does not take a whole prompt of the largest bucket either.
    s = _scheduler()
    s.prefix_index.record(3, list(range(1, 41)))
    s.submit(reuse := Request(list(range(1, 41)) + [7, 8], 2))
    s.submit(whole := Request([200 + i % 50 for i in range(100)], 2))
    assert s.next_prefill(0.0).requests == (reuse,) and s.next_prefill(0.0).requests == (whole,)


def test_one_length_bucket_turns_prefix_caching_off():
    plan = make_plan(CONFIG, max_batch=2, max_context=16, prefix_caching=True)  # the one bucket is 16
    assert plan.prefill_lengths == (16,) and not plan.prefix_caching and plan.extend_lengths == ()
    assert Scheduler.for_plan(plan, 4).prefix_index is None


def test_new_requests_overwrite_least_recently_used_slots_within_the_decode_bucket():
    s = _scheduler()
    chats = [Request([100 + c] * 20 + [c], 1) for c in range(3)]  # three conversations, one token each
    live = Request([50] * 20, 50)  # keeps slot 3 busy: the decode bucket is 4 throughout
    for r in (*chats, live):
        s.submit(r)
    batch = s.next_prefill(0.0)
    assert batch.slots == (0, 1, 2, 3)
    s.record_prefill(batch, [5] * 4, [0.0] * 4, 0.0)  # the chats finish: slots 0-2 keep their histories
    # An unrelated prompt overwrites the least recently used history (conversation 0).
    s.submit(Request([7] * 20, 1))
    s.record_prefill(b := s.next_prefill(1.0), [5], [0.0], 1.0)
    assert b.slots == (0,)
    # Conversation 1 comes back: it reuses its slot in place, which makes that slot the most recent.
    s.submit(Request(chats[1].prompt + [9] * 50, 1))  # 71 tokens: bucket 128, the rest 64
    b = s.next_prefill(2.0)
    assert b.slots == (1,) and b.reuse.sources == (1,) and b.reuse.lengths == (21,)
    s.record_prefill(b, [5], [0.0], 2.0)
    # Two more unrelated prompts: conversation 2's old history goes first, then slot 0; conversation 1's stays.
    for p in ([8] * 20, [6] * 20):
        s.submit(Request(p, 1))
    assert s.next_prefill(3.0).slots == (2, 0)


def test_with_nothing_live_a_new_request_takes_slot_0_unless_a_wider_decode_step_is_cheap():
    s = _scheduler()
    for c in range(2):
        s.submit(Request([100 + c] * 20, 1))
    s.record_prefill(s.next_prefill(0.0), [5, 5], [0.0] * 2, 0.0)
    s.submit(Request([7] * 20, 4))
    assert s.next_prefill(1.0).slots == (0,)  # not the empty slot 2: a decode bucket of 1 costs least
    # Where the cost model says a 4-wide decode step costs what a 1-wide one does, both histories are kept.
    s = _scheduler()
    s.prefix_index.cheap_batch = 4
    for c in range(2):
        s.submit(Request([100 + c] * 20, 1))
    s.record_prefill(s.next_prefill(0.0), [5, 5], [0.0] * 2, 0.0)
    s.submit(Request([7] * 20, 4))
    assert s.next_prefill(1.0).slots == (2,)


def test_cheap_decode_batch_follows_the_cost_model():
    assert make_plan(get_config("demo")).cheap_decode_batch() == 1  # no chip model on a CPU: no predictions
    gpu = make_plan(get_config("falcon-7b"), device_kind="NVIDIA H100 80GB HBM3")
    times = {s.batch: s.predicted_ms for s in gpu.steps if s.phase == "decode"}
    cheap = gpu.cheap_decode_batch()
    assert 1 < cheap < gpu.max_batch  # weight loads dominate small batches, not 32
    assert times[cheap] <= 1.05 * times[1] < times[2 * cheap]
    assert Scheduler.for_plan(dataclasses.replace(gpu, prefix_caching=True), 4).prefix_index.cheap_batch == cheap


def test_batch_generate_reuses_a_shared_few_shot_prefix(tmp_path):
    import json

    from meshserve.model.loading import load_model
    from meshserve.serving.offline import run_generate

    model = load_model(preset="tiny", weights="f32")
    # The engine test's plan: its compiled steps are in the compile cache already.
    plan = make_plan(model.config, max_batch=4, max_context=128, length_buckets=(16, 64), context_buckets=(64,),
                     decode_buckets=(4,), weights="f32", prefix_caching=True)  # fmt: skip
    engine = Engine(model.params, model.config, plan)
    engine.warm_up(phases=("generate",))
    shots = "Q: 2+2? A: 4. Q: 3+3? A: 6. Q: 5+1? A: 6. Q: 7+2? A: 9. "  # one few-shot prefix for every line
    lines = [{"id": i, "prompt": shots + f"Q: {i}+{i}? A:", "max_new_tokens": 4} for i in range(6)]
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_generate(model, engine, src, out, errors)
    assert summary.done == 6 and summary.errors == 0
    # The first prompt prefills whole; the rest reuse at least the few-shot prefix from a slot that holds it.
    assert summary.cached_prompt_tokens >= 5 * len(model.encode_prompt(shots))
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for x in lines:
        ref = generate(model.params, model.config, [model.encode_prompt(x["prompt"])], max_new_tokens=4)[0]
        assert rows[x["id"]]["tokens"] == list(ref.tokens)


def test_a_burst_sharing_a_prefix_prefills_it_once():
    s = _scheduler()
    system = list(range(1, 61))
    burst = [Request(system + [70 + i], 2) for i in range(3)]  # 61 tokens each: bucket 64; nothing cached yet
    unrelated = Request([200] * 10, 2)
    for r in (*burst, unrelated):
        s.submit(r)
    first = s.next_prefill(0.0)
    # The others would compute 64 tokens each now, 16 next step; the unrelated one need not wait behind them.
    assert first.requests == (burst[0], unrelated) and list(s.queue) == burst[1:]
    s.record_prefill(first, [5, 5], [0.0] * 2, 0.0)
    second = s.next_prefill(1.0)
    assert second.requests == (burst[1], burst[2])
    assert second.reuse.lengths == (60, 60) and second.reuse.sources == (0, 0) and second.length == 16
