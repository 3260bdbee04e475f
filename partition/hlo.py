"""Read the collectives out of compiled HLO text: kind, mesh axes and bytes per chip, as partition/comm.py lists them.

Used by the tests that hold the cost model's list equal to the compiled code, and by anyone who wants to see
what a layout really runs (`collectives_in_hlo(fn.lower(...).compile().as_text(), mesh)`).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from meshserve.partition.comm import MESH_AXES, Collective

__all__ = ["collectives_in_hlo", "summarize"]

_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(_KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}


def _nbytes(shape: str) -> int:
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(d) for d in m["dims"].split(",") if d]
        total += int(np.prod(dims, dtype=np.int64)) * _BYTES[m["dtype"]]
    return total


def _groups(line: str, n: int) -> list[list[int]]:
    explicit = re.search(r"replica_groups=\{(\{[\d,{}\s]*\})\}", line)
    if explicit:
        return [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d,\s]*)\}", explicit[1])]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        ids = np.arange(n).reshape([int(d) for d in iota[3].split(",")])
        if iota[4]:
            ids = ids.transpose([int(d) for d in iota[4].split(",")])
        return ids.reshape(int(iota[1]), int(iota[2])).tolist()
    pairs = re.search(r"source_target_pairs=\{([\d,{}\s]*)\}", line)
    if pairs:  # collective-permute: each source-target pair
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs[1])]
    return [list(range(n))]


def collectives_in_hlo(text: str, mesh) -> list[Collective]:
    """Every collective in compiled HLO `text` on `mesh` (a jax Mesh with axes x, y, z), in text order.

    axes: the mesh axes along which the devices of one replica group differ; bytes as comm.Collective
    defines them (reduce-scatter: its input, i.e. output × group size).
    """
    coords = {int(d.id): idx for idx, d in np.ndenumerate(mesh.devices)}
    out = []
    for line in text.splitlines():
        m = _OP.search(line)
        if not m or "-done" in line.split("=")[0]:
            continue
        groups = _groups(line, mesh.devices.size)
        group = groups[0]
        if m["kind"] != "collective-permute":
            groups = [group]  # one group shows the axes; a permute's pairs each show one step of its ring
        points = [np.array([coords[d] for d in g]) for g in groups]
        axes = tuple(a for i, a in enumerate(MESH_AXES) if any(len(set(pt[:, i])) > 1 for pt in points))
        nbytes = _nbytes(m["shape"])
        if m["kind"] == "reduce-scatter":
            nbytes *= len(group)
        scope = re.search(r'op_name="([^"]*)"', line)
        out.append(Collective(m["kind"], axes, nbytes, scope[1] if scope else "", ""))
    return out


def summarize(collectives: list[Collective]) -> Counter:
    """A multiset of (kind, axes, bytes) for comparing two lists whatever their order."""
    return Counter((c.kind, tuple(sorted(c.axes)), c.bytes_per_chip) for c in collectives)
