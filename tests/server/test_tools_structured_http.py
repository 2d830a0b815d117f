"""Tool calling and structured output end to end: the official `openai` client against a real
`mistralpy serve demo` subprocess (tiny random checkpoint, CPU).

Random weights never call tools on their own, so calls are forced through the tool-call
grammar (`tool_choice` "required" or a named function); every output is checked with
independent validators (json, jsonschema, re) against the request's own schemas.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.random_schemas import random_schema, random_tool
from tests.seeds import fresh_seeds
from tests.server.conftest import free_port, start_server, stop_server

SEEDS = fresh_seeds(8, "tools-http")
TOOL_CALLS_ID = 9  # the tiny checkpoint's [TOOL_CALLS] (checked against /detokenize below)
ASK = [
    {"role": "system", "content": "You are a helpful assistant with tools."},
    {"role": "user", "content": "What is the weather in Paris, in Celsius?"},
]


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    """`mistralpy serve demo` as in conftest, with room for several rounds of forced calls
    (a "required" call list has no length limit but the context)."""
    port = free_port()
    args = ["-m", "mistralpy.server.cli", "serve", "demo", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--device", "cpu", "--max-model-len", "4096"]
    proc = start_server(args + ["--max-num-seqs", "16"], port, timeout=300)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)


def model_name(base: str) -> str:
    return httpx.get(base + "/v1/models").json()["data"][0]["id"]


def _tokens(base: str, text: str) -> list[int]:
    body = {"prompt": text, "add_special_tokens": False}
    return httpx.post(base + "/tokenize", json=body).json()["tokens"]


def short_calls_bias(base: str) -> dict[str, float]:
    """Logit bias that keeps a random model's forced calls short: a "required" call list has
    no length limit, and JSON allows whitespace between tokens. The grammar still decides."""
    bias = {
        str(t): -6.0 for ws in (" ", "  ", "\n", "\n\n", "\t", "\t\t") for t in _tokens(base, ws)
    }
    bias.update({str(t): 4.0 for end in ("]", "}]") for t in _tokens(base, end)})
    return bias


def tool_schema(tools: list[dict], name: str) -> dict:
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)


def check_calls(calls, tools: list[dict], names: set[str]) -> None:
    """Each call names one of `names`, has an OpenAI-shaped id, and valid JSON arguments."""
    assert calls
    for call in calls:
        assert call.type == "function" and re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
        assert call.function.name in names
        jsonschema.validate(
            json.loads(call.function.arguments), tool_schema(tools, call.function.name)
        )


def merge_stream(chunks) -> tuple[str, list[dict], str | None, int]:
    """Concatenate a chat stream the way OpenAI clients do: (content, calls, finish, n_arg_deltas).

    Checks OpenAI's delta shape: a call's first delta has index, id, type and function.name;
    later deltas of that call carry only arguments.
    """
    content, calls, finish, arg_deltas = "", [], None, 0
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.index == len(calls):
                assert tc.id and tc.type == "function" and tc.function.name
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
            else:
                assert tc.index == len(calls) - 1 and tc.id is None and tc.function.name is None
            if tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
                arg_deltas += 1
        finish = choice.finish_reason or finish
    return content, calls, finish, arg_deltas


def assistant_turn(message) -> dict:
    """The assistant message to send back: content plus the tool calls exactly as received."""
    return {
        "role": "assistant",
        "content": message.content,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ],
    }


@pytest.mark.parametrize("mode", ["required", "named"])
def test_forced_tool_round_trip_stream_and_whole(demo_server, mode):
    c, name = client(demo_server), model_name(demo_server)
    detok = httpx.post(
        demo_server + "/detokenize", json={"tokens": [TOOL_CALLS_ID], "skip_special_tokens": False}
    )
    assert detok.json()["prompt"] == "[TOOL_CALLS]"
    rng = random.Random(SEEDS[0] + (mode == "named"))
    tools = [random_tool(rng, n) for n in ("get_weather", "search-web", "lookup_2")]
    names = {t["function"]["name"] for t in tools}
    choice = "required"
    if mode == "named":
        forced = rng.choice(sorted(names))
        choice, names = {"type": "function", "function": {"name": forced}}, {forced}
    kw = dict(
        model=name,
        messages=ASK,
        tools=tools,
        tool_choice=choice,
        temperature=1.0,  # no max_tokens: the grammar bounds the call
        seed=rng.randrange(2**31),
        logit_bias=short_calls_bias(demo_server),
    )
    whole = c.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls", message
    check_calls(message.tool_calls, tools, names)
    assert not message.content
    if mode == "named":
        assert len(message.tool_calls) == 1

    content, streamed, finish, arg_deltas = merge_stream(
        c.chat.completions.create(**kw, stream=True)
    )
    assert finish == "tool_calls" and not content
    assert [(s["name"], s["arguments"]) for s in streamed] == [
        (t.function.name, t.function.arguments) for t in message.tool_calls
    ]
    assert arg_deltas > len(streamed)  # arguments arrive in pieces, token by token

    # Second turn: the calls and their results go back; the model answers (any text).
    history = ASK + [assistant_turn(message)]
    for i, call in enumerate(message.tool_calls):
        result = json.dumps({"call": i, "temperature_c": rng.randint(-20, 40), "note": 'a "q"'})
        history.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer_kw = dict(model=name, messages=history, tools=tools, max_tokens=8, temperature=0)
    answer = c.chat.completions.create(**answer_kw)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and answer.usage.prompt_tokens > 30
    text, calls, finish, _ = merge_stream(c.chat.completions.create(**answer_kw, stream=True))
    assert (text, finish) == (answer.choices[0].message.content, answer.choices[0].finish_reason)
    assert not calls and not answer.choices[0].message.tool_calls


def test_required_many_samples_and_parallel_tool_calls_false(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    rng = random.Random(SEEDS[1])
    tools = [random_tool(rng, f"tool_{i}") for i in range(3)]
    names = {t["function"]["name"] for t in tools}
    kw = dict(model=name, messages=ASK, tools=tools, tool_choice="required")
    kw["logit_bias"] = short_calls_bias(demo_server)
    res = c.chat.completions.create(**kw, n=6, seed=rng.randrange(2**31))
    for choice in res.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, tools, names)
    single = c.chat.completions.create(
        **kw, n=4, seed=rng.randrange(2**31), parallel_tool_calls=False
    )
    for choice in single.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, tools, names)


def test_tool_choice_none_bans_calls_and_auto_drops_malformed_call_text(demo_server):
    """A +100 bias makes the model emit [TOOL_CALLS] at every step: under "none" it still may
    not; under "auto" the marker soup is not a valid call, and its control-token text does not
    leak into the content."""
    c, name = client(demo_server), model_name(demo_server)
    tools = [random_tool(random.Random(SEEDS[2]), "get_weather")]
    kw = dict(
        model=name,
        messages=ASK,
        tools=tools,
        max_tokens=6,
        temperature=0,
        logit_bias={str(TOOL_CALLS_ID): 100},
    )
    none = c.chat.completions.create(**kw, tool_choice="none", logprobs=True)
    choice = none.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert "[TOOL_CALLS]" not in [t.token for t in choice.logprobs.content]
    auto = c.chat.completions.create(**kw, tool_choice="auto")
    choice = auto.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content == ""
    text, calls, finish, _ = merge_stream(
        c.chat.completions.create(**kw, tool_choice="auto", stream=True)
    )
    assert (text, calls, finish) == (choice.message.content, [], "length")


def test_required_call_cut_by_max_tokens_leaks_no_marker_and_ends_when_room(demo_server):
    """Random weights under a forced call: the grammar allows no whitespace runs, so a call of
    a bounded tool ends in a few dozen tokens; cut shorter, no `[TOOL_CALLS]` text remains."""
    c, name = client(demo_server), model_name(demo_server)
    params = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Nice"]}, "days": {"type": "boolean"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    kw = dict(model=name, messages=ASK, tools=tools, tool_choice="required", temperature=0)
    kw["parallel_tool_calls"] = False
    cut = c.chat.completions.create(**kw, max_tokens=6).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls
    assert "[TOOL_CALLS]" not in (cut.message.content or "")
    text, _, finish, _ = merge_stream(c.chat.completions.create(**kw, max_tokens=6, stream=True))
    assert finish == "length" and "[TOOL_CALLS]" not in text
    whole = c.chat.completions.create(**kw, max_tokens=64).choices[0]
    assert whole.finish_reason == "tool_calls", whole.message.content
    jsonschema.validate(json.loads(whole.message.tool_calls[0].function.arguments), params)


def test_response_format_json_schema_on_random_schemas(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    rng = random.Random(SEEDS[3])
    schemas = [random_schema(rng) for _ in range(12)]

    def ask(i: int):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}
        fmt["json_schema"]["strict"] = i % 2 == 0
        return c.chat.completions.create(
            model=name, messages=ASK, response_format=fmt, max_tokens=400, seed=SEEDS[4] + i
        )

    with concurrent.futures.ThreadPoolExecutor(len(schemas)) as pool:
        results = list(pool.map(ask, range(len(schemas))))
    for schema, res in zip(schemas, results):
        assert res.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(res.choices[0].message.content), schema)


def test_response_format_json_object(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    # Random weights rarely close an open-ended object: favour `"` and `}` so most finish.
    bias = {str(t): 8 for text in ('"', "}") for t in _tokens(demo_server, text)}
    res = c.chat.completions.create(
        model=name,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=300,
        n=6,
        seed=SEEDS[5],
        logit_bias=bias,
    )
    finished = [ch for ch in res.choices if ch.finish_reason == "stop"]
    assert finished
    for ch in finished:
        assert isinstance(json.loads(ch.message.content), dict)


LARK = 'start: "id-" NUM ("," NUM)?\nNUM: /[0-9]{1,3}/'
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
EXTENSIONS = [
    ({"guided_regex": r"[a-c]{2,5}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-c]{2,5}-[0-9]{2}", t)),
    ({"guided_choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    (
        {"guided_json": json.dumps(SCHEMA)},
        lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
    ),
    ({"guided_grammar": LARK}, lambda t: re.fullmatch(r"id-[0-9]{1,3}(,[0-9]{1,3})?", t)),
    # [0-9], not \d: llguidance's \d follows a newer Unicode than Python 3.11's re (14.0), so
    # a digit such as U+16130 (Unicode 16) passed the grammar and failed the check (CI seed run)
    ({"grammar": {"type": "regex", "value": r"[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{4}", t)),
    ({"grammar": {"type": "lark", "value": LARK}}, lambda t: t.startswith("id-")),
    ({"grammar": {"type": "llguidance", "value": LARK}}, lambda t: t.startswith("id-")),
    ({"grammar": {"type": "choice", "value": ["a", "b"]}}, lambda t: t in ("a", "b")),
    (
        {"grammar": {"type": "json_schema", "value": SCHEMA}},
        lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
    ),
]


@pytest.mark.parametrize("extra, check", EXTENSIONS)
def test_grammar_request_extensions(demo_server, extra, check):
    """mistral.rs' `grammar` and vLLM's `guided_*` fields, chat (whole and streamed) and
    text completions."""
    c, name = client(demo_server), model_name(demo_server)
    kw = dict(model=name, max_tokens=200, seed=SEEDS[6], extra_body=extra)
    res = c.chat.completions.create(messages=ASK, **kw)
    text = res.choices[0].message.content
    assert res.choices[0].finish_reason == "stop" and check(text), text
    streamed, _, finish, _ = merge_stream(
        c.chat.completions.create(messages=ASK, stream=True, **kw)
    )
    assert (streamed, finish) == (text, "stop")
    done = c.completions.create(prompt="Answer:", **kw)
    assert done.choices[0].finish_reason == "stop" and check(done.choices[0].text)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD_REQUESTS = [
    ({"extra_body": {"grammar": {"type": "regex", "value": "[a-"}}}, "grammar"),
    ({"extra_body": {"grammar": {"type": "lark", "value": "start: nothing"}}}, "grammar"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strin"}, "strict": True},
            }
        },
        "response_format",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None),
    (
        {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
        "guided_regex",
    ),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
            ],
            "tool_choice": "required",
        },
        "tool_choice",
    ),
]


@pytest.mark.parametrize("extra, param", BAD_REQUESTS)
def test_invalid_constraints_are_400_with_openai_error_body(demo_server, extra, param):
    c, name = client(demo_server), model_name(demo_server)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(
                model=name, messages=ASK, max_tokens=5, stream=stream, **extra
            )
        err = info.value.body
        assert info.value.status_code == 400 and err["message"] and err["type"]
        if param is not None:
            assert err["param"] == param, err
    assert httpx.get(demo_server + "/health").status_code == 200
