"""The tensors of a Hugging Face directory: which safetensors file holds each name, with shapes and dtypes read from
the headers (no weights read until `get`).

Which files count, as transformers' `from_pretrained` picks them:
  - model.safetensors when present: that one file (other *.safetensors beside it, e.g. Mistral's
    consolidated.safetensors in its own naming, are not the model);
  - else model.safetensors.index.json when present: its `weight_map` (tensor name -> file) is the whole model; every
    file it names must exist and hold the tensors mapped to it;
  - else every *.safetensors file, no name in two of them (a stale copy beside a re-export would otherwise decide
    by file name order which weights are used).
Every failure is an HFImportError naming the file (and the tensor), never a library traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from meshserve.errors import UserError

__all__ = ["HFImportError", "HFTensors", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFImportError(UserError):
    """A Hugging Face directory that is missing, unreadable, unsupported or inconsistent with its config."""


class HFTensors:
    """Name -> file for every tensor of the directory (see the module docstring); reads on demand."""

    def __init__(self, directory: Path):
        import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' so safetensors can return it)
        from safetensors import safe_open

        self._open = safe_open
        self._handles: dict[Path, Any] = {}
        index = directory / INDEX_FILE
        if (directory / SINGLE_FILE).is_file():
            self.files = dict.fromkeys(self._names(directory / SINGLE_FILE), directory / SINGLE_FILE)
        elif index.exists():
            self.files = self._read_index(index)
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
                hint = f" (found {', '.join(other)}: re-save with safe_serialization=True)" if other else ""
                raise HFImportError(f"no *.safetensors weights in {directory}{hint}")
            self.files = {}
            for shard in shards:
                for name in self._names(shard):
                    if name in self.files:
                        raise HFImportError(
                            f"tensor {name} is in both {self.files[name].name} and {shard.name} (and there is no "
                            f"{INDEX_FILE} to say which): remove the stale file"
                        )
                    self.files[name] = shard
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        held: dict[Path, set[str]] = {}
        for name, path in self.files.items():
            if path not in held:
                held[path] = set(self._names(path))
            if name not in held[path]:  # only an index can map a name to a file without it
                raise HFImportError(f"{INDEX_FILE} maps tensor {name} to {path.name}, which does not hold it")
            piece = self._handle(path).get_slice(name)
            self.shapes[name], self.dtypes[name] = tuple(piece.get_shape()), piece.get_dtype()

    @staticmethod
    def _read_index(index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(k): index.parent / str(v) for k, v in weight_map.items()}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFImportError(f"cannot read {index} (expected a 'weight_map' object): {e}") from None
        if not files:
            raise HFImportError(f"{index}: 'weight_map' is empty (it should name every tensor's file)")
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise HFImportError(f"{index.name} names missing file(s): {', '.join(missing)}")
        return files

    def _names(self, path: Path) -> list[str]:
        return list(self._handle(path).keys())  # safe_open handles are not iterable

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = self._open(str(path), framework="np")
            except Exception as e:  # SafetensorError, OSError, ...: the library has no common base class
                raise HFImportError(f"cannot read safetensors file {path}: {e}") from None
        return self._handles[path]

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except HFImportError:
            raise
        except Exception as e:
            raise HFImportError(f"cannot read tensor {name} from {path}: {e}") from None
