"""Guided decoding's token side: each tokenizer's token_bytes() against its own decode, masks against a brute-force
check of every token, the Guide's contract (stop ids, disallowed tokens, ids past the tokenizer's), and random walks
through the masks that must end in text json.loads reads and the schema accepts (or tool calls parse_tool_calls
reads back)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from meshserve.model.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from meshserve.serving.guided import Guide, GuideSpec, TokenTable, compile_spec
from meshserve.serving.openai_tools import parse_tool_calls

DOCS = [
    json.dumps({"name": w, "age": i, "tags": [w[:2], i % 3], "ok": i % 2 == 0, "n": None, "x": i / 7}, indent=i % 3)
    for i, w in enumerate(["alpha", "brown", "cat", "déjà vu", "日本", "tensor", "mesh", "lambda"] * 5)
]
TEXT = [f"the {w} jumps over {n} lazy dogs; it's {w}." for w in ("quick", "naïve", "sorted") for n in ("two", "ten")]


def bits(mask: np.ndarray) -> np.ndarray:
    return np.unpackbits(mask.view(np.uint8), bitorder="little").astype(bool)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE (GPT-2 style) trained on JSON and text, with special and non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(DOCS + TEXT, trainer)
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def test_byte_tokenizer_bytes():
    assert ByteTokenizer().token_bytes() == [bytes([i]) for i in range(256)]


def _random_ids(rng, tokens, n):
    return [rng.choice(tokens) for _ in range(n)]


def test_byte_level_bpe_bytes_match_decode(bpe):
    table = bpe.token_bytes()
    assert len(table) == bpe.vocab_size
    assert table[bpe.bos_id] is None and table[bpe.eos_id] is None  # special: never allowed
    assert table[bpe._tok.token_to_id("<tool_call>")] == b"<tool_call>"
    whole = [v for v, b in enumerate(table) if b is not None and _utf8(b)]
    rng = random.Random(0)
    for _ in range(200):
        ids = _random_ids(rng, whole, rng.randint(1, 12))
        assert b"".join(table[v] for v in ids).decode() == bpe.decode(ids)
    for text in ['{"k": "déjà 日本 🙂"}', " tabs\tand\nnewlines"]:  # pieces that end mid-character join back
        ids = bpe.encode(text)
        assert b"".join(table[v] for v in ids) == text.encode() and bpe.decode(ids) == text


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_metaspace_bytes_match_decode(tmp_path):
    """A Llama-style tokenizer.json: Metaspace pieces, <0xAB> byte fallback, the decoder that strips one space."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXT + DOCS[:5], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"].update(byte_fallback=True, unk_token="<unk>")
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}  # fmt: skip
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    table = hf.token_bytes()
    assert table[hf._tok.token_to_id("<0x41>")] == b"A" and table[hf._tok.token_to_id("<s>")] is None
    pieces = [v for v, b in enumerate(table) if b is not None and not hf._tok.id_to_token(v).startswith("<0x")]
    rng = random.Random(1)
    for _ in range(200):
        ids = _random_ids(rng, pieces, rng.randint(1, 10))
        text = b"".join(table[v] for v in ids).decode()
        assert hf.decode(ids) in (text, text[1:] if text.startswith(" ") else text)
    text = "unseen: 日本 🙂 {}"
    ids = hf.encode(text)
    assert any(hf._tok.id_to_token(v).startswith("<0x") for v in ids)  # byte fallback used
    assert b"".join(table[v] for v in ids) == b" " + text.encode()


def test_sentencepiece_bytes_match_decode(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 5 + DOCS), model_writer=model, vocab_size=350,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)  # fmt: skip
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    sp = SentencePieceTokenizer(path)
    table = sp.token_bytes()
    assert table[sp.bos_id] is None and table[sp.eos_id] is None and table[0] is None  # <unk>
    pieces = [v for v, b in enumerate(table) if b is not None and not sp._sp.IsByte(v)]
    rng = random.Random(2)
    for _ in range(200):
        ids = _random_ids(rng, pieces, rng.randint(1, 10))
        text = b"".join(table[v] for v in ids).decode()
        assert sp.decode(ids) in (text, text[1:] if text.startswith(" ") else text)
    ids = sp.encode("日本 🙂 {}")
    assert b"".join(table[v] for v in ids) == " 日本 🙂 {}".encode()


SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 18, "maximum": 130},
        "score": {"type": "number"},
        "email": {"type": ["string", "null"]}, "kind": {"enum": ["cat", "dog", 7, None]},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "tags"]},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"a": {"type": "string"}, "b": {"const": [1, {"c": "d"}]}},
                "required": ["a", "b"]}]},
    {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["v"]}}},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "object"}], "items": {"type": "number"},
     "maxItems": 4},
    {"type": "object", "additionalProperties": {"type": "integer"}},
]  # fmt: skip


def conforms(value, schema, root) -> bool:
    """A small checker for the subset (oneOf read as anyOf, as the grammar does)."""
    if schema is True or schema == {}:
        return True
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return conforms(value, target, root)
    if "anyOf" in schema:
        return any(conforms(value, s, root) for s in schema["anyOf"])
    if "const" in schema:
        return json.dumps(value) == json.dumps(schema["const"])
    if "enum" in schema:
        return any(json.dumps(value) == json.dumps(e) for e in schema["enum"])
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds is None:
        return True
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "null": lambda v: v is None,
              "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
    if not any(checks[k](value) for k in kinds):
        return False
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            order = [k for k in props if k in value]
            if list(value) != order or any(r not in value for r in schema.get("required", [])):
                return False
            return all(conforms(value[k], props[k], root) for k in value)
        return all(conforms(v, schema.get("additionalProperties", True), root) for v in value.values())
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30):
            return False
        prefix = schema.get("prefixItems", [])
        return all(conforms(v, prefix[i] if i < len(prefix) else schema.get("items", True), root)
                   for i, v in enumerate(value))  # fmt: skip
    if isinstance(value, str):
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30)
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = -(1 << 70), 1 << 70
        inclusive = schema.get("minimum", low) <= value <= schema.get("maximum", high)
        return inclusive and schema.get("exclusiveMinimum", low) < value < schema.get("exclusiveMaximum", high)
    return True


STRUCTURE = frozenset(b'"]},:')


def walk(guide: Guide, rng: random.Random, limit: int = 300) -> tuple[bytes, bool, list]:
    """Sample among the mask's tokens until done, a stop token or `limit` tokens: (bytes, ended, states seen).
    Tokens holding a closing or separating byte (and stops) weigh more, so values end within the limit."""
    out, states = [], []
    table = guide.table
    for _ in range(limit):
        states.append(guide.state)
        allowed = np.flatnonzero(bits(guide.mask())[: table.vocab_size])
        assert allowed.size
        weights = [30 if t in guide.stop_ids or STRUCTURE & set(table.bytes[t]) else 1 for t in allowed]
        token = int(rng.choices(allowed, weights)[0])
        guide.advance(token)
        if token in guide.stop_ids:
            return b"".join(out), True, states
        out.append(table.bytes[token])
        if guide.done:
            return b"".join(out), True, states
    return b"".join(out), False, states


def brute(table: TokenTable, grammar, state) -> np.ndarray:
    allowed = np.zeros(table.words * 32, bool)
    for v, data in enumerate(table.bytes):
        allowed[v] = bool(data) and grammar.advance(state, data) is not None
    return allowed


@pytest.mark.parametrize("which", range(len(SCHEMAS) + 1))
def test_random_walks_follow_the_schema(bpe, which):
    spec = GuideSpec("json_schema", schema=json.dumps(SCHEMAS[which])) if which < len(SCHEMAS) else None
    grammar = compile_spec(spec or GuideSpec("json_object"))
    schema = SCHEMAS[which] if spec else {"type": "object"}
    table = TokenTable.of(bpe, bpe.vocab_size + 30)  # the model's V may exceed the tokenizer's
    ended = 0
    for seed in range(6):
        rng = random.Random(seed)
        text, finished, states = walk(Guide(grammar, table, [bpe.eos_id]), rng)
        if finished:
            ended += 1
            value = json.loads(text)
            assert conforms(value, schema, schema), text
        for state in rng.sample(states, min(3, len(states))):  # masks agree with every token tried one by one
            np.testing.assert_array_equal(bits(table.mask(grammar, state)), brute(table, grammar, state))
    assert ended >= 4


@pytest.mark.parametrize("parallel", [False, True])
def test_random_walks_write_tool_calls(bpe, parallel):
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
              "days": {"type": "integer"}}, "required": ["city"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}},
             {"type": "function", "function": {"name": "time"}}]  # fmt: skip
    grammar = compile_spec(GuideSpec("tool_calls", tools=json.dumps(tools), parallel=parallel))
    table = TokenTable.of(bpe, bpe.vocab_size)
    ended = 0
    for seed in range(6):
        guide = Guide(grammar, table, [bpe.eos_id])
        text, finished, _ = walk(guide, random.Random(seed))
        if not finished:
            continue
        ended += 1
        content, calls = parse_tool_calls(text.decode())
        assert content is None and calls and (parallel or len(calls) == 1), text
        assert len(calls) == text.count(b"</tool_call>")
        for call in calls:
            args = json.loads(call.arguments)
            assert call.name in ("weather", "time") and isinstance(args, dict)
            if call.name == "weather":
                assert conforms(args, params, params), text
    assert ended >= 4


def test_guide_contract():
    grammar = compile_spec(GuideSpec("json_schema", schema=json.dumps({"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]})))  # fmt: skip
    table = TokenTable.of(ByteTokenizer(), 300)
    assert table.words == 10 and TokenTable.of(ByteTokenizer(), 300) is not table  # cached per tokenizer object
    tokenizer = ByteTokenizer()
    assert TokenTable.of(tokenizer, 300) is TokenTable.of(tokenizer, 300)
    guide = Guide(grammar, table, [299])
    first = guide.mask()
    assert first.dtype == np.uint32 and first.shape == (10,)
    assert set(np.flatnonzero(bits(first))) == {ord(c) for c in " \n{"}  # no stop before a whole value
    assert guide.mask() is first and not first.flags.writeable  # cached, read-only
    with pytest.raises(ValueError, match="cannot follow"):
        guide.advance(ord("["))
    with pytest.raises(ValueError):
        guide.advance(299)  # a stop id before the output may end
    with pytest.raises(ValueError):
        guide.advance(280)  # an id past the tokenizer's
    for b in b'{"a": 12':
        guide.advance(b)
    assert not guide.done and not bits(guide.mask())[299]
    guide.advance(ord("}"))
    assert guide.done
    assert list(np.flatnonzero(bits(guide.mask()))) == [299]  # when done only the stop ids remain
