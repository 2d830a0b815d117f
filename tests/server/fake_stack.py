"""A fake engine/tokenizer/prompt builder with the real interfaces, for API and server tests.

The fake streams deterministic text one byte-token at a time, so the HTTP and Python API
layers can be tested without a model. Run as a module to serve it:
    python -m tests.server.fake_stack --port 8000 [--api-key K]
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from mistralpy.api.chat import ChatService, InvalidRequest
from mistralpy.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob

OFFSET = 10  # token ids below this are "special"
TOOL_REPLY = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]'
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


class FakeTokenizer:
    """Byte-level: token id = byte + OFFSET; ids 1 and 2 are BOS/EOS."""

    vocab_size = 256 + OFFSET
    max_token_bytes = 1
    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False, stop=None) -> list[int]:
        ids = [b + OFFSET for b in text.encode()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode(errors="replace")


@dataclass
class FakePrompt:
    token_ids: list[int]
    images: list = field(default_factory=list)


class FakePrompts:
    """Renders messages as `role: text` lines; image URLs starting with "bad:" are refused."""

    def __init__(self, tokenizer: FakeTokenizer):
        self.tokenizer = tokenizer

    async def load_images(self, messages: list[dict], stop=None) -> dict:
        return {}  # image URLs stay strings in the fake prompt

    def chat(
        self, messages: list[dict], tools: list[dict] | None, images: dict, stop=None
    ) -> FakePrompt:
        lines, images = [], []
        for m in messages:
            content = m.get("content") or ""
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        url = part["image_url"]["url"]
                        if url.startswith("bad:"):
                            raise InvalidRequest(f"cannot load image {url}", "messages")
                        images.append(url)
                content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            lines.append(f"{m['role']}: {content}")
        if tools:
            lines.append("tools: " + json.dumps([t["function"]["name"] for t in tools]))
        return FakePrompt(self.tokenizer.encode("\n".join(lines), True), images)

    def text(self, prompt: str | list[int], stop=None) -> FakePrompt:
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt, True)
        return FakePrompt(list(ids))


def reply_text(prompt_ids: list[int], params, index: int) -> str:
    """The fake model's full answer: tool call on "weather", else words from the prompt."""
    text = FakeTokenizer().decode(prompt_ids)
    if "weather" in text and "tools:" in text:
        return TOOL_REPLY
    rng = random.Random(sum(prompt_ids) * 31 + index if params.greedy else params.seed)
    return " ".join(rng.choice(WORDS) for _ in range(12))


class FakeEngine:
    """AsyncEngine stand-in: one byte-token per step, `delay` seconds apart."""

    def __init__(self, max_model_len: int = 512, delay: float = 0.0, max_num_seqs: int = 10**6):
        self.max_model_len = max_model_len
        self.delay = delay
        self.max_num_seqs = max_num_seqs  # sequences that run at once; other requests wait
        self.aborted: set[str] = set()
        self.active: set[str] = set()
        self.running: dict[str, int] = {}  # request id -> its sequences (n), while running
        self.finished_ids: list[str] = []

    def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.aborted.add(request_id)

    def stats(self) -> dict[str, float]:
        return {
            "num_running": sum(self.running.values()),
            "num_running_requests": len(self.running),
            "num_waiting": len(self.active) - len(self.running),
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_usage": 0.0,
        }

    async def _until_scheduled(self, request_id: str, n: int) -> None:
        """Wait, as a scheduler's waiting queue does, until the batch has room for n more."""
        while sum(self.running.values()) + n > self.max_num_seqs and request_id not in self.aborted:
            await asyncio.sleep(0.005)
        self.running[request_id] = n

    async def generate(self, request_id: str, prompt, params):
        tok = FakeTokenizer()
        metrics = RequestMetrics(time.monotonic(), time.monotonic())
        metrics.num_prompt_tokens = len(prompt.token_ids)
        room = self.max_model_len - len(prompt.token_ids)
        limit = min(params.max_tokens or room, room)
        replies = [tok.encode(reply_text(prompt.token_ids, params, i)) for i in range(params.n)]
        outs = [
            CompletionOutput(i, [], "", "", [], [] if params.logprobs else None, None, None)
            for i in range(params.n)
        ]
        self.active.add(request_id)
        finished = False
        try:
            await self._until_scheduled(request_id, params.n)
            # ignore_eos repeats the reply up to the limit ("length"), as a model would go on
            steps = limit if params.ignore_eos else max(len(r) for r in replies)
            for step in range(steps + 1):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    for o in outs:
                        o.finish_reason = o.finish_reason or "abort"
                    return
                metrics.first_token_time = metrics.first_token_time or time.monotonic()
                for o, reply in zip(outs, replies):
                    _advance(o, reply, step, limit, params, tok)
                finished = all(o.finish_reason for o in outs)
                if finished:
                    metrics.finished_time = time.monotonic()
                    self.finished_ids.append(request_id)
                yield RequestOutput(
                    request_id, list(prompt.token_ids), [_copy(o) for o in outs], finished, metrics
                )
                if finished:
                    return
        finally:
            if not finished:  # closed early, as AsyncEngine.generate: that aborts it
                self.aborted.add(request_id)
            self.active.discard(request_id)
            self.running.pop(request_id, None)


def _advance(o: CompletionOutput, reply: list[int], step: int, limit: int, params, tok) -> None:
    o.delta_text, o.delta_token_ids = "", []
    if o.finish_reason:
        return
    if step >= len(reply) and not params.ignore_eos:
        o.finish_reason = "stop"
        return
    token = reply[step % len(reply)]
    o.token_ids.append(token)
    o.delta_token_ids = [token]
    o.delta_text = tok.decode([token])
    o.text += o.delta_text
    if o.logprobs is not None:
        top = [TokenLogprob(token, o.delta_text, -0.5)] * params.top_logprobs
        o.logprobs.append(TokenLogprob(token, o.delta_text, -0.5, top))
    if len(o.token_ids) >= limit:
        o.finish_reason = "length"


def _copy(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        o.index,
        list(o.token_ids),
        o.text,
        o.delta_text,
        list(o.delta_token_ids),
        None if o.logprobs is None else list(o.logprobs),
        o.finish_reason,
        o.stop_reason,
    )


def make_fake_service(
    max_model_len: int = 512, delay: float = 0.0, max_num_seqs: int = 10**6
) -> ChatService:
    tok = FakeTokenizer()
    engine = FakeEngine(max_model_len, delay, max_num_seqs)
    return ChatService(engine, tok, FakePrompts(tok), "fake-model", max_model_len)


def main() -> None:
    import argparse

    import uvicorn

    from mistralpy.server.app import ServerSettings, create_app

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    service = make_fake_service(delay=args.delay)
    app = create_app(service, ServerSettings(api_key=args.api_key), service.engine.stats)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
