"""Counting what XLA:GPU's runtime issues per decode step, from its thunk sequence (the executable's own plan, dumped
by `--xla_dump_to` as *.thunk_sequence_after_thunk_passes.txt). Newer XLA forms command buffers (CUDA graphs) on
thunks, after the HLO, so hlo_tally.py's HLO count cannot see them; this can. Used by decode_hlo.py --target.

A dump looks like (indentation nests; a while has condition:/body:, a conditional its branches):

    004: kWhile [prev=003 (1) | sink]
      body:
        000: kCommandBuffer [source | next=071 (1)]
            006: kCustomKernel [...] loop_minimum_fusion_1 grid: [1, 1, 1] ...
        071: kConditional [prev=000 (1) | next=072 (1)]
          false_branch:
            ...
        072: kCustomKernel [prev=071 (1) | next=073 (1)] loop_add_fusion_2 ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_THUNK = re.compile(r"^(\s*)\d+: (k\w+)\s*(.*)$")
_SECTION = re.compile(r"^(\s*)(\w+):\s*$")
_CONTAINERS = ("kCommandBuffer", "kSequential")  # thunks whose children run as part of them


@dataclass
class Thunk:
    kind: str
    rest: str
    children: list[Thunk] = field(default_factory=list)  # a command buffer's thunks
    sections: dict[str, list[Thunk]] = field(default_factory=dict)  # a while's condition/body, a branch each


def parse_thunks(text: str) -> list[Thunk]:
    """The top-level thunks of a thunk sequence dump, each with what it nests."""
    items: list[tuple[int, str | None, str]] = []  # (indent, thunk kind or None for a section header, rest/name)
    for line in text.splitlines():
        if m := _THUNK.match(line):
            items.append((len(m.group(1)), m.group(2), m.group(3)))
        elif m := _SECTION.match(line):
            items.append((len(m.group(1)), None, m.group(2)))
    return _build(items, 0, 0)[0]


def _build(items: list[tuple[int, str | None, str]], i: int, indent: int) -> tuple[list[Thunk], int]:
    """The run of thunks at items[i:] indented at least `indent`, each absorbing what is indented deeper than it
    (its children, its sections); a section header ends the run (it belongs to an outer thunk). A while prints its
    `condition:` at its own indent, so a header at a thunk's own indent is that thunk's too."""
    nodes: list[Thunk] = []
    while i < len(items) and items[i][0] >= indent and items[i][1] is not None:
        own, kind, rest = items[i]
        node, i = Thunk(kind, rest), i + 1
        while i < len(items) and (items[i][0] > own or (items[i][1] is None and items[i][0] == own)):
            if items[i][1] is None:  # a section: its thunks start on the next line, at their own indent
                name, i = items[i][2], i + 1
                node.sections[name], i = _build(items, i, items[i][0] if i < len(items) else 0)
            else:
                children, i = _build(items, i, items[i][0])
                node.children += children
        nodes.append(node)
    return nodes, i


def _kernels(nodes: list[Thunk]) -> int:
    """Leaf thunks (kernels, copies, library calls) anywhere under `nodes`."""
    return sum(_kernels(n.children) + sum(_kernels(s) for s in n.sections.values()) or 1 for n in nodes)


@dataclass
class Launches:
    graphs: int = 0  # command buffer launches
    in_graphs: int = 0  # the kernels they hold
    alone: int = 0  # thunks the host issues one by one (kernels, copies, library calls)
    conditionals: int = 0  # outside command buffers: each copies its predicate to the host and waits

    def __add__(self, other: Launches) -> Launches:
        return Launches(*(a + b for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


def launches(nodes: list[Thunk], largest: bool = False) -> Launches:
    """What the host issues for one run of `nodes`; a conditional counts its branch with the fewest launches
    (largest: the most)."""
    total = Launches()
    for n in nodes:
        if n.kind == "kCommandBuffer":
            total += Launches(graphs=1, in_graphs=_kernels(n.children))
        elif n.kind == "kConditional":
            branches = [launches(b, largest) for b in n.sections.values()] or [Launches()]
            pick = max if largest else min
            total += Launches(conditionals=1) + pick(branches, key=lambda b: (b.graphs + b.alone, b.in_graphs))
        elif n.kind == "kWhile":  # a nested loop: one iteration of its body, and its condition read back
            total += launches(n.sections.get("body", []), largest) + Launches(conditionals=1)
        elif n.kind in _CONTAINERS:
            total += launches(n.children, largest)
        else:
            total += Launches(alone=1)
    return total


def count_loop_thunks(text: str) -> dict[str, Any] | None:
    """Per iteration of the module's largest top-level while (the decode loop): graph launches, the kernels in
    them, thunks issued alone, conditionals (host syncs); None when the dump has no while."""
    loops = [n for n in parse_thunks(text) if n.kind == "kWhile"]
    if not loops:
        return None
    body = max(loops, key=lambda n: _kernels(n.sections.get("body", []))).sections.get("body", [])
    low, high = launches(body), launches(body, largest=True)
    return {
        "graph_launches": low.graphs,
        "kernels_in_graphs": low.in_graphs,
        "issued_alone": low.alone,
        "conditionals": low.conditionals,
        "host_launches": low.graphs + low.alone,
        "host_launches_max": high.graphs + high.alone,
    }
