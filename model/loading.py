"""Load a model for running: a checkpoint (the bundled demo by default) or a preset with random weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from meshserve.model.chat import ChatError, ChatTemplate
from meshserve.model.checkpoint import CheckpointError, load_checkpoint
from meshserve.model.config import ModelConfig, get_config
from meshserve.model.params import Params, cast_params, init_params
from meshserve.model.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["LoadedModel", "load_model", "DEMO_CHECKPOINT"]

# The shipped model, trained by `python -m meshserve.model.demo_train` (see BUILD.md).
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    weights: str  # f32 | bf16 | int8
    source: str  # checkpoint path or "random:<preset>"
    chat: ChatTemplate | None = None  # the checkpoint's chat template (converted from a Hugging Face directory)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids for a text prompt, with the model's BOS token first when it has one."""
        ids = self.tokenizer.encode(text)
        return ([self.config.bos_id] if self.config.bos_id is not None else []) + ids

    def encode_chat(self, messages, tools: list | None = None, extra: dict | None = None) -> list[int]:
        """Token ids for a conversation (OpenAI's messages: roles system/user/assistant/tool, model/chat.py
        check_messages) and its tools (None: none) rendered by the model's chat template with the assistant's turn
        opened: transformers' `apply_chat_template(messages, tools=tools, add_generation_prompt=True,
        tokenize=True)`. The template writes BOS itself where the model wants it, so nothing is added to the
        tokenizer's encoding (encode_prompt's BOS would be a second one). extra: more template variables
        (chat_template_kwargs). Raises ChatError."""
        return self.tokenizer.encode(self._template().render(messages, tools=tools, extra=extra))

    def encode_chat_opening(
        self, messages, tools: list | None = None, extra: dict | None = None
    ) -> tuple[list[int], str]:
        """`encode_chat`'s ids, and the text the template adds for the assistant's turn (the render with
        add_generation_prompt less the render without; the whole render when the first does not extend the second).
        Raises ChatError."""
        template = self._template()
        whole = template.render(messages, tools=tools, extra=extra)
        base = template.render(messages, add_generation_prompt=False, tools=tools, extra=extra)
        return self.tokenizer.encode(whole), whole[len(base) :] if whole.startswith(base) else whole

    def _template(self) -> ChatTemplate:
        if self.chat is None:
            raise ChatError("the model has no chat template (convert it from a Hugging Face directory that has one)")
        return self.chat

    def stop_ids(self) -> list[int]:
        """The ids that end generation unless a request ignores eos: the model's eos (the config's, else the
        tokenizer's) and the config's extra_eos_ids."""
        eos = self.config.eos_id if self.config.eos_id is not None else self.tokenizer.eos_id
        return ([] if eos is None else [eos]) + [i for i in self.config.extra_eos_ids if i != eos]


def load_model(
    checkpoint: str | Path | None = None,
    *,
    weights: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    shardings=None,
) -> LoadedModel:
    """A checkpoint (default: the bundled demo), or with `preset` a model of random weights (tests, benchmarks)."""
    if preset is not None:
        config = get_config(preset)
        weights = weights or "f32"
        params = cast_params(config, init_params(config, jax.random.key(seed)), weights)
        return LoadedModel(config, params, ByteTokenizer(), weights, f"random:{preset}")
    if checkpoint is not None and not str(checkpoint).strip():  # "" would silently mean the demo model
        raise CheckpointError("the checkpoint path is empty: give a meshserve checkpoint directory")
    info, params = load_checkpoint(checkpoint or DEMO_CHECKPOINT, weights=weights, shardings=shardings)
    tokenizer = load_tokenizer(info.tokenizer_path) if info.tokenizer_path else ByteTokenizer()
    return LoadedModel(info.config, params, tokenizer, weights or info.weights, str(info.path), info.chat)
