"""OpenAI conformance misses of issue #16, checked in-process on the fake engine.

Each test names the behaviour OpenAI (or vLLM / llama.cpp where OpenAI has no rule) shows and
that mistralpy did not.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from mistralpy.api.chat import ChatService
from mistralpy.server.app import ServerSettings, create_app
from tests.server.fake_stack import FakePrompts, FakeTokenizer, make_fake_service

USER = [{"role": "user", "content": "hi there"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]
HUB_ID = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"


class RecordingPrompts(FakePrompts):
    """FakePrompts that keeps the messages each chat prompt was built from."""

    def __init__(self, tokenizer: FakeTokenizer):
        super().__init__(tokenizer)
        self.seen: list[list[dict]] = []

    def chat(self, messages, tools, images, stop=None):
        self.seen.append(messages)
        return super().chat(messages, tools, images)


@pytest.fixture
def service() -> ChatService:
    svc = make_fake_service()
    svc.prompts = RecordingPrompts(svc.tokenizer)
    svc.model_names.add(HUB_ID)
    return svc


@pytest.fixture
def client(service) -> TestClient:
    return TestClient(create_app(service), raise_server_exceptions=False)


def chat(client: TestClient, **body):
    return client.post("/v1/chat/completions", json={"messages": USER, **body})


def assert_error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_developer_role_is_a_system_message(client, service):
    messages = [{"role": "developer", "content": "be brief"}, *USER]
    assert chat(client, messages=messages, max_tokens=2).status_code == 200
    assert service.prompts.seen[-1][0] == {"role": "system", "content": "be brief"}


def test_model_route_takes_ids_with_slashes(client):
    resp = client.get(f"/v1/models/{HUB_ID}")
    assert resp.status_code == 200 and resp.json()["id"] == HUB_ID
    assert client.get("/v1/models/fake-model").json()["object"] == "model"
    error = assert_error(client.get("/v1/models/some/local/path"), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("prompt", [["one", "two two"], [[10 + 65, 10 + 66], [10 + 67]]])
def test_completions_batch_gives_one_choice_per_prompt_times_n(client, prompt):
    body = {"prompt": prompt, "n": 2, "max_tokens": 3, "temperature": 0, "echo": True}
    res = client.post("/v1/completions", json=body).json()
    choices = res["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    tok = FakeTokenizer()
    for k, p in enumerate(prompt):
        echo = tok.decode(tok.encode(p, True) if isinstance(p, str) else p)
        assert all(c["text"].startswith(echo) for c in choices[2 * k : 2 * k + 2])
    assert res["usage"]["completion_tokens"] == 4 * 3
    alone = client.post("/v1/completions", json={**body, "prompt": prompt[1]}).json()
    assert [c["text"] for c in alone["choices"]] == [c["text"] for c in choices[2:]]


def test_completions_batch_streams_every_choice(client):
    body = {
        "prompt": ["one", "two"],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=body) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
    whole = client.post("/v1/completions", json={**body, "stream": False, "stream_options": None})
    assert texts == {c["index"]: c["text"] for c in whole.json()["choices"]}
    assert chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("prompt", [[], [""], ["a", ""], [["a"]], [[1, 2], "a"], [[]], ["a"] * 65])
def test_completions_bad_batches_are_400(client, prompt):
    error = assert_error(client.post("/v1/completions", json={"prompt": prompt}), 400)
    assert error["param"].startswith("prompt")  # schema errors name the item: prompt.0


@pytest.mark.parametrize("messages", ["", "just a string"])
def test_messages_as_string_is_400(client, messages):
    assert_error(chat(client, messages=messages), 400, "messages")


def test_temperature_above_two_is_400(client):
    assert_error(chat(client, temperature=2.5), 400, "temperature")
    assert chat(client, temperature=2, max_tokens=2).status_code == 200
    assert_error(client.post("/v1/completions", json={"prompt": "a", "temperature": 3}), 400)


def test_stream_options_without_stream_is_400(client):
    opts = {"include_usage": True}
    assert_error(chat(client, stream_options=opts), 400, "stream_options")
    body = {"prompt": "a", "stream_options": opts}
    assert_error(client.post("/v1/completions", json=body), 400, "stream_options")
    assert chat(client, stream_options=opts, stream=True, max_tokens=2).status_code == 200


def tool_history(call_id: str, arguments: str = '{"city": "Paris"}') -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = arguments
    return [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]


@pytest.mark.parametrize("call_id", ["call_6789", "call_abc123DEF456ghi789JKL0", "abcDEF123"])
def test_foreign_tool_call_ids_map_to_nine_characters(client, service, call_id):
    resp = chat(client, messages=tool_history(call_id), tools=TOOLS, max_tokens=2)
    assert resp.status_code == 200, resp.text
    seen = service.prompts.seen[-1]
    mapped = seen[1]["tool_calls"][0]["id"]
    assert len(mapped) == 9 and mapped.isalnum() and seen[2]["tool_call_id"] == mapped
    if call_id == "abcDEF123":
        assert mapped == call_id
    chat(client, messages=tool_history(call_id), tools=TOOLS, max_tokens=2)
    assert service.prompts.seen[-1][1]["tool_calls"][0]["id"] == mapped  # deterministic


@pytest.mark.parametrize("arguments", ["{", '{"city": '])
def test_malformed_tool_call_arguments_in_history_are_400(client, arguments):
    resp = chat(client, messages=tool_history("abcDEF123", arguments), tools=TOOLS)
    assert "arguments" in assert_error(resp, 400)["message"]


def test_empty_tools_list_is_400(client):
    assert_error(chat(client, tools=[]), 400, "tools")


def test_tokenize_counts_tools(client):
    plain = client.post("/tokenize", json={"messages": USER}).json()["count"]
    with_tools = client.post("/tokenize", json={"messages": USER, "tools": TOOLS}).json()
    assert with_tools["count"] > plain


def test_openapi_documents_the_error_statuses():
    schema = TestClient(create_app(make_fake_service())).get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "422" not in codes, (path, method)
            assert {"200", "400", "401", "404", "413"} <= codes, (path, method)
            ref = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse")


def test_head_health_and_lower_case_bearer():
    app = create_app(make_fake_service(), ServerSettings(api_key="sekret"))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.head("/health").status_code == 200
    for scheme in ("Bearer", "bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} sekret"}
        assert client.get("/v1/models", headers=headers).status_code == 200, scheme
    for header in ("bearer wrong", "Basic sekret", "sekret", "bearersekret"):
        assert_error(client.get("/v1/models", headers={"Authorization": header}), 401)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_cut_by_max_tokens_leaks_no_control_text(client, stream):
    body = {
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "max_tokens": 20,  # the fake tokenizer is byte-level: cut inside the call's JSON
        "stream": stream,
    }
    if not stream:
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
        assert not choice["message"].get("tool_calls")
    else:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: {")]
        deltas = [json.loads(line)["choices"][0] for line in lines]
        content = "".join(d["delta"].get("content") or "" for d in deltas)
        finish = deltas[-1]["finish_reason"]
    assert finish == "length"
    assert "TOOL_CALLS" not in content and "{" not in content
