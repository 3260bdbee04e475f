"""A byte-level matcher for JSON shaped by a compiled schema (`Grammar`): a pushdown automaton with nondeterminism.

Nodes (built by serving/guided/schema.py; a node is a tuple in `Grammar.nodes`, referenced by its index):
  ("alt", (ids...))                       one of the nodes (anyOf, type lists, enum, $ref targets)
  ("obj", props | None, value_id)          props: ((key JSON bytes incl. quotes, node id, required), ...) written in
                                           that order, no other keys; None: any keys, each value a `value_id`
  ("arr", prefix ids, items id | -1, min, max | -1)   -1 items: nothing beyond the prefix
  ("str", min_length, max_length | -1)
  ("pat", StringPattern)                   a string whose content a pattern matches (JSON Schema pattern / format:
                                           serving/guided/patterns.py; its frames: strings.py)
  ("num", integer: bool)
  ("int", lo | None, hi | None)           an integer within bounds (serving/guided/ranges.py)
  ("lit", bytes)                           exact bytes (true, false, null, a const's JSON)
  ("tools", call node id, parallel)        Hermes `<tool_call>` blocks around the call objects

A thinking model's reasoning first (`Grammar(..., think=...)`, serve --reasoning-parser): think.py's THINK frame.

A state is a sorted tuple of distinct deterministic stacks (the alternatives still open); a stack is a tuple of
frames (tuples of ints), its top last. A frame is a value being written; the frame below is its container, already
in the state it takes once the value ends (so a value ending is a pop). States are canonical: the same position
reached by any path is the same tuple, so masks cache per state. Tuples of ints, not frozensets: the cyclic garbage
collector stops tracking them, so the (state, byte) memo does not make its full collections slow (frozensets there
cost tens of ms pauses).

Bounds on runs a model could repeat without progress:
- Whitespace between two JSON tokens (and before the value, and around Hermes tags) is one of: nothing, one space,
  or a newline and at most WS_INDENT (24) spaces or tabs, as llama.cpp's JSON grammars allow. So compact JSON and
  pretty-printed JSON (indent 2 to 12 levels deep, indent 4 to 6) can both be written, but not runs of blank lines
  or long space runs: a small model left free filled every gap up to any looser bound (measured on the demo model
  with 32 bytes / 2 newlines between tokens: 30-space runs in most gaps).
- Digits: at most NUM_DIGITS (20) in a number's integer part, fraction and exponent each.
Strings may be as long as the request's max_tokens allows: each character is progress. String content is stepped in
strings.py (plain strings and pattern strings).
"""

from __future__ import annotations

import itertools

from meshserve.serving.guided import ranges, strings
from meshserve.serving.guided.ranges import RNG
from meshserve.serving.guided.spec import GuideError
from meshserve.serving.guided.strings import PAT
from meshserve.serving.guided.think import THINK, think_start, think_step

__all__ = ["Grammar", "State", "WS_INDENT", "NUM_DIGITS", "MAX_OPEN", "new_key"]

State = tuple  # a sorted tuple of stacks (tuples of frames)

WS_INDENT = 24
# Alternatives (stacks) a state may hold, not counting those inside a literal (an enum's values, each cheap): each
# costs every byte of every mask. Overlapping anyOf branches under a recursive $ref double them at each nesting level
# (a 152-character schema reached 65,536 and 24 s a step, stalling every request of the engine): past the bound the
# request fails alone. 256 open alternatives cost ~0.07 s for a new state's mask (4096-token vocabulary, this CPU).
MAX_OPEN = 256
NUM_DIGITS = 20
new_key = itertools.count().__next__  # Grammar.key, StringPattern.key: one sequence (an id() is reused once freed)
_MEMO_LIMIT = 1 << 18  # (state, byte) -> next state entries kept per grammar before the memo is dropped (~50 MB)

# Frame tags (first element of each frame).
VAL, OBJ, ARR, STR, NUM, LIT, TOOLS = range(7)
assert STR == strings.STR  # strings.py steps these frames
# OBJ states: after "{", after ",", inside a key literal, before ":", after a value.
O_OPEN, O_KEY, O_KEYM, O_COLON, O_AFTER = range(5)
# ARR states: after "[", after a value.
A_OPEN, A_AFTER = range(2)
# TOOLS states: in the opening tag, in the closing tag, after a block (parallel: another may follow).
T_OPEN, T_CLOSE, T_MORE = range(3)
OPEN_TAG, CLOSE_TAG = b"<tool_call>", b"</tool_call>"

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_NUM_DONE = frozenset((1, 2, 4, 7))  # number states where what is written is a whole number


def _ws(ws: int, b: int) -> int:
    """The whitespace gap's counter after byte b, or -1 when b cannot extend it. 0: empty, 1: one space (complete),
    2 + n: a newline and n indentation bytes."""
    if ws == 0:
        return 1 if b == 0x20 else 2 if b == 0x0A else -1
    if ws >= 2 and b in (0x20, 0x09) and ws - 2 < WS_INDENT:
        return ws + 1
    return -1


class Grammar:
    """A compiled format: `start()`, `advance(state, bytes)`, `accepts(state)`, `must_end(state)`."""

    def __init__(
        self, nodes: list[tuple], start: tuple | list[tuple], where: str = "", think: str = "", think_gap: int = 2
    ):
        """think: "" (the format from the first byte), "start" (an optional reasoning block first) or "open" (a
        reasoning block first, its "<think>" already in the prompt); see think.py. think_gap: the newlines the
        block may end with before the format."""
        self.nodes = nodes
        self.where = where  # what it was compiled from, for repr
        self.key = new_key()  # masks.py's cache keys masks by this (a key holding the grammar would keep it alive)
        # One stack, or several alternatives (a "choice" format: one per string).
        self._format: State = tuple(sorted(set(start))) if isinstance(start, list) else (start,)
        self._start, self._think_gap = think_start(think, self._format), think_gap
        self._leaves: dict[int, tuple[int, ...]] = {}
        self._memo: dict[State, dict[int, State | None]] = {}  # state -> {byte: next state}
        self._size = 0  # entries in the memo
        self._ends: dict[State, bool] = {}

    def __repr__(self) -> str:
        return f"Grammar({self.where}, {len(self.nodes)} nodes)"

    # -- public interface --------------------------------------------------------------------------------------

    def start(self) -> State:
        return self._start

    def advance(self, state: State | None, data: bytes) -> State | None:
        """The state after `data`, or None when it cannot follow."""
        for b in data:
            if state is None:
                return None
            state = self.step(state, b)
        return state

    def accepts(self, state: State) -> bool:
        """What is written so far is a whole output: it may end here."""
        return any(self._can_end(stack) for stack in state)

    def must_end(self, state: State) -> bool:
        """accepts(state) and no byte can follow."""
        done = self._ends.get(state)
        if done is None:
            done = self.accepts(state) and all(self.step(state, b) is None for b in range(256))
            self._ends[state] = done  # bounded: cleared with the memo (each entry here put 256 there)
        return done

    def step(self, state: State, b: int) -> State | None:
        """One byte (memoized: masks walk the vocabulary's trie through the same (state, byte) pairs again)."""
        row = self.row(state)
        return row[b] if b in row else self.fill(row, state, b)

    def row(self, state: State) -> dict[int, State | None]:
        """The memo of `state`'s successors by byte (filled as bytes are tried)."""
        row = self._memo.get(state)
        if row is None:
            if self._size >= _MEMO_LIMIT:
                self._memo.clear()
                self._ends.clear()
                self._size = 0
            row = self._memo[state] = {}
        return row

    def fill(self, row: dict[int, State | None], state: State, b: int) -> State | None:
        """Compute and memoize the state after byte b (`row` is `row(state)`). GuideError when more than
        MAX_OPEN alternatives would be open (see MAX_OPEN)."""
        out: set[tuple] = set()
        for stack in state:
            out.update(self._step(stack, b))
        if len(out) > MAX_OPEN and sum(1 for stack in out if stack and stack[-1][0] != LIT) > MAX_OPEN:
            raise GuideError(
                f"{self.where}: the format keeps more than {MAX_OPEN} alternatives open at once (overlapping "
                "alternatives: anyOf / oneOf / type lists under a recursive $ref, or a regex's | and optional "
                "repeats): simplify it"
            )
        nxt = tuple(sorted(out)) if out else None
        row[b] = nxt
        self._size += 1
        return nxt

    def string_room(self, state: State) -> int | None:
        """When every stack is inside a string between characters: the most characters any may still take (a plain
        token of that many characters or fewer is allowed); None otherwise."""
        room = 0
        for stack in state:
            top = stack[-1] if stack else None
            if top is None or top[0] != STR or top[3] or top[4]:
                return None
            _, lo, hi = self.nodes[top[1]]
            room = max(room, 1 << 30 if hi < 0 else hi - top[2])
        return room

    # -- the automaton ------------------------------------------------------------------------------------------

    def leaves(self, node: int) -> tuple[int, ...]:
        """The non-alternative nodes `node` may be (alternatives and $ref placeholders flattened; cycles skipped)."""
        out = self._leaves.get(node)
        if out is None:
            found: list[int] = []
            seen: set[int] = set()
            todo = [node]
            while todo:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                if self.nodes[n][0] == "alt":
                    todo.extend(reversed(self.nodes[n][1]))
                else:
                    found.append(n)
            out = self._leaves[node] = tuple(found)
        return out

    def opened(self, node: int) -> int:
        """The most stacks (literals not counted, as in `fill`) one byte opens where a value of `node` begins: its
        leaves that begin with that byte added up, a pattern string counting each NFA state its first character may
        take. schema.py refuses past MAX_OPEN at compile time: `fill` would refuse only once the value is reached,
        on the engine thread, after part of the output was streamed."""
        counts: dict[object, int] = {}
        first = {"obj": "{", "arr": "[", "str": '"', "pat": '"', "num": "number", "int": "number"}
        for leaf in self.leaves(node):
            spec = self.nodes[leaf]
            if spec[0] in first:
                counts[first[spec[0]]] = counts.get(first[spec[0]], 0) + (len(spec[1].start) if spec[0] == "pat" else 1)
        return max(counts.values(), default=0)

    def _can_end(self, stack: tuple) -> bool:
        if not stack:
            return True
        if len(stack) != 1:
            return False
        top = stack[0]
        if top[0] == RNG:
            return ranges.complete(top, *self.nodes[top[1]][1:])
        return (top[0] == NUM and top[2] in _NUM_DONE) or (top[0] == TOOLS and top[2] == T_MORE and top[3] == 0)

    def _begin(self, rest: tuple, node: int, b: int) -> list[tuple]:
        """Stacks after byte b starts a value of leaf `node` on top of `rest`."""
        spec = self.nodes[node]
        kind = spec[0]
        if kind == "obj":
            return [rest + ((OBJ, node, O_OPEN, 0, 0, 0),)] if b == 0x7B else []
        if kind == "arr":
            return [rest + ((ARR, node, A_OPEN, 0, 0),)] if b == 0x5B else []
        if kind == "str":
            return [rest + ((STR, node, 0, 0, 0, 0, 0),)] if b == 0x22 else []
        if kind == "pat":  # a pattern string (strings.py): the pattern's first characters
            return [rest + (frame,) for frame in spec[1].begin(node)] if b == 0x22 else []
        if kind == "num":
            if b == 0x2D:
                return [rest + ((NUM, node, 0, 0),)]
            if b == 0x30:
                return [rest + ((NUM, node, 1, 0),)]
            return [rest + ((NUM, node, 2, 1),)] if b in _DIGITS else []
        if kind == "int":
            frame = ranges.begin(node, spec[1], spec[2], b)
            return [] if frame is None else [rest + (frame,)]
        if kind == "lit":
            lit = spec[1]
            if b != lit[0]:
                return []
            return [rest] if len(lit) == 1 else [rest + ((LIT, node, 1),)]
        if kind == "tools":
            return []
        raise AssertionError(kind)

    def _value(self, rest: tuple, node: int, b: int) -> list[tuple]:
        out: list[tuple] = []
        for leaf in self.leaves(node):
            out.extend(self._begin(rest, leaf, b))
        return out

    def _step(self, stack: tuple, b: int) -> list[tuple]:
        if not stack:
            return []
        top, rest = stack[-1], stack[:-1]
        tag = top[0]
        if tag == STR:
            return strings.plain(self.nodes[top[1]], top, rest, b)
        if tag == PAT:
            return strings.pattern(self.nodes[top[1]][1], top, rest, b)
        if tag == VAL:
            if b in _WS:
                ws = _ws(top[2], b)
                return [rest + ((VAL, top[1], ws),)] if ws >= 0 else []
            return self._value(rest, top[1], b)
        if tag == LIT:
            lit, pos = self.nodes[top[1]][1], top[2]
            if b != lit[pos]:
                return []
            return [rest] if pos + 1 == len(lit) else [rest + ((LIT, top[1], pos + 1),)]
        if tag == NUM:
            return self._number(top, rest, b)
        if tag == RNG:
            lo, hi = self.nodes[top[1]][1:]
            if (frame := ranges.step(top, lo, hi, b)) is not None:
                return [rest + (frame,)]
            return self._step(rest, b) if ranges.complete(top, lo, hi) else []  # the number ended before b
        if tag == OBJ:
            return self._object(top, rest, b)
        if tag == ARR:
            return self._array(top, rest, b)
        if tag == THINK:
            return think_step(top, b, self._format, self._step, self._think_gap)
        return self._tools(top, rest, b)

    def _number(self, top: tuple, rest: tuple, b: int) -> list[tuple]:
        _, node, st, nd = top
        integer = self.nodes[node][1]
        digit = b in _DIGITS
        if st == 0:  # after "-"
            if b == 0x30:
                return [rest + ((NUM, node, 1, 0),)]
            return [rest + ((NUM, node, 2, 1),)] if digit else []
        if st == 3 or st == 6:  # after "." or an exponent's sign: a digit must follow
            return [rest + ((NUM, node, st + 1, 1),)] if digit else []
        if st == 5:  # after "e"
            if b == 0x2B or b == 0x2D:
                return [rest + ((NUM, node, 6, 0),)]
            return [rest + ((NUM, node, 7, 1),)] if digit else []
        # st in 1, 2, 4, 7: a whole number so far
        if digit and st != 1 and nd < NUM_DIGITS:
            return [rest + ((NUM, node, st, nd + 1),)]
        if not integer and st in (1, 2):
            if b == 0x2E:
                return [rest + ((NUM, node, 3, 0),)]
            if b == 0x65 or b == 0x45:
                return [rest + ((NUM, node, 5, 0),)]
        if not integer and st == 4 and (b == 0x65 or b == 0x45):
            return [rest + ((NUM, node, 5, 0),)]
        return self._step(rest, b)  # the number ended before b: b belongs to the container

    def _keys(self, node: int, props: tuple, pos: int, rest: tuple) -> list[tuple]:
        """After a key's opening quote: one stack per property that may come next (those from `pos` up to and
        including the first required one)."""
        out = []
        for j in range(pos, len(props)):
            out.append(rest + ((OBJ, node, O_KEYM, j, 1, 0),))
            if props[j][2]:
                break
        return out

    def _object(self, top: tuple, rest: tuple, b: int) -> list[tuple]:
        _, node, st, pos, k, ws = top
        _, props, value = self.nodes[node]
        if st == O_KEYM:  # props is not None here
            key = props[pos][0]
            if b != key[k]:
                return []
            if k + 1 == len(key):
                return [rest + ((OBJ, node, O_COLON, pos, 0, 0),)]
            return [rest + ((OBJ, node, O_KEYM, pos, k + 1, 0),)]
        if b in _WS:
            ws = _ws(ws, b)
            return [rest + ((OBJ, node, st, pos, k, ws),)] if ws >= 0 else []
        if st == O_COLON:
            if b != 0x3A:
                return []
            if props is None:
                return [rest + ((OBJ, node, O_AFTER, 0, 0, 0), (VAL, value, 0))]
            return [rest + ((OBJ, node, O_AFTER, pos + 1, 0, 0), (VAL, props[pos][1], 0))]
        if st == O_AFTER:
            if b == 0x2C and (props is None or pos < len(props)):
                return [rest + ((OBJ, node, O_KEY, pos, 0, 0),)]
            if b == 0x7D and (props is None or not any(p[2] for p in props[pos:])):
                return [rest]
            return []
        # O_OPEN or O_KEY: a key's opening quote (or, right after "{", the closing brace)
        if b == 0x22:
            if props is None:
                return [rest + ((OBJ, node, O_COLON, 0, 0, 0), (STR, self._key_node, 0, 0, 0, 0, 0))]
            return self._keys(node, props, pos, rest)
        if b == 0x7D and st == O_OPEN and (props is None or not any(p[2] for p in props)):
            return [rest]
        return []

    _key_node = 0  # schema.py puts a plain ("str", 0, -1) node first: any object's keys

    def _array(self, top: tuple, rest: tuple, b: int) -> list[tuple]:
        _, node, st, count, ws = top
        _, prefix, items, lo, hi = self.nodes[node]
        if b in _WS:
            ws = _ws(ws, b)
            return [rest + ((ARR, node, st, count, ws),)] if ws >= 0 else []
        if b == 0x5D:
            return [rest] if count >= lo and (st == A_AFTER or count == 0) else []
        if st == A_AFTER:
            if b != 0x2C or 0 <= hi <= count:
                return []
            item = prefix[count] if count < len(prefix) else items
            return [rest + ((ARR, node, A_AFTER, count + 1, 0), (VAL, item, 0))]
        if hi == 0:  # A_OPEN of an array that must stay empty
            return []
        item = prefix[0] if prefix else items
        return self._value(rest + ((ARR, node, A_AFTER, 1, 0),), item, b)

    def _tools(self, top: tuple, rest: tuple, b: int) -> list[tuple]:
        _, node, st, k, ws = top
        _, call, parallel = self.nodes[node]
        if k == 0 and b in _WS:
            ws = _ws(ws, b)
            return [rest + ((TOOLS, node, st, 0, ws),)] if ws >= 0 else []
        if st == T_MORE:
            st = T_OPEN  # another block: its tag starts here
        tag = OPEN_TAG if st == T_OPEN else CLOSE_TAG
        if b != tag[k]:
            return []
        if k + 1 < len(tag):
            return [rest + ((TOOLS, node, st, k + 1, 0),)]
        if st == T_OPEN:
            return [rest + ((TOOLS, node, T_CLOSE, 0, 0), (VAL, call, 0))]
        return [rest + ((TOOLS, node, T_MORE, 0, 0),)] if parallel else [rest]
