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

Tokens are kept longest first, so those with a byte k are a prefix of the order: each step touches only them (a
vocabulary's longest token, 100-250 bytes in Llama 3's or Qwen's, costs its own bytes, not L times every token).
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
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: a class sequence's hash is h * _MIX + class + 1 a byte, modulo 2^64


class TokenMatrix(NamedTuple):
    """Some tokens' bytes, longest first: ids int64 [Vt], data uint8 [L, Vt] (byte k of each in row k, 0 past its
    end), lengths int64 [Vt], longer[k] = how many are longer than k (a prefix of the order) for k < L, heads int64
    [256] and head_bytes float64 [256]: how many tokens start with each byte, and their bytes."""

    ids: np.ndarray
    data: np.ndarray
    lengths: np.ndarray
    longer: list[int]
    heads: np.ndarray
    head_bytes: np.ndarray


class Groups(NamedTuple):
    """Tokens grouped for one pattern: rows[k] uint8 [longer[k]] (byte k of each group's representative, longest
    first, only those that have one), longer (as TokenMatrix's, over the representatives), of_id int32 [W * 32]: each
    token id's group, U for an id the matrix does not hold (never allowed)."""

    rows: list[np.ndarray]
    longer: list[int]
    of_id: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows) + self.of_id.nbytes + 8 * len(self.longer) + 200


def token_matrix(pieces: list[tuple[int, bytes]]) -> TokenMatrix:
    """The matrix of (token id, its non-empty bytes) pairs."""
    lengths = np.fromiter((len(data) for _, data in pieces), np.int64, len(pieces))
    width = int(lengths.max()) if pieces else 1
    order = np.argsort(-lengths, kind="stable")
    ids = np.fromiter((v for v, _ in pieces), np.int64, len(pieces))[order]
    rows = np.frombuffer(b"".join(d.ljust(width, b"\0") for _, d in pieces), np.uint8).reshape(-1, width)
    data = np.ascontiguousarray(rows[order].T)
    lengths = lengths[order]
    heads = np.bincount(data[0], minlength=256)
    return TokenMatrix(ids, data, lengths, _longer(lengths, width), heads,
                       np.bincount(data[0], weights=lengths, minlength=256))  # fmt: skip


def _longer(lengths: np.ndarray, width: int) -> list[int]:
    """How many of `lengths` (descending) exceed k, for k < width."""
    return np.searchsorted(-lengths, -np.arange(width), side="left").tolist()  # -lengths ascending: -len < -k


def ungrouped(matrix: TokenMatrix, size: int) -> Groups:
    """Every token its own group (a few positions' masks, where grouping would cost more than it saves)."""
    of_id = np.full(size, len(matrix.ids), np.int32)
    of_id[matrix.ids] = np.arange(len(matrix.ids), dtype=np.int32)
    return Groups([matrix.data[k, :n] for k, n in enumerate(matrix.longer)], matrix.longer, of_id)


def worth_grouping(table: np.ndarray, matrix: TokenMatrix, positions: list[int]) -> bool:
    """Whether grouping the tokens costs less than walking every token from each of `positions`, by the costs
    measured at 128k tokens: ~1.5 ns a (position, token) pair's first byte and ~3 ns each later byte of a pair still
    alive, against ~7 ns a byte of each token keyed (those whose first byte some position takes). So `.*` (8
    positions, few of them between characters) walks every token in 4.2 ms rather than grouping in 5.8, and
    `[a-z]{1,8}` (9, every lowercase token alive to its end) groups in 3.5 ms rather than walking in 12."""
    taken = table[:-1] != len(table) - 1  # [P, 256]: the bytes each position takes
    alive = int((taken[positions] @ matrix.heads).sum())  # the pairs alive after their first byte
    keyed = float(matrix.head_bytes[taken.any(axis=0)].sum())
    later = sum(matrix.longer[1:]) / max(1, len(matrix.ids))  # a token's bytes after its first, on average
    return 3 * len(positions) * len(matrix.ids) + 6 * alive * later > 14 * keyed


def group_tokens(table: np.ndarray, matrix: TokenMatrix, size: int) -> Groups:
    """The matrix's tokens grouped by their byte classes under `table` (int16 [P + 1, 256]), each sequence cut after
    its first byte that no position takes (the tokens starting with one: a group at once, the others keyed by a hash
    of their classes, checked against their group's first token); `size` = W * 32 ids."""
    dead = len(table) - 1
    columns = np.ascontiguousarray(table.T)  # a void view per column: np.unique(axis=0) would make a field per row
    _, first, byte_class = np.unique(columns.view(np.dtype((np.void, columns.shape[1] * 2))).reshape(-1),
                                     return_index=True, return_inverse=True)  # fmt: skip
    classes = byte_class.reshape(-1).astype(np.uint16)
    nowhere = np.flatnonzero((columns[first, :dead] == dead).all(axis=1))  # a class of bytes no position takes
    nowhere = int(nowhere[0]) if len(nowhere) else -1  # (one at most: such bytes have the same column)
    head = classes[matrix.data[0]]
    keyed = np.flatnonzero(head != nowhere)  # the others die at their first byte: one group
    # Class sequences, a row at a time over the keyed tokens that have byte k (a prefix): hashed, and each token's
    # length once cut after a byte no position takes.
    counts = np.searchsorted(keyed, matrix.longer).tolist()  # keyed tokens with a byte k, for each k
    hashes, cut = head[keyed].astype(np.uint64) + np.uint64(1), np.ones(len(keyed), np.int64)
    going = np.ones(len(keyed), bool)  # not cut yet
    seqs = [head[keyed]]
    for k in range(1, len(counts)):
        n = counts[k]
        if not n:
            break
        seq = classes[matrix.data[k, keyed[:n]]]
        seqs.append(seq)
        on = going[:n]
        hashes[:n] = np.where(on, hashes[:n] * _MIX + seq + np.uint64(1), hashes[:n])
        cut[:n] += on
        going[:n] &= seq != nowhere
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep = first[inverse]  # each keyed token's group's first token (an index into keyed)
    same = cut[rep] == cut  # a hash shared by two class sequences: check each token against its group's first one
    for k, seq in enumerate(seqs):
        n = len(seq)
        inside = cut[:n] > k
        same[:n] &= ~inside | (seq == seq[np.minimum(rep[:n], n - 1)])
    if not same.all():  # a 64-bit collision (never seen): the groups it touches, keyed by the sequences themselves
        members = np.flatnonzero(np.isin(inverse, inverse[~same]))
        inverse[members] = len(first) + _exact_groups(seqs, cut, members)
        first, inverse = np.unique(inverse, return_index=True, return_inverse=True)[1:]
        inverse = inverse.reshape(-1)
    group = np.full(len(head), len(first), np.intp)  # each token's group; len(first): died at its first byte
    group[keyed] = inverse
    heads = keyed[first] if len(keyed) == len(head) else np.append(keyed[first], np.flatnonzero(head == nowhere)[:1])
    order = np.argsort(heads)  # the groups in the matrix's order (longest first), each named by its first token
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    reps = heads[order]
    of_id = np.full(size, len(reps), np.int32)
    of_id[matrix.ids] = rank[group]
    longer = _longer(matrix.lengths[reps], len(matrix.data))
    return Groups([matrix.data[k, reps[:n]] for k, n in enumerate(longer) if n or not k], longer, of_id)


def _exact_groups(seqs: list[np.ndarray], cut: np.ndarray, members: np.ndarray) -> np.ndarray:
    """A group number for each of `members` (indices into the keyed tokens) by its whole class sequence: its cut
    length, then its classes (-1 past the cut)."""
    keys = np.full((len(members), len(seqs) + 1), -1, np.int32)
    keys[:, 0] = cut[members]
    for k, seq in enumerate(seqs):
        has = members < len(seq)  # (members with a byte k)
        keys[has, k + 1] = np.where(cut[members[has]] > k, seq[members[has]], -1)
    keys = np.ascontiguousarray(keys)
    return np.unique(keys.view(np.dtype((np.void, keys.shape[1] * 4))).reshape(-1), return_inverse=True)[1].reshape(-1)


def walk(table: np.ndarray, groups: Groups, starts: np.ndarray) -> np.ndarray:
    """bool [S, U + 1]: whether the pattern's table takes each group's bytes from each start position (the last
    column, ids outside the matrix, never). Every (start, group) pair's first byte, then only the pairs still alive,
    each byte k only for the groups longer than k (a prefix: longest first)."""
    dead, flat, rows, longer = len(table) - 1, table.ravel(), groups.rows, groups.longer
    now = np.ascontiguousarray(table[starts].T)[rows[0]].ravel()  # [U * S]: after each group's first byte
    pairs = np.flatnonzero(now != dead)  # the live pairs, group-major: group ascending (longest first)
    (group, start), now = np.divmod(pairs, len(starts)), now[pairs].astype(np.int32)
    for k in range(1, len(rows)):
        cut = int(np.searchsorted(group, longer[k]))  # the pairs whose group has a byte k: a prefix
        if not cut:
            break
        now[:cut] = flat[now[:cut] << 8 | rows[k][group[:cut]]]  # table[now, byte k] (256 bytes a row)
        if 4 * np.count_nonzero(now[:cut] == dead) > cut:  # many died: drop the dead pairs
            keep = now != dead
            group, start, now = group[keep], start[keep], now[keep]
    keep = now != dead
    allowed = np.zeros((len(starts), len(rows[0]) + 1), bool)
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
