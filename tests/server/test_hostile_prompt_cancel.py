"""Issue #17 item 4 gaps: a large prompt's tokenization leaves the event loop free, and stops
when its client leaves. Real Tekken tokenizer, ChatService as the routes call it; the route's
cancellation is what the transport guard does on a disconnect (tests/server/
test_hostile_transport.py checks that part). Bounded: one 3 MB prompt per case.

Why a CPU-time window after the disconnect proves nothing here: `tokenizers` holds the GIL
for a whole `encode` call, so a one-shot encode of 3 MB in a worker thread freezes the event
loop for its seconds; the disconnect is seen only after the work is done, and nothing runs
after it either way. What tells the two apart is how much of the prompt gets encoded, and how
long the loop stays deaf."""

from __future__ import annotations

import asyncio
import time

import pytest

from mistralpy.api.chat import ChatService, TemplatePrompts
from mistralpy.processing.chat_template import ChatTemplate
from mistralpy.processing.images import ImagePolicy
from mistralpy.processing.tokenizer import ENCODE_PIECE_CHARS, Tokenizer
from mistralpy.testing.tiny_checkpoint import write_tokenizer_files

# ~3 s of a core to encode in one go: far more than the time the client stays
BIG = "lorem ipsum dolor " * (3_000_000 // 18)
CLIENT_STAYS_S = 0.3


class _CountingEncoder:
    """Wraps a Tokenizer's plain encoder, counting the characters handed to it."""

    def __init__(self, encode):
        self.encode = encode
        self.chars = 0

    def __call__(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.encode(text)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def _work(service: ChatService, route: str):
    if route == "tokenize":
        return service.tokenize({"prompt": BIG})
    if route == "completion":
        return service._prepare_completion({"prompt": BIG, "max_tokens": 1})
    return service._prepare_chat({"messages": [{"role": "user", "content": BIG}]})


@pytest.mark.parametrize("route", ["tokenize", "completion", "chat"])
def test_a_client_that_leaves_stops_its_prompt_tokenization(
    tokenizer, tokenizer_dir, route, monkeypatch
):
    spy = _CountingEncoder(tokenizer._encode_plain)
    monkeypatch.setattr(tokenizer, "_encode_plain", spy)
    prompts = TemplatePrompts(tokenizer, ChatTemplate.from_dir(tokenizer_dir), ImagePolicy(), None)
    # a context so long that the cheap size check lets the prompt through to the tokenizer
    service = ChatService(None, tokenizer, prompts, "m", max_model_len=10**8)

    async def go() -> tuple[float, int]:
        task = asyncio.ensure_future(_work(service, route))
        start = time.monotonic()
        await asyncio.sleep(CLIENT_STAYS_S)
        loop_deaf = time.monotonic() - start - CLIENT_STAYS_S
        task.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        encoded_when_left = spy.chars
        await asyncio.sleep(1.0)  # a stopped worker has ended by now (one piece: ~30 ms)
        return loop_deaf, encoded_when_left

    loop_deaf, encoded_when_left = asyncio.run(go())
    assert loop_deaf < 1.0, f"the event loop was deaf {loop_deaf:.1f} s while tokenizing"
    # after the disconnect at most the piece under way (and a cut's overshoot to a word end)
    after = spy.chars - encoded_when_left
    assert after <= 2 * ENCODE_PIECE_CHARS, f"{after} characters encoded after the client left"
    assert spy.chars < len(BIG) / 2, f"{spy.chars} of {len(BIG)} characters encoded"
