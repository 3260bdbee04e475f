"""Tokenizers: Hugging Face tokenizer.json, SentencePiece .model, and raw bytes (for the tiny test model).

One small interface (encode, decode, vocab_size, bos_id, eos_id) so the engine never cares which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from meshserve.errors import UserError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
    "TOKENIZER_FILES",
    "TokenizerError",
]

# File names a checkpoint directory may hold, in the order they are looked for.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(UserError):
    """A tokenizer file that is missing or unreadable."""


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (no special tokens). Used by the `tiny` model in tests."""

    vocab_size = 256
    bos_id = None
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes (guided decoding's masks): id i is the byte i."""
        return [bytes([i]) for i in range(256)]


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (BPE, Unigram, WordPiece, ...)."""

    def __init__(self, path: str | Path, bos_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos_token, ("<bos>", "<s>", "<|startoftext|>", "<|begin_of_text|>"))
        self.eos_id = self._find(eos_token, ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>"))

    def _find(self, explicit: str | None, candidates: tuple[str, ...]) -> int | None:
        for name in (explicit,) if explicit else candidates:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as decode writes them (guided decoding's masks); None for special tokens. Byte-level BPE
        pieces map back through GPT-2's byte-to-character table; other pieces (Metaspace / SentencePiece style) write
        "▁" as a space and "<0xAB>" byte-fallback pieces as that byte; non-special added tokens are their text."""
        import json

        spec = json.loads(self._tok.to_str())
        added = {t["id"]: t for t in spec.get("added_tokens") or []}
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer")
        )
        to_byte = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in added:
                out.append(None if added[i].get("special") else added[i]["content"].encode())
            elif piece is None:
                out.append(None)
            elif byte_level and all(c in to_byte for c in piece):
                out.append(bytes(to_byte[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out


class SentencePieceTokenizer:
    """A SentencePiece .model file (PaLM, T5, LLaMA-1 style)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:  # OSError or RuntimeError depending on the failure
            raise TokenizerError(f"cannot read SentencePiece model {path}: {e}") from e
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= i < self.vocab_size])

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as decode writes them (guided decoding's masks): None for control and unknown pieces,
        the byte of a byte-fallback piece, else the piece with "\u2581" as a space (decode drops the text's first
        space)."""
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            if self._sp.IsControl(i) or self._sp.IsUnknown(i) or self._sp.IsUnused(i):
                out.append(None)
            elif self._sp.IsByte(i):
                out.append(bytes([int(self._sp.IdToPiece(i)[3:5], 16)]))
            else:
                out.append(self._sp.IdToPiece(i).replace("\u2581", " ").encode())
        return out


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE writes each byte of a piece as one of these)."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A tokenizer from a file or a directory holding one of TOKENIZER_FILES; None gives ByteTokenizer."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                return load_tokenizer(path / name)
        raise TokenizerError(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)})")
    if not path.exists():
        raise TokenizerError(f"tokenizer file not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
