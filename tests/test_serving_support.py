"""Support for the serving tests (no tests here): a tiny checkpoint, a `meshserve serve` subprocess on a free port,
and the grid of buckets every serving test compiles (small and identical, so the persistent XLA cache is shared)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# One small bucket grid for every serving test process: prompt buckets 32 and 128 (the tiny context), decode
# buckets 2 and 8, 8 slots. Identical grids hit the same persistent compilation cache entries.
GRID = ["--max-batch", "8", "--length-buckets", "32", "--decode-buckets", "2", "--objective", "latency"]
CACHE_DIR = Path(tempfile.gettempdir()) / f"meshserve-test-xla-cache-{os.getuid()}"


def env() -> dict[str, str]:
    """The test process's environment (8 CPU devices from conftest) plus a shared persistent compilation cache."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1",
    }


def make_checkpoint(path: Path) -> Path:
    """The tiny preset with random f32 weights (seed 0), ByteTokenizer (no tokenizer file)."""
    import jax
    from meshserve.model.checkpoint import save_checkpoint
    from meshserve.model.config import get_config
    from meshserve.model.params import init_params

    config = get_config("tiny")
    return save_checkpoint(path, config, init_params(config, jax.random.key(0)), "f32")


def meshserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshserve.serving.cli", *args]


def scrape_metrics(port: int) -> dict[str, float]:
    """A server's Prometheus metrics (--metrics-port): {'name{labels as exposed}': value}, e.g.
    'meshserve_requests_total{code="OK",method="Generate"}' (labels as prometheus-client writes them: sorted)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class ServerProcess:
    """`meshserve serve` on a free port; `.target` once it prints `listening on`."""

    def __init__(self, checkpoint: Path, *extra: str, timeout: float = 240.0, python_code: str | None = None):
        """`python_code`, when given, runs instead of `python -m meshserve.serving.cli` (with the same arguments in
        sys.argv[1:]): a test can change something in the process (inject a fault) before calling the CLI."""
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        cmd = meshserve("serve", "--checkpoint", str(checkpoint), "--port", "0", *GRID, *extra)
        if python_code is not None:
            cmd = [sys.executable, "-c", python_code, *cmd[3:]]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            m = re.search(r"listening on ([\d.]+):(\d+)", text)
            if m:
                self.target = f"{m.group(1)}:{m.group(2)}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server not ready in {timeout} s:\n{Path(self.log.name).read_text()}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    @property
    def http(self) -> str:
        """The OpenAI-compatible API's base URL (serve --http-port), e.g. http://127.0.0.1:8000/v1."""
        m = re.search(r"OpenAI-compatible API on (https?://[\d.]+:\d+/v1)", self.output())
        assert m, f"no HTTP API announced:\n{self.output()}"
        return m.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def slow_decode(seconds: float = 0.05, while_exists: Path | None = None, score: bool = False) -> str:
    """Python code for ServerProcess(python_code=...) or `python -c CODE ARGS...`: the real CLI, but every decode step
    (and, with `score`, every Score chunk) takes >= `seconds` more (a stand-in for a big model), so a stream or a job
    lasts long enough to be interrupted or drained in its middle on any machine. With `while_exists`, only while that
    file exists: a test turns the slowdown on (see `slowed`) for just the part that must outlast a client's action,
    and the rest of its module runs at full speed."""
    check = f"os.path.exists({str(while_exists)!r})" if while_exists is not None else "True"
    patch_score = (
        "fast_score = engine.Engine.score_chunk\n"
        "def score_chunk(self, items):\n"
        f"    if {check}:\n"
        f"        time.sleep({seconds!r})\n"
        "    return fast_score(self, items)\n"
        "engine.Engine.score_chunk = score_chunk\n"
        if score
        else ""
    )
    return (
        "import os, sys, time\n"
        "from meshserve.serving import engine\n"
        "fast = engine.Engine.decode_async\n"
        "def decode_async(self, batch, context=None):\n"
        f"    if {check}:\n"
        f"        time.sleep({seconds!r})\n"
        "    return fast(self, batch, context)\n"
        "engine.Engine.decode_async = decode_async\n"
        f"{patch_score}"
        "from meshserve.serving.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


@contextlib.contextmanager
def slowed(flag: Path) -> Iterator[None]:
    """A server started with slow_decode(while_exists=flag) runs slowed inside this block, at full speed after."""
    flag.touch()
    try:
        yield
    finally:
        flag.unlink(missing_ok=True)


# Every decode step takes >= 50 ms more, always: for a server or job that must be slow from its first step.
SLOW_DECODE = slow_decode(0.05)
