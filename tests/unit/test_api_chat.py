"""ChatService on the fake engine: response shapes, streaming, tool calls, errors, aborts."""

import asyncio
import json

import pytest

from mistralpy.api.chat import InvalidRequest, ModelNotFound
from mistralpy.params import InvalidParameter
from tests.server.fake_stack import TOOL_REPLY, make_fake_service

USER = [{"role": "user", "content": "hi there"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


def run(coro):
    return asyncio.run(coro)


async def collect(agen):
    return [c async for c in agen]


def test_chat_completion_shape_and_usage():
    svc = make_fake_service()
    res = run(svc.create_chat_completion({"messages": USER, "max_tokens": 5, "temperature": 0}))
    assert res["object"] == "chat.completion" and res["model"] == "fake-model"
    choice = res["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"]) == 5
    usage = res["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    for key in ("avg_tok_per_sec", "avg_prompt_tok_per_sec", "avg_compl_tok_per_sec"):
        assert usage[key] >= 0
    assert usage["total_time_sec"] >= usage["total_completion_time_sec"] >= 0


def test_stream_equals_whole_and_role_first():
    svc = make_fake_service()
    body = {"messages": USER, "temperature": 0}
    whole = run(svc.create_chat_completion(dict(body)))
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    chunks = run(collect(svc.stream_chat_completion(dict(body))))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "stop" and all(f is None for f in finals[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(text)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_n_choices_and_logprobs():
    svc = make_fake_service()
    body = {"messages": USER, "n": 3, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    res = run(svc.create_chat_completion(body))
    assert [c["index"] for c in res["choices"]] == [0, 1, 2]
    lp = res["choices"][1]["logprobs"]["content"]
    assert len(lp) == 4 and len(lp[0]["top_logprobs"]) == 2
    assert lp[0]["bytes"] == list(lp[0]["token"].encode())


def test_tool_calls_whole_and_streamed():
    svc = make_fake_service()
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    res = run(svc.create_chat_completion(dict(body)))
    choice = res["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert choice["message"]["content"] is None
    chunks = run(collect(svc.stream_chat_completion(dict(body))))
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and len(deltas[0]["id"]) == 9
    args = "".join(d["function"]["arguments"] for d in deltas)
    assert args == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_returns_raw_text():
    svc = make_fake_service()
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    res = run(svc.create_chat_completion({**body, "tool_choice": "none"}))
    assert res["choices"][0]["message"]["content"] == TOOL_REPLY


@pytest.mark.parametrize(
    ("body", "exc", "param"),
    [
        ({"messages": []}, InvalidRequest, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, InvalidRequest, "messages[0].role"),
        ({"messages": USER, "max_tokens": 0}, InvalidParameter, "max_tokens"),
        ({"messages": USER, "max_tokens": 10_000}, InvalidRequest, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, InvalidRequest, "messages"),
        ({"messages": USER, "temperature": -1}, InvalidParameter, "temperature"),
        ({"messages": USER, "top_p": 0}, InvalidParameter, "top_p"),
        ({"messages": USER, "n": 1000}, InvalidParameter, "n"),
        ({"messages": USER, "logit_bias": {"x": 1}}, InvalidParameter, "logit_bias"),
        ({"messages": USER, "model": "gpt-4"}, ModelNotFound, "model"),
    ],
)
def test_bad_requests_raise_typed_errors(body, exc, param):
    svc = make_fake_service()
    with pytest.raises(exc) as info:
        run(svc.create_chat_completion(body))
    assert info.value.param == param
    with pytest.raises(exc):
        run(collect(svc.stream_chat_completion(body)))
    assert not svc.engine.active


def test_closing_a_stream_early_aborts_the_request():
    svc = make_fake_service(delay=0.001)

    async def go():
        agen = svc.stream_chat_completion({"messages": USER, "request": 1}, "req-1")
        await agen.__anext__()
        await agen.__anext__()
        await agen.aclose()

    run(go())
    assert "req-1" in svc.engine.aborted and not svc.engine.active


def test_completions_and_tokenizer_roundtrip():
    svc = make_fake_service()
    res = run(
        svc.create_completion({"prompt": "hello", "max_tokens": 3, "echo": True, "temperature": 0})
    )
    assert res["object"] == "text_completion" and res["choices"][0]["text"].startswith("hello")
    chunks = run(
        collect(svc.stream_completion({"prompt": "hello", "max_tokens": 3, "temperature": 0}))
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == res["choices"][0]["text"][5:]
    toks = run(svc.tokenize({"prompt": "héllo", "add_special_tokens": False}))
    assert svc.detokenize({"tokens": toks["tokens"]})["prompt"] == "héllo"
    with pytest.raises(InvalidRequest):
        svc.detokenize({"tokens": [10**9]})


def test_default_max_tokens_limits_replies_within_the_context():
    """`run` and built models set a reply limit for requests that give none (cut to the room
    left, so it never turns a request into a context-length error); the server sets none."""
    svc = make_fake_service(max_model_len=48)
    body = {"messages": USER, "temperature": 0, "ignore_eos": True}
    svc.default_max_tokens = 5
    res = run(svc.create_chat_completion(dict(body)))
    assert res["usage"]["completion_tokens"] == 5 and res["choices"][0]["finish_reason"] == "length"
    assert (
        run(svc.create_chat_completion({**body, "max_tokens": 7}))["usage"]["completion_tokens"]
        == 7
    )
    chunks = run(collect(svc.stream_completion({"prompt": "abc", "temperature": 0})))
    assert sum(len(c["choices"][0]["text"]) for c in chunks if c["choices"]) <= 5
    svc.default_max_tokens = 10**6
    res = run(svc.create_chat_completion(dict(body)))
    assert res["usage"]["total_tokens"] == 48  # up to the end of the context, no error


def test_messages_carry_their_own_max_tokens():
    from mistralpy.api.runner import Model
    from mistralpy.api.types import TextMessageRole, VisionMessages

    svc = make_fake_service()
    svc.default_max_tokens = 50
    msgs = VisionMessages().add_message(TextMessageRole.User, "hi").set_max_tokens(3)
    res = run(Model(svc).send_chat_request(msgs))
    assert res.usage.completion_tokens == 3


def test_images_over_the_policy_limit_are_refused_before_any_load():
    """More image parts than `max_images_per_request` (the same URL counts each time it
    appears): a TooManyImagesError naming `messages`, raised before any download starts."""
    import threading

    from mistralpy.api.chat import TemplatePrompts
    from mistralpy.processing.errors import TooManyImagesError
    from mistralpy.processing.images import ImagePolicy

    def message(n: int) -> list[dict]:
        part = {"type": "image_url", "image_url": {"url": "http://198.51.100.1/x.png"}}
        return [{"role": "user", "content": [{"type": "text", "text": "hi"}] + [part] * n}]

    # text-only (no image processor): within the limit nothing loads, so no download is tried
    prompts = TemplatePrompts(None, None, ImagePolicy(max_images_per_request=2), None)  # type: ignore[arg-type]
    assert asyncio.run(prompts.load_images(message(2), threading.Event())) == {}
    with pytest.raises(TooManyImagesError, match="at most 2 images") as err:
        asyncio.run(prompts.load_images(message(3), threading.Event()))
    assert err.value.param == "messages"
