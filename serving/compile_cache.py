"""The persistent XLA compilation cache the serving CLIs turn on by default, kept under a size bound.

`setup_compile_cache` points JAX at a directory (default $JAX_COMPILATION_CACHE_DIR, else ~/.cache/meshserve/xla)
and, before anything compiles, prunes it to `--compile-cache-max-gb` (default 8 GiB) by deleting whole entries,
least recently used first. `meshserve cache` shows the directory, clears it or prunes it to a size.

What JAX 0.10 writes there (jax/_src/lru_cache.py, cache_key.py): one file per compiled executable,
`<module name>-<64 hex sha256>-cache`, plus `<same key>-atime` (a timestamp JAX rewrites on every hit) only when
`jax_compilation_cache_max_size` is set, which we do not set (it fails every write in a directory filled without
it). Without it JAX updates nothing on a cache hit, so "last used" is the newest of the -cache file's mtime and
atime (and the -atime file's mtime where one exists): the filesystem bumps a file's atime when JAX reads it on a
hit (relatime: on the first read after a write and then at most once a day, enough for an order over days; on a
noatime mount only the write time counts). A server that restarts and hits an entry is what keeps it fresh.

Only names of that form are touched (and counted): a directory holding other files, or XLA's GPU autotune
subdirectory, keeps them. Pruning is safe beside a running JAX process: a file that vanished meanwhile is skipped;
a process that reads an entry while it is deleted warns and recompiles it (JAX's `_cache_read`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import UserError

__all__ = [
    "COMMANDS",
    "DEFAULT_MAX_GB",
    "CacheEntry",
    "PruneResult",
    "add_compile_cache_argument",
    "default_compile_cache",
    "max_gb_bytes",
    "prune_compile_cache",
    "resolve_compile_cache",
    "scan_compile_cache",
    "setup_compile_cache",
]

# Room for many models' bucket grids (on the 2-core CPU dev machine the whole test suite's shared cache held 1,385
# entries in 30 MiB; GPU executables of large models are bigger), small next to the disk of a serving machine.
DEFAULT_MAX_GB = 8.0
_GIB = 1 << 30
_MIB = 1 << 20
# JAX's key is "<module name>-<sha256 hex>" (cache_key.get); its files add "-cache" and, with eviction on, "-atime".
_ENTRY_FILE = re.compile(r"^(?P<key>.+-[0-9a-f]{64})-(?P<kind>cache|atime)$")


@dataclass(frozen=True)
class CacheEntry:
    """One compiled executable: its key, its files (the -cache file first), their total bytes and when it was last
    used (seconds since the epoch: the newest of the -cache file's mtime and atime and the -atime file's mtime)."""

    key: str
    files: tuple[Path, ...]
    nbytes: int
    last_used: float


@dataclass(frozen=True)
class PruneResult:
    """What a prune did: files and entries deleted, their bytes, and the entries and bytes left."""

    removed_files: int
    removed_bytes: int
    kept_bytes: int
    removed_entries: int = 0
    kept_entries: int = 0


def default_compile_cache() -> Path:
    """$XDG_CACHE_HOME/meshserve/xla (~/.cache/meshserve/xla), where vLLM-style servers keep compiled artifacts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshserve" / "xla"


def resolve_compile_cache(value: str | None) -> Path:
    """The directory a --compile-cache value names: itself, or for None $JAX_COMPILATION_CACHE_DIR, else the
    default. ("off" is the caller's to handle.)"""
    if value is None:
        value = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_compile_cache())
    elif not value.strip():  # Path("") is the working directory: a cache (and --clear) would land there unasked
        raise UserError("--compile-cache needs a directory, got an empty string")
    return Path(value).expanduser()


def add_compile_cache_argument(parser: argparse.ArgumentParser) -> None:
    """--compile-cache DIR|off and --compile-cache-max-gb GIB (read by `setup_compile_cache`)."""
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="persistent XLA compilation cache, so a restart skips compiling (default: $JAX_COMPILATION_CACHE_DIR, "
        f"else {default_compile_cache()}; off = none)",
    )
    parser.add_argument(
        "--compile-cache-max-gb",
        type=float,
        default=DEFAULT_MAX_GB,
        metavar="GIB",
        help="at startup, delete the least recently used compile cache entries until the cache holds at most this "
        f"many GiB (default {DEFAULT_MAX_GB:g}; 0 = no limit)",
    )


def max_gb_bytes(max_gb: float, flag: str = "--compile-cache-max-gb") -> int | None:
    """GiB -> bytes; None for 0 (no limit). A negative or NaN value is a UserError naming `flag`."""
    if not max_gb >= 0:  # also refuses NaN
        raise UserError(f"{flag} must be >= 0 (GiB; 0 = no limit), got {max_gb:g}")
    if max_gb == 0 or math.isinf(max_gb):
        return None
    return int(max_gb * _GIB)


def setup_compile_cache(value: str | None, *, max_gb: float = DEFAULT_MAX_GB) -> str | None:
    """Point JAX's persistent compilation cache at `value` (a directory, "off", or None for the default), after
    pruning it to `max_gb` GiB (0 = no limit); returns the directory used. An unusable default directory only warns
    (a cache must never stop a server); an unusable directory the user named is an error. Call before compiling."""
    limit = max_gb_bytes(max_gb)
    import jax

    if value == "off":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    named = value is not None
    path = resolve_compile_cache(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        if named:
            raise UserError(f"--compile-cache {value}: cannot write there: {e.strerror}") from None
        print(f"meshserve: compilation cache off ({path}: {e.strerror})", file=sys.stderr)
        return None
    if limit is not None:
        try:
            result = prune_compile_cache(path, limit)
        except OSError as e:  # the directory itself went away or became unreadable: serve without pruning
            print(f"meshserve: compile cache: not pruned ({path}: {e.strerror})", file=sys.stderr)
        else:
            if result.removed_files:
                print(f"meshserve: compile cache: {_summary(result, path)}", file=sys.stderr)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every step is worth caching: a server compiles dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return str(path)


def scan_compile_cache(path: str | os.PathLike) -> list[CacheEntry]:
    """The JAX cache entries in `path`, least recently used first (ties by key). Only regular files named as JAX
    names them count; a file that vanishes during the scan is skipped. Raises OSError if `path` cannot be listed."""
    groups: dict[str, list[tuple[Path, str, os.stat_result]]] = {}
    with os.scandir(path) as it:
        for item in it:
            match = _ENTRY_FILE.match(item.name)
            if match is None:
                continue
            try:
                if not item.is_file(follow_symlinks=False):
                    continue
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            groups.setdefault(match["key"], []).append((Path(item.path), match["kind"], st))
    entries = []
    for key, files in groups.items():
        # An -atime file is rewritten (mtime = its stamp) on every hit when JAX's own eviction is on; it is never read
        # here, since reading it would bump its atime and make the scan itself count as a use.
        last_used = max(st.st_mtime if kind == "atime" else max(st.st_mtime, st.st_atime) for _, kind, st in files)
        # The -cache file first, so deleting an entry never leaves a -cache without its -atime (JAX's own eviction
        # reads the -atime of every -cache file and would fail on such a leftover).
        files.sort(key=lambda f: f[1] != "cache")
        entries.append(CacheEntry(key, tuple(f for f, _, _ in files), sum(st.st_size for _, _, st in files), last_used))
    entries.sort(key=lambda e: (e.last_used, e.key))
    return entries


def prune_compile_cache(path: str | os.PathLike, max_bytes: int) -> PruneResult:
    """Delete whole entries of the cache in `path`, least recently used first, until they total <= max_bytes.

    Nothing but JAX's entry files is touched. A file that vanished meanwhile (another server pruning at the same
    time) is skipped; an entry whose file cannot be deleted (permissions) keeps its bytes and the next one goes
    instead. Raises OSError only if `path` cannot be listed."""
    entries = scan_compile_cache(path)
    total = sum(e.nbytes for e in entries)
    removed_files = removed_bytes = removed_entries = gone_entries = 0
    for entry in entries:
        if total <= max_bytes:
            break
        removed, stuck = 0, False
        for file in entry.files:
            try:
                size = file.stat(follow_symlinks=False).st_size
                file.unlink()
            except FileNotFoundError:
                continue
            except OSError:  # stop here: never leave a -cache file without its -atime
                stuck = True
                break
            removed += 1
            removed_bytes += size
        removed_files += removed
        removed_entries += removed > 0
        if not stuck:
            gone_entries += 1
            total -= entry.nbytes  # what the scan saw, so the loop ends even if a file changed size meanwhile
    return PruneResult(removed_files, removed_bytes, total, removed_entries, len(entries) - gone_entries)


def _summary(result: PruneResult, path: Path) -> str:
    return (
        f"removed {result.removed_entries} {'entry' if result.removed_entries == 1 else 'entries'} "
        f"({result.removed_bytes / _MIB:.1f} MiB), "
        f"{result.kept_bytes / _MIB:.1f} MiB kept in {path}"
    )


# ---- `meshserve cache` -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show the persistent XLA compilation cache (directory, entries, size), clear it or prune it to a size. "
        "Only JAX's entry files are counted or deleted."
    )
    parser.add_argument(
        "--compile-cache",
        metavar="DIR",
        help=f"the cache directory (default: $JAX_COMPILATION_CACHE_DIR, else {default_compile_cache()})",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--clear", action="store_true", help="delete every entry")
    action.add_argument(
        "--max-gb", type=float, metavar="GIB", help="delete the least recently used entries until at most GIB remain"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    if args.compile_cache == "off":
        raise UserError("--compile-cache takes a directory here, got 'off'")
    if args.max_gb is not None and not args.max_gb > 0:
        raise UserError(f"--max-gb must be > 0 (GiB; --clear deletes everything), got {args.max_gb:g}")
    path = resolve_compile_cache(args.compile_cache)
    if path.exists() and not path.is_dir():
        raise UserError(f"--compile-cache {path}: not a directory")
    limit = 0 if args.clear else None if args.max_gb is None else max_gb_bytes(args.max_gb, "--max-gb")
    result = None
    try:
        if path.is_dir() and limit is not None:
            result = prune_compile_cache(path, limit)
        entries = scan_compile_cache(path) if path.is_dir() else []
    except OSError as e:
        raise UserError(f"--compile-cache {path}: cannot read it: {e.strerror}") from None
    nbytes = sum(e.nbytes for e in entries)
    exists = path.is_dir()
    if args.json:
        out = {"directory": str(path), "exists": exists, "entries": len(entries), "bytes": nbytes}
        if args.clear or args.max_gb is not None:
            removed = result or PruneResult(0, 0, 0)
            out |= {"removed_entries": removed.removed_entries, "removed_bytes": removed.removed_bytes}
        print(json.dumps(out))
        return 0
    if result is not None and result.removed_files:
        print(_summary(result, path))
    # A missing directory is normal before the first compile, and a mistyped --compile-cache: say which it is.
    missing = "" if exists else " (no such directory: nothing cached there yet)"
    print(f"{path}: {len(entries)} entries, {nbytes / _MIB:.1f} MiB{missing}")
    return 0


COMMANDS = {"cache": (add_arguments, run)}
