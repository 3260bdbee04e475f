"""meshserve.progress: a log file (stderr not a terminal) gets plain progress lines, with the values a bar shows
after its counts and the command's own lines between them; a disabled bar (--json) writes nothing."""

import io
import sys

from meshserve.progress import LogProgress, progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_postfix_and_own_lines_go_in_the_log_as_plain_lines():
    """Before: demo training and bench drew tqdm's bar into a log, postfix and all, redrawn with carriage returns."""
    clock, log = _Clock(), io.StringIO()
    with LogProgress("train", "step", total=20, file=log, clock=clock) as bar:
        for step in range(20):
            clock.now += 1.0
            bar.set_postfix(loss=f"{2.0 - step / 10:.3f}")
            bar.update()
            if step == 4:
                bar.write("step 5: validation ppl 9.00")
    assert log.getvalue() == (
        "train: 0/20 step (0%), 0 s\n"  # the start: no rate yet
        "step 5: validation ppl 9.00\n"
        "train: 10/20 step (50%), 10 s, 1.0 step/s, loss=1.100\n"
        "train: 20/20 step (100%), 20 s, 1.0 step/s, loss=0.100\n"
    )


def test_progress_picks_lines_off_a_terminal_and_nothing_when_disabled(capsys):
    assert not sys.stderr.isatty()  # pytest captures stderr: as a log file
    with progress("compiling", "step", 3, leave=False) as bar:  # tqdm-only arguments are dropped for a log
        assert isinstance(bar, LogProgress)
        bar.update(3)
    with progress("pareto sweep", "model", 2, disable=True) as quiet:
        quiet.update(2)
        quiet.set_postfix(x=1)
    lines = capsys.readouterr().err.splitlines()  # the disabled sweep wrote nothing
    assert len(lines) == 2 and lines[0] == "compiling: 0/3 step (0%), 0 s"
    assert lines[1].startswith("compiling: 3/3 step (100%), 0 s")  # then the rate, a real clock's
