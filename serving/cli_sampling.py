"""The sampling flags of `meshserve generate` (in process and with --server), and the --logit-bias ID:BIAS parser
(comma-separated token ids go through the analytics flags' list parser, `cli_helpers.ints`). Ranges are checked where the values are used (SamplingParams, the
model's vocabulary), so every entry point reports them alike."""

from __future__ import annotations

import argparse
import json

from meshserve.analytics.cli_helpers import ints

__all__ = ["add_sampling_arguments", "add_chat_arguments", "chat_messages", "N_MAX_LOCAL"]

# --n in process: every sample is a row of the one batch (prompts x n), as batch-generate's line limit.
N_MAX_LOCAL = 64


def _logit_bias(text: str) -> dict[int, float]:
    """--logit-bias ID:BIAS,ID:BIAS -> {id: bias} (ranges are SamplingParams' checks; the vocabulary the model's)."""
    out: dict[int, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        token, sep, bias = item.partition(":")
        try:
            if not sep:
                raise ValueError
            token_id, value = int(token), float(bias)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes comma-separated TOKEN_ID:BIAS pairs, e.g. 123:-100,456:5, got {item!r}"
            ) from None
        if token_id in out:
            raise argparse.ArgumentTypeError(f"token id {token_id} is given more than once")
        out[token_id] = value
    return out


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """--chat and --system: PROMPTs as user messages through the model's chat template (model/chat.py)."""
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat each PROMPT as one user message of its own conversation, rendered by the model's chat template "
        "(a checkpoint converted from a Hugging Face directory that has one) with the assistant's turn opened; "
        "prints the reply only (default: PROMPTs are plain text)",
    )
    parser.add_argument(
        "--system",
        metavar="TEXT",
        help="with --chat: a system message before each PROMPT's user message (default: none)",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        type=_template_kwargs,
        help="with --chat: more variables for the chat template, a JSON object, e.g. '{\"enable_thinking\": false}' "
        "for Qwen3 (vLLM's chat_template_kwargs; default: none)",
    )


def _template_kwargs(text: str) -> dict:
    """--chat-template-kwargs' value: a JSON object of template variable names (argparse reports a ValueError)."""
    from meshserve.model.chat import check_template_kwargs

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    try:
        return check_template_kwargs(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def chat_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    """One PROMPT of `generate --chat` as its conversation: [system,] user."""
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": prompt}]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by in-process and client-side generation."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default 0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed in [0, 2**63): same seed, same output (default 0, also with --server; a gRPC request "
        "that sets no seed gets a random one)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide (multiply if negative) the logits of tokens already in the prompt or output (default 1 = off)",
    )
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract from tokens already generated, in [-2, 2] (default 0 = off)",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtract per occurrence in the output, in [-2, 2] (default 0 = off)",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min_p x the top probability, in [0, 1] (default 0 = off)",
    )
    parser.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        metavar="N",
        help="also show the N most likely tokens at each step, in [0, 20] (one line per token; in --json too; default 0)",
    )
    parser.add_argument(
        "--logit-bias",
        type=_logit_bias,
        default={},
        metavar="ID:BIAS,...",
        help="add BIAS in [-100, 100] to token ID's logit before sampling (greedy too), e.g. 123:-100,456:5: -100 "
        "all but bans a token, +100 all but forces it; at most 64 entries, --min-tokens' included (default none)",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=0,
        metavar="N",
        help="end-of-sequence and --stop-token-ids cannot be sampled, nor --stop end the text, before N tokens are "
        "generated; each such id takes one of --logit-bias's 64 entries; at most --max-new-tokens (default 0 = off)",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token (default: stop)"
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="a string that ends the text, cut off before it; repeat for several (default none). In process the "
        "model still runs --max-new-tokens steps; the text and tokens end at the stop",
    )
    parser.add_argument(
        "--include-stop-str",
        action="store_true",
        help="with --stop: the text ends with the stop string instead of just before it (vLLM's "
        "include_stop_str_in_output; default: before it)",
    )
    parser.add_argument(
        "--stop-token-ids",
        type=ints,
        default=[],
        metavar="7,9",
        help="more token ids that end generation, e.g. a chat template's end-of-turn token (default none)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=1,
        metavar="K",
        help="samples per prompt, sample i with seed + i (use --temperature > 0, or all K are the same): with "
        f"--server up to the server's max_n (16 by default), in process up to {N_MAX_LOCAL}, each a row of the "
        "batch; each sample printed under a '--- sample i ---' header (default 1)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per prompt, in input order: {"tokens", "text", "logprobs", "finish_reason"}; with --n K '
        '> 1: {"choices": [{"index", "tokens", "text", "logprobs", "finish_reason"}, ...]} (default: text)',
    )
