"""Token masks: each token id's bytes in a trie (`TokenTable`, one per tokenizer and V) and one request's place in
its grammar (`Guide`).

A mask is uint32 [W], W = ceil(V / 32): token v is allowed iff (mask[v // 32] >> (v % 32)) & 1 (the layout of
np.packbits(bool [W * 32], bitorder="little").view("<u4")). A new state's mask walks the vocabulary's byte trie with
the grammar, pruning a subtree at its first rejected byte; masks are cached per (grammar, state) in the table (one
LRU over the table's grammars: at most MASK_CACHE masks and MASK_CACHE_BYTES; a Qwen-sized V of 152k makes a mask
19 KiB). Inside a string (every stack between two characters of a string) the "plain" tokens (valid
UTF-8 without a quote, backslash or control byte) are allowed wholesale from a precomputed mask by their character
count, and only the other tokens are walked.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
from meshserve.serving.guided.grammar import Grammar, State
from meshserve.serving.guided.spec import GuideError

__all__ = ["TokenTable", "Guide", "MASK_CACHE", "MASK_CACHE_BYTES"]

MASK_CACHE = 65536  # masks kept per table (all its grammars), LRU
MASK_CACHE_BYTES = 256 << 20  # and at most this many bytes of them (a mask is V / 8 bytes)
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int):
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
        self._masks: OrderedDict[tuple[Grammar, State], np.ndarray] = OrderedDict()
        self._cache_limit = max(1, min(MASK_CACHE, MASK_CACHE_BYTES // (4 * self.words)))
        self._lock = threading.Lock()  # requests' first masks are computed on the callers' threads

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
        key = (grammar, state)
        out = self._masks.get(key)
        if out is not None:
            return out
        out = self._compute(grammar, state)
        with self._lock:
            cache = self._masks
            cache[key] = out
            if len(cache) > self._cache_limit:
                cache.popitem(last=False)  # least recently computed (lookups do not reorder: no lock on them)
        return out

    def _compute(self, grammar: Grammar, state: State) -> np.ndarray:
        room = grammar.string_room(state)
        allowed = np.zeros(self.words * 32, bool)
        ids = self._walk(grammar, state, self.trie if room is None else self.other_trie)
        allowed[ids] = True
        out = self._pack(allowed)
        if room is not None:
            out = out | self._plain[min(room, len(self._plain) - 1)]
            out.setflags(write=False)
        return out

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
