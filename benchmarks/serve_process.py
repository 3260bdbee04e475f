"""`meshserve serve` in a subprocess, for the benchmarks that measure a real server over gRPC (chat_prefix.py,
cold_start.py): start it with the caller's flags, read its log for `listening on`, scrape its Prometheus metrics,
stop it with SIGTERM (it drains), and never leave it running when the caller fails or is interrupted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["ServeProcess", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the metrics port must be named before the server binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m meshserve.serving.cli serve FLAGS --port 0 --metrics-port P`; `.target` once it listens.

    started: time.monotonic() at launch, so callers can time the start itself (`.listening` is when the log first
    showed `listening on`, as seen by polling every `poll` seconds)."""

    def __init__(self, flags: list[str], name: str, start_timeout: float = 900.0, poll: float = 0.05) -> None:
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "meshserve.serving.cli", "serve", *flags, "--port", "0",
               "--metrics-port", str(self.metrics_port)]  # fmt: skip
        self.name, self.poll = name, poll
        self.log = Path(tempfile.gettempdir()) / f"meshserve_bench_{name}_{os.getpid()}.log"
        print(f"{name}: starting {' '.join(cmd[3:])} (log {self.log})", file=sys.stderr)
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            # The caller's environment as is: a test's compilation cache directory reaches the server.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            m = self.wait_for(r"listening on ([\d.]+):(\d+)", self.started + start_timeout)
        except BaseException:  # Ctrl-C while it compiles, or it never listened: no server left behind
            self.stop()
            raise
        self.listening = time.monotonic()
        self.target = f"{m.group(1)}:{m.group(2)}"

    def text(self) -> str:
        """The log so far (progress bars' carriage returns as newlines)."""
        return self.log.read_text().replace("\r", "\n")

    def wait_for(self, pattern: str, deadline: float) -> re.Match:
        """The first match of `pattern` in the log, polling until `deadline` (time.monotonic()); RuntimeError with
        the log's tail if the server exits or the deadline passes first."""
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(line for line in self.text().splitlines()[-20:] if line.strip())
                raise RuntimeError(f"{self.name}: no {pattern!r} in the server log (exit {self.proc.poll()}):\n{tail}")
            time.sleep(self.poll)

    def scrape(self, names: tuple[str, ...]) -> dict[str, float]:
        """Those metrics from /metrics (NaN for one the server does not export)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for name in names:
            m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> None:
        """SIGTERM (the server drains and exits), then wait; kill only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
