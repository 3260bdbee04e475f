"""How long guided decoding's masks take: `python -m meshserve.serving.guided.bench [--vocab 32000] [--json]`.

Trains a byte-level BPE (GPT-2 style, the `tokenizers` library) of `--vocab` tokens on generated JSON and
English-like text, then reports:
- the first mask of a new state (nothing cached for the grammar yet, and with the grammar's byte memo warm): at the
  start of a json_object, in a string, after a key, in a number, and inside pattern strings (format date-time and
  email, a pattern [^\\s]{1,40}: no plain-string fast path there), with the time compile_spec takes for that schema;
- over random walks through the masks that write `--docs` JSON documents (about 200 tokens each, json_object and a
  schema in turn), the mask time per token (mean, p50, p99, max) and how many masks came from the cache;
- guided_regex: for each of a few realistic regexes (REGEXES), compile_spec's time, how many positions it has and
  prepare_masks' time (every position's mask, on the request's thread at submit) with nothing cached for it
  (`--regex-only`: this section alone, e.g. `--vocab 128000 --regex-only`).
Above 32,000 tokens the generated corpus grows with the vocabulary (more lines, a larger lexicon) so that the
trainer can reach it (128,000 from 128,000 lines and 80,000 words).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "train_vocab", "REGEXES"]

_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "number"}}},
        "kind": {"enum": ["person", "company", "robot"]},
    },
    "required": ["name", "age"],
}
# guided_regex patterns as users send them (vLLM's structured-outputs examples and issues): an ISO date, an email-like
# address, a US phone number, a few words, a choice, a decimal, free text of bounded length and a word; then two near
# positions.MAX_POSITIONS (a line of up to 120 characters, 1000 letters or spaces: seconds each before grouping).
REGEXES = (r"\d{4}-\d{2}-\d{2}", r"[a-z0-9._+-]{1,30}@[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,2}\.[a-z]{2,6}",
           r"\(?\d{3}\)?[ -]?\d{3}-\d{4}", r"[a-z]{1,20}( [a-z]{1,20}){0,5}", r"(yes|no|maybe)", r"\d{1,6}(\.\d{1,3})?",
           r".{0,80}", r"\w+", r"[A-Z][a-z]+ \w+: .{0,40}", r"[^\n]{0,120}", r"[a-z ]{0,1000}")  # fmt: skip
_PATTERNED = {
    "type": "object",
    "properties": {
        "at": {"type": "string", "format": "date-time"},
        "mail": {"type": "string", "format": "email"},
        "tag": {"type": "string", "pattern": "^[^\\s]{1,40}$"},
    },
}


def _corpus(rng: random.Random, lines: int, lexicon: int = 20000) -> list[str]:
    """Generated JSON and English-like text over a synthetic lexicon of `lexicon` words (20,000: enough distinct
    words for 32k merges)."""
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(lexicon)]
    common = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "on", "by", "are", "this",
              "be", "at", "from", "or", "an"]  # fmt: skip
    out = []
    for i in range(lines):
        pick = [rng.choice(common if rng.random() < 0.4 else words) for _ in range(rng.randint(4, 14))]
        if i % 2:
            out.append(" ".join(pick).capitalize() + rng.choice([".", ",", ";", "?"]))
        else:
            doc = {w: rng.choice([rng.randint(-999, 99999), " ".join(pick[:3]), None, True, [w, 1.5]]) for w in pick}
            out.append(json.dumps(doc, indent=rng.choice([None, 2, 4]), ensure_ascii=rng.random() < 0.5))
    return out


def train_vocab(size: int, seed: int = 0):
    """A byte-level BPE HFTokenizer of `size` tokens trained here (a few seconds for 32k, ~5 s for 128k). Up to 32k
    tokens from 60,000 lines over 20,000 words; above, `size` lines over 5/8 `size` words (60,000 lines stop at
    ~90k tokens: too few distinct words)."""
    from meshserve.model.tokenizer import HFTokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    lines, lexicon = (60000, 20000) if size <= 32000 else (size, size * 5 // 8)
    tok.train_from_iterator(_corpus(random.Random(seed), lines, lexicon), trainer)
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer is read into memory: nothing left behind
        path = Path(folder) / "tokenizer.json"
        tok.save(str(path))
        return HFTokenizer(path)


def _new_state_ms(tokenizer, spec, prefix: bytes) -> tuple[float, float, float, float]:
    """(ms for the first mask of the state after `prefix` on a fresh grammar and table, ms for its mask again once
    the grammar's byte memo is warm, ms prepare_patterns takes on a fresh table (the caller's thread at submit), ms
    for the state's mask after it: what the engine thread pays for a new state)."""
    from meshserve.serving.guided import Guide, TokenTable, compile_spec
    from meshserve.serving.guided.masks import prepare_patterns

    compile_spec.cache_clear()
    grammar = compile_spec(spec)
    table = TokenTable(tokenizer.token_bytes(), tokenizer.vocab_size)
    state = grammar.advance(grammar.start(), prefix)
    t0 = time.perf_counter()
    table.mask(grammar, state)
    cold = time.perf_counter() - t0
    table._masks.clear()  # the mask cache emptied, the grammar's memo kept
    t0 = time.perf_counter()
    table.mask(grammar, state)
    warm = time.perf_counter() - t0
    table = TokenTable(tokenizer.token_bytes(), tokenizer.vocab_size)
    t0 = time.perf_counter()
    prepare_patterns(Guide(grammar, table))
    prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.mask(grammar, state)
    return cold * 1e3, warm * 1e3, prepare * 1e3, (time.perf_counter() - t0) * 1e3


def _walks(tokenizer, docs: int, seed: int) -> dict:
    from meshserve.progress import progress
    from meshserve.serving.guided import Guide, GuideSpec, TokenTable, compile_spec

    table = TokenTable.of(tokenizer, tokenizer.vocab_size)
    specs = [GuideSpec("json_object"), GuideSpec("json_schema", schema=json.dumps(_SCHEMA))]
    structure = frozenset(b'"]},:')
    weights = np.array([30.0 if data and structure & set(data) else 1.0 for data in table.bytes])
    rng = np.random.default_rng(seed)
    times, tokens, finished = [], 0, 0
    with progress("walks", "doc", docs) as bar:
        for d in range(docs):
            guide = Guide(compile_spec(specs[d % 2]), table, [tokenizer.eos_id])
            for _ in range(400):
                t0 = time.perf_counter()
                mask = guide.mask()
                times.append(time.perf_counter() - t0)
                allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: table.vocab_size])
                w = weights[allowed]
                token = int(rng.choice(allowed, p=w / w.sum()))
                guide.advance(token)
                tokens += 1
                if token == tokenizer.eos_id or guide.done:
                    finished += 1
                    break
            bar.update(1)
    ms = np.array(times) * 1e3
    return {"docs": docs, "finished": finished, "tokens": tokens, "tokens_per_doc": tokens / docs,
            "mask_ms_mean": float(ms.mean()), "mask_ms_p50": float(np.percentile(ms, 50)),
            "mask_ms_p99": float(np.percentile(ms, 99)), "mask_ms_max": float(ms.max()),
            "mask_ms_total": float(ms.sum())}  # fmt: skip


def _thinking_ms(tokenizer, first, second) -> dict:
    """ms prepare_thinking takes (a thinking guide's 8 reasoning-block masks, serving/guided/think.py): on a fresh
    table (its one-time scan for the tag), then for another grammar on the same table."""
    from dataclasses import replace

    from meshserve.serving.guided import Guide, TokenTable, compile_spec
    from meshserve.serving.guided.masks import prepare_thinking

    table, out = TokenTable(tokenizer.token_bytes(), tokenizer.vocab_size), {}
    for name, spec in (("first", first), ("another_grammar", second)):
        guide = Guide(compile_spec(replace(spec, think="start")), table)
        t0 = time.perf_counter()
        prepare_thinking(guide)
        out[name] = (time.perf_counter() - t0) * 1e3
    return out


def regex_ms(tokenizer, patterns=REGEXES) -> dict:
    """For each pattern: {"positions", "compile" ms (compile_spec, nothing cached), "prepare_masks" ms (every
    position's mask; its positions counted on the way, as at a request's submit), "again" ms (prepare_masks for
    another request of the same pattern: the masks cached in the table)}, on one token table built beforehand."""
    from meshserve.serving.guided import Guide, GuideSpec, TokenTable, compile_spec
    from meshserve.serving.guided.masks import prepare_masks
    from meshserve.serving.guided.patterns import _COMPILED

    table, out = TokenTable(tokenizer.token_bytes(), tokenizer.vocab_size), {}
    for pattern in patterns:
        compile_spec.cache_clear()
        _COMPILED.clear()
        table._masks.clear()
        t0 = time.perf_counter()
        grammar = compile_spec(GuideSpec("regex", pattern=pattern))
        t1 = time.perf_counter()
        positions = prepare_masks(Guide(grammar, table))
        t2 = time.perf_counter()
        prepare_masks(Guide(grammar, table))
        t3 = time.perf_counter()
        out[pattern] = {"positions": positions, "compile": (t1 - t0) * 1e3, "prepare_masks": (t2 - t1) * 1e3,
                        "again": (t3 - t2) * 1e3}  # fmt: skip
    return out


def _print_regex(regex: dict) -> None:
    for pattern, r in regex.items():
        print(f"  guided_regex {pattern:32.32s} {r['positions']:4d} positions: compile {r['compile']:5.1f} ms, "
              f"prepare_masks {r['prepare_masks']:7.1f} ms (again {r['again']:.1f} ms)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshserve.serving.guided.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size to train (default 32000)")
    parser.add_argument("--docs", type=int, default=20, help="random-walk documents (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--regex-only", action="store_true", help="only the guided_regex section (REGEXES)")
    args = parser.parse_args(argv)
    from meshserve.serving.guided import GuideSpec

    t0 = time.perf_counter()
    tokenizer = train_vocab(args.vocab, args.seed)
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    from meshserve.serving.guided import TokenTable

    TokenTable.of(tokenizer, tokenizer.vocab_size)
    table_s = time.perf_counter() - t0
    if args.regex_only:
        result = {"vocab": tokenizer.vocab_size, "train_s": trained, "table_build_s": table_s,
                  "regex_ms": regex_ms(tokenizer)}  # fmt: skip
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"vocab {result['vocab']}: trained in {trained:.1f} s, token table built in {table_s:.2f} s")
            _print_regex(result["regex_ms"])
        return 0
    obj, schema = GuideSpec("json_object"), GuideSpec("json_schema", schema=json.dumps(_SCHEMA))
    patterned = GuideSpec("json_schema", schema=json.dumps(_PATTERNED))
    from meshserve.serving.guided import compile_spec
    from meshserve.serving.guided.patterns import _COMPILED

    compile_spec.cache_clear()
    _COMPILED.clear()  # the patterns' own cache too: a first compile
    t0 = time.perf_counter()
    compile_spec(patterned)
    compile_ms = (time.perf_counter() - t0) * 1e3
    cases = {"start": (obj, b""), "in a string": (obj, b'{"name": "Ada Lo'),
             "after a key": (obj, b'{"name"'), "in a number": (obj, b'{"age": 12'),
             "schema: in a string": (schema, b'{"name": "Ada Lo'), "schema: after a key": (schema, b'{"name"'),
             "schema: in a number": (schema, b'{"name": "x", "age": 12'),
             "date-time: in the date": (patterned, b'{"at": "2024-0'),
             "date-time: in the time": (patterned, b'{"at": "2024-01-02T12:3'),
             "email: in the domain": (patterned, b'{"at": "2024-01-02T12:30:00Z", "mail": "joe@exa'),
             "[^\\s]{1,40}: 3 chars in": (patterned, b'{"tag": "abc')}  # fmt: skip
    new_state = {name: _new_state_ms(tokenizer, spec, prefix) for name, (spec, prefix) in cases.items()}
    thinking = _thinking_ms(tokenizer, obj, schema)
    result = {"vocab": tokenizer.vocab_size, "train_s": trained, "table_build_s": table_s,
              "pattern_schema_compile_ms": compile_ms,
              "new_state_ms": {k: {"cold": v[0], "memo_warm": v[1], "prepare_patterns": v[2], "prepared": v[3]}
                               for k, v in new_state.items()},
              "thinking_block_ms": thinking, "walks": _walks(tokenizer, args.docs, args.seed),
              "regex_ms": regex_ms(tokenizer)}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"vocab {result['vocab']}: trained in {trained:.1f} s, token table built in {table_s:.2f} s; a schema "
        f"with date-time, email and pattern strings compiled in {compile_ms:.0f} ms"
    )
    for name, (cold, warm, prepare, prepared) in new_state.items():
        after = f"; {prepared:5.2f} ms after prepare_patterns' {prepare:.0f} ms" if prepare > 1 else ""
        print(f"  new state, {name:26s} {cold:7.2f} ms (byte memo warm: {warm:6.2f} ms{after})")
    print(f"  a reasoning block's 8 masks (--reasoning-parser): {thinking['first']:.1f} ms the first time on a fresh "
          f"table, {thinking['another_grammar']:.1f} ms for another grammar")  # fmt: skip
    w = result["walks"]
    print(f"  walks: {w['docs']} docs ({w['finished']} finished), {w['tokens']} tokens, mask per token: "
          f"mean {w['mask_ms_mean']:.3f} ms, p50 {w['mask_ms_p50']:.3f}, p99 {w['mask_ms_p99']:.2f}, "
          f"max {w['mask_ms_max']:.2f}; total {w['mask_ms_total']:.0f} ms")  # fmt: skip
    _print_regex(result["regex_ms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
