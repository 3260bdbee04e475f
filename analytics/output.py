"""Where the analytics and bench commands write.

Output paths are checked before any work: `meshserve analyze | calibrate | bench` refuse a path they could not write
(a directory, a missing or read-only directory, an image format matplotlib cannot draw) before a sweep or a
measurement, so a typo costs nothing and writes nothing. `quiet_broken_pipe` lets a reader such as `| head -2` close
stdout early without a traceback. Files are written atomically (`save_figure`, `write_atomic`: a temporary file
beside the target, renamed over it), so a run cut off or failing mid-write leaves the old file or none, never half
an image or half a JSON array.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from meshserve.errors import UserError

__all__ = [
    "check_output_path",
    "write_probe",
    "check_image_path",
    "image_formats",
    "quiet_broken_pipe",
    "save_figure",
    "write_atomic",
    "EXIT_BROKEN_PIPE",
]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


def quiet_broken_pipe(run: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's run(args): when the reader of stdout has closed it (`| head -2`), stop quietly with exit
    status 141 instead of a BrokenPipeError traceback. stdout is pointed at /dev/null so that the interpreter's own
    flush at exit does not raise again."""

    @functools.wraps(run)
    def wrapped(*args, **kwargs) -> int:
        try:
            code = run(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass  # stdout is not a file descriptor (captured in a test): nothing left to flush into a pipe
            return EXIT_BROKEN_PIPE

    return wrapped


def check_output_path(flag: str, path: str | Path | None, *, create_parent: bool = False) -> None:
    """Raise UserError naming `flag` when `path` cannot be written as a file.

    create_parent: the writer makes missing parent directories itself (calibrate's chip file), so only a parent
    that exists as a file, or an existing directory that is not writable, is refused.
    """
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory, expected a file name")
    parent = target.absolute().parent
    existing = parent
    while create_parent and not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest ancestor that exists is where the writer starts creating
    if not existing.is_dir():
        what = "is not a directory" if existing.exists() else "does not exist"
        raise UserError(f"{flag} {path}: directory {existing} {what}")
    if not os.access(existing, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")
    why = write_probe(target if target.absolute().parent == existing else existing / f".meshserve-probe-{os.getpid()}")
    if why is not None:
        raise UserError(f"{flag} {path}: cannot be written ({why})")


def write_probe(path: Path) -> str | None:
    """Why a file cannot be written at `path`, found by trying (None when it can): an existing file is opened for
    append and left as it was; a new one is created and removed at once. os.access says yes to root everywhere,
    /proc and read-only bind mounts included (containers often run as root), so only trying tells."""
    try:
        if path.exists():
            open(path, "a").close()  # noqa: SIM115
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            os.unlink(path)
    except OSError as e:
        return e.strerror or str(e)
    return None


def image_formats() -> list[str]:
    """File extensions matplotlib's Agg backend writes (png, svg, pdf, ...; the list depends on its version)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


def check_image_path(flag: str, path: str | Path | None) -> None:
    """check_output_path, and the extension must name an image format matplotlib writes (it picks the format from
    the extension and fails only after the figure is drawn)."""
    if path is None:
        return
    check_output_path(flag, path)
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = image_formats()
    if suffix not in formats:
        got = f"extension .{suffix}" if suffix else "no extension"
        raise UserError(f"{flag} {path}: {got}; use an image format matplotlib writes: {', '.join(formats)}")


def _temporary(path: Path) -> Path:
    """A hidden name beside `path` (same directory, so the rename is atomic), unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed over it; the temporary file never outlives a failure."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """fig.savefig into `path`, atomically. The format comes from path's extension (as savefig would pick it), given
    explicitly since the temporary file's name does not end in it."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or None, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
