"""Token masks: each token id's bytes in a trie (`TokenTable`, one per tokenizer and V) and one request's place in
its grammar (`Guide`).

A mask is uint32 [W], W = ceil(V / 32): token v is allowed iff (mask[v // 32] >> (v % 32)) & 1 (the layout of
np.packbits(bool [W * 32], bitorder="little").view("<u4")). A new state's mask walks the vocabulary's byte trie with
the grammar, pruning a subtree at its first rejected byte; masks are cached per (grammar, state) in the table (one
LRU, spec.SizedCache, over the table's grammars: at most MASK_CACHE masks and MASK_CACHE_BYTES counted with their
keys; a Qwen-sized V of 152k makes a mask 19 KiB). Inside a string (every stack between two characters of a string)
the "plain" tokens (valid UTF-8 without a quote, backslash or control byte) are allowed wholesale from a
precomputed mask by their character count, and only the other tokens are walked.
A pattern (patterns.py: a JSON Schema pattern string's content, or a regex request's whole output) has finitely
many positions and a table of each one's next by byte: a position's mask runs that table over the tokens' bytes in
numpy (`pattern_masks`: a pattern string's plain tokens, which cannot close the string, so do not depend on the rest
of the stack; a regex's every token), the tokens grouped by the byte classes the table sees so that one token walks
for each group (token_groups.py), for many positions at once, cached in the table's LRU and shared by every state,
schema and request reaching the position (positions whose allowed tokens coincide share one array; a trie walk
instead cost 35-40 ms a position for [^\\s] or email at 32,000 tokens). `prepare_patterns` computes a schema's on
the caller's thread, `prepare_masks` a regex's every one, pinned on its Guide.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any

import numpy as np
from meshserve.serving.guided.grammar import Grammar, State
from meshserve.serving.guided.spec import GuideError, SizedCache
from meshserve.serving.guided.strings import PAT
from meshserve.serving.guided.think import THINK, THINK_CLOSE
from meshserve.serving.guided.token_groups import (
    PAIRS,
    expand,
    group_tokens,
    token_matrix,
    ungrouped,
    walk,
    worth_grouping,
)

__all__ = ["TokenTable", "Guide", "prepare_masks", "prepare_patterns", "prepare_thinking", "MASK_CACHE",
           "MASK_CACHE_BYTES", "PREPARE_PATTERNS_S", "PREPARE_S"]  # fmt: skip

MASK_CACHE = 65536  # masks kept per table (all its grammars), LRU
MASK_CACHE_BYTES = 256 << 20  # and at most this many bytes of them (a mask is V / 8 bytes)
PREPARE_PATTERNS_S = 10.0  # caller-thread seconds a request may spend on its patterns' masks; the rest come lazily
# And on a regex's every mask, before it is refused: a backstop, kept though grouped tokens made the bench's regexes
# take 2-45 ms at 128k tokens (the slowest found within the bounds, tokens that barely group, 0.25-0.44 s), since a
# refusal here depends on load and is cached (sticky).
PREPARE_S = 10.0
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENTRY = 256  # an ndarray object (~112 bytes), its OrderedDict entry, key tuple and counted size


def _cost(key: tuple, mask: np.ndarray) -> int:
    """The bytes a cached mask holds, about: the mask, its array object and dict entry (_ENTRY), and a state key's
    tuples (40 bytes a tuple and 8 a slot; small ints are shared). Keys hold no grammar or matcher (a (grammar.key,
    state) or ("pat", matcher.key, position) of ints and tuples): one would keep its grammar's memo or its matcher's
    table alive past their own caches, uncounted (6000 distinct patterns held +387 MiB against the 256 MiB cap)."""
    if key[0] == "pat":
        return mask.nbytes + _ENTRY
    state = key[1]
    tuples = 40 + 8 * len(state) + sum(40 + 8 * len(stack) + sum(40 + 8 * len(f) for f in stack) for stack in state)
    return mask.nbytes + _ENTRY + tuples


def _trie(pieces: list[tuple[int, bytes]]) -> dict:
    """A byte trie: each node is a dict byte -> child node; key -1 holds the ids of the tokens ending there."""
    root: dict = {}
    for token, data in pieces:
        node = root
        for b in data:
            node = node.setdefault(b, {})
        node.setdefault(-1, []).append(token)
    return root


def _plain_chars(data: bytes) -> int:
    """The character count of a token that is plain string content, else 0."""
    if b'"' in data or b"\\" in data or min(data) < 0x20:
        return 0
    try:
        return len(data.decode("utf-8"))
    except UnicodeDecodeError:  # ends or starts mid-character, or is not UTF-8 at all
        return 0


class TokenTable:
    """Every token id's bytes for a model of V ids, with the trie masks walk. `TokenTable.of` caches one per
    tokenizer object and V."""

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int, cache_bytes: int = MASK_CACHE_BYTES):
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        # Ids past the tokenizer's, special tokens (None) and empty tokens (no progress) are never allowed.
        self.bytes: list[bytes | None] = [
            (data if data else None) if v < len(token_bytes) else None
            for v, data in enumerate(token_bytes[:vocab_size] + [None] * max(0, vocab_size - len(token_bytes)))
        ]
        pieces = [(v, data) for v, data in enumerate(self.bytes) if data]
        chars = {v: _plain_chars(data) for v, data in pieces}
        self.trie = _trie(pieces)
        self.other_trie = _trie([(v, data) for v, data in pieces if not chars[v]])
        # plain[n]: the plain tokens of at most n characters (n up to the longest plain token's count).
        longest = max(chars.values(), default=0)
        by_count = np.zeros((longest + 1, self.words * 32), bool)
        for v, n in chars.items():
            if n:
                by_count[n, v] = True
        cumulative = np.logical_or.accumulate(by_count, axis=0)
        self._plain = [self._pack(row) for row in cumulative]
        # For pattern_masks (token_groups.py), every token (True) and the plain ones (False), longest first; and each
        # as its own group (a single position's mask, its pattern's groups not at hand).
        self._matrices = {
            raw: token_matrix([(v, data) for v, data in pieces if raw or chars[v]]) for raw in (True, False)
        }
        self._ungrouped = {raw: ungrouped(m, self.words * 32) for raw, m in self._matrices.items()}
        self._masks = SizedCache(MASK_CACHE, cache_bytes, _cost)  # masks are computed on callers' threads too
        # A pattern's token groups (matcher key -> token_groups.Groups: ~4 bytes a token id) for its later batches.
        self._groups = SizedCache(16, 64 << 20, lambda _, groups: groups.nbytes)
        self._slow = SizedCache(1024, 1 << 20, lambda _, why: len(why))  # grammar key -> prepare_masks' time refusal
        self._closers: dict[int, list[int]] = {}  # k -> tokens that can complete "</think>" after k of its bytes
        self._holding_tag: list[int] | None = None  # tokens with the whole "</think>" in them

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> TokenTable:
        """The table for `tokenizer` (anything with token_bytes()) and the model's V (>= the tokenizer's ids)."""
        try:
            tables = _TABLES.setdefault(tokenizer, {})
        except TypeError:  # not weakly referable: a table per call
            return cls(tokenizer.token_bytes(), vocab_size)
        table = tables.get(vocab_size)
        if table is None:
            table = tables[vocab_size] = cls(tokenizer.token_bytes(), vocab_size)
        return table

    def _pack(self, allowed: np.ndarray) -> np.ndarray:
        """bool [W*32] -> uint32 [W], read-only."""
        out = np.packbits(allowed, bitorder="little").view("<u4").astype(np.uint32)
        out.setflags(write=False)
        return out

    def mask(self, grammar: Grammar, state: State) -> np.ndarray:
        """The tokens whose bytes can follow `state` (stop tokens not included): uint32 [W], read-only, cached.
        Thread-safe. A cached mask is read without the lock, and a mask is computed outside it (only the cache's
        update holds it): the engine thread never waits for a caller thread's long computation (two threads may
        compute the same mask once each; the grammar's memo takes equal entries from either)."""
        key = (grammar.key, state)
        out = self._masks.get(key)
        if out is not None:
            return out
        return self._masks.put(key, self._compute(grammar, state))

    def _compute(self, grammar: Grammar, state: State) -> np.ndarray:
        if len(state) == 1 and len(state[0]) == 1 and state[0][0][:2] == (THINK, 1):
            return self._thinking(grammar, state, state[0][0][2])
        room = grammar.string_room(state)
        places = None if room is not None else _pattern_positions(grammar, state)
        allowed = np.zeros(self.words * 32, bool)
        whole = room is None and places is None
        ids = self._walk(grammar, state, self.trie if whole else self.other_trie)
        allowed[ids] = True
        out = self._pack(allowed)
        if room is not None:
            out = out | self._plain[min(room, len(self._plain) - 1)]
            out.setflags(write=False)
        if places is not None:
            for matcher, position in places:  # a cached mask looked up directly (the engine thread's usual case)
                mask = self._masks.get(("pat", matcher.key, position))
                out = out | (mask if mask is not None else self.pattern_masks(matcher, [position])[0])
            out.setflags(write=False)
        return out

    def _thinking(self, grammar: Grammar, state: State, k: int) -> np.ndarray:
        """Inside a reasoning block, k bytes of "</think>" matched: every token, except those that complete the tag
        and go on with bytes the format cannot start with (checked one by one: they are few). A trie walk would visit
        the whole vocabulary for each of the 8 states: ~a second for 150k tokens."""
        closers = self._closers.get(k)
        if closers is None:  # the whole tag inside the token, or (k > 0) the tag's rest at its start
            if self._holding_tag is None:
                self._holding_tag = [v for v, data in enumerate(self.bytes) if data and THINK_CLOSE in data]
            ids, data = self._matrices[True][:2]  # every token's byte j in row j, 0 past its end (the tag has no 0)
            rest, starts = THINK_CLOSE[k:], np.zeros(len(ids), bool)
            if k and len(rest) <= data.shape[0]:
                starts[:] = True
                for j, byte in enumerate(rest):
                    starts &= data[j] == byte
            closers = self._closers[k] = sorted({*self._holding_tag, *ids[starts].tolist()})
        allowed = np.zeros(self.words * 32, bool)
        allowed[self._matrices[True].ids] = True  # every token with bytes
        for v in closers:
            allowed[v] = grammar.advance(state, self.bytes[v]) is not None
        return self._pack(allowed)

    def pattern_masks(self, matcher, positions: list[int], deadline: float = math.inf) -> list[np.ndarray | None]:
        """The masks of these positions of a pattern (its StringPattern), uint32 [W] each, cached: the plain tokens
        (a `raw` pattern's, a regex request's: every token) whose bytes its position table (`matcher.next` int16 [P +
        1, 256], row P the dead end) takes from each. Those not cached are computed together (token_groups.py): the
        tokens grouped by the byte classes the table sees (kept for the pattern's later calls; where a few positions
        walk every token for less, token_groups.worth_grouping, they do), the table run over one token of each group
        from the positions, token_groups.PAIRS pairs a walk, and a mask made per distinct result. No walk starts
        past `deadline` (time.perf_counter()): the positions it would have computed are None."""
        cached = {p: m for p in positions if (m := self._masks.get(("pat", matcher.key, p))) is not None}
        todo = [p for p in positions if p not in cached]
        groups = self._groups.get(matcher.key) if todo else None
        matrix = self._matrices[matcher.raw]
        if groups is None and todo and time.perf_counter() <= deadline and worth_grouping(matcher.next, matrix, todo):
            groups = self._groups.put(matcher.key, group_tokens(matcher.next, matrix, self.words * 32))
        groups = groups or self._ungrouped[matcher.raw]
        size = max(1, PAIRS // max(1, len(groups.rows[0])))  # positions a walk (all of them when the groups are few)
        for at in range(0, len(todo), size):
            if time.perf_counter() > deadline:
                break
            starts = np.asarray(todo[at : at + size], np.intp)
            masks = expand(walk(matcher.next, groups, starts), groups.of_id)
            for position, mask in zip(starts.tolist(), masks, strict=True):
                cached[position] = self._masks.put(("pat", matcher.key, position), mask)
        return [cached.get(p) for p in positions]

    @staticmethod
    def _walk(grammar: Grammar, state: State, trie: dict) -> list[int]:
        """Ids of the tokens in `trie` whose bytes the grammar takes from `state` (depth-first, pruned)."""
        ids: list[int] = []
        row_of, fill = grammar.row, grammar.fill
        todo = [(trie, state)]
        while todo:
            node, at = todo.pop()
            row = row_of(at)
            for b, child in node.items():
                if b < 0:
                    continue
                nxt = row[b] if b in row else fill(row, at, b)
                if nxt is None:
                    continue
                ended = child.get(-1)
                if ended:
                    ids.extend(ended)
                if len(child) > (1 if ended else 0):
                    todo.append((child, nxt))
        return ids


def _pattern_positions(grammar: Grammar, state: State) -> list[tuple] | None:
    """When every stack's top is a pattern string's frame (strings.PAT): (its StringPattern, position) for each
    group of stacks with the same rest and node (their frames, node field 0, are one position of that pattern);
    None otherwise (or, never expected, when a group is not a position: then every token is walked)."""
    if not grammar.nodes:  # a pattern alone (patterns.py): not a JSON grammar
        return None
    groups: dict[tuple, list] = {}
    for stack in state:
        top = stack[-1] if stack else None
        if top is None or top[0] != PAT:
            return None
        groups.setdefault((stack[:-1], top[1]), []).append(((PAT, 0, *top[2:]),))
    out = []
    for (_, node), frames in groups.items():
        matcher = grammar.nodes[node][1]
        position = matcher.index.get(tuple(sorted(frames)))
        if position is None:
            return None
        out.append((matcher, position))
    return out


def prepare_patterns(guide, seconds: float = PREPARE_PATTERNS_S) -> int:
    """Compute the plain-token masks of every position of the pattern strings in the guide's grammar not cached yet
    (on the caller's thread, before the request is queued: the engine thread then ORs cached masks and walks only
    the other tokens); returns how many. Past `seconds` the rest are left to be computed when reached."""
    grammar, table = guide.grammar, guide.table
    deadline, done = time.perf_counter() + seconds, 0
    for matcher in {node[1] for node in grammar.nodes if node[0] == "pat"}:
        todo = [p for p in range(len(matcher.positions)) if ("pat", matcher.key, p) not in table._masks]
        if todo:
            done += sum(mask is not None for mask in table.pattern_masks(matcher, todo, deadline))
    return done


def prepare_thinking(guide) -> None:
    """A thinking guide's reasoning-block masks (its 8 states: "</think>" matched up to k bytes), computed on the
    caller's thread: the first time per token table a scan of the vocabulary for the tag (~20 ms for 151k tokens),
    then ~1 ms a grammar."""
    for k in range(len(THINK_CLOSE)):
        guide.table.mask(guide.grammar, (((THINK, 1, k),),))


def prepare_masks(guide, seconds: float = PREPARE_S) -> int:
    """Compute the mask of every position a regex guide's pattern can reach (as a pattern string's: its table run
    over every token's bytes, cached in the table) and pin them on the guide (the engine thread then only looks
    them up, whatever the table's cache evicts); returns how many. GuideError past positions.py's bounds (cached per
    pattern: a retry is refused at once), or past `seconds` (a backstop: a regex whose tokens barely group, every
    letter a class of its own, costs ~0.3-0.5 ms a position at 128k tokens; this refusal depends on the machine's
    load, so it is cached per grammar and table: a retry is refused at once rather than accepted when the machine is
    idler)."""
    grammar, table = guide.grammar, guide.table
    if (why := table._slow.get(grammar.key)) is not None:
        raise GuideError(why)
    start = time.perf_counter()
    matcher = grammar.indexed()  # patterns.PatternGrammar: its positions counted (compile_pattern's caches)
    masks = table.pattern_masks(matcher, list(range(len(matcher.positions))), start + seconds)
    if time.perf_counter() - start > seconds or any(mask is None for mask in masks):
        why = table._slow.put(grammar.key, f"{grammar.where}: its token masks take more than {seconds:g} s to "
                              "prepare on this vocabulary (use * or + for long repeats)")  # fmt: skip
        raise GuideError(why)
    guide.pinned.update(zip(matcher.positions, masks, strict=True))
    return len(guide.pinned)


class Guide:
    """One request's place in its grammar: `mask()` before each sampled token, `advance(token)` after it, `done` when
    the output must end. `stop_ids` (the request's ids that end it) are allowed whenever the output may end."""

    def __init__(self, grammar: Grammar, table: TokenTable, stop_ids: tuple[int, ...] | list[int] = ()):
        self.grammar = grammar
        self.table = table
        self.stop_ids = tuple(sorted({int(t) for t in stop_ids if 0 <= int(t) < table.vocab_size}))
        self.state = grammar.start()
        # Masks held by this request whatever the table's cache evicts (a regex's every position: prepare_masks).
        self.pinned: dict[State, np.ndarray] = {}

    @property
    def done(self) -> bool:
        return self.grammar.must_end(self.state)

    def accepts(self) -> bool:
        return self.grammar.accepts(self.state)

    def mask(self) -> np.ndarray:
        """uint32 [W]: the tokens that may come next (read-only when cached; a fresh array when stops are added)."""
        out = self.pinned.get(self.state)
        if out is None:
            out = self.table.mask(self.grammar, self.state)
        if self.stop_ids and self.grammar.accepts(self.state):
            out = out.copy()
            for t in self.stop_ids:
                out[t >> 5] |= np.uint32(1 << (t & 31))
        if not out.any():
            where = self.grammar.where
            if self.done:  # complete before anything was written (a pattern matching only ""), and no stop token
                raise GuideError(f"{where}: the format is complete with nothing written, and this request has no "
                                 "stop token to end on (it matches only the empty string)")  # fmt: skip
            raise GuideError(f"{where}: no token of this vocabulary can continue the guided output here (the format "
                             "needs bytes no token holds)")  # fmt: skip
        return out

    def advance(self, token: int) -> None:
        """Move past a sampled token. ValueError when it was not allowed (a bug upstream: the mask forbade it)."""
        token = int(token)
        if token in self.stop_ids and self.grammar.accepts(self.state):
            return  # the request ends on it
        data = self.table.bytes[token] if 0 <= token < self.table.vocab_size else None
        nxt = self.grammar.advance(self.state, data) if data else None
        if nxt is None:
            raise ValueError(f"token {token} ({data!r}) cannot follow the guided output here")
        self.state = nxt
