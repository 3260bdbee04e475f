"""The offline jobs' path checks, run before any model is loaded or any file written: IN readable, OUT and the
errors file creatable, and no two of IN, OUT, the errors file and OUT's settings record one file (a job would read
its own results as input, or rewrite its input). serving/jsonl_jobs.py re-exports check_paths and OfflineError."""

from __future__ import annotations

import os
from pathlib import Path

from meshserve.analytics.output import write_probe
from meshserve.errors import UserError
from meshserve.serving.job_settings import settings_path

__all__ = ["OfflineError", "check_paths"]


class OfflineError(UserError):
    """A job that cannot start (missing input, output is a directory, ...)."""


def _check_writable(path: Path, what: str) -> None:
    """A file we will create or append to: its folder must exist and be writable (checked before any loading, so
    a typo in a path never costs a model load and compile, and never leaves the other file created)."""
    if path.is_dir():
        raise OfflineError(f"{what} {path} is a directory")
    folder = path.parent
    if not folder.exists():
        raise OfflineError(f"{what} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OfflineError(f"{what} {path}: {folder} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OfflineError(f"{what} {path} is not writable")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OfflineError(f"{what} {path}: folder {folder} is not writable")
    why = write_probe(path)  # os.access says yes to root everywhere: only trying tells
    if why is not None:
        raise OfflineError(f"{what} {path} cannot be written: {why}")


def check_paths(in_path: Path, out_path: Path, errors_path: Path) -> None:
    """Refuse paths that cannot work or would destroy data, before anything is loaded or written: a missing or
    unreadable IN, OUT or the errors file in a missing or read-only folder, OUT or the errors file (rewritten each
    run) on top of IN, the errors file on top of OUT, or IN or the errors file on top of OUT's settings record
    (serving/job_settings.py). Compared after resolving, so `./in.jsonl` and
    `d/../in.jsonl` count as IN, and by inode, so a hard link to IN does too."""
    if in_path.is_dir():
        raise OfflineError(f"input {in_path} is a directory, not a JSONL file")
    if not in_path.exists():  # a pipe (/dev/stdin, <(...)) is fine: IN is read once, before anything runs
        raise OfflineError(f"input file not found: {in_path}")
    if not os.access(in_path, os.R_OK):
        raise OfflineError(f"input {in_path} is not readable")
    if out_path.exists() and not out_path.is_dir() and not out_path.is_file():
        # /dev/stdout, a pipe: resuming reads OUT back (a read from a pipe waits forever), and the settings record
        # would be created beside it (in /dev).
        raise OfflineError(f"output {out_path} is not a regular file: OUT is read back to resume a job, so it must "
                           "be a file")  # fmt: skip
    _check_writable(out_path, "output")
    _check_writable(errors_path, "--errors")
    src, out, err, record = in_path, out_path, errors_path, settings_path(out_path)
    if _same_file(out, src):
        raise OfflineError("output must be a different file from the input")
    if _same_file(err, src):
        raise OfflineError(f"--errors must be a different file from the input ({in_path})")
    if _same_file(err, out):
        raise OfflineError(f"--errors must be a different file from the output ({out_path})")
    if _same_file(record, src) or _same_file(record, err):  # the record is replaced whole on a fresh job
        what = "the input" if _same_file(record, src) else "--errors"
        raise OfflineError(f"{what} must not be the output's settings record {settings_path(out_path)}")


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same path once resolved (`./in.jsonl`, `d/../in.jsonl`, a symbolic link), or,
    when both exist, the same inode (a hard link: OUT would read IN's lines as results and append to IN)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
