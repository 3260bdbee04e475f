"""QA of the int8 matmul modes (rowsum; int8 activations in offline resumes): what a user reads and gets from the
CLI matches what it does. score / batch-generate --help name the int8 activations setting the resume compares
(serving/job_settings.COMPARED["int8_activations"]), and an in-process `meshserve generate` refuses a bad
MESHSERVE_INT8_MATMUL in one line whatever the weights, as bench, serve, score and batch-generate do."""

import re

import pytest
from cli_helpers import run_cli
from meshserve.serving.cli import main


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


@pytest.mark.parametrize("command", ["score", "batch-generate"])
def test_offline_help_names_the_int8_activations_setting_a_resume_compares(capsys, command):
    text = _help(capsys, command)
    flag = re.search(r"--allow-changed-settings resume OUT even when (.*?) differ", text)
    assert flag is not None, text
    assert "MESHSERVE_INT8_MATMUL=w8a8" in flag.group(1)  # the flag's own help lists every compared setting
    record = re.search(r"How OUT was made is recorded beside it(.*?)A rerun that would append", text)
    assert record is not None and "MESHSERVE_INT8_MATMUL=w8a8" in record.group(1)  # and so does the epilog


def test_generate_in_process_refuses_a_bad_int8_matmul_mode_whatever_the_weights(capsys, monkeypatch):
    monkeypatch.setenv("MESHSERVE_INT8_MATMUL", "bogus")
    code, out, err = run_cli(capsys, "generate", "--model", "tiny", "--max-new-tokens", "2", "hi")
    assert code == 2 and out == ""
    assert "MESHSERVE_INT8_MATMUL must be one of xla, pallas, w8a8, rowsum, got 'bogus'" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback, before the model loads
