"""The shipped demo model (model/demo/): it loads, it predicts held-out stdlib text, int8 costs < 1%, it writes words.

Held-out text is rebuilt from this Python's own standard library by model/demo_train.py's fixed split (the
documents the tokenizer and the model never saw); a slice of HELDOUT_ROWS rows of SEQ_LEN tokens, spread
evenly over the held-out documents, keeps the test within its ~60 s budget.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from meshserve.model import demo_corpus, demo_train
from meshserve.model.loading import DEMO_CHECKPOINT, load_model
from meshserve.model.params import cast_params

SEQ_LEN = 256  # the training row length
HELDOUT_ROWS = 24  # ~6k held-out tokens: enough to resolve a 1% agreement gap (~60 tokens), fast on 2 cores
# Held-out perplexity of the shipped bf16 weights on this slice: 63.5 measured (Python 3.11.7; 59.7 on all
# 72k held-out tokens, see BUILD.md). The bound leaves 25% for other Python releases, whose docstrings differ a
# little; an untrained model scores ~4096 (uniform over the vocabulary), and the training run's validation
# perplexity was still 202 a tenth of the way in, so a broken checkpoint or tokenizer cannot pass.
PPL_MEASURED = 63.5
PPL_BOUND = 80.0


@pytest.fixture(scope="module")
def demo():
    return load_model()


@pytest.fixture(scope="module")
def heldout(demo) -> np.ndarray:
    rows = demo_corpus.heldout_rows(demo.tokenizer, SEQ_LEN)
    pick = np.linspace(0, len(rows) - 1, HELDOUT_ROWS).round().astype(int)
    return rows[pick]


@pytest.fixture(scope="module")
def stats(demo, heldout) -> dict[str, dict]:
    bf16 = demo.params
    int8 = cast_params(demo.config, bf16, "int8")
    return {
        "bf16": demo_train.evaluate(bf16, demo.config, heldout),
        "int8": demo_train.evaluate(int8, demo.config, heldout),
    }


def test_shipped_checkpoint_loads_with_its_tokenizer(demo):
    assert demo.config.name == "demo" and demo.weights == "bf16"
    assert demo.tokenizer.vocab_size == demo.config.vocab_size
    # <pad>/<bos>/<eos> at 0/1/2, as the preset's bos_id/eos_id promise.
    assert (demo.tokenizer.bos_id, demo.tokenizer.eos_id) == (demo.config.bos_id, demo.config.eos_id) == (1, 2)
    text = "Return a new list containing all items from the iterable."
    assert demo.tokenizer.decode(demo.tokenizer.encode(text)) == text
    files = [p for p in DEMO_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10_000_000, "the bundled model must stay under 10 MB"


def test_split_is_fixed_and_disjoint():
    docs = demo_corpus.stdlib_documents()
    train, val, heldout = demo_corpus.split_documents(docs)
    keys = [{d.key for d in part} for part in (train, val, heldout)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert len(train) + len(val) + len(heldout) == len(docs)
    assert 0.02 < len(heldout) / len(docs) < 0.10 and heldout == demo_corpus.split_documents(docs)[2]


def test_heldout_perplexity_of_bf16_weights(stats):
    ppl = stats["bf16"]["perplexity"]
    assert stats["bf16"]["tokens"] > 4000
    assert ppl < PPL_BOUND, f"held-out perplexity {ppl:.2f} above {PPL_BOUND} (measured {PPL_MEASURED} when trained)"


def test_int8_matches_bf16_on_heldout_text(stats):
    """Issue 3 item 4: per-channel int8 weights keep top-1 agreement >= 99% and perplexity within 1%."""
    real = stats["bf16"]["real"]
    agree = float(np.mean(stats["bf16"]["argmax"][real] == stats["int8"]["argmax"][real]))
    ratio = stats["int8"]["perplexity"] / stats["bf16"]["perplexity"]
    assert agree >= 0.99, f"int8 top-1 agreement {agree:.4f} < 0.99"
    assert abs(ratio - 1) < 0.01, (
        f"int8 perplexity {stats['int8']['perplexity']:.3f} vs bf16 {stats['bf16']['perplexity']:.3f}"
    )


def test_generate_cli_prints_readable_text():
    """`meshserve generate` on the default (bundled) model, as a user runs it: words, not a repeated token."""
    exe = Path(sys.executable).with_name("meshserve")
    cmd = [str(exe) if exe.exists() else "meshserve", "generate", "Return a new list", "--max-new-tokens", "48"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.startswith("Return a new list")
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[0])
    text, tokens = result["text"], result["tokens"]
    assert len(tokens) >= 8 and len(set(tokens)) >= 6, f"degenerate output {tokens}"
    assert sum(c.isascii() for c in text) / max(1, len(text)) > 0.95
    words = text.split()
    wordlike = [w for w in words if re.search(r"[A-Za-z]{2,}", w)]  # English words or Python names, not noise
    assert len(words) >= 5 and len(wordlike) / len(words) >= 0.6, f"not readable: {text!r}"
    assert len(set(words)) >= 5, f"one word repeated: {text!r}"
