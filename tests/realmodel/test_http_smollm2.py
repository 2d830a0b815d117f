"""A real trained model behind the real HTTP server: SmolLM2-135M-Instruct from its GGUF.

The server runs `mistralpy serve FILE.gguf --dtype float32` (the dequantized path, whose logits
equal transformers') on loopback; greedy answers are compared token for token with
transformers' float32 greedy `generate` on the same prompt ids. Sampling controls are checked
on the model's peaked distributions: EOS (`<|im_end|>`) ends a reply with finish_reason "stop",
stop strings cut it, top_k=1 / a tiny top_p equal greedy, seeds reproduce, penalties and
logit_bias move the choice away from what greedy picks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from mistralpy.processing.chat_template import ChatTemplate, build_chat_prompt
from mistralpy.processing.tokenizer import Tokenizer
from tests.realmodel.conftest import CHATS
from tests.server.conftest import free_port, start_server, stop_server

FRANCE = CHATS[0]
MAX_NEW = 40  # enough for every CHATS answer to reach EOS under transformers' greedy
TIMEOUT = 120.0  # one request on 2 shared cores


@pytest.fixture(scope="module")
def server(smollm2_gguf) -> Iterator[str]:
    port = free_port()
    args = ["-m", "mistralpy.server.cli", "serve", str(smollm2_gguf), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    args += ["--max-model-len", "1024", "--max-num-seqs", "8", "--served-model-name", "smollm2"]
    proc = start_server(args, port, timeout=400)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def chat(server: str, messages: list[dict], **params) -> dict:
    body = {"model": "smollm2", "messages": messages, "max_tokens": MAX_NEW, **params}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def prompt_ids(smollm2_gguf):
    tokenizer, template = Tokenizer.from_dir(smollm2_gguf), ChatTemplate.from_dir(smollm2_gguf)
    return lambda messages: build_chat_prompt(tokenizer, template, messages).token_ids


@pytest.mark.parametrize("index", range(len(CHATS)), ids=[f"chat{i}" for i in range(len(CHATS))])
def test_greedy_answer_equals_transformers(index, server, prompt_ids, hf_greedy, hf_tokenizer):
    messages = CHATS[index]
    theirs = hf_greedy(prompt_ids(messages), MAX_NEW)
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ended = eos in theirs
    theirs = theirs[: theirs.index(eos)] if ended else theirs
    got = chat(server, messages, temperature=0)
    assert got["message"]["content"] == hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert got["finish_reason"] == ("stop" if ended else "length")


def test_capital_of_france_stops_at_eos(server):
    got = chat(server, FRANCE, temperature=0)
    assert got["message"]["content"] == "The capital of France is Paris."
    assert got["finish_reason"] == "stop"


def test_streamed_answer_equals_the_whole(server):
    body = {"messages": FRANCE, "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
    text, reasons = "", []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["delta"].get("content") or ""
                reasons.append(choice.get("finish_reason"))
    assert text == "The capital of France is Paris." and reasons[-1] == "stop"


def test_stop_string_cuts_the_answer(server):
    got = chat(server, FRANCE, temperature=0, stop=[" Paris"])
    assert got["message"]["content"] == "The capital of France is"
    assert got["finish_reason"] == "stop"


def test_max_tokens_ends_with_length(server):
    got = chat(server, FRANCE, temperature=0, max_tokens=3)
    assert got["message"]["content"] == "The capital of"
    assert got["finish_reason"] == "length"


def test_top_k_one_and_tiny_top_p_are_greedy(server):
    greedy = chat(server, CHATS[2], temperature=0)["message"]["content"]
    assert chat(server, CHATS[2], temperature=1.5, top_k=1, seed=3)["message"]["content"] == greedy
    assert (
        chat(server, CHATS[2], temperature=1.5, top_p=1e-6, seed=4)["message"]["content"] == greedy
    )


def test_seeds_reproduce_and_differ(server):
    def sample(seed: int) -> str:
        return chat(server, CHATS[2], temperature=1.0, seed=seed, max_tokens=12)["message"][
            "content"
        ]

    first = sample(11)
    assert sample(11) == first  # same seed, same text
    assert len({first, sample(12), sample(13), sample(14)}) > 1  # T=1 on a 135M model varies


def test_logit_bias_bans_the_greedy_word(server, smollm2_gguf):
    paris = Tokenizer.from_dir(smollm2_gguf).encode(" Paris")
    assert len(paris) == 1
    got = chat(server, FRANCE, temperature=0, logit_bias={str(paris[0]): -100})
    assert got["message"]["content"].startswith("The capital of France is")
    assert " Paris" not in got["message"]["content"]


def test_penalties_reduce_repetition(server):
    messages = [{"role": "user", "content": "Write the word 'cat' twenty times."}]
    plain = chat(server, messages, temperature=0, max_tokens=30)["message"]["content"]
    penalised = chat(server, messages, temperature=0, max_tokens=30, frequency_penalty=2.0)
    repeated = chat(server, messages, temperature=0, max_tokens=30, repetition_penalty=1.8)
    count = lambda s: s.lower().count("cat")  # noqa: E731
    assert count(penalised["message"]["content"]) < count(plain), (plain, penalised)
    assert count(repeated["message"]["content"]) < count(plain), (plain, repeated)


def test_json_schema_answer_on_a_gguf_vocabulary(server):
    """A grammar-constrained request on the GGUF model (its llguidance tokenizer is built
    from the file's vocabulary at start-up): the answer parses and fits the schema."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    got = chat(server, FRANCE, temperature=0, max_tokens=24, response_format=fmt)
    assert set(json.loads(got["message"]["content"])) == {"city"}
