"""A checkpoint save's temporary directory and disk space (model/checkpoint.py writes the checkpoint itself).

A save writes into .NAME.tmp-HOST-PID-XXXXXXXX beside NAME and renames it at the end. kill -9 or the OOM killer
mid-write leaves that directory behind: a partial copy of the weights, gigabytes for a large model. A save over an
existing NAME first renames that aside to .NAME.old-HOST-PID-XXXXXXXX and removes it once the new one is in place;
killed in between, it leaves a whole old copy behind. The next save to NAME removes both kinds whose writer is gone
(an old copy only while NAME exists: otherwise it is the only copy).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import jax

__all__ = ["temporary_name", "backup_name", "remove_dead_writers", "space_error"]


def temporary_name(path: Path) -> Path:
    """Where a save to `path` writes first: .NAME.tmp-HOST-PID-XXXXXXXX beside it."""
    return path.with_name(f"{_prefix(path, _host())}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def backup_name(path: Path) -> Path:
    """Where a save over an existing `path` moves the old checkpoint until the new one is in place:
    .NAME.old-HOST-PID-XXXXXXXX beside it."""
    return path.with_name(f"{_prefix(path, _host(), 'old')}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_dead_writers(path: Path, idle_s: float = 600.0) -> None:
    """Remove the directories earlier saves to `path` left (temporary ones, and old checkpoints moved aside while
    `path` exists) whose writer is gone: this host's, with a PID that no longer runs, and nothing in them written
    for `idle_s` seconds (another host's, or a live process's, may still be writing; so may a process in another PID
    namespace under the same host name, which the idle time covers; PID reuse keeps one, never removes a live one)."""
    kinds = ("tmp", "old") if path.exists() else ("tmp",)  # without NAME, an old copy is the only one: kept
    for kind in kinds:
        prefix = _prefix(path, _host(), kind)
        for stale in path.parent.glob(glob.escape(prefix) + "*"):
            pid = stale.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and _idle_for(stale, idle_s):
                shutil.rmtree(stale, ignore_errors=True)


def _prefix(path: Path, host: str, kind: str = "tmp") -> str:
    """The start of the names this host gives a save's directories beside `path`: .NAME.tmp-HOST- (the new one
    being written) or .NAME.old-HOST- (the old one moved aside), then PID-XXXXXXXX."""
    return f".{path.name}.{kind}-{host}-"


def _host() -> str:
    """This host's name in a temporary directory's name: no "-" (the PID after it must parse back) and no "/"."""
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def _idle_for(directory: Path, seconds: float) -> bool:
    """Whether nothing in `directory` (itself included) was modified in the last `seconds`."""
    newest = directory.stat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime)
            except OSError:  # removed meanwhile
                continue
    return time.time() - newest >= seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def space_error(path: Path, params: Any, tokenizer_file: str | Path | None) -> str | None:
    """Why a save to `path` cannot fit (the weights alone exceed the free space where it goes), or None. Checked
    before writing: orbax's writer threads would fail part way and log a traceback per thread."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None:
        return None  # mkdir reports it
    need = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(params))
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        need += Path(tokenizer_file).stat().st_size
    free = shutil.disk_usage(parent).free
    if need <= free:
        return None
    return (
        f"cannot write checkpoint {path}: it needs about {need / 2**20:,.1f} MiB and {parent} has "
        f"{free / 2**20:,.1f} MiB free"
    )
