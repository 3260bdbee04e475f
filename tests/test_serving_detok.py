"""The streaming detokenizer against the full decode: random id sequences and texts (multi-byte UTF-8 split across
tokens, invalid bytes, special tokens) for the byte tokenizer and the demo model's BPE tokenizer, with and without
stop strings; and the cost of a push, counted as ids handed to `tokenizer.decode`, does not grow with length."""

from pathlib import Path

import numpy as np
import pytest
from meshserve.model.tokenizer import ByteTokenizer, load_tokenizer
from meshserve.serving.detok import StreamDecoder, cut_at_stop

DEMO = Path(__file__).resolve().parent.parent / "model" / "demo"
TEXT = "héllo wörld, ünïcode: 日本語のテキスト 🙂🚀 ok. def f(x):\n    return x * 2  # ∑ → ∞ ‰ €"


class Counting:
    """A tokenizer whose decode calls record how many ids each was given."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []
        self.vocab_size, self.bos_id, self.eos_id = tok.vocab_size, tok.bos_id, tok.eos_id

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@pytest.fixture(scope="module", params=["bytes", "demo"])
def tok(request):
    return ByteTokenizer() if request.param == "bytes" else load_tokenizer(DEMO)


def _stream(tok, ids, rng, stop=(), include_stop=False):
    """Push ids in random chunks of 1-3 until a stop; -> (pieces, finish text, ids pushed, stop hit)."""
    d = StreamDecoder(tok, stop, include_stop)
    pieces, i, hit = [], 0, False
    while i < len(ids) and not hit:
        n = int(rng.integers(1, 4))
        text, hit = d.push(ids[i : i + n])
        pieces.append(text)
        i += n
    return pieces, d.finish(), ids[:i], hit


def _cut(text, stop, include_stop=False):
    hits = [(i, i + len(s)) for s in stop if (i := text.find(s)) >= 0]
    if not hits:
        return text
    return text[: min(end for _, end in hits) if include_stop else min(start for start, _ in hits)]


def _random_ids(tok, rng, n):
    if rng.random() < 0.5:  # arbitrary ids: invalid UTF-8, lone continuation bytes, special tokens
        return [int(x) for x in rng.integers(0, tok.vocab_size, n)]
    start = int(rng.integers(0, len(TEXT)))  # real text (multi-byte characters split across tokens)
    return tok.encode((TEXT[start:] + TEXT)[: n // 2 + 1] * 2)[:n]


def test_stream_equals_full_decode_over_random_ids(tok):
    rng = np.random.default_rng(0)
    for _ in range(150):
        ids = _random_ids(tok, rng, int(rng.integers(1, 120)))
        pieces, rest, pushed, hit = _stream(tok, ids, rng)
        full = tok.decode(ids)
        assert not hit and "".join(pieces) + rest == full, ids
        if not full.endswith("\ufffd"):
            assert "".join(pieces) == full, ids  # nothing held back without stop strings: the pushes alone add up
        else:
            assert full.startswith("".join(pieces)), ids


def test_valid_text_never_emits_a_replacement_character(tok):
    rng = np.random.default_rng(1)
    ids = tok.encode(TEXT * 3)
    pieces, rest, _, _ = _stream(tok, ids, rng)
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) + rest == TEXT * 3
    if isinstance(tok, ByteTokenizer):  # a multi-byte character split across pushes was held back, not replaced
        assert any(p == "" for p in pieces)


def test_stop_strings_cut_the_stream_at_the_first_match(tok):
    rng = np.random.default_rng(2)
    stops = [["ö"], ["日本", "x *"], ["🙂🚀 o", "\n "], ["return", "ld, ü"], ["zzzz"]]
    for trial in range(120):
        stop = stops[trial % len(stops)]
        ids = _random_ids(tok, rng, int(rng.integers(1, 120))) if trial % 3 == 0 else tok.encode(TEXT)
        pieces, rest, pushed, hit = _stream(tok, ids, rng, stop)
        text = "".join(pieces) + rest
        full = tok.decode(pushed)
        assert text == _cut(full, stop), (stop, ids)
        if hit:
            assert rest == "" and any(full.startswith(s, len(text)) for s in stop), (stop, ids)
        else:
            assert pushed == ids
        for s in stop:  # a piece never carries a stop string or the beginning of one that then completed
            assert s not in text


def test_include_stop_ends_the_text_with_the_stop_string(tok):
    """vLLM's include_stop_str_in_output: the text ends with the first stop string to end, whatever the pushes'
    split."""
    rng = np.random.default_rng(4)
    stops = [["ö"], ["日本", "日本語"], ["🙂🚀 o", "\n "], ["return", "ld, ü"], ["zzzz"]]
    for trial in range(100):
        stop = stops[trial % len(stops)]
        ids = _random_ids(tok, rng, int(rng.integers(1, 120))) if trial % 3 == 0 else tok.encode(TEXT)
        pieces, rest, pushed, hit = _stream(tok, ids, rng, stop, include_stop=True)
        text = "".join(pieces) + rest
        assert text == _cut(tok.decode(pushed), stop, include_stop=True), (stop, ids)
        if hit:
            assert any(text.endswith(s) for s in stop) and rest == "", (stop, ids)
    assert _cut(TEXT, ["日本語", "日本"], include_stop=True).endswith("日本")  # a stream meets it first


def test_no_stop_string_ends_the_text_before_min_tokens():
    """As vLLM: min_tokens holds back stop strings too. A stop string inside the first min_tokens ids is text; one
    that completes at or after the min_tokens-th id ends it, also one that began before (its prefix was held)."""
    tok = ByteTokenizer()
    ids = tok.encode("xa xb xc")  # byte ids: one character each
    assert cut_at_stop(tok, ids, ["x"]) == (1, "", True)
    assert cut_at_stop(tok, ids, ["x"], min_tokens=2) == (4, "xa ", True)  # the first x is text
    assert cut_at_stop(tok, ids, ["x"], include_stop=True, min_tokens=4) == (4, "xa x", True)
    assert cut_at_stop(tok, ids, [" xc"], min_tokens=7) == (8, "xa xb", True)  # began before min_tokens
    assert cut_at_stop(tok, ids, ["x"], min_tokens=9) == (8, "xa xb xc", False)  # never reached
    decoder = StreamDecoder(tok, ["x"], min_tokens=5)  # several ids a push (a verify step) across min_tokens
    assert decoder.push(ids[:3]) == ("xa ", False) and decoder.push(ids[3:]) == ("xb ", True)  # at the 3rd x


def test_min_tokens_gives_the_same_cut_whatever_the_pushes_split():
    """Pushes of several ids (verify steps) across min_tokens end where one id a push ends (cut_at_stop)."""
    tok, rng = ByteTokenizer(), np.random.default_rng(5)
    for _ in range(400):
        ids = tok.encode("".join(rng.choice(list("xab "), size=int(rng.integers(1, 20)))))
        stop = ["".join(rng.choice(list("xab "), size=int(rng.integers(1, 3))))]
        min_tokens, include = int(rng.integers(0, 12)), bool(rng.integers(0, 2))
        _, text, hit = cut_at_stop(tok, ids, stop, include, min_tokens)
        decoder, pieces, i, stopped = StreamDecoder(tok, stop, include, min_tokens), [], 0, False
        while i < len(ids) and not stopped:
            n = int(rng.integers(1, 5))
            piece, stopped = decoder.push(ids[i : i + n])
            pieces.append(piece)
            i += n
        assert ("".join(pieces) + decoder.finish(), stopped) == (text, hit), (ids, stop, min_tokens, include)


def test_emitted_text_is_never_taken_back(tok):
    rng = np.random.default_rng(3)
    for _ in range(60):
        ids = _random_ids(tok, rng, int(rng.integers(1, 80)))
        d = StreamDecoder(tok)
        for i in range(len(ids)):
            d.push(ids[i : i + 1])
            assert tok.decode(ids[: i + 1]).startswith(d.emitted), ids[: i + 1]


@pytest.mark.parametrize("kind", ["text", "invalid bytes", "special tokens"])
def test_push_cost_does_not_grow_with_length(tok, kind):
    counting = Counting(tok)
    if kind == "text":
        ids = tok.encode(TEXT * 60)[:3000]
    elif kind == "invalid bytes":  # a model emitting bytes that never form a character: nothing settles
        ids = [0xFF if isinstance(tok, ByteTokenizer) else tok.encode("\ufffd")[-1]] * 1000
    else:
        ids = [0 if isinstance(tok, ByteTokenizer) else tok.eos_id] * 1000
    d = StreamDecoder(counting, stop=["never appears"])
    early = late = 0
    for i, t in enumerate(ids):
        counting.lengths.clear()
        d.push([t])
        cost = sum(counting.lengths)
        assert cost <= 40, (i, counting.lengths)  # a window, not all i ids
        if i < 100:
            early = max(early, cost)
        elif i >= len(ids) - 100:
            late = max(late, cost)
    assert late <= early
    counting.lengths.clear()
    assert d.emitted + d.finish() == tok.decode(ids) and counting.lengths == [len(ids)]  # one full decode


@pytest.mark.parametrize("pads", [1, 4, 8, 9, 20])
def test_skipped_special_tokens_inside_a_character_never_emit_a_replacement(pads):
    # '€' is three byte-level pieces; <pad> tokens (decoded to nothing) between them once made the decoder settle
    # the first piece as U+FFFD after 8 pending ids, a character the full decode does not have.
    tok = load_tokenizer(DEMO)
    euro = tok.encode("€")
    ids = euro[:1] + [0] * pads + euro[1:]
    d = StreamDecoder(tok)
    pieces = [d.push([t])[0] for t in ids]
    assert tok.decode(ids) == "€" and "".join(pieces) == "€" and d.finish() == "", pieces


def test_stream_equals_full_decode_with_special_tokens_densely_mixed_in():
    tok = load_tokenizer(DEMO)
    pool = [0, 1, 2, *tok.encode("€日🙂é a")]  # specials and the pieces of multi-byte characters
    rng = np.random.default_rng(4)
    for _ in range(400):
        ids = [int(x) for x in rng.choice(pool, int(rng.integers(1, 40)))]
        d = StreamDecoder(tok)
        pieces, i = [], 0
        while i < len(ids):
            n = int(rng.integers(1, 4))
            pieces.append(d.push(ids[i : i + n])[0])
            i += n
            assert tok.decode(ids[:i]).startswith(d.emitted), ids[:i]  # never taken back
        assert "".join(pieces) + d.finish() == tok.decode(ids), ids
