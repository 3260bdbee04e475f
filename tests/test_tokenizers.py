"""Tokenizers: a Hugging Face tokenizer.json and a SentencePiece .model, each built here, round-trip and agree on ids."""

from __future__ import annotations

import io

import pytest
from meshserve.model.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)

# A few hundred varied lines: the training text for both tokenizers.
LINES = [
    f"Line {i}: the {w} {n} jumps over {m} lazy dogs; Python's {w}() returns {i * 7 % 13}."
    for i, (w, n, m) in enumerate(
        (w, n, m)
        for w in ("quick", "brown", "sorted", "lambda", "yield", "naïve")
        for n in ("fox", "cat", "tensor", "mesh")
        for m in ("two", "three", "many", "few", "eleven", "zero", "seven", "ten", "nine")
    )
]
SAMPLES = [
    "the quick brown fox",
    "Python's sorted() returns 7.",
    "  two  spaces, tabs\tand\nnewlines ",
    "unseen: Ωmega ✓ 日本 🙂",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level BPE (GPT-2 / Falcon style): every string is encodable and decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LINES, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES),
        model_writer=model,
        vocab_size=330,
        byte_fallback=True,  # unseen characters become byte pieces, so decode(encode(s)) == s
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_hf_tokenizer_json(hf_tokenizer_file):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(hf_tokenizer_file))
    tok = load_tokenizer(hf_tokenizer_file)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True) == 400
    assert (tok.bos_id, tok.eos_id) == (reference.token_to_id("<s>"), reference.token_to_id("</s>")) == (0, 1)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # BPE merges learned from the training text: a frequent word is one token, far fewer than its bytes.
    assert len(tok.encode(" jumps over")) < len(" jumps over") // 2
    # Special tokens are dropped when decoding generated ids.
    assert tok.decode([tok.bos_id, *tok.encode("the fox"), tok.eos_id]) == "the fox"
    # A directory holding tokenizer.json loads the same tokenizer.
    assert load_tokenizer(hf_tokenizer_file.parent).encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_sentencepiece_model(sp_model_file):
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    tok = load_tokenizer(sp_model_file)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == reference.get_piece_size() == 330
    assert (tok.bos_id, tok.eos_id) == (reference.bos_id(), reference.eos_id()) == (1, 2)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox") // 2
    # Out-of-range ids (e.g. padding in a larger model vocabulary) are skipped, not an error.
    assert tok.decode([*tok.encode("fox"), tok.vocab_size + 5]) == "fox"
    assert load_tokenizer(sp_model_file.parent).encode("mesh") == tok.encode("mesh")


def test_byte_tokenizer_default():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == list(text.encode("utf-8"))


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="cannot read SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")


def test_checkpoint_carries_its_tokenizer(tmp_path, sp_model_file):
    """A checkpoint saved with a .model file loads it back; prompts encode with it, BOS first.

    (tokenizer.json travelling through `meshserve convert` is checked in test_hf_import.py.)
    """
    import jax
    from meshserve.model.checkpoint import save_checkpoint
    from meshserve.model.config import get_config
    from meshserve.model.loading import load_model
    from meshserve.model.params import init_params

    config = get_config("tiny", vocab_size=512, bos_id=1, max_seq_len=32)
    path = tmp_path / "ckpt"
    save_checkpoint(path, config, init_params(config, jax.random.key(0)), "f32", sp_model_file)
    assert (path / "tokenizer.model").read_bytes() == sp_model_file.read_bytes()
    model = load_model(path)
    assert isinstance(model.tokenizer, SentencePieceTokenizer)
    ids = model.tokenizer.encode("the quick fox")
    assert ids and model.encode_prompt("the quick fox") == [1, *ids]
    assert model.tokenizer.decode(ids) == "the quick fox"
