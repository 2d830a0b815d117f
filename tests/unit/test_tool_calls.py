"""Tool-call parsing: both Mistral formats, whole and streamed, on random calls and splits."""

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.processing.tool_calls import (
    TOOL_CALLS,
    ToolCallStreamParser,
    generate_tool_call_id,
    parse_tool_calls,
)

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)
ARGS = st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=4)
IDS = st.none() | st.from_regex(r"[A-Za-z0-9]{9}", fullmatch=True)
CALLS = st.lists(st.tuples(NAMES, ARGS, IDS), min_size=1, max_size=3)
PREFIX = st.sampled_from(["", "Sure. ", "Let me check.\n", "[", "a [TOOL"])


def _counter_ids():
    counter = itertools.count()
    return lambda: f"gen{next(counter):06d}"


def render_v7(calls) -> str:
    items = []
    for name, args, call_id in calls:
        item = {"name": name, "arguments": args}
        if call_id:
            item["id"] = call_id
        items.append(item)
    return "[TOOL_CALLS]" + json.dumps(items, ensure_ascii=False)


def render_v11(calls) -> str:
    out = ""
    for name, args, call_id in calls:
        head = name + (f"[CALL_ID]{call_id}" if call_id else "")
        out += f"[TOOL_CALLS]{head}[ARGS]" + json.dumps(args, ensure_ascii=False)
    return out


def stream(text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    """Feed `text` split at `cuts`; merge the deltas the way an OpenAI client does."""
    parser = ToolCallStreamParser(id_factory=_counter_ids())
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    deltas.append(parser.finish())
    content, calls = "", []
    for d in deltas:
        content += d.content
        for tc in d.tool_calls:
            if tc["index"] == len(calls):
                assert {"id", "type", "function"} <= tc.keys()
                assert tc["function"]["name"]
                calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
            calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, calls


def check_against_whole(text: str, cuts: list[int], ids_may_differ: bool) -> None:
    whole = parse_tool_calls(text, id_factory=_counter_ids())
    content, calls = stream(text, cuts)
    assert content == (whole.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.name, c.arguments) for c in whole.tool_calls
    ]
    if not ids_may_differ:
        assert [c["id"] for c in calls] == [c.id for c in whole.tool_calls]


@settings(max_examples=150, deadline=None)
@given(PREFIX, CALLS, st.lists(st.integers(0, 10_000), max_size=12))
def test_v7_whole_and_streamed(prefix, calls, cuts):
    text = prefix + render_v7(calls)
    whole = parse_tool_calls(text)
    assert whole.content == (prefix or None)
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        (n, a) for n, a, _ in calls
    ]
    for got, (_, _, call_id) in zip(whole.tool_calls, calls):
        assert got.id == call_id if call_id else len(got.id) == 9 and got.id.isalnum()
    # v7 puts the model's id after the arguments, so a stream may carry the generated one.
    check_against_whole(text, cuts, ids_may_differ=True)


@settings(max_examples=150, deadline=None)
@given(PREFIX, CALLS, st.lists(st.integers(0, 10_000), max_size=12))
def test_v11_whole_and_streamed(prefix, calls, cuts):
    text = prefix + render_v11(calls)
    whole = parse_tool_calls(text)
    assert whole.content == (prefix or None)
    assert [(c.name, json.loads(c.arguments), c.id) for c in whole.tool_calls] == [
        (n, a, i) if i else (n, a, whole.tool_calls[k].id) for k, (n, a, i) in enumerate(calls)
    ]
    check_against_whole(text, cuts, ids_may_differ=False)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60), st.lists(st.integers(0, 10_000), max_size=8))
def test_random_text_never_raises_and_streams_like_whole(text, cuts):
    check_against_whole(text, cuts, ids_may_differ=False)


@settings(max_examples=100, deadline=None)
@given(CALLS, st.integers(1, 10_000), st.lists(st.integers(0, 10_000), max_size=8))
def test_truncated_calls_leave_no_marker_text(calls, cut, cuts):
    """A call cut by max_tokens: no call, and none of its text (the marker is a control token)."""
    text = render_v7(calls)
    marker = len(TOOL_CALLS)  # one token: a cut never splits it
    text = "Sure. " + text[: marker + cut % (len(text) - marker)]
    whole = parse_tool_calls(text)
    assert whole.tool_calls == [] and whole.content == "Sure. "
    assert stream(text, cuts)[0] == "Sure. "  # (a stream may have sent a partial call)


def test_arguments_arrive_in_pieces():
    parser = ToolCallStreamParser()
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]'
    pieces = [parser.feed(text[i : i + 4]) for i in range(0, len(text), 4)]
    arg_deltas = [tc for d in pieces for tc in d.tool_calls if "id" not in tc]
    assert len(arg_deltas) > 3
    first = next(tc for d in pieces for tc in d.tool_calls if "id" in tc)
    assert first["function"]["name"] == "get_weather" and first["type"] == "function"


def test_plain_content_streams_before_marker():
    parser = ToolCallStreamParser()
    assert parser.feed("Hello [").content == "Hello "
    assert parser.feed("x").content == "[x"
    assert parser.feed(" [TOOL_").content == " "
    delta = parser.feed("CALLS]f[ARGS]{}")
    assert delta.content == "" and delta.tool_calls[0]["function"]["name"] == "f"


def test_lenient_forms():
    out = parse_tool_calls('[TOOL_CALLS]{"name": "f", "parameters": {"x": 1}}')
    assert out.tool_calls[0].name == "f" and json.loads(out.tool_calls[0].arguments) == {"x": 1}
    out = parse_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": "{\\"x\\": 2}"}]')
    assert json.loads(out.tool_calls[0].arguments) == {"x": 2}
    out = parse_tool_calls('[TOOL_CALLS][{"name": "f"}]')
    assert out.tool_calls[0].arguments == "{}"


def test_malformed_call_text_is_dropped():
    for text in [
        "[TOOL_CALLS]",
        "[TOOL_CALLS]not a call",
        "[TOOL_CALLS][{]",
        "[TOOL_CALLS][]",
        '[TOOL_CALLS][{"arguments": {}}]',
        '[TOOL_CALLS][{"name": 3, "arguments": {}}]',
        "[TOOL_CALLS]f[ARGS][1]",
    ]:
        out = parse_tool_calls("Hi " + text + " tail")
        assert out.tool_calls == [] and out.content == "Hi "


def test_generated_ids():
    ids = {generate_tool_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 9 and i.isalnum() for i in ids)


FRAGMENTS = st.sampled_from(
    [
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
        "[",
        "]",
        "{",
        "}",
        '"',
        ",",
        ":",
        " ",
        "f",
        "x1",
        '"name"',
        '"arguments"',
        '"id"',
        "1",
        "\\",
        "\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=25), st.lists(st.integers(0, 10_000), max_size=8))
def test_marker_soup_never_raises_and_streams_like_whole(parts, cuts):
    text = "".join(parts)
    whole = parse_tool_calls(text, id_factory=_counter_ids())
    content, calls = stream(text, cuts)
    if whole.tool_calls or not calls:  # a stream cannot take back calls it already sent
        assert content == (whole.content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.name, c.arguments) for c in whole.tool_calls
        ]
