"""Request fields → GrammarSpec: every accepted spelling, conflicts and tool_choice modes."""

import pytest

from mistralpy.api.chat import grammar_from_request, grammar_param
from mistralpy.params import GrammarSpec, InvalidParameter

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "g"}},
]


@pytest.mark.parametrize(
    "body, spec, param",
    [
        ({}, None, None),
        ({"response_format": {"type": "text"}}, None, None),
        (
            {"response_format": {"type": "json_object"}},
            GrammarSpec("json_object"),
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            GrammarSpec("json_schema", SCHEMA),
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": SCHEMA, "strict": True},
                }
            },
            GrammarSpec("json_schema", SCHEMA, strict=True),
            "response_format",
        ),
        ({"grammar": {"type": "regex", "value": "a+"}}, GrammarSpec("regex", "a+"), "grammar"),
        ({"grammar": {"type": "llguidance", "value": "x"}}, GrammarSpec("lark", "x"), "grammar"),
        ({"guided_json": SCHEMA}, GrammarSpec("json_schema", SCHEMA), "guided_json"),
        ({"guided_regex": "a+"}, GrammarSpec("regex", "a+"), "guided_regex"),
        ({"guided_choice": ["a", "b"]}, GrammarSpec("choice", ["a", "b"]), "guided_choice"),
        ({"guided_grammar": "start: x"}, GrammarSpec("lark", "start: x"), "guided_grammar"),
        ({"tools": TOOLS}, None, None),
        ({"tools": TOOLS, "tool_choice": "auto"}, None, None),
        ({"tools": TOOLS, "tool_choice": "none"}, None, None),
        (
            {"tools": TOOLS, "tool_choice": "required"},
            GrammarSpec("tool_calls", {"tools": TOOLS, "mode": "required", "single": False}),
            "tool_choice",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
            GrammarSpec("tool_calls", {"tools": TOOLS, "mode": "required", "single": True}),
            "tool_choice",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
            GrammarSpec("tool_calls", {"tools": TOOLS, "mode": "named", "name": "g"}),
            "tool_choice",
        ),
    ],
)
def test_each_spelling_maps_to_one_spec(body, spec, param):
    assert grammar_from_request(body) == spec
    assert grammar_param(body) == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"grammar": {"type": "regex", "value": "a"}, "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": SCHEMA, "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"grammar": {"type": "ebnf", "value": "x"}}, "grammar"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}}, None),
    ],
)
def test_conflicts_and_bad_fields_raise_invalid_parameter(body, param):
    with pytest.raises(InvalidParameter) as info:
        grammar_from_request(body)
    assert info.value.param == (param or "tool_choice")


def test_output_constraint_over_the_size_cap_is_refused_naming_the_limit():
    """#17 item 10: a 10,000-property schema (349 KB) cost ~8 s of a core to build; beyond
    MAX_GRAMMAR_BYTES a constraint is refused at the door, under it accepted."""
    from mistralpy.api.chat import MAX_GRAMMAR_BYTES

    def schema_body(properties: int) -> dict:
        props = {f"field_{i}": {"type": "integer"} for i in range(properties)}
        schema = {"type": "object", "properties": props}
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}

    assert grammar_from_request(schema_body(3000)) is not None  # ~100 KB: a big real schema
    with pytest.raises(InvalidParameter) as info:
        grammar_from_request(schema_body(10_000))
    assert info.value.param == "response_format"
    assert str(MAX_GRAMMAR_BYTES) in str(info.value)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 300_000}}}]
    with pytest.raises(InvalidParameter) as info:
        grammar_from_request({"tools": tools, "tool_choice": "required"})
    assert info.value.param == "tool_choice"
