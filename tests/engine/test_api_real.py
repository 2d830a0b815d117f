"""The Python API on the real stack (tiny demo checkpoint, CPU)."""

import asyncio

import pytest


@pytest.fixture(scope="module")
def runner():
    from mistralpy import Runner, VisionArchitecture, Which

    r = Runner(
        which=Which.VisionPlain(model_id="demo", arch=VisionArchitecture.Mistral3),
        device="cpu",
        max_model_len=512,
    )
    yield r
    r.shutdown()


def test_runner_image_from_local_path_stream_and_usage(runner, tmp_path):
    from PIL import Image

    from mistralpy import ChatCompletionRequest

    path = tmp_path / "img.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(path)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": str(path)}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    req = ChatCompletionRequest(model="mistral3", messages=msgs, max_tokens=6, temperature=0)
    res = runner.send_chat_completion_request(req)
    assert res.usage.completion_tokens == 6 and res.usage.avg_compl_tok_per_sec > 0
    req.stream = True
    text = "".join(
        c.choices[0].delta.content or ""
        for c in runner.send_chat_completion_request(req)
        if c.choices
    )
    assert text == res.choices[0].message.content
    req.messages[0]["content"][0]["image_url"]["url"] = "file://" + str(path)
    req.stream = False
    assert runner.send_chat_completion_request(req).choices[0].message.content == text


def test_runner_tokenizer_matches_engine(runner):
    ids = runner.tokenize_text("Hello world", add_special_tokens=False)
    assert runner.detokenize_text(ids, skip_special_tokens=True) == "Hello world"
    assert runner.max_sequence_length() == 512


def test_async_builder():
    from mistralpy import (
        TextMessageRole,
        VisionArchitecture,
        VisionMessages,
        VisionModelBuilder,
    )

    async def go():
        model = await (
            VisionModelBuilder("demo", VisionArchitecture.Mistral3)
            .with_device("cpu")
            .with_max_model_len(256)
            .with_max_tokens(6)
            .with_logging()
            .build()
        )
        from PIL import Image

        msgs = VisionMessages().add_image_message(
            TextMessageRole.User, "Describe.", Image.new("RGB", (30, 30)), model
        )
        res = await model.send_chat_request(msgs)
        chunks = [c async for c in model.stream_chat_request(msgs)]
        model.shutdown()
        return res, chunks

    res, chunks = asyncio.run(go())
    assert res.choices[0].message.content is not None
    assert res.usage.completion_tokens <= 6  # the builder's reply limit (default 1024)
    assert chunks[0].choices[0].delta.role == "assistant"
