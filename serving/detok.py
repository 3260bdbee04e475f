"""Incremental detokenization with stop strings, for streaming.

Text is what `tokenizer.decode(all generated ids)` gives; each step emits only the part that is settled:
  - a decode ending in U+FFFD (an incomplete UTF-8 sequence or a byte-fallback piece) is held back until the
    next token completes it;
  - a tail that could be the start of a stop string is held back until it is clear it is not one;
  - when a stop string appears, the text is cut before it (after it with include_stop, vLLM's
    include_stop_str_in_output) and the request ends; not before min_tokens tokens (as vLLM, whose min_tokens
    holds back stop strings as well as stop tokens).
Concatenating every emitted piece gives the final text exactly (`finish` flushes what was held back).

Each push costs O(new tokens + a small window), not O(all tokens): as vLLM's `detokenize_incrementally` and TGI's
`decode_token`, only ids[prefix:] is decoded and compared with ids[prefix:read], the window of ids whose text is
already out (decoding the window again, rather than the new ids alone, keeps what the tokenizer does at a word
start, e.g. SentencePiece dropping a leading space, out of the difference). `finish` decodes all ids once, so the
final text is the full decode whenever it extends what was emitted (emitted text is never taken back).
"""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.model.tokenizer import Tokenizer

__all__ = ["StreamDecoder", "alternatives_with_text", "alternatives_json", "cut_at_stop"]

_REPLACEMENT = "\ufffd"
# Ids whose text stays held back (a run of incomplete or empty pieces) before the decoder settles all but the
# last _RESOLVE of them: a UTF-8 character is at most 4 bytes, so 4 later ids that add text decide every earlier
# byte (ids that add nothing, skipped special tokens, decide nothing: see _advance). Bounds the window when a model
# emits invalid bytes or skipped special tokens over and over.
_MAX_PENDING = 8
_RESOLVE = 4


class StreamDecoder:
    """Per-request state: the ids so far, the text emitted so far, and the stop strings to look for."""

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), include_stop: bool = False, min_tokens: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop  # the text ends with the stop string found (else just before it)
        self.min_tokens = min_tokens  # no stop string ends the text before this many ids
        self.ids: list[int] = []
        self.stopped = False
        # ids[:_read] are text already (emitted or in _pending); ids[_prefix:_read] is decoded again as context.
        self._prefix = 0
        self._read = 0
        self._pieces: list[str] = []  # emitted text, in the pieces handed out
        self._pending = ""  # decoded text not handed out yet: a tail that may start a stop string

    @property
    def emitted(self) -> str:
        """The text handed out so far."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def push(self, tokens: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns (new settled text, whether a stop string ended the request)."""
        if self.stopped:
            return "", True
        unchecked = self.min_tokens - 1 - len(self.ids)  # ids of this push before the min_tokens-th
        if 0 < unchecked < len(tokens):  # a verify step's ids across it: pushed as one at a time would be
            text, _ = self.push(tokens[:unchecked])
            more, stopped = self.push(tokens[unchecked:])
            return text + more, stopped
        self.ids.extend(int(t) for t in tokens)
        text = self._pending + self._advance()
        cut = self._find_stop(text) if len(self.ids) >= self.min_tokens else None
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return self._emit(text[:cut]), True
        hold = self._stop_prefix_len(text)
        self._pending = text[len(text) - hold :]
        return self._emit(text[: len(text) - hold]), False

    def finish(self) -> str:
        """The rest of the text at the end of the request (held-back pieces included)."""
        if self.stopped:
            return ""
        emitted = self.emitted
        full = self._decode(self.ids)  # once per request: the final text is the full decode
        if full.startswith(emitted):
            rest = full[len(emitted) :]
        else:  # a tokenizer whose full decode rewrites emitted text: never take it back, flush the window instead
            prefix_text = self._decode(self.ids[self._prefix : self._read])
            rest = self._pending + self._decode(self.ids[self._prefix :])[len(prefix_text) :]
        self._pending = ""
        self.stopped = True  # nothing more is emitted
        cut = self._find_stop(rest) if len(self.ids) >= self.min_tokens else None
        return self._emit(rest if cut is None else rest[:cut])

    def _advance(self) -> str:
        """Text of the ids since `_read` that is settled now; moves the window. Decodes O(window) ids."""
        ids, p, r = self.ids, self._prefix, self._read
        if len(ids) == r:
            return ""
        prefix_text = self._decode(ids[p:r])
        new_text = self._decode(ids[p:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix, self._read = r, len(ids)
            return new_text[len(prefix_text) :]
        if len(ids) - r > _MAX_PENDING:
            # Still unsettled after many ids: the text up to all but the last few is final if those ids left it
            # unchanged (its replacement characters are invalid bytes, not a character waiting for its end).
            # Unless they added nothing: skipped special tokens decode to nothing, so a character's first bytes
            # followed by pads end in U+FFFD that its remaining bytes may still complete.
            k = len(ids) - _RESOLVE
            mid = self._decode(ids[p:k])
            if new_text.startswith(mid) and (len(new_text) > len(mid) or not mid.endswith(_REPLACEMENT)):
                self._prefix, self._read = r, k
                return mid[len(prefix_text) :]
        return ""

    def _emit(self, text: str) -> str:
        if text:
            self._pieces.append(text)
        return text

    def _find_stop(self, text: str) -> int | None:
        """Where `text` ends: before the first stop string in it, or with include_stop after the first to end (as a
        stream sees them: "ab" ends before "abc" does), or None. `text` is everything not yet emitted: a stop string
        cannot start in emitted text, since a tail that could start one is held back (see push)."""
        hits = [(i, i + len(s)) for s in self.stop if (i := text.find(s)) >= 0]
        if not hits:
            return None
        return min(end for _, end in hits) if self.include_stop else min(start for start, _ in hits)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def cut_at_stop(
    tokenizer: Tokenizer, tokens: Sequence[int], stop: Sequence[str], include_stop: bool = False, min_tokens: int = 0
) -> tuple[int, str, bool]:
    """Generated `tokens` as a server streams them with these stop strings: (how many tokens it keeps, their text
    cut at the stop, whether a stop string ended it). For output generated without the stop strings (generate in
    process): the same tokens and text a server's request with them gives."""
    decoder = StreamDecoder(tokenizer, stop, include_stop, min_tokens)
    for i, token in enumerate(tokens):
        if decoder.push([token])[1]:
            return i + 1, decoder.emitted, True
    decoder.finish()
    return len(tokens), decoder.emitted, False


def alternatives_with_text(
    tokenizer: Tokenizer, alternatives: Sequence[tuple[Sequence[int], Sequence[float]]]
) -> list[list[tuple[int, str, float]]]:
    """top_logprobs per token, (ids, log-probs) -> [(id, text, logprob)], each token decoded alone (a piece of a
    multi-byte character shows as U+FFFD)."""
    return [[(t, tokenizer.decode([t]), lp) for t, lp in zip(ids, lps, strict=True)] for ids, lps in alternatives]


def alternatives_json(rows: Sequence[Sequence[tuple[int, str, float]]]) -> list[list[dict]]:
    """The JSON form of `alternatives_with_text` (generate --json, batch-generate): {"token", "text", "logprob"}."""
    return [[{"token": t, "text": s, "logprob": lp} for t, s, lp in alts] for alts in rows]
