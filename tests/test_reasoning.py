"""serving/reasoning.py: a thinking model's <think> block split from its answer, whole and streamed.

The whole-text split on the cases that decide it (a block at the start, whitespace before it, none, a template
that opened it, a generation cut inside it, tags split across pieces, a second block), and for random texts cut
into random pieces the streamed pieces join to exactly the whole split.
"""

from __future__ import annotations

import random

import pytest
from meshserve.serving.reasoning import ReasoningSplit, opens_reasoning, split_reasoning


@pytest.mark.parametrize(
    "text,inside,want",
    [
        ("<think>\nplan\n</think>\n\nAnswer", False, ("\nplan\n", "\n\nAnswer")),
        ("  \n<think>why</think>Yes", False, ("why", "Yes")),  # whitespace before the block is dropped
        ("Answer <think>not reasoning</think>", False, (None, "Answer <think>not reasoning</think>")),
        ("\n\nAnswer", False, (None, "\n\nAnswer")),  # enable_thinking false: the template closed the block
        ("plan</think>Answer", True, ("plan", "Answer")),  # the template opened it (DeepSeek-R1)
        ("<think>cut short", False, ("cut short", "")),  # max_tokens inside the block: all reasoning
        ("cut short", True, ("cut short", "")),
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),  # the first close ends it
        ("<thin", False, (None, "<thin")),  # never became the tag
        ("<think></think>", False, ("", "")),
        ("", True, ("", "")),
    ],
)
def test_whole_text(text, inside, want):
    assert split_reasoning(text, inside) == want


def test_where_the_prompt_leaves_the_model():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking false
    assert not opens_reasoning("<|im_start|>assistant\n")
    assert opens_reasoning("<think>old</think> turn <think>")


def test_streamed_pieces_join_to_the_whole_split():
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<", "</", "<th", "</thi", "k>", " ", "\n", "a", "b", "think"]
    for trial in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        inside = trial % 3 == 0
        split = ReasoningSplit(inside)
        reasoning, content, at = [], [], 0
        while at < len(text):
            step = rng.randint(1, 4)
            r, c = split.feed(text[at : at + step])
            reasoning.append(r)
            content.append(c)
            at += step
        r, c = split.finish()
        want_reasoning, want_content = split_reasoning(text, inside)
        assert "".join(content) + c == want_content, (text, inside)
        assert "".join(reasoning) + r == (want_reasoning or ""), (text, inside)


def test_a_streamed_tag_is_held_back_until_decided():
    split = ReasoningSplit()
    assert split.feed("<th") == ("", "")
    assert split.feed("ink>step one </th") == ("step one ", "")
    assert split.feed("ink>An") == ("", "An")
    assert split.feed("swer") == ("", "swer")
    assert split.finish() == ("", "")


def test_reasoning_content_only_on_an_assistant_message():
    from meshserve.model.chat import ChatError, check_messages

    answer = {"role": "assistant", "content": "ok", "reasoning_content": "because"}
    assert check_messages([answer])[0]["reasoning_content"] == "because"
    assert "reasoning_content" not in check_messages([{**answer, "reasoning_content": ""}])[0]
    for bad in ({"role": "user", "content": "hi", "reasoning_content": "x"}, {**answer, "reasoning_content": 5}):
        with pytest.raises(ChatError, match=r"messages\[0\]\.reasoning_content: a string, on an assistant message"):
            check_messages([bad])


def test_server_default_template_variables_and_a_requests_own():
    """`serve --default-chat-template-kwargs` reaches every chat; a request's chat_template_kwargs replace them key
    by key (the tiny model's byte tokenizer: the prompt ids are the rendered text's bytes)."""
    from meshserve.model.chat import ChatTemplate
    from meshserve.model.loading import load_model
    from meshserve.serving.client import Client
    from meshserve.serving.reasoning import ChatOptions
    from meshserve.serving.validation import Limits, RequestParser

    model = load_model(preset="tiny")
    model.chat = ChatTemplate("{{ messages[0].content }}|{{ a | default('-') }}|{{ b | default('-') }}")
    limits = Limits(max_context=128, max_batch=2, max_new_tokens=8, max_queue=4)
    question = [{"role": "user", "content": "hi"}]

    def rendered(parser, **kwargs) -> str:
        request = Client.request(messages=question, chat_template_kwargs=kwargs or None)
        return bytes(parser.generate(request, None)[0].prompt).decode()

    assert rendered(RequestParser(model, limits)) == "hi|-|-"
    defaults = RequestParser(model, limits, chat=ChatOptions(template_kwargs={"a": 1, "b": 2}))
    assert rendered(defaults) == "hi|1|2"
    assert rendered(defaults, b="x") == "hi|1|x"


def test_template_variables_may_not_hide_the_templates_functions():
    from meshserve.model.chat import ChatError, check_template_kwargs

    for name in ("namespace", "raise_exception", "range", "messages"):
        with pytest.raises(ChatError, match=rf"chat_template_kwargs\.{name}: set by the server"):
            check_template_kwargs({name: 1})


def test_a_long_template_variable_is_named_in_the_size_error():
    from meshserve.model.chat import ChatTemplate
    from meshserve.model.loading import load_model
    from meshserve.serving.client import Client
    from meshserve.serving.validation import Limits, RequestError, RequestParser

    model = load_model(preset="tiny")
    model.chat = ChatTemplate("{{ messages[0].content }}")
    parser = RequestParser(model, Limits(max_context=16, max_batch=1, max_new_tokens=4, max_queue=1))
    request = Client.request(messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={"x": "a" * 600})
    with pytest.raises(RequestError, match="characters of content, template variables exceed the limit of 512"):
        parser.generate(request, None)


def test_a_regex_guided_answer_is_never_split():
    """guided_regex is matched from the first token: its output is all answer, even one that starts with <think>;
    a format that thinks first (think set) and free text are split as usual."""
    from types import SimpleNamespace

    from meshserve.serving.guided import GuideSpec
    from meshserve.serving.reasoning import ChatOptions

    chat = ChatOptions("qwen3")
    regex = SimpleNamespace(guide=GuideSpec("regex", pattern="<think>a</think>b"), think_open=True)
    assert chat.splitter(regex).feed("<think>a</think>b", last=True) == ("", "<think>a</think>b")
    thinking = SimpleNamespace(guide=GuideSpec("json_object", think="open"), think_open=True)
    assert chat.splitter(thinking).feed("a</think>{}", last=True) == ("a", "{}")
    free = SimpleNamespace(guide=None, think_open=False)
    assert chat.splitter(free).feed("<think>a</think>b", last=True) == ("a", "b")
    assert ChatOptions().splitter(free) is None
