"""A checkpoint whose chat template ignores `tools` (as the Hugging Face repo of Mistral Small
3.1 ships it) still gets tools into the prompt: chats with tools, tool calls or tool results
render with the bundled tool template, as mistral-common encodes them; --jinja-explicit still
overrides. Also: OpenAI-side chats (developer role, foreign call ids) through the real stack.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest

from mistralpy.api.runner import ModelOptions, load_template
from mistralpy.engine.config import EngineConfig
from mistralpy.processing.chat_template import (
    InvalidChatError,
    build_chat_prompt,
    openai_chat_to_mistral,
)
from mistralpy.processing.tokenizer import Tokenizer
from mistralpy.testing.tiny_checkpoint import write_tokenizer_files

# The shape of the HF repo's template (written here, not copied): a default system prompt, no
# `tools` anywhere, and assistant content read as a string or as its first part's text, which
# fails on an assistant turn that has tool_calls and `content: null`.
HF_STYLE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}
{%- else %}
{%- set system_message = 'You are a helpful assistant.' %}{% set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}
{%- elif message['role'] == 'assistant' %}
{%- if message['content'] is string %}{{- message['content'] + eos_token }}
{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}
{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}
{%- endif %}
{%- endfor %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {
    "id": "abcDEF123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ROUND = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 C"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Tokenizer files of the tiny checkpoint with the template only in tokenizer_config.json."""
    out = write_tokenizer_files(tmp_path_factory.mktemp("hf"))
    (out / "chat_template.jinja").unlink()
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = HF_STYLE_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return Tokenizer.from_dir(hf_dir)


@pytest.fixture(scope="module")
def oracle(hf_dir):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(hf_dir / "tekken.json"))


def oracle_ids(oracle, messages, tools):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(messages=copy.deepcopy(messages), tools=tools)
    return oracle.encode_chat_completion(request).tokens


def load(hf_dir, tokenizer, jinja_explicit=None):
    options = ModelOptions(EngineConfig(str(hf_dir)), jinja_explicit=jinja_explicit)
    return load_template(hf_dir, options, tokenizer)


def test_tools_render_with_the_bundled_template_and_the_log_says_so(
    hf_dir, tokenizer, oracle, caplog
):
    with caplog.at_level(logging.WARNING, logger="mistralpy"):
        template = load(hf_dir, tokenizer)
    notes = [r.getMessage() for r in caplog.records if "ignores `tools`" in r.getMessage()]
    assert len(notes) == 1 and str(hf_dir) in notes[0]
    with_tools = build_chat_prompt(tokenizer, template, ASK, TOOLS).token_ids
    assert with_tools == oracle_ids(oracle, ASK, TOOLS)
    assert tokenizer.special_tokens["[AVAILABLE_TOOLS]"] in with_tools
    # the assistant turn with tool_calls and null content renders (the HF-style one raises)
    assert build_chat_prompt(tokenizer, template, ROUND, TOOLS).token_ids == oracle_ids(
        oracle, ROUND, TOOLS
    )
    # a plain chat keeps the checkpoint's own template (its default system prompt)
    plain = tokenizer.decode(build_chat_prompt(tokenizer, template, ASK).token_ids, False)
    assert "You are a helpful assistant." in plain


def test_jinja_explicit_still_overrides(hf_dir, tokenizer, tmp_path, caplog):
    explicit = tmp_path / "explicit.jinja"
    explicit.write_text(HF_STYLE_TEMPLATE)
    with caplog.at_level(logging.WARNING, logger="mistralpy"):
        template = load(hf_dir, tokenizer, str(explicit))
    assert not [r for r in caplog.records if "ignores `tools`" in r.getMessage()]
    ids = build_chat_prompt(tokenizer, template, ASK, TOOLS).token_ids
    assert tokenizer.special_tokens["[AVAILABLE_TOOLS]"] not in ids


def test_openai_chat_through_the_real_template(hf_dir, tokenizer, oracle):
    """developer role = system; OpenAI call ids map to 9 characters, results stay paired."""
    template = load(hf_dir, tokenizer)
    foreign = copy.deepcopy(ROUND)
    foreign[1]["tool_calls"][0]["id"] = "call_6789"
    foreign[2]["tool_call_id"] = "call_6789"
    chat = openai_chat_to_mistral([{"role": "developer", "content": "Be brief."}, *foreign])
    mapped = chat[2]["tool_calls"][0]["id"]
    assert chat[0]["role"] == "system" and chat[3]["tool_call_id"] == mapped
    ids = build_chat_prompt(tokenizer, template, chat, TOOLS).token_ids
    assert ids == oracle_ids(oracle, chat, TOOLS)
    bad = copy.deepcopy(ROUND)
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{"
    with pytest.raises(InvalidChatError, match="arguments"):
        openai_chat_to_mistral(bad)
