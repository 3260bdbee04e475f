"""Shared by the CLI tests (no tests here): a module-scoped tiny checkpoint fixture and an in-process `meshserve`
run that returns the exit code and the captured output."""

from __future__ import annotations

import jax
import pytest
from meshserve.model.checkpoint import save_checkpoint
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.serving.cli import main

__all__ = ["checkpoint_fixture", "free_port", "run_cli"]


def checkpoint_fixture(seed: int = 0, **overrides):
    """A module-scoped fixture named `checkpoint`: the path (str) of an f32 checkpoint of the tiny preset with
    `overrides`, its weights drawn from `seed`. Assign it in a test module: `checkpoint = checkpoint_fixture()`."""

    @pytest.fixture(scope="module", name="checkpoint")
    def checkpoint(tmp_path_factory) -> str:
        config = get_config("tiny", **overrides)
        path = tmp_path_factory.mktemp("ck") / "tiny"
        save_checkpoint(path, config, init_params(config, jax.random.key(seed)), "f32")
        return str(path)

    return checkpoint


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`meshserve *argv` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server that needs the number before it binds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
