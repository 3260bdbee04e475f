"""Signals during the long-running commands (serving/signals.py): Ctrl-C or SIGTERM in the middle of batch-generate
stops it in order (whole lines only, exit 130 or 143, a rerun completes the job; the same signal delivered twice is
one), and a second signal ends a draining server at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshserve.serving.client import Client
from meshserve.serving.signals import REPEAT_S
from test_serving_support import GRID, SLOW_DECODE, ServerProcess, env, make_checkpoint, meshserve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def _watched(marker: Path, signals: int) -> str:
    """SLOW_DECODE's CLI, its SignalLatch watched: each signal its handler is called for (a repeat it ignores too)
    is appended to `marker`, and the handlers are restored only once `signals` were handled (10 s at most). The test
    sends a repeat only after the first was handled (two in a row before Python runs its handler are one call), and
    it still meets the latch however soon the job stops (the stop takes from about nothing to a 0.1 s poll plus a
    step; a signal after the restore meets the default handler: a KeyboardInterrupt at exit, not exit 130)."""
    return (
        f"""
import time
from meshserve.serving import signals
on_signal, restore, seen = signals.SignalLatch._on_signal, signals.SignalLatch.restore, []
def _on_signal(self, signum, frame):
    seen.append(signum)
    with open({str(marker)!r}, "a") as f:
        f.write(f"{{signum}}\\n")
    on_signal(self, signum, frame)
def _restore(self):
    end = time.monotonic() + 10
    while len(seen) < {signals} and time.monotonic() < end:
        time.sleep(0.01)
    restore(self)
signals.SignalLatch._on_signal, signals.SignalLatch.restore = _on_signal, _restore
"""
        + SLOW_DECODE
    )


@pytest.mark.parametrize(
    "sig,code,word,times",
    [(signal.SIGINT, 130, "interrupted", 1), (signal.SIGTERM, 143, "terminated", 1), (signal.SIGINT, 130,
     "interrupted", 2)],  # twice: one Ctrl-C delivered twice (GNU timeout signals the child, then its group)
)  # fmt: skip
def test_a_signal_mid_job_keeps_whole_lines_and_a_rerun_completes_it(checkpoint, tmp_path, sig, code, word, times):
    n = 96
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "x" * (1 + i % 9), "max_new_tokens": 16,
                                       "ignore_eos": True}) + "\n" for i in range(n)))  # fmt: skip
    args = ["batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint), *GRID, "--json"]
    marker = tmp_path / "handled"
    proc = subprocess.Popen([sys.executable, "-c", _watched(marker, times), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())  # fmt: skip
    deadline = time.monotonic() + 240
    while (not out.exists() or out.read_bytes().count(b"\n") < 8) and proc.poll() is None:
        assert time.monotonic() < deadline, "no output lines in time"
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    for i in range(times):
        proc.send_signal(sig)
        # The next one only after this one was handled: Python folds two in a row into one call of its handler.
        handled = time.monotonic() + 30
        while not marker.exists() or len(marker.read_text().split()) <= i:
            assert time.monotonic() < handled, "the signal was not handled"
            time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    written = _ids(out)  # every line whole: the job stopped between lines, not in the middle of one
    assert 8 <= len(written) < n and out.read_bytes().endswith(b"\n")
    assert f"meshserve batch-generate: {word} after {len(written)} lines; rerun the same command to continue" in stderr
    assert "Traceback" not in stderr and "second signal" not in stderr
    summary = json.loads(stdout.splitlines()[-1])  # --json: what was written, marked interrupted
    assert summary["interrupted"] is True and summary["done"] == len(written)

    again = subprocess.run(meshserve(*args), capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["skipped"] == len(written) and summary["done"] == n - len(written)
    assert summary["interrupted"] is False
    assert sorted(_ids(out)) == sorted(f"r{i}" for i in range(n))  # each id exactly once


def test_a_second_signal_while_draining_stops_the_server_at_once(checkpoint):
    server = ServerProcess(checkpoint, "--grace", "120", python_code=SLOW_DECODE)
    try:
        with Client(server.target) as client:
            client.wait_ready()
            call = client.stream_call([1, 2, 3], max_new_tokens=120, ignore_eos=True)  # >= 6 s of decoding
            first = next(iter(call))
            assert len(first.tokens) >= 1
            server.proc.send_signal(signal.SIGTERM)  # drains: the stream may run on for up to --grace 120 s
            deadline = time.monotonic() + 30
            while "draining" not in server.output():
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.05)
            # Within REPEAT_S of the first a signal counts as the first delivered twice. The server handled the first
            # before it printed "draining": REPEAT_S from now is past that on any machine (timed from sending it, the
            # second could fall within REPEAT_S of a first that a loaded server handled late, and count as a repeat).
            time.sleep(REPEAT_S + 0.1)
            start = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            assert server.proc.wait(10) == 143  # the first signal's code: SIGTERM
            assert time.monotonic() - start < 5
            call.cancel()
        text = server.output()
        assert "draining (a second signal stops at once)" in text
        assert "meshserve serve: second signal: stopped at once" in text and "Traceback" not in text
        assert "stopped (" not in text  # not the orderly end of a drain
    finally:
        server.close()
