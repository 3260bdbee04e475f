"""A thinking model's reasoning split from its answer (`serve --reasoning-parser qwen3|deepseek_r1`), as vLLM's
reasoning parsers do: the text of a `<think> ... </think>` block goes to the reply's reasoning (HTTP
`message.reasoning_content` / `delta.reasoning_content`, gRPC `reasoning`), the rest is the content, which the
tool-call parser then reads (a call written while thinking is not a call). Chats only: a completion's text is raw.

Where the reasoning starts depends on the chat template, so what it adds for the assistant's turn decides (the
render with add_generation_prompt less the render without: a user's own "<think>" does not count; `opens_reasoning`):
- the template opened the block (DeepSeek-R1's generation prompt ends with "<think>\\n", as Qwen3-Thinking-2507's
  does): the prompt's last "<think>" comes after its last "</think>", and the output starts inside the reasoning;
- otherwise (Qwen3: the model writes "<think>" itself, or with enable_thinking false the template has already
  written an empty "<think>\\n\\n</think>\\n\\n"): the output's reasoning is a "<think>" block at its very start
  (whitespace before it allowed and dropped); output that starts with anything else is all content.
Inside the reasoning everything up to the first "</think>" is reasoning (a generation cut short leaves it all
reasoning, whole or streamed alike); the content is what follows "</think>", as generated. Both parser names use
these tags and this rule (vLLM's deepseek_r1 and qwen3 differ only in what they assume the template did, which the
prompt says here).

A guided chat (response_format, tool_choice required, guided_choice) follows the same block first and its format
after it (serving/guided/think.py); guided_regex is matched from the first token, so outside any block.

`ReasoningSplit` is one choice's stream: `feed` each piece of text, `finish` at the end; a piece that may be the
start of a tag is held back until it is decided, so the pieces join to exactly `split_reasoning` of the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "PARSERS",
    "OPEN",
    "CLOSE",
    "ChatOptions",
    "ReasoningSplit",
    "split_reasoning",
    "opens_reasoning",
]

PARSERS = ("qwen3", "deepseek_r1")
OPEN, CLOSE = "<think>", "</think>"
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class ChatOptions:
    """How a server treats chats beyond the template: `serve --reasoning-parser` (None: off) and
    `--default-chat-template-kwargs` (template variables every chat gets; a request's own replace them key by key)."""

    reasoning_parser: str | None = None
    template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None and self.reasoning_parser not in PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}, got {self.reasoning_parser!r}")
        object.__setattr__(self, "template_kwargs", dict(self.template_kwargs or {}))

    def splitter(self, request) -> ReasoningSplit | None:
        """A chat's ReasoningSplit, started where its template's generation prompt leaves the model (a regex-guided
        output is the match from its first token: all answer, even one that starts with "<think>"); None without a
        reasoning parser."""
        if self.reasoning_parser is None:
            return None
        guide = request.guide
        if guide is not None and not guide.think:
            return ReasoningSplit(answer_only=True)
        return ReasoningSplit(request.think_open)


def opens_reasoning(generation_prompt: str) -> bool:
    """Whether the text a chat template adds for the assistant's turn (LoadedModel.encode_chat_opening) leaves the
    model inside a <think> block."""
    return generation_prompt.rfind(OPEN) > generation_prompt.rfind(CLOSE)


class ReasoningSplit:
    """One output's text -> (reasoning, content) pieces as it streams."""

    def __init__(self, inside: bool = False, answer_only: bool = False):
        """inside: the output starts inside the reasoning (`opens_reasoning` of the prompt); answer_only: there is
        no reasoning (a format matched from the first token): every piece is content."""
        self.state = "content" if answer_only else "reasoning" if inside else "start"
        self._buffer = ""
        self.reasoned = inside  # whether the output has (or began in) a reasoning block

    def feed(self, text: str, last: bool = False) -> tuple[str, str]:
        """The next piece of the output -> (reasoning, content) decided by it (either may be ""); last: the output
        ends with this piece (what was held back comes out too, as `finish`)."""
        if last:
            reasoning, content = self.feed(text)
            more_reasoning, more_content = self.finish()
            return reasoning + more_reasoning, content + more_content
        self._buffer += text
        reasoning, content = [], []
        while self._buffer:
            if self.state == "start":
                stripped = self._buffer.lstrip(_SPACE)
                if stripped.startswith(OPEN):
                    self.state, self.reasoned, self._buffer = "reasoning", True, stripped[len(OPEN) :]
                    continue
                if OPEN.startswith(stripped):  # whitespace, or a prefix of the tag: not decided yet
                    break
                self.state = "content"
            elif self.state == "reasoning":
                end = self._buffer.find(CLOSE)
                if end >= 0:
                    reasoning.append(self._buffer[:end])
                    self.state, self._buffer = "content", self._buffer[end + len(CLOSE) :]
                    continue
                keep = _partial_tag(self._buffer)  # a tail that may become "</think>"
                reasoning.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            else:
                content.append(self._buffer)
                self._buffer = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The output ended: what was held back, as reasoning (inside a block) or content."""
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self.state == "reasoning" else ("", rest)


def _partial_tag(text: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of CLOSE."""
    for n in range(min(len(text), len(CLOSE) - 1), 0, -1):
        if CLOSE.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """A whole output -> (reasoning, or None when it has no reasoning block; content)."""
    split = ReasoningSplit(inside)
    reasoning, content = split.feed(text, last=True)
    return (reasoning if split.reasoned else None), content
