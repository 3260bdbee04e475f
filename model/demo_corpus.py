"""The demo model's corpus and tokenizer: text every Python install has, split the same way everywhere.

The pydoc topics (`pydoc_data.topics.topics`, the language reference pages `help()` shows) and the module, class
and function docstrings of every public stdlib module, read with `ast` from the source files (nothing is imported,
so no module runs), plus the docstrings of compiled modules. Documents are ordered by key; a fixed ~5% of them (by a
hash of the key, so the split does not move when a Python release adds a module) is held out for perplexity and
never seen by the tokenizer or the model.

Tokenizer: byte-level BPE (Hugging Face `tokenizers`), <pad>/<bos>/<eos> at ids 0/1/2 to match the demo preset.
Each document is `<bos> text <eos>`; the documents are concatenated and cut into rows of seq_len + 1 tokens.
Used by model/demo_train.py (training) and tests/test_demo_model.py (held-out checks).
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Document",
    "stdlib_documents",
    "split_documents",
    "train_tokenizer",
    "pack",
    "heldout_rows",
    "SPECIAL_TOKENS",
    "PAD",
    "BOS",
    "EOS",
]

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 (the demo preset's bos_id=1, eos_id=2)
HELDOUT_BUCKETS = 20  # 1 in 20 documents (~5%) is held out

# Stdlib folders that are not documentation of the library: tests, GUI demos, vendored installers,
# codec tables (encodings/), and pydoc_data itself (its topics are read separately).
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "__pycache__",
    "venv",
    "__phello__",
}
# Compiled modules that are test fixtures or codec tables, not library documentation.
_SKIP_COMPILED = ("_test", "xx", "_xx", "_ctypes_test", "_codecs_")


@dataclass(frozen=True)
class Document:
    key: str  # "topic:NAME" or "module:dotted.name"; orders the corpus and decides the split
    text: str

    @property
    def bucket(self) -> int:
        return zlib.crc32(self.key.encode()) % HELDOUT_BUCKETS

    @property
    def heldout(self) -> bool:
        """Reported perplexity only: never trained on, never used to choose anything."""
        return self.bucket == 0

    @property
    def validation(self) -> bool:
        """Not trained on; picks the best checkpoint during training (so the held-out number stays honest)."""
        return self.bucket == 1


def _pydoc_topics() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"topic:{name}", topics[name].strip())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # unparse of exotic defaults; the name alone still reads
        return f"{node.name}(...)"


def _module_text(name: str, tree: ast.Module) -> str:
    """A module's docstrings as one readable page: module doc, then each public class/function with its doc."""
    parts = [f"Module {name}"]
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.name.startswith("_") and node.name != "__init__":
                continue
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    parts.append(f"class {prefix}{node.name}:\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif doc:
                parts.append(f"def {prefix}{_signature(node)}:\n{doc}")

    visit(tree.body, "")
    return "\n\n".join(parts)


def _stdlib_modules() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS or p.startswith((".", "config-")) for p in rel.parts[:-1]):
            continue
        if rel.name.startswith(("test_", "__")) and rel.name != "__init__.py":
            continue
        files.append(rel)
    for rel in sorted(files, key=str):
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):  # a broken or non-UTF-8 file is skipped, not fatal
            continue
        text = _module_text(name, tree)
        if text.count("\n") >= 2:  # a module with nothing but its name teaches nothing
            yield Document(f"module:{name}", text)


def _compiled_modules() -> Iterator[Document]:
    """Docstrings of the built-in and C-extension modules (math, itertools, builtins' str/list/dict, ...).

    These have no .py source, so they are imported; importing a compiled stdlib module runs no user code.
    """
    import importlib
    import inspect

    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    names = set(sys.builtin_module_names) | {p.name.split(".")[0] for p in dynload.glob("*.so")}
    for name in sorted(n for n in names if not n.startswith(_SKIP_COMPILED)):
        try:
            module = importlib.import_module(name)
        except Exception:  # e.g. _tkinter without a display library
            continue
        parts = [f"Module {name}"] + ([inspect.cleandoc(module.__doc__)] if module.__doc__ else [])
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isbuiltin(obj) or inspect.isclass(obj)) or not obj.__doc__:
                continue
            if getattr(obj, "__module__", None) not in (None, name, "builtins") and name != "builtins":
                continue  # re-exported from elsewhere; documented there
            kind = "class" if inspect.isclass(obj) else "def"
            parts.append(f"{kind} {attr}:\n{inspect.cleandoc(obj.__doc__)}")
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    doc = getattr(vars(obj)[meth], "__doc__", None)
                    if not meth.startswith("_") and isinstance(doc, str) and doc:
                        parts.append(f"def {attr}.{meth}:\n{inspect.cleandoc(doc)}")
        if len(parts) > 2:
            yield Document(f"compiled:{name}", "\n\n".join(parts))


def stdlib_documents() -> list[Document]:
    """Every corpus document, sorted by key (deterministic for a given Python install)."""
    return sorted([*_pydoc_topics(), *_stdlib_modules(), *_compiled_modules()], key=lambda d: d.key)


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, validation, heldout): the fixed hash split, ~90/5/5%."""
    train = [d for d in docs if not (d.heldout or d.validation)]
    return train, [d for d in docs if d.validation], [d for d in docs if d.heldout]


def train_tokenizer(docs: list[Document], vocab_size: int, path: Path) -> None:
    """Byte-level BPE with <pad>/<bos>/<eos> at ids 0/1/2, trained on `docs`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} landed at id {tok.token_to_id(name)}, not {i}"
    tok.save(str(path))


def pack(docs: list[Document], tokenizer, seq_len: int) -> np.ndarray:
    """int32 [rows, seq_len + 1]: `<bos> doc <eos>` for every doc, concatenated, cut into rows; the tail is padded."""
    ids: list[int] = []
    for d in docs:
        ids += [BOS, *tokenizer.encode(d.text), EOS]
    rows = -(-len(ids) // (seq_len + 1))
    out = np.full(rows * (seq_len + 1), PAD, np.int32)
    out[: len(ids)] = ids
    return out.reshape(rows, seq_len + 1)


def heldout_rows(tokenizer, seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """The held-out documents packed like training data: int32 [rows, seq_len + 1]."""
    _, _, heldout = split_documents(stdlib_documents())
    rows = pack(heldout, tokenizer, seq_len)
    return rows if max_rows is None else rows[:max_rows]
