"""Guided decoding after a thinking model's reasoning block (GuideSpec.think, grammar.py THINK): the block is free
text, the format is enforced after "</think>"; the masks of the block's states (computed by a fast path, not a trie
walk of the whole vocabulary) equal the trie walk's; random walks over the masks always write a block and then JSON
that parses, split by serving/reasoning.py exactly into the two.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from meshserve.serving.guided import Guide, GuideSpec, TokenTable, compile_spec
from meshserve.serving.guided.spec import GuideError
from meshserve.serving.guided.think import THINK
from meshserve.serving.reasoning import split_reasoning

# Pieces of the tags split every way, tags with text around them, JSON pieces and newlines.
VOCAB = [b"<", b"</", b"</th", b"ink>", b"</think>", b"</think>{", b"</think>\n\n", b"</think>x", b"think>", b"k>",
         b"k>{", b"k> {", b">", b"a", b"b c", b"{", b'"', b"}", b'{"k": 1}', b"\n", b"\n\n", b"hello</think>\n{",
         b"<think>", b"<think>\n", b"ink>\n\n\n\n", b" ", b"1", b'"k"', b":", None, b""]  # fmt: skip
EOS = len(VOCAB)


@pytest.mark.parametrize(
    "think,text,whole",
    [("", b'{"a": 1}', True), ("", b"<think>x</think>{}", False),
     ("start", b'{"a": 1}', True), ("start", b"<think>hmm </thin</think>\n\n{}", True),
     ("start", b"hmm</think>{}", False), ("start", b"<think>x</think>\n\n\n{}", True),
     ("start", b"<think>x</think>\n\n\n\n\n{}", False), ("start", b"<think>x</think>", False),
     ("open", b"hmm</think>{}", True), ("open", b"{}", False), ("open", b"<think>x</think> {}", True)],
)  # fmt: skip
def test_what_a_thinking_grammar_accepts(think, text, whole):
    grammar = compile_spec(GuideSpec("json_object", think=think))
    state = grammar.advance(grammar.start(), text)
    assert (state is not None and grammar.accepts(state)) == whole


def test_regex_has_no_thinking_mode():
    with pytest.raises(GuideError, match="think: 'start' is not supported for kind 'regex'"):
        compile_spec(GuideSpec("regex", pattern="a+", think="start"))


@pytest.mark.parametrize("spec", [GuideSpec("json_object", think="open"),
                                  GuideSpec("choice", choices=("yes", "no"), think="start")])  # fmt: skip
def test_the_blocks_masks_equal_the_trie_walk(spec):
    table = TokenTable(VOCAB, len(VOCAB) + 1)
    grammar = compile_spec(spec)
    for k in range(8):
        state = (((THINK, 1, k),),)
        walked = np.zeros(table.words * 32, bool)
        walked[table._walk(grammar, state, table.trie)] = True
        np.testing.assert_array_equal(table._thinking(grammar, state, k), table._pack(walked))


@pytest.mark.parametrize("think", ["start", "open"])
def test_random_walks_write_a_block_then_json(think):
    table = TokenTable(VOCAB, len(VOCAB) + 1)
    grammar = compile_spec(GuideSpec("json_object", think=think))
    rng = random.Random(0)
    finished = reasoned = 0
    for _ in range(300):
        guide, out = Guide(grammar, table, [EOS]), []
        for _ in range(40):
            bits = np.unpackbits(guide.mask().view(np.uint8), bitorder="little")[: len(VOCAB) + 1]
            token = rng.choice(np.flatnonzero(bits).tolist())
            if token == EOS:
                break
            guide.advance(token)
            out.append(VOCAB[token])
            if guide.done:
                break
        else:
            continue  # cut short inside the block: nothing to check
        finished += 1
        reasoning, content = split_reasoning(b"".join(out).decode(), inside=think == "open")
        assert isinstance(json.loads(content), dict)  # the format, whole, after the block
        reasoned += reasoning is not None
        assert think == "open" or reasoning is None or b"".join(out).startswith(b"<think>")
    assert finished > 50 and reasoned > 20


def test_a_choice_follows_the_block_with_nothing_between():
    """A choice's content must be exactly one of the strings: no newlines of the block's own before it (a JSON
    value may have them: they are whitespace there), and a choice starting with <think> is refused (the split would
    read it as reasoning)."""
    grammar = compile_spec(GuideSpec("choice", choices=("yes", "no"), think="start"))
    after = grammar.advance(grammar.start(), b"<think>x</think>")
    assert grammar.advance(after, b"\n") is None and grammar.accepts(grammar.advance(after, b"yes"))
    with pytest.raises(GuideError, match=r"choices\[1\]: starts with <think>"):
        compile_spec(GuideSpec("choice", choices=("yes", "<think>x"), think="start"))
    assert compile_spec(GuideSpec("choice", choices=("yes", "<think>x")))  # without thinking it is a string
