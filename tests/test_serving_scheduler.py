"""The scheduler as pure state (no threads, no device): prefill batches within bucket and budget, the queue bound,
slot release on length, stop token, cancel and deadline, pipelined tickets, requeue; the streaming detokenizer; a
Request's min_tokens ids. The orchestrator's loop over a mock engine is in tests/test_serving_orchestrator_mock.py."""

import pytest
from meshserve.model.tokenizer import ByteTokenizer
from meshserve.serving.detok import StreamDecoder
from meshserve.serving.scheduler import QueueFullError, Request, Scheduler


def length_bucket(n: int) -> int:
    return next(b for b in (16, 64, 128) if b >= n)


def make(max_batch=4, max_queue=8, budget=128, prefill_batches=(1, 4), decode_batches=(1, 2, 4)):
    return Scheduler(max_batch, max_queue, prefill_batches, length_bucket, decode_batches, budget)


def req(n_prompt=3, max_new=4, **kw):
    return Request(list(range(1, n_prompt + 1)), max_new, **kw)


def test_prefill_fills_lowest_free_slots_within_bucket_and_budget():
    s = make(max_batch=4, budget=128)
    rs = [req(10), req(10), req(100), req(5)]
    for r in rs:
        s.submit(r)
    batch = s.next_prefill(0.0)
    # 2 x 16-token prompts fit a (4, 16) bucket; the 100-token prompt would make (4, 128) = 512 > 128 tokens.
    assert [r.id for r in batch.requests] == [rs[0].id, rs[1].id]
    assert batch.slots == (0, 1) and batch.batch == 4 and batch.length == 16
    assert s.decode_batch() is None  # a slot decodes once its prefill's first token is recorded
    s.record_prefill(batch, [1, 1], [0.0, 0.0], 0.0)
    assert s.decode_batch() == 2
    batch2 = s.next_prefill(0.0)  # the long prompt alone: always admitted, even over the budget
    assert batch2.requests == (rs[2],) and batch2.batch == 1 and batch2.length == 128 and batch2.slots == (2,)
    batch3 = s.next_prefill(0.0)
    assert batch3.slots == (3,) and s.next_prefill(0.0) is None  # no free slot left
    for b in (batch2, batch3):
        s.record_prefill(b, [1], [0.0], 0.0)
    assert s.decode_batch() == 4


def test_queue_bound_raises_queue_full():
    s = make(max_queue=2)
    s.submit(req())
    s.submit(req())
    with pytest.raises(QueueFullError, match="max_queue=2"):
        s.submit(req())


def test_length_stop_token_and_slot_release():
    s = make()
    a, b = req(max_new=2), req(max_new=5, stop_ids=frozenset({7}))
    s.submit(a)
    s.submit(b)
    batch = s.next_prefill(0.0)
    ups = s.record_prefill(batch, [3, 4], [-0.1, -0.2], 1.0)
    assert [u.tokens for u in ups] == [(3,), (4,)] and all(u.finish_reason is None for u in ups)
    ticket = s.decode_ticket()
    assert ticket[0] == 2
    ups = s.record_decode(ticket, [5, 7], [-1.0, -2.0], 2.0)
    assert [(u.request, u.finish_reason) for u in ups] == [(a, "length"), (b, "stop")]
    assert a.tokens == [3, 5] and b.tokens == [4, 7] and b.logprobs == [-0.2, -2.0]
    assert s.idle() and s.free_slots == [0, 1, 2, 3] and s.decode_ticket() is None


def test_ticket_drops_tokens_of_requests_that_ended_after_dispatch():
    """Pipelining: step n+1 is dispatched before step n is read; a request ending at n gets nothing from n+1,
    and its reused slot's new owner is not fed the stale token."""
    s = make(max_batch=1, prefill_batches=(1,), decode_batches=(1,))
    a, b = req(max_new=2), req(max_new=3)
    s.submit(a)
    s.submit(b)
    s.record_prefill(s.next_prefill(0), [1], [0.0], 0)
    t1 = s.decode_ticket()
    t2 = s.decode_ticket()  # dispatched before t1's tokens are read
    assert [u.finish_reason for u in s.record_decode(t1, [2], [0.0], 1)] == ["length"]
    batch = s.next_prefill(1)  # b takes the freed slot 0
    assert batch.slots == (0,)
    s.record_prefill(batch, [10], [0.0], 1)
    assert s.record_decode(t2, [3], [0.0], 2) == []  # t2 belonged to a, which is done
    assert a.tokens == [1, 2] and b.tokens == [10]


def test_cancel_and_deadline_free_slots_at_reap():
    s = make()
    running, queued, late = req(max_new=50), req(max_new=50), req(max_new=50, deadline=5.0)
    for r in (running, late):
        s.submit(r)
    s.record_prefill(s.next_prefill(0), [1, 1], [0, 0], 0)
    s.submit(queued)
    s.cancel(running)
    s.cancel(queued)
    assert {u.request.id for u in s.reap(1.0)} == {running.id, queued.id}
    assert running.finish_reason == queued.finish_reason == "cancelled" and not s.queue
    assert s.active == [late]
    assert [u.request for u in s.reap(5.0)] == [late] and s.idle()
    assert s.reap(6.0) == []  # nothing left, nothing finished twice


def test_external_finish_for_stop_strings():
    s = make()
    r = req(max_new=10)
    s.submit(r)
    s.record_prefill(s.next_prefill(0), [1], [0], 0)
    assert s.finish(r, "stop", 1.0).finish_reason == "stop"
    assert s.finish(r, "stop", 1.0) is None and s.idle()


def test_requeue_puts_a_refused_batch_back_in_front_in_order_with_slots_free():
    s = make(max_batch=4)
    a, b, c, later = req(arrival=1.0), req(arrival=2.0), req(arrival=3.0), req(arrival=4.0)
    for r in (a, b, c):
        s.submit(r)
    batch = s.next_prefill(5.0)
    assert batch.requests == (a, b, c) and batch.slots == (0, 1, 2)
    s.submit(later)
    s.finish(b, "cancelled", 6.0)  # the one refused request fails; the others go back
    s.requeue([a, b, c])
    assert list(s.queue) == [a, c, later] and s.free_slots == [0, 1, 2, 3]
    assert (a.slot, a.prefill_start, a.arrival) == (None, None, 1.0) and c.arrival == 3.0
    again = s.next_prefill(7.0)
    assert again.requests == (a, c, later) and again.slots == (0, 1, 2) and a.prefill_start == 7.0


def test_stream_decoder_holds_incomplete_utf8_and_stop_prefixes():
    tok = ByteTokenizer()
    d = StreamDecoder(tok, stop=["END"])
    pieces = []
    for t in "héllo E".encode():
        text, hit = d.push([t])
        assert not hit
        pieces.append(text)
    assert "\ufffd" not in "".join(pieces)  # the two bytes of é were held back until complete
    assert "".join(pieces) == "héllo "  # "E" could start "END": held back
    text, hit = d.push(list(b"NDx"))
    assert hit and text == "" and d.emitted == "héllo "
    d2 = StreamDecoder(tok, stop=["END"])
    d2.push(list(b"ab E"))
    assert d2.finish() == "E" and d2.emitted == "ab E"  # at the end, the held-back prefix is flushed


def test_min_tokens_holds_back_the_ids_the_request_stops_on():
    """The engine reads min_tokens' ids from the sampling params; a Request keeps them equal to its stop_ids, so a
    caller that built SamplingParams(min_tokens=...) without stop ids still gets eos held back."""
    from meshserve.model.sampling_params import SamplingParams

    r = Request([1, 2], 8, SamplingParams(min_tokens=3), frozenset({7, 2}))
    assert sorted(r.sampling.stop_ids) == [2, 7] and r.sampling.min_tokens == 3
    assert Request([1], 8, SamplingParams(), frozenset({7})).sampling.stop_ids == ()  # no min_tokens: nothing held
