"""The HTTP layer on a fake engine in a real server subprocess: OpenAI shapes, SSE, errors,
auth, disconnects, metrics. Drives it with the `openai` client and raw httpx."""

import json

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "hi there"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_non_stream_and_stream_with_openai_client(fake_server):
    c = client(fake_server)
    res = c.chat.completions.create(model="fake-model", messages=USER, temperature=0)
    text = res.choices[0].message.content
    assert text and res.choices[0].finish_reason == "stop"
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.usage.model_extra["avg_tok_per_sec"] >= 0
    stream = c.chat.completions.create(
        model="fake-model",
        messages=USER,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens


def test_raw_sse_ends_with_done(fake_server):
    body = {"model": "fake-model", "messages": USER, "stream": True, "max_tokens": 3}
    with httpx.stream("POST", fake_server + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_tool_calls_over_http(fake_server):
    c = client(fake_server)
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    res = c.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS)
    call = res.choices[0].message.tool_calls[0]
    assert res.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)
    chunks = list(
        c.chat.completions.create(model="fake-model", messages=msgs, tools=TOOLS, stream=True)
    )
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_completions_models_tokenize(fake_server):
    c = client(fake_server)
    res = c.completions.create(model="fake-model", prompt="hello", max_tokens=4)
    assert len(res.choices[0].text) == 4 and res.choices[0].finish_reason == "length"
    assert [m.id for m in c.models.list().data] == ["fake-model"]
    toks = httpx.post(fake_server + "/tokenize", json={"prompt": "abc"}).json()
    assert toks["count"] == len(toks["tokens"])
    text = httpx.post(fake_server + "/detokenize", json={"tokens": toks["tokens"]}).json()
    assert text["prompt"] == "abc"


BAD = [
    ({"messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": 10**7}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": USER, "temperature": -1}, 400, "temperature"),
    ({"messages": USER, "temperature": float("inf")}, 400, None),
    ({"messages": USER, "top_p": 2}, 400, "top_p"),
    ({"messages": USER, "n": 1000}, 400, "n"),
    ({"messages": USER, "top_logprobs": 5}, 400, "top_logprobs"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "bad:x"}}]}
            ]
        },
        400,
        "messages",
    ),
    ({"messages": "just a string"}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_openai_errors(fake_server, body, status, param, stream):
    payload = json.dumps({"model": "fake-model", **body, "stream": stream}, allow_nan=True)
    resp = httpx.post(
        fake_server + "/v1/chat/completions",
        content=payload,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == status, resp.text
    if status != 200:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param:
            assert err["param"] == param
        if status == 404:
            assert err["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'{"messages": 5}'])
def test_malformed_bodies(fake_server, raw):
    resp = httpx.post(
        fake_server + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400 and "error" in resp.json()


def test_openai_client_sees_bad_request(fake_server):
    with pytest.raises(openai.BadRequestError):
        client(fake_server).chat.completions.create(model="fake-model", messages=USER, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client(fake_server).chat.completions.create(model="nope", messages=USER)


def test_api_key(fake_server_with_key):
    base = fake_server_with_key
    assert httpx.get(base + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        resp = httpx.get(base + "/v1/models", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    res = client(base, "sekret").chat.completions.create(model="fake-model", messages=USER)
    assert res.choices[0].message.content


def test_disconnect_mid_stream_leaves_server_healthy(fake_server):
    body = {
        "model": "fake-model",
        "messages": USER,
        "stream": True,
        "ignore_eos": True,
        "max_tokens": 400,
    }
    with httpx.stream("POST", fake_server + "/v1/chat/completions", json=body) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 3:
                break
    metrics = httpx.get(fake_server + "/metrics").text
    assert "mistralpy_requests_total" in metrics
    res = client(fake_server).chat.completions.create(
        model="fake-model", messages=USER, max_tokens=3
    )
    assert len(res.choices[0].message.content) == 3
    running = [
        ln
        for ln in httpx.get(fake_server + "/metrics").text.splitlines()
        if ln.startswith("mistralpy_num_requests_running")
    ]
    assert running == ["mistralpy_num_requests_running 0.0"]
