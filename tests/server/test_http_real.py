"""The real stack (tiny demo checkpoint) behind a real server subprocess.

Skipped until the engine, model and processing parts are merged into this tree.
"""

import base64
import io

import httpx
import openai

from tests.server.test_soak import soak

USER = [{"role": "user", "content": "Tell me a story."}]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def model_name(base: str) -> str:
    return httpx.get(base + "/v1/models").json()["data"][0]["id"]


def png_data_url(size=(40, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_greedy_stream_matches_whole_and_usage(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    res = c.chat.completions.create(model=name, messages=USER, temperature=0, max_tokens=12)
    assert res.usage.completion_tokens == 12 and res.choices[0].finish_reason == "length"
    chunks = list(
        c.chat.completions.create(
            model=name,
            messages=USER,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == res.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    extra = res.usage.model_extra
    assert extra["avg_compl_tok_per_sec"] > 0 and extra["total_time_sec"] > 0


def test_image_request_and_image_errors(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url()}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    res = c.chat.completions.create(model=name, messages=msgs, max_tokens=4, temperature=0)
    assert res.usage.prompt_tokens > 10
    bad_sources = [
        "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        png_data_url()[:60],  # truncated
        "http://127.0.0.1:1/x.png",  # loopback refused
        "http://10.0.0.1/x.png",  # private refused
        "/etc/passwd",  # outside the allowed media dir
        "file:///etc/hostname",
    ]
    for src in bad_sources:
        body = {
            "model": name,
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": src}},
                        {"type": "text", "text": "x"},
                    ],
                }
            ],
        }
        resp = httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 400, (src, resp.text)
        assert resp.json()["error"]["message"]
    many = [{"type": "image_url", "image_url": {"url": png_data_url((8, 8))}}] * 40
    body = {"model": name, "messages": [{"role": "user", "content": many}], "max_tokens": 1}
    assert (
        httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=60).status_code == 400
    )


def test_context_and_sampling_errors(demo_server):
    name = model_name(demo_server)
    for extra, param in [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"top_k": -5}, "top_k"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ]:
        body = {"model": name, "messages": USER, **extra}
        resp = httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    long = [{"role": "user", "content": "hello " * 2000}]
    resp = httpx.post(
        demo_server + "/v1/chat/completions", json={"model": name, "messages": long}, timeout=60
    )
    assert resp.status_code == 400


def test_tokenize_roundtrip(demo_server):
    toks = httpx.post(
        demo_server + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}
    ).json()
    back = httpx.post(demo_server + "/detokenize", json={"tokens": toks["tokens"]}).json()
    assert back["prompt"] == "Hello world"


def test_soak_real(demo_server):
    soak(demo_server, clients=64, max_tokens=16)
    assert httpx.get(demo_server + "/health").status_code == 200
    metrics = httpx.get(demo_server + "/metrics").text
    assert "mistralpy_kv_cache_usage_ratio" in metrics


def test_small_concurrency_matches_alone(demo_server):
    soak(demo_server, clients=8, max_tokens=8, seed=1)


def test_completion_batches_and_chat_conformance_on_the_real_stack(demo_server):
    """A prompt batch gives each prompt's own greedy answer; `developer` renders as `system`;
    /tokenize counts tools as the chat does; HEAD /health answers."""
    c, name = client(demo_server), model_name(demo_server)
    prompts = [[1, 1500, 1600, 1700], [1, 2000, 2100]]
    batch = c.completions.create(model=name, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    for k, prompt in enumerate(prompts):
        alone = c.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
        assert {ch.text for ch in batch.choices[2 * k : 2 * k + 2]} == {alone.choices[0].text}
    assert batch.usage.prompt_tokens == 7
    ask = [{"role": "user", "content": "hi"}]
    usage = {
        role: c.chat.completions.create(
            model=name, messages=[{"role": role, "content": "Be brief."}, *ask], max_tokens=1
        ).usage.prompt_tokens
        for role in ("system", "developer")
    }
    assert usage["system"] == usage["developer"]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    counts = [
        httpx.post(demo_server + "/tokenize", json={"messages": ask, **extra}).json()["count"]
        for extra in ({}, {"tools": tools})
    ]
    chat = c.chat.completions.create(model=name, messages=ask, tools=tools, max_tokens=1)
    assert counts[1] > counts[0] and counts[1] == chat.usage.prompt_tokens
    assert httpx.head(demo_server + "/health").status_code == 200
