"""The mistral.rs-shaped Python API on the fake engine: types, Runner, builder, lazy import."""

import asyncio
import subprocess
import sys

import pytest

from mistralpy import (
    ChatCompletionRequest,
    CompletionRequest,
    IsqType,
    MultimodalArchitecture,
    Runner,
    TextMessageRole,
    TextMessages,
    VisionArchitecture,
    VisionMessages,
    Which,
)
from mistralpy.api.runner import Model, check_isq
from mistralpy.api.types import image_source
from mistralpy.params import InvalidParameter
from tests.server.fake_stack import make_fake_service


@pytest.fixture
def runner():
    r = Runner.from_service(make_fake_service())
    yield r
    r.shutdown()


def test_import_is_cheap():
    code = "import sys, mistralpy; assert 'torch' not in sys.modules; mistralpy.Which"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_which_variants():
    w = Which.VisionPlain(model_id="m", arch=VisionArchitecture.Mistral3, dtype="bf16")
    assert (w.model_id, w.arch, w.dtype) == ("m", "mistral3", "bfloat16")
    assert Which.MultimodalPlain("m", arch=MultimodalArchitecture.Mistral3).arch == "mistral3"
    assert MultimodalArchitecture.Mistral3 == "mistral3"
    assert Which.MultimodalPlain("m").arch is None and Which.Plain("m").kind == "text"
    with pytest.raises(ValueError):
        Which.VisionPlain("m", arch="gemma3")


def test_runner_chat_attribute_access(runner):
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            model="mistral3",
            messages=[{"role": "user", "content": "What is this?"}],
            max_tokens=6,
            presence_penalty=1.0,
            top_p=0.1,
            temperature=0.1,
            seed=1,
        )
    )
    assert len(res.choices[0].message.content) == 6
    assert res.choices[0].finish_reason == "length"
    u = res.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    for name in (
        "avg_tok_per_sec",
        "avg_prompt_tok_per_sec",
        "avg_compl_tok_per_sec",
        "total_time_sec",
        "total_prompt_time_sec",
        "total_completion_time_sec",
    ):
        assert getattr(u, name) >= 0
    assert repr(u).startswith("Usage(prompt_tokens=")


def test_runner_streaming_and_completion(runner):
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True
    )
    chunks = list(runner.send_chat_completion_request(req))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    req.stream = False
    assert runner.send_chat_completion_request(req).choices[0].message.content == text
    res = runner.send_completion_request(CompletionRequest(prompt="abc", max_tokens=2))
    assert len(res.choices[0].text) == 2


def test_runner_tools_and_tokenizer(runner):
    tool = '{"type": "function", "function": {"name": "get_weather", "parameters": {}}}'
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "weather?"}], tool_schemas=[tool]
        )
    )
    assert res.choices[0].message.tool_calls[0].function.name == "get_weather"
    ids = runner.tokenize_text("hello", add_special_tokens=False)
    assert runner.detokenize_text(ids, skip_special_tokens=True) == "hello"
    assert runner.max_sequence_length() == 512


def test_runner_errors_are_typed(runner):
    with pytest.raises(InvalidParameter):
        runner.send_chat_completion_request(
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=-2)
        )


def test_messages_and_image_sources(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 4), "red")
    msgs = VisionMessages().add_image_message(TextMessageRole.User, "what?", img, None)
    part = msgs.messages[0]["content"][0]
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_source(b"\x89PNG").startswith("data:image/png;base64,")
    assert image_source(str(tmp_path)) == str(tmp_path)
    text = TextMessages().add_message(TextMessageRole.User, "hi").messages
    assert text == [{"role": "user", "content": "hi"}]


def test_async_model_api():
    async def go():
        model = Model(make_fake_service())
        msgs = TextMessages().add_message(TextMessageRole.User, "hi")
        res = await model.send_chat_request(msgs)
        chunks = [c async for c in model.stream_chat_request(msgs)]
        return res, chunks

    res, chunks = asyncio.run(go())
    assert res.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"


def test_isq_is_never_ignored():
    assert check_isq("Q4K") == check_isq(IsqType.Q4K) == "q4k"
    with pytest.raises(ValueError, match="unknown quantization format"):
        check_isq("q9")
