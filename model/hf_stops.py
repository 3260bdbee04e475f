"""Which token ids end generation for an imported Hugging Face model, beyond config.json's eos_token_id.

As transformers' `generate` and vLLM do: generation_config.json's eos_token_id (transformers stops on it; vLLM and TGI
add it to the stop ids) and the tokenizer's eos token (tokenizer_config.json's eos_token, which vLLM stops on). Both
go to ModelConfig.extra_eos_ids (eos_id when config.json has none), so `meshserve generate`, serve and the offline
jobs stop where transformers and vLLM stop.
"""

from __future__ import annotations

import json
from pathlib import Path

from meshserve.model.chat import ChatTemplate
from meshserve.model.config import ModelConfig
from meshserve.model.hf_tensors import HFImportError

__all__ = ["with_stop_ids", "generation_eos", "chat_eos"]


def with_stop_ids(config: ModelConfig, directory: Path, chat: ChatTemplate | None) -> ModelConfig:
    """`config` with generation_config.json's eos ids and the chat template's eos token among its stop ids."""
    return _with_ids(config, generation_eos(directory, config.vocab_size) + chat_eos(directory, chat))


def generation_eos(directory: Path, vocab_size: int) -> list[int]:
    """generation_config.json's eos_token_id (one id or a list; [] without the file).

    transformers' `generate` stops on these, and vLLM and TGI add them to the stop ids: instruct models end a turn
    with a token config.json may not list (Meta-Llama-3-8B-Instruct's <|eot_id|> 128009 beside config.json's 128001;
    Qwen2.5 instruct's <|endoftext|> beside <|im_end|>). Without them a chat runs on past the assistant's turn."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"cannot read {path}: {e}") from None
    value = data.get("eos_token_id") if isinstance(data, dict) else None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise HFImportError(
                f"{path}: eos_token_id {json.dumps(i)} is not a token id in [0, vocab_size={vocab_size})"
            )
    return ids


def chat_eos(directory: Path, chat: ChatTemplate | None) -> list[int]:
    """The id of the chat template's eos_token (tokenizer_config.json's, the string the template ends a turn with),
    as vLLM stops on the tokenizer's eos; [] when there is no template, no tokenizer.json or no such token."""
    if chat is None or not chat.eos_token or not (directory / "tokenizer.json").is_file():
        return []
    from tokenizers import Tokenizer

    try:
        found = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(chat.eos_token)
    except Exception:  # the library raises a bare Exception; load_tokenizer reports a damaged file
        return []
    return [] if found is None else [found]


def _with_ids(config: ModelConfig, ids: list[int]) -> ModelConfig:
    """`config` with `ids` among its stop ids (eos_id first when it has none); ids outside the vocabulary skipped."""
    known = {config.eos_id, *config.extra_eos_ids}
    new = [i for i in dict.fromkeys(ids) if i not in known and 0 <= i < config.vocab_size]
    if not new:
        return config
    if config.eos_id is None:
        return config.replace(eos_id=new[0], extra_eos_ids=(*config.extra_eos_ids, *new[1:]))
    return config.replace(extra_eos_ids=(*config.extra_eos_ids, *new))
