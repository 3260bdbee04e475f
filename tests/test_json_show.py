"""Error messages quote a client's value as JSON spells it (requests and job lines are JSON): `got true`, not
Python's `got True`; `got "x"`, not `got 'x'`. One helper (serving/json_show.py) for the guided-decoding and tool
fields, over HTTP, gRPC and batch-generate's lines alike."""

import pytest
from meshserve.serving.guided.schema import compile_spec
from meshserve.serving.guided.spec import GuideError, GuideSpec
from meshserve.serving.guided_requests import choice_spec, response_format
from meshserve.serving.json_show import show
from meshserve.serving.openai_tools import check_tools
from meshserve.serving.validation import RequestError


def test_show_spells_json_and_cuts_long_values():
    assert [show(v) for v in (True, None, "hot", [1, "a"], {"k": 1.5}, "é")] == [
        "true", "null", '"hot"', '[1, "a"]', '{"k": 1.5}', '"é"'
    ]  # fmt: skip
    long = show("x" * 500)
    assert len(long) == 80 and long == '"' + "x" * 76 + "..."
    assert show(b"\x00") == "b'\\x00'"  # no JSON spelling (a proto's bytes): repr, not an exception
    assert show("a\ud800") == '"a\\ud800"'  # a lone surrogate: escaped as written, so the answer can be UTF-8


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: choice_spec(True), "guided_choice: expected a list of strings, got true"),
        (lambda: choice_spec(["a", None]), "guided_choice[1]: expected a non-empty string, got null"),
        (lambda: response_format("x"), 'response_format: expected an object {"type": "json_object"} or '
                                       '{"type": "json_schema", "json_schema": {...}}, got "x"'),
        (lambda: response_format({"type": "xml"}), 'response_format.type: expected one of "text", "json_object", '
                                                   '"json_schema", got "xml"'),
        (lambda: check_tools([{"type": "function", "function": {"name": "f", "strict": "yes"}}]),
         'tools[0].function.strict: expected true or false, got "yes"'),
    ],
)  # fmt: skip
def test_request_fields_quote_values_as_json(call, message):
    """Before: `got True`, `got None`, `got 'x'`, `one of 'text', ...`, `got 'yes'`."""
    with pytest.raises(RequestError) as e:
        call()
    assert str(e.value) == message


def test_schema_errors_quote_values_as_json():
    with pytest.raises(GuideError, match=r'^schema\.required: "b" is not in properties'):  # was 'b'
        compile_spec(GuideSpec("json_schema", schema='{"type": "object", "properties": {"a": {}}, "required": ["b"]}'))
