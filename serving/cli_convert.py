"""`meshserve convert`: a Hugging Face directory -> a meshserve checkpoint, or change a checkpoint's dtype.

Hugging Face `model_type`s: llama, mistral, qwen2, qwen3, gemma3_text, gemma3 and falcon (model/hf_import.py says
what each may hold). The directory's tokenizer (tokenizer.json or tokenizer.model) is required unless --no-tokenizer.

  meshserve convert --from-hf DIR --out CKPT [--weights f32|bf16|int8]
  meshserve convert --checkpoint CKPT --out CKPT2 --weights int8      (quantise at convert time)

Everything is read and checked before anything is written; the checkpoint is written to a temporary
sibling directory and renamed at the end (model/checkpoint.py), so a failure leaves nothing at --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from meshserve.errors import UserError

__all__ = ["COMMANDS", "ConvertError"]


class ConvertError(UserError):
    """Conflicting or missing convert options (the message names the flag)."""


EXAMPLES = """examples:
  meshserve convert --from-hf ./Mistral-7B-v0.3 --out ./mistral-7b-ms
  meshserve convert --from-hf ./falcon-7b --out ./falcon-7b-ms --weights bf16
  meshserve convert --checkpoint ./falcon-7b-ms --out ./falcon-7b-int8 --weights int8
  meshserve generate --checkpoint ./falcon-7b-int8 "The capital of France is"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf",
        metavar="DIR",
        help="a Hugging Face Llama, Mistral, Qwen2, Qwen3, Gemma 3 or Falcon directory: config.json + *.safetensors "
        "(+ tokenizer)",
    )
    source.add_argument("--checkpoint", metavar="CKPT", help="a meshserve checkpoint to re-store in another dtype")
    parser.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint directory to write")
    parser.add_argument(
        "--weights",
        choices=["f32", "bf16", "int8"],
        help="stored weight dtype (int8 quantises matmul weights per output channel). Default with --from-hf: "
        "f32 if every tensor is float32, else bf16; required with --checkpoint",
    )
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="with --from-hf: write no tokenizer and no chat template (needed for a directory without tokenizer.json "
        "or tokenizer.model, which is refused otherwise: text would be encoded as raw bytes, not the model's tokens); "
        "prompts must then be token ids (generate --tokens)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print one JSON line describing the result")


def _check_out(args: argparse.Namespace) -> Path:
    for flag, value in (("--from-hf", args.from_hf), ("--checkpoint", args.checkpoint), ("--out", args.out)):
        if value is not None and not value.strip():  # Path("") is the current directory: never what was meant
            raise ConvertError(f"{flag} is empty: give a directory")
    out = Path(args.out)
    # Refuse a parent that cannot hold a directory before reading any weights (a file, or a missing root).
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ConvertError(f"--out {out}: {parent} is not a directory")
    if out.exists() and not args.force:
        raise ConvertError(f"--out {out} already exists (pass --force to replace it)")
    for flag, source in (("--checkpoint", args.checkpoint), ("--from-hf", args.from_hf)):
        if source and out.resolve() == Path(source).resolve():
            raise ConvertError(f"--out must differ from {flag} (the source is read while the output is written)")
    if out.exists() and not (out / "meshserve.json").is_file():
        # --force replaces an old checkpoint only, never a file or another directory (e.g. the HF source).
        raise ConvertError(
            f"--out {out} exists and is not a meshserve checkpoint (no meshserve.json); not replacing it"
        )
    return out


def run(args: argparse.Namespace) -> int:
    out = _check_out(args)
    if args.checkpoint and not args.weights:
        raise ConvertError("--weights (f32, bf16 or int8) is required with --checkpoint")
    if args.checkpoint and args.no_tokenizer:
        raise ConvertError("--no-tokenizer applies with --from-hf only (a checkpoint keeps its tokenizer)")
    start = time.perf_counter()

    from meshserve.model.checkpoint import load_checkpoint, save_checkpoint
    from meshserve.model.params import cast_params, param_count

    if args.from_hf:
        from meshserve.model.hf_import import load_hf

        imported = load_hf(args.from_hf, args.weights, progress=True, require_tokenizer=not args.no_tokenizer)
        config, params, tokenizer = imported.config, imported.params, imported.tokenizer_file
        chat = imported.chat  # the Hugging Face chat template, kept as chat_template.jinja
        if args.no_tokenizer:  # a chat template renders text, which only the model's tokenizer encodes right
            tokenizer = chat = None
        source, source_weights = str(Path(args.from_hf)), imported.source_dtype
        weights = args.weights or imported.default_weights
    else:
        info, params = load_checkpoint(args.checkpoint)
        config, tokenizer = info.config, info.tokenizer_path
        chat = info.chat
        source, source_weights, weights = str(info.path), info.weights, args.weights
    # --from-hf params are already read as f32 or bf16 (int8 is quantised here, from f32 unless the source is bf16).
    if weights == "int8" or (args.checkpoint and weights != source_weights):
        print(f"casting to {weights}", file=sys.stderr)
        params = cast_params(config, params, weights)
    print(f"writing {out}", file=sys.stderr)
    path = save_checkpoint(out, config, params, weights, tokenizer, overwrite=args.force, chat=chat)
    summary = {
        "out": str(path),
        "source": source,
        "model": config.name,
        "params": param_count(config),
        "weights": weights,
        "source_weights": source_weights,
        "tokenizer": tokenizer.name if tokenizer else None,
        "chat_template": chat is not None,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {path}: {config.name}, {summary['params']:,} parameters, {weights} weights"
            f"{', tokenizer ' + summary['tokenizer'] if tokenizer else ''} ({summary['seconds']} s)"
        )
    return 0


COMMANDS = {"convert": (add_arguments, run)}
