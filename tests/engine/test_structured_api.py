"""Structured output and forced tool calls through the Python API (`Runner`, tiny demo model).

Oracle: every output is parsed with `json` and validated with `jsonschema` against the
request's own freshly generated schema (or matched with `re` for regex grammars).
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re

import jsonschema
import pytest

from tests.random_schemas import random_schema, random_tool
from tests.seeds import fresh_seeds

SEEDS = fresh_seeds(4, "structured-api")
NUM_SCHEMAS = 50
ASK = [{"role": "user", "content": "Reply in JSON."}]


@pytest.fixture(scope="module")
def runner():
    from mistralpy import Runner, VisionArchitecture, Which

    r = Runner(
        which=Which.VisionPlain(model_id="demo", arch=VisionArchitecture.Mistral3),
        device="cpu",
        max_model_len=2048,
        max_seqs=16,
    )
    yield r
    r.shutdown()


def test_json_schema_outputs_validate_on_random_schemas(runner):
    """50 random schemas at once (the engine batches them); strict and lenient alike."""
    from mistralpy import ChatCompletionRequest

    rng = random.Random(SEEDS[0])
    schemas = [random_schema(rng) for _ in range(NUM_SCHEMAS)]

    def ask(i: int):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}
        fmt["json_schema"]["strict"] = i % 2 == 0
        req = ChatCompletionRequest(
            messages=ASK, response_format=fmt, max_tokens=600, seed=SEEDS[1] + i
        )
        return runner.send_chat_completion_request(req)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(NUM_SCHEMAS)))
    for schema, res in zip(schemas, results):
        choice = res.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_tool_schemas_as_json_strings_forced_call(runner):
    """mistral.rs' `tool_schemas` (JSON strings) + tool_choice: the call validates; streamed
    deltas concatenate to the whole call."""
    from mistralpy import ChatCompletionRequest

    rng = random.Random(SEEDS[2])
    tools = [random_tool(rng, "alpha"), random_tool(rng, "beta")]
    choice = {"type": "function", "function": {"name": "beta"}}
    req = ChatCompletionRequest(
        messages=ASK,
        tool_schemas=[json.dumps(t) for t in tools],
        tool_choice=choice,
        seed=SEEDS[3],
    )
    res = runner.send_chat_completion_request(req)
    assert res.choices[0].finish_reason == "tool_calls"
    (call,) = res.choices[0].message.tool_calls
    assert call.function.name == "beta" and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), tools[1]["function"]["parameters"])
    req.stream = True
    args, finish = "", None
    for chunk in runner.send_chat_completion_request(req):
        for tc in chunk.choices[0].delta.tool_calls or []:
            args += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert (args, finish) == (call.function.arguments, "tool_calls")


def test_grammar_and_grammar_type(runner):
    from mistralpy import ChatCompletionRequest, CompletionRequest

    pattern = r"[A-F]{2}[0-9]{1,4}"
    chat = ChatCompletionRequest(messages=ASK, grammar=pattern, grammar_type="regex", seed=1)
    text = runner.send_chat_completion_request(chat).choices[0].message.content
    assert re.fullmatch(pattern, text), text
    done = runner.send_completion_request(
        CompletionRequest(prompt="Answer:", grammar=["yes", "no"], grammar_type="choice")
    )
    assert done.choices[0].text in ("yes", "no")
    with pytest.raises(ValueError, match="regex"):
        runner.send_chat_completion_request(
            ChatCompletionRequest(messages=ASK, grammar="[a-", grammar_type="regex")
        )
