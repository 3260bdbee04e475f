"""Incremental detokenization with stop strings, for streaming.

Text is what `tokenizer.decode(all generated ids)` gives; each step emits only the part that is settled:
  - a decode ending in U+FFFD (an incomplete UTF-8 sequence or a byte-fallback piece) is held back until the
    next token completes it;
  - a tail that could be the start of a stop string is held back until it is clear it is not one;
  - when a stop string appears, the text is cut before it and the request ends.
Concatenating every emitted piece gives the final text exactly (`finish` flushes what was held back).
"""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.model.tokenizer import Tokenizer

__all__ = ["StreamDecoder"]

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Per-request state: the ids so far, the text emitted so far, and the stop strings to look for."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids) if self.ids else ""

    def push(self, tokens: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns (new settled text, whether a stop string ended the request)."""
        if self.stopped:
            return "", True
        self.ids.extend(int(t) for t in tokens)
        text = self._decode()
        if text.endswith(_REPLACEMENT):
            return "", False  # wait for the bytes that complete the character
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut]), True
        hold = self._stop_prefix_len(text)
        return self._emit(text[: len(text) - hold]), False

    def finish(self) -> str:
        """The rest of the text at the end of the request (held-back pieces included)."""
        if self.stopped:
            return ""
        text = self._decode()
        cut = self._find_stop(text)
        return self._emit(text if cut is None else text[:cut])

    def _emit(self, settled: str) -> str:
        # Re-decoding can, with some tokenizers, change already-emitted text (a merge across pieces); never take
        # emitted text back, emit only what extends it.
        if not settled.startswith(self.emitted):
            common = 0
            for a, b in zip(settled, self.emitted, strict=False):
                if a != b:
                    break
                common += 1
            settled = self.emitted + settled[common:] if common == len(self.emitted) else self.emitted
        new = settled[len(self.emitted) :]
        self.emitted = settled
        return new

    def _find_stop(self, text: str) -> int | None:
        # Only the unsettled tail can hold a new match; search from the earliest place a stop string could start.
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
