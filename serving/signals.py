"""Ctrl-C and SIGTERM for the long-running commands (serve, batch-generate, score), handled without raising.

A Python signal handler that raises lands its KeyboardInterrupt at whatever bytecode the main thread runs: during
compiles often JAX's gc callback, which prints and swallows it, or inside `Thread.start()` or a `with` statement's
entry, where the thread it was starting is never joined. A process that then exits while another thread runs an XLA
compile or step aborts (SIGABRT, exit 134) or crashes in interpreter shutdown (SIGSEGV, 139). So the handlers here
only record the signal; the command's main loop looks at `SignalLatch.event` and stops in order. A second signal
ends the process at once (os._exit after flushing): the user asked twice, and whatever is in flight (a drain, the
step being compiled) is what they chose not to wait for. The offline jobs' output survives that as it survives
kill -9 (a rerun resumes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["SignalLatch", "run_interruptibly", "REPEAT_S"]

T = TypeVar("T")
_HANDLED = (signal.SIGINT, signal.SIGTERM)


# A signal this soon after the first is the same request delivered twice, not a second one: GNU timeout (without
# --foreground) signals the child and then its whole process group, and a wrapper that forwards Ctrl-C to a child
# that also got it from the terminal does the same. Seen: `timeout -s INT 5 meshserve batch-generate` took the
# "stopped at once" path.
REPEAT_S = 1.0


class SignalLatch:
    """Records SIGINT/SIGTERM for `command` from construction until `restore()` (or leaving it as a context).

    signals: those received, in order (a repeat within REPEAT_S of the first is not counted); event: set by the
    first. The second ends the process at once with `code`."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.signals: list[int] = []
        self.event = threading.Event()
        self._first_at = 0.0
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED}

    def __enter__(self) -> SignalLatch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """The handlers from before; signals after this are the process's default behaviour again. Once a signal
        was recorded the latch stays instead: the process is stopping, and a repeat of that signal (REPEAT_S) that
        arrived between here and the exit would meet the default handler (a KeyboardInterrupt traceback at exit in
        place of `code`); a later, second signal still ends it at once."""
        if self.signals:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def interrupted(self) -> bool:
        """The first signal was Ctrl-C (SIGINT), rather than SIGTERM."""
        return bool(self.signals) and self.signals[0] == signal.SIGINT

    @property
    def code(self) -> int:
        """The exit status for a stop by signal: 130 for Ctrl-C, 143 for SIGTERM (128 + the signal, as shells do)."""
        return 130 if self.interrupted else 143

    def exit_now(self, message: str) -> None:
        """End the process at once with `code`, after writing `meshserve COMMAND: message` on a line of its own (a
        progress bar may be mid-line). No interpreter shutdown: see the module docstring. Safe inside a signal
        handler: the line goes straight to fd 2 (sys.stderr's buffer may be mid-write on the main thread, where a
        print would raise RuntimeError: reentrant call), and stdout is flushed only if it is free."""
        busy = (RuntimeError, OSError, ValueError)  # mid-write on the interrupted main thread, or closed
        with contextlib.suppress(*busy):
            sys.stderr.flush()  # what the progress bar wrote goes before the message
        os.write(2, f"\nmeshserve {self.command}: {message}\n".encode())
        with contextlib.suppress(*busy):
            sys.stdout.flush()
        os._exit(self.code)

    def _on_signal(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.signals and now - self._first_at < REPEAT_S:
            return  # the first signal delivered twice (see REPEAT_S)
        if not self.signals:
            self._first_at = now
        self.signals.append(signum)
        self.event.set()
        if len(self.signals) > 1:
            self.exit_now("second signal: stopped at once")


def run_interruptibly(work: Callable[[], T], latch: SignalLatch, terminated: str) -> T:
    """work() (loading and the first compiles: minutes on a large model) on a daemon worker thread while this thread
    waits; its result, or its exception re-raised here (a UserError still exits 2 in one line).

    A signal before work returns ends the process at once (latch.exit_now): Ctrl-C 130 ("interrupted"), SIGTERM 143
    (`terminated`). The worker may be inside an XLA compile, which cannot be interrupted and must not meet
    interpreter shutdown. Nothing is on disk yet to clean up."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as e:
            result["error"] = e

    worker = threading.Thread(target=run, name=f"meshserve-{latch.command}-load", daemon=True)
    worker.start()
    while worker.is_alive() and not latch.event.is_set():
        worker.join(0.1)
    if latch.signals:
        latch.exit_now("interrupted" if latch.interrupted else terminated)
    if "error" in result:
        raise result["error"]
    return result["value"]
