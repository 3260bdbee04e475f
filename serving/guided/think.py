"""A thinking model's reasoning block before a guided format (GuideSpec.think; serve --reasoning-parser), as vLLM's
structured outputs with a reasoning parser: the block is free text, the format is enforced after it.

A THINK frame (THINK, phase, k) is alone on its stack:
  phase 0: the output's opening "<think>", k bytes of it written (think "start": the alternative to beginning the
           format at once, both open at the start);
  phase 1: the block's text, anything until "</think>", k bytes of the tag matched (think "open": the template's
           generation prompt opened the block, so the output starts here);
  phase 2: after "</think>", k of at most two newlines of its own (none before a choice, whose content must be
           exactly one of the strings), then the format from its start (whose own whitespace gap may follow).
The masks of phase 1's 8 states are computed by masks.py's `_thinking` (every token but those that complete the tag
into bytes the format refuses), not by a trie walk of the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from meshserve.serving.guided.spec import GuideError

__all__ = ["THINK", "THINK_OPEN", "THINK_CLOSE", "check_think", "think_start", "think_step"]

THINK = 9  # the frame tag (after strings.PAT = 8)
THINK_OPEN, THINK_CLOSE = b"<think>", b"</think>"  # serving/reasoning.py's tags


def check_think(spec) -> None:
    """GuideError for a GuideSpec whose `think` cannot be followed: an unknown mode, a regex (matched from the first
    token), or a choice starting with <think> (the reasoning split would read it as the model's reasoning)."""
    if spec.think not in ("", "start", "open") or (spec.think and spec.kind == "regex"):
        raise GuideError(f"think: {spec.think!r} is not supported for kind {spec.kind!r}")
    for i, choice in enumerate(spec.choices if spec.think and spec.kind == "choice" else ()):
        if choice.lstrip().startswith("<think>"):
            raise GuideError(
                f"choices[{i}]: starts with <think>, which a thinking model's output reads as its reasoning"
            )


def think_start(think: str, format_start: tuple) -> tuple:
    """A grammar's start state: the format's own (think ""), a block or the format ("start"), the block ("open")."""
    if think == "open":
        return (((THINK, 1, 0),),)
    if think == "start":
        return tuple(sorted({*format_start, ((THINK, 0, 0),)}))
    return format_start


def think_step(
    top: tuple, b: int, format_start: tuple, step: Callable[[tuple, int], list[tuple]], newlines: int = 2
) -> list[tuple]:
    """The stacks after byte b from a THINK frame; `step(stack, b)` is the grammar's, for the format's start;
    `newlines`: how many the block may end with before the format."""
    _, phase, k = top
    if phase == 0:
        if b != THINK_OPEN[k]:
            return []
        return [((THINK, 1, 0),)] if k + 1 == len(THINK_OPEN) else [((THINK, 0, k + 1),)]
    if phase == 1:  # "<" occurs in the tag only first: a mismatch restarts the match at 0 (at 1 on a "<")
        if b == THINK_CLOSE[k]:
            return [((THINK, 2, 0),)] if k + 1 == len(THINK_CLOSE) else [((THINK, 1, k + 1),)]
        return [((THINK, 1, int(b == THINK_CLOSE[0])),)]
    out = [((THINK, 2, k + 1),)] if b == 0x0A and k < newlines else []
    for stack in format_start:
        out.extend(step(stack, b))
    return out
