"""Counting what a compiled XLA module launches per run, from its optimized HLO text: kernels by kind, command
buffers (CUDA graphs), host syncs (conditionals outside graphs, whiles of unknown trip count), nested loops scaled
by their trip counts, and the kernels that write a large output (a weight-sized copy is one: a pad or a transpose
of a weight in the step). Used by benchmarks/decode_hlo.py (`count_step`: per decode step of the bench's loop)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Ops with no kernel behind them (metadata, or folded into their users); *-done ops wait for their *-start.
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
            "opt-barrier", "domain"}  # fmt: skip
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s+=\s+(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BACKEND_KIND = re.compile(r'"kind":"([^"]+)"')
_SUFFIX = re.compile(r"(\.\d+)+$")  # fusion.12 -> fusion: kernels of one kind across layers count together


LARGE_BYTES = 4 << 20  # a kernel output at least this large is listed (`Tally.large`)
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")  # f32[8,64], pred[4], f8e4m3fn[2]
# Fusions that update a buffer in place (the KV cache): their output is the whole buffer, their writes a slice.
_IN_PLACE = ("dynamic_update_slice", "scatter")
_LAYOUT = re.compile(r"\{[^{}]*\}")  # f32[8,64]{1,0} -> f32[8,64]


@dataclass
class Op:
    name: str
    opcode: str
    rest: str  # operands and attributes
    shape: str = ""  # the result's shape text: f32[8,64]{1,0}, or a tuple (...)

    def out_bytes(self) -> int:
        """Bytes of the result (every array of a tuple result; pred and s8 1 byte, s4 rounded up)."""
        total = 0
        for dtype, dims in _ARRAY.findall(self.shape):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            bits = re.match(r"[a-z]+(\d+)", dtype)  # f8e4m3fn: 8; pred: 8 (a byte)
            total += n * max(1, int(bits.group(1) if bits else 8) // 8)
        return total

    def attr(self, key: str) -> str | None:
        """The computation named by `key=%name` (calls, to_apply, body, condition), or None."""
        m = re.search(rf"\b{key}=%?([^\s,}}]+)", self.rest)
        return m.group(1) if m else None

    def branches(self) -> list[str]:
        m = re.search(r"branch_computations=\{([^}]*)\}", self.rest)
        return [b.strip().lstrip("%") for b in m.group(1).split(",")] if m else []


def _opcode(text: str) -> tuple[str, str, str]:
    """(opcode, the rest, the shape) of an instruction's right-hand side `SHAPE OPCODE(OPERANDS), ATTRS`; a tuple
    shape `(s32[], f32[2]{0}, ...)` is skipped by matching its parentheses."""
    end, depth = 0, 0
    while text.startswith("(") and end < len(text):
        depth += (text[end] == "(") - (text[end] == ")")
        if depth == 0:
            break
        end += 1
    i = text.find(" ", end)
    m = _OPCODE.search(text, i + 1 if i >= 0 else 0)
    return (m.group(1), text[m.end() :], text[: m.start()].strip()) if m else ("", text, "")


def parse_hlo(text: str) -> tuple[dict[str, list[Op]], str]:
    """(computation name -> its instructions in order, the entry computation's name) of an HLO module's text."""
    comps: dict[str, list[Op]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith("HloModule"):
                current = comps.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif m := _INSTR.match(line):
            opcode, rest, shape = _opcode(m.group(2))
            current.append(Op(m.group(1), opcode, rest, shape))
    return comps, entry


def trip_count(op: Op) -> int | None:
    m = _TRIP.search(op.rest)
    return int(m.group(1)) if m else None


def kernel_label(op: Op) -> str | None:
    """What kind of kernel `op` launches (fusion:kLoop, fusion:kCustom:__triton_gemm, custom-call:__cublas$gemm,
    copy, ...), or None for a free op or control flow (while, conditional, call: their computations are walked)."""
    if op.opcode in FREE_OPS or op.opcode.endswith("-done") or op.opcode in ("while", "conditional", "call"):
        return None
    if op.opcode == "fusion":
        kind = re.search(r"\bkind=(\w+)", op.rest)
        label = f"fusion:{kind.group(1) if kind else '?'}"
        backend = _BACKEND_KIND.search(op.rest)
        return f"{label}:{backend.group(1)}" if backend and label == "fusion:kCustom" else label
    if op.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', op.rest)
        return f"custom-call:{target.group(1) if target else '?'}"
    return op.opcode


@dataclass
class Tally:
    """Launch counts of one run of a computation (nested loops scaled by their trip counts)."""

    kinds: Counter = field(default_factory=Counter)  # kernel label -> count
    names: Counter = field(default_factory=Counter)  # instruction name without its .N suffix -> count
    in_graphs: int = 0  # kernels inside command buffers
    graph_launches: int = 0
    host_syncs: int = 0
    conditionals: int = 0
    unknown_trips: int = 0  # nested whiles of unknown trip count, counted as one iteration
    large: Counter = field(default_factory=Counter)  # "name shape" of kernels writing >= LARGE_BYTES (not in place)
    large_bytes: int = 0  # what they write

    @property
    def kernels(self) -> int:
        return sum(self.kinds.values())

    def add(self, other: Tally, times: int = 1) -> None:
        for label, n in other.kinds.items():
            self.kinds[label] += n * times
        for name, n in other.names.items():
            self.names[name] += n * times
        self.in_graphs += other.in_graphs * times
        self.graph_launches += other.graph_launches * times
        self.host_syncs += other.host_syncs * times
        self.conditionals += other.conditionals * times
        self.unknown_trips += other.unknown_trips * times
        for key, n in other.large.items():
            self.large[key] += n * times
        self.large_bytes += other.large_bytes * times


def _short_shape(shape: str) -> str:
    """f32[8,64]{1,0} -> f32[8,64]; a tuple -> (its first array, ... N arrays)."""
    arrays = [f"{d}[{dims}]" for d, dims in _ARRAY.findall(shape)]
    if not shape.startswith("("):
        return _LAYOUT.sub("", shape)
    return f"({arrays[0]}, ... {len(arrays)} arrays)" if len(arrays) > 2 else f"({', '.join(arrays)})"


def tally(comps: dict[str, list[Op]], name: str, in_graph: bool = False, largest: bool = False,
          skip: str | None = None) -> Tally:  # fmt: skip
    """The launches of one run of computation `name`; a conditional counts its smallest branch (largest=True: its
    largest); `skip` names an instruction left out (the decode loop, when tallying what is outside it)."""
    t = Tally()
    for op in comps.get(name, []):
        if op.name == skip:
            continue
        if label := kernel_label(op):
            t.kinds[label] += 1
            t.names[_SUFFIX.sub("", op.name)] += 1
            t.in_graphs += in_graph
            size = op.out_bytes()
            in_place = op.opcode in ("dynamic-update-slice", "scatter") or any(w in op.name for w in _IN_PLACE)
            if size >= LARGE_BYTES and not in_place:
                t.large[f"{_SUFFIX.sub('', op.name)} {_short_shape(op.shape)}"] += 1
                t.large_bytes += size
        elif op.opcode == "call" and (target := op.attr("to_apply")):
            graph = target.startswith("command_buffer")
            t.graph_launches += graph and not in_graph
            t.add(tally(comps, target, in_graph or graph, largest))
        elif op.opcode == "while":
            n = trip_count(op)
            t.add(tally(comps, op.attr("body") or "", in_graph, largest), n or 1)
            if n is None:  # the condition runs on the device and its result is read back each iteration
                t.unknown_trips += 1
                t.host_syncs += not in_graph
                t.add(tally(comps, op.attr("condition") or "", in_graph, largest))
        elif op.opcode == "conditional":
            t.conditionals += 1
            t.host_syncs += not in_graph
            runs = [tally(comps, b, in_graph, largest) for b in op.branches()]
            if runs:
                t.add(max(runs, key=lambda r: r.kernels) if largest else min(runs, key=lambda r: r.kernels))
    return t


def find_loop(comps: dict[str, list[Op]], entry: str, steps: int) -> tuple[Op | None, str, bool]:
    """(the decode loop's while, the computation holding it, whether that is a command buffer): the outermost while
    reachable from the entry through calls, the one whose trip count divides `steps` (else the one with the most
    body instructions); None when XLA removed the loop (fully unrolled)."""
    found: list[tuple[Op, str, bool]] = []

    def visit(name: str, graph: bool) -> None:
        for op in comps.get(name, []):
            if op.opcode == "while":
                found.append((op, name, graph))
            elif op.opcode == "call" and (target := op.attr("to_apply")):
                visit(target, graph or target.startswith("command_buffer"))

    visit(entry, False)
    if not found:
        return None, entry, False
    fits = [f for f in found if (trip_count(f[0]) or 0) > 0 and steps % trip_count(f[0]) == 0]
    return max(fits or found, key=lambda f: len(comps.get(f[0].attr("body") or "", [])))


def count_step(text: str, steps: int, n_layers: int, whole: bool = False) -> dict[str, Any]:
    """Per-step launch counts of a compiled G-step decode loop's HLO text (see the module docstring for each);
    whole: the module is one step with no decode loop to find (a server's step: a `while` in it is its own)."""
    comps, entry = parse_hlo(text)
    loop, holder, in_graph = (None, entry, False) if whole else find_loop(comps, entry, steps)
    if loop is None:  # no loop left: the whole entry is G steps
        per_iter, iters, outside = tally(comps, entry), steps, Tally()
        per_iter_max = tally(comps, entry, largest=True)
    else:
        iters = trip_count(loop) or steps
        body = loop.attr("body") or ""
        per_iter = tally(comps, body, in_graph)
        per_iter_max = tally(comps, body, in_graph, largest=True)
        outside = tally(comps, entry, skip=loop.name if holder == entry else None)
        if trip_count(loop) is None:
            per_iter.add(tally(comps, loop.attr("condition") or "", in_graph))
            per_iter.host_syncs += not in_graph
    per = steps / iters  # decode steps per loop iteration: 1 unless XLA unrolled the loop
    kernels = per_iter.kernels / per
    host_launches = (per_iter.kernels - per_iter.in_graphs + per_iter.graph_launches) / per
    return {
        "loop_found": loop is not None,
        "loop_trip_count": iters,
        "loop_in_command_buffer": in_graph,
        "kernels_per_step": kernels,
        "kernels_per_layer": kernels / n_layers,
        "kernels_max_per_step": per_iter_max.kernels / per,
        "host_launches_per_step": host_launches,
        "graph_launches_per_step": per_iter.graph_launches / per,
        "kernels_in_graphs_per_step": per_iter.in_graphs / per,
        "host_syncs_per_step": per_iter.host_syncs / per,
        "conditionals_per_step": per_iter.conditionals / per,
        "nested_loops_unknown_trip": per_iter.unknown_trips,
        "by_kind": {k: n / per for k, n in per_iter.kinds.most_common()},
        "by_name": {k: n / per for k, n in per_iter.names.most_common(15)},
        "large_outputs_per_step": {k: n / per for k, n in per_iter.large.most_common()},
        "large_output_bytes_per_step": per_iter.large_bytes / per,
        "outside_loop_kernels": outside.kernels,
        "large_outputs_per_call": dict(outside.large.most_common()),
        "command_buffers_in_module": sum(1 for c in comps if c.startswith("command_buffer")),
    }
