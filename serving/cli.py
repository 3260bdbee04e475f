"""The `meshserve` command: a thin dispatcher over subcommands that live beside the code they drive.

Each subcommand module exposes `COMMANDS = {name: (add_arguments, run)}`. Only the module of the
command being run is imported, so `meshserve analyze` starts without touching JAX.
User mistakes (`meshserve.errors.UserError`) print one line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from meshserve.errors import UserError

__all__ = ["main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("meshserve.serving.cli_generate", "generate text in process (or from a server with --server)"),
    "convert": (
        "meshserve.serving.cli_convert",
        "convert a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Falcon) or change dtype",
    ),
    "serve": ("meshserve.serving.cli_serve", "run the inference server: gRPC, and OpenAI's HTTP API with --http-port"),
    "score": ("meshserve.serving.cli_offline", "score continuations in a JSONL file (offline, in process)"),
    "batch-generate": ("meshserve.serving.cli_offline", "generate for every line of a JSONL file (offline)"),
    "analyze": ("meshserve.analytics.cli", "what-if: latency, MFU and cost per layout and batch"),
    "memory": ("meshserve.analytics.cli", "memory needed for inference or fine-tuning"),
    "plan": ("meshserve.analytics.cli", "the layout plan the server would use"),
    "calibrate": ("meshserve.analytics.cli", "measure this machine and store it as the `local` chip"),
    "speculate": (
        "meshserve.analytics.cli_speculate",
        "what-if: would speculative decoding pay (verify vs decode step)",
    ),
    "bench": ("meshserve.serving.cli_bench", "benchmark prefill and decode (speed, bandwidth, MFU)"),
    "cache": ("meshserve.serving.compile_cache", "show, clear or prune the persistent XLA compile cache"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve",
        description="Inference for PaLM-style decoder LLMs on device meshes (Pope et al., 2022).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`meshserve COMMAND --help` shows a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    from meshserve import __version__

    parser.add_argument("--version", action="version", version=f"meshserve {__version__}")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """A command's parser whose flag errors read as every other user error: one line naming the flag, exit 2
    (argparse's default prints the whole usage block first, which buries the error under dozens of flags)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])  # prints help / version, or the error for an unknown flag
        return 2
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"meshserve {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    add_arguments, run = module.COMMANDS[name]
    parser = _OneLineParser(prog=f"meshserve {name}", description=help_)
    add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
    except UserError as e:
        print(f"meshserve {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshserve {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`meshserve ... | head`): stop quietly with the usual status of SIGPIPE. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
