"""A pattern's position masks over a vocabulary, in numpy (masks.TokenTable.pattern_masks): tokens grouped by what the
pattern sees of their bytes, one walk per group and start position, a mask built once per distinct result.

A pattern's table (`next` int16 [P + 1, 256], row P the dead end: positions.py) treats bytes with equal columns
alike: those are the byte classes (`\\d{4}-\\d{2}`: the digits, "-", everything else). Two tokens whose bytes have the
same classes, up to the first byte no position takes (after which nothing matters: every walk has died), end in the
same position from every start, so their masks agree: `group_tokens` keeps one representative per class sequence
(128k BPE tokens: ~50 groups for `[a-z]{1,20}( [a-z]{1,20}){0,5}`, a few hundred for `.{0,80}`). `walk` runs the
table over the representatives from each start (every (start, token) pair's first byte, then only the pairs still
alive), and `expand` turns each distinct row of the result into a mask over every token id: positions whose allowed
groups coincide (`.{0,80}` with 60 characters left or 70: every token fits) share one mask.

Shapes: Vt tokens with bytes (the matrix), L their longest length, U groups, S start positions, W = ceil(V / 32).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "TokenMatrix",
    "Groups",
    "token_matrix",
    "ungrouped",
    "worth_grouping",
    "group_tokens",
    "walk",
    "expand",
    "PAIRS",
]

PAIRS = 1 << 21  # (start, token) pairs a walk holds at once (~2M: 152k ungrouped tokens, 13 starts; ~40 MB of arrays)
_PAD = 256  # a class past a token's end (or past its first byte that no position takes)


class TokenMatrix(NamedTuple):
    """Some tokens' bytes, longest first: ids int64 [Vt], data uint8 [L, Vt] (byte k of each in row k, 0 past its
    end), lengths int64 [Vt], longer[k] = how many are longer than k (a prefix of the order) for k < L, past bool
    [L, Vt] (k at or past the token's end), heads int64 [256] (how many tokens start with each byte)."""

    ids: np.ndarray
    data: np.ndarray
    lengths: np.ndarray
    longer: list[int]
    past: np.ndarray
    heads: np.ndarray


class Groups(NamedTuple):
    """Tokens grouped for one pattern: data uint8 [L, U] (a representative's bytes per group, longest first), longer
    (as TokenMatrix's, over the representatives), of_id int32 [W * 32]: each token id's group, U for an id the matrix
    does not hold (never allowed)."""

    data: np.ndarray
    longer: list[int]
    of_id: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.of_id.nbytes + 8 * len(self.longer) + 200


def token_matrix(pieces: list[tuple[int, bytes]]) -> TokenMatrix:
    """The matrix of (token id, its non-empty bytes) pairs."""
    lengths = np.fromiter((len(data) for _, data in pieces), np.int64, len(pieces))
    width = int(lengths.max()) if pieces else 1
    order = np.argsort(-lengths, kind="stable")
    ids = np.fromiter((v for v, _ in pieces), np.int64, len(pieces))[order]
    rows = np.frombuffer(b"".join(d.ljust(width, b"\0") for _, d in pieces), np.uint8).reshape(-1, width)
    data = np.ascontiguousarray(rows[order].T)
    lengths = lengths[order]
    past = np.arange(width)[:, None] >= lengths[None, :]
    return TokenMatrix(ids, data, lengths, _longer(lengths, width), past, np.bincount(data[0], minlength=256))


def _longer(lengths: np.ndarray, width: int) -> list[int]:
    """How many of `lengths` (descending) exceed k, for k < width."""
    return np.searchsorted(-lengths, -np.arange(width), side="left").tolist()  # -lengths ascending: -len < -k


def ungrouped(matrix: TokenMatrix, size: int) -> Groups:
    """Every token its own group (a single position's mask: grouping would cost more than it saves)."""
    of_id = np.full(size, len(matrix.ids), np.int32)
    of_id[matrix.ids] = np.arange(len(matrix.ids), dtype=np.int32)
    return Groups(matrix.data, matrix.longer, of_id)


def worth_grouping(table: np.ndarray, matrix: TokenMatrix, positions: list[int]) -> bool:
    """Whether grouping the tokens costs less than walking every token from each of `positions`, by the costs
    measured at 128k tokens: ~1.5 ns a (position, token) pair's first byte and ~3 ns each later byte of a pair still
    alive, against ~5 ns a byte of each token keyed (those whose first byte some position takes). So `.*` (8
    positions, few of them between characters) walks every token in 4.4 ms rather than grouping in 8.7, and
    `[a-z]{1,8}` (9, every lowercase token alive to its end) groups in 4.9 ms rather than walking in 13."""
    taken = table[:-1] != len(table) - 1  # [P, 256]: the bytes each position takes
    alive = int((taken[positions] @ matrix.heads).sum())  # the pairs alive after their first byte
    keyed = int(matrix.heads[taken.any(axis=0)].sum())
    later = sum(matrix.longer[1:]) / max(1, len(matrix.ids))  # a token's bytes after its first, on average
    return 3 * len(positions) * len(matrix.ids) + 6 * alive * later > 10 * keyed * len(matrix.data)


def group_tokens(table: np.ndarray, matrix: TokenMatrix, size: int) -> Groups:
    """The matrix's tokens grouped by their byte classes under `table` (int16 [P + 1, 256]), each sequence cut after
    its first byte that no position takes (the tokens starting with one: a group at once, the others keyed);
    `size` = W * 32 ids."""
    dead = len(table) - 1
    columns = np.ascontiguousarray(table.T)  # a void view per column: np.unique(axis=0) would make a field per row
    _, first, byte_class = np.unique(columns.view(np.dtype((np.void, columns.shape[1] * 2))).reshape(-1),
                                     return_index=True, return_inverse=True)  # fmt: skip
    # 0xC0, 0xC1 and 0xF5-0xFF start no UTF-8 character: one class of bytes no position takes, so at most 245.
    wide = len(first) >= _PAD
    classes = byte_class.reshape(-1).astype(np.uint16 if wide else np.uint8)
    nowhere = np.flatnonzero((columns[first, :dead] == dead).all(axis=1))  # a class of bytes no position takes
    nowhere = int(nowhere[0]) if len(nowhere) else -1  # (one at most: such bytes have the same column)
    head = classes[matrix.data[0]]
    keyed = np.flatnonzero(head != nowhere)  # the others die at their first byte: one group
    whole = len(keyed) == len(head)
    seq = classes[matrix.data if whole else matrix.data[:, keyed]]  # [L, Vk] classes
    past = matrix.past.copy() if whole else matrix.past[:, keyed]  # [L, Vk]: past each token's end
    if nowhere >= 0:
        died = seq == nowhere
        for k in range(1, len(died)):  # died[k]: at or after such a byte (a row at a time: accumulate is slower)
            died[k] |= died[k - 1]
        past[1:] |= died[:-1]  # after the first byte nothing takes: every walk is over
    if wide:
        seq[past] = _PAD
    else:  # (a boolean index is slower than a mask of bits)
        seq |= past.view(np.uint8) * np.uint8(_PAD - 1)
    rows = np.ascontiguousarray(seq.T)  # [Vk, L]: one key per token
    keys = rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).reshape(-1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    group = np.full(len(head), len(first), np.intp)  # each token's group; len(first): died at its first byte
    group[keyed] = inverse.reshape(-1)
    heads = keyed[first] if whole else np.append(keyed[first], np.flatnonzero(head == nowhere)[:1])
    order = np.argsort(heads)  # the groups in the matrix's order (longest first), each named by its first token
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    reps = heads[order]
    of_id = np.full(size, len(reps), np.int32)
    of_id[matrix.ids] = rank[group]
    return Groups(np.ascontiguousarray(matrix.data[:, reps]), _longer(matrix.lengths[reps], len(seq)), of_id)


def walk(table: np.ndarray, groups: Groups, starts: np.ndarray) -> np.ndarray:
    """bool [S, U + 1]: whether the pattern's table takes each group's bytes from each start position (the last
    column, ids outside the matrix, never). Every (start, group) pair's first byte, then only the pairs still alive,
    each byte k only for the groups longer than k (a prefix: longest first)."""
    dead, flat, data, longer = len(table) - 1, table.ravel(), groups.data, groups.longer
    now = np.ascontiguousarray(table[starts].T)[data[0]].ravel()  # [U * S]: after each group's first byte
    pairs = np.flatnonzero(now != dead)  # the live pairs, group-major: group ascending (longest first)
    (group, start), now = np.divmod(pairs, len(starts)), now[pairs].astype(np.int32)
    for k in range(1, len(longer)):
        cut = int(np.searchsorted(group, longer[k]))  # the pairs whose group has a byte k: a prefix
        if not cut:
            break
        now[:cut] = flat[now[:cut] << 8 | data[k][group[:cut]]]  # table[now, byte k] (256 bytes a row)
        if 4 * np.count_nonzero(now[:cut] == dead) > cut:  # many died: drop the dead pairs
            keep = now != dead
            group, start, now = group[keep], start[keep], now[keep]
    keep = now != dead
    allowed = np.zeros((len(starts), data.shape[1] + 1), bool)
    allowed[start[keep], group[keep]] = True
    return allowed


def expand(allowed: np.ndarray, of_id: np.ndarray) -> list[np.ndarray]:
    """Each row of `allowed` (bool [S, U + 1]) as a mask over every id (uint32 [W], read-only); equal rows give one
    array (positions whose allowed groups coincide share their mask)."""
    keys = np.ascontiguousarray(allowed).view(np.dtype((np.void, allowed.shape[1]))).reshape(-1)
    _, first, which = np.unique(keys, return_index=True, return_inverse=True)  # (axis=0 makes a field per column)
    rows = allowed[first]
    masks: list[np.ndarray] = []
    for at in range(0, len(rows), 64):  # [64, W * 32] bools at a time (10 MB at 152k tokens)
        packed = np.packbits(np.take(rows[at : at + 64], of_id, axis=1), axis=1, bitorder="little").view("<u4")
        for row in packed:
            row = row.astype(np.uint32)
            row.setflags(write=False)
            masks.append(row)
    return [masks[i] for i in which.reshape(-1)]
