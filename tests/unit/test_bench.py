"""The load generators count real tokens and send fresh prompts.

Serving side: an in-process fake OpenAI server (httpx.MockTransport) whose SSE chunks carry
two tokens each, with /tokenize counting words. Engine side: `mistralpy bench`'s engine rows
over a fake AsyncEngine that delivers two tokens per output and records every prompt.
"""

from __future__ import annotations

import asyncio
import json
import random
from argparse import Namespace
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from mistralpy.api.chat import ChatService
from mistralpy.bench.metrics import RequestResult, percentile, spread_itl, summarize
from mistralpy.bench.serving import ServingConfig, fit_prompt, run_serving_bench
from mistralpy.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput
from mistralpy.server import cli
from tests.server.fake_stack import FakePrompts, FakeTokenizer

GAP_S = 0.01  # the fake server's delay between chunks

# --- metrics ------------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    rng = random.Random(3)
    xs = [rng.random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_spread_itl_splits_a_multi_token_gap():
    # deliveries at 0, 1, 3 s carrying 1, 2, 1 tokens: gaps 1 s (2 tokens) and 2 s (1 token)
    assert spread_itl([0.0, 1.0, 3.0], [1, 2, 1]) == [0.5, 0.5, 2.0]


def test_summarize_counts_only_successful_requests():
    ok = RequestResult(10, 5, 0.1, 0.5, [0.1] * 4)
    bad = RequestResult(0, 0, None, 0.2, [], "HTTP 500: boom")
    s = summarize([ok, ok, bad], wall_s=2.0)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 1, 10)
    assert s["output_tok_per_s"] == pytest.approx(5.0)
    assert s["tpot_ms_mean"] == pytest.approx(100.0)


# --- serving bench against a fake server -------------------------------------------------------


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class FakeOpenAI:
    """Counts words as tokens (+1 for BOS); streams `max_tokens` tokens two per chunk; chat
    streams start with a role-only chunk; the last chunk carries usage."""

    def __init__(self, tokenize: bool = True, usage: bool = True):
        self.tokenize = tokenize
        self.usage = usage
        self.prompts: list[str] = []

    @staticmethod
    def count(text: str) -> int:
        return len(text.split()) + 1

    async def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        body = json.loads(request.content)
        if path == "/tokenize":
            if not self.tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            text = body.get("prompt") or body["messages"][0]["content"]
            return httpx.Response(200, json={"count": self.count(text), "tokens": []})
        text = body.get("prompt") or body["messages"][0]["content"]
        self.prompts.append(text)
        return httpx.Response(200, content=self.stream(body, path.endswith("chat/completions")))

    async def stream(self, body: dict, chat: bool):
        n, text = body["max_tokens"], body.get("prompt") or body["messages"][0]["content"]
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(0, n, 2):
            await asyncio.sleep(GAP_S)
            piece = "xy"[: min(2, n - i)]
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"text": piece}
            yield _sse({"choices": [choice], "usage": None})
        if self.usage:
            usage = {"prompt_tokens": self.count(text), "completion_tokens": n}
            yield _sse({"choices": [], "usage": usage})
        yield _sse("[DONE]")


def _run(fake: FakeOpenAI, **kw) -> dict:
    cfg = ServingConfig(base_url="http://fake", num_requests=4, concurrency=2, warmup=1, **kw)
    return asyncio.run(run_serving_bench(cfg, transport=httpx.MockTransport(fake.handler)))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_serving_counts_tokens_not_chunks(endpoint):
    fake = FakeOpenAI()
    run = _run(fake, input_len=20, output_len=8, endpoint=endpoint)
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (4, 0)
    assert s["total_output_tokens"] == 4 * 8  # 4 chunks of 2 tokens each, not 4
    assert [r["prompt_tokens"] for r in run["requests"]] == [20] * 4
    assert all(r["ttft_s"] and r["ttft_s"] > 0 for r in run["requests"])
    # each later chunk's gap is split over its 2 tokens: half the fake's chunk gap
    assert GAP_S / 2 * 0.8 < s["itl_ms_p50"] / 1e3 < GAP_S / 2 * 3
    assert s["tpot_ms_mean"] > 0 and s["e2e_ms_p99"] >= s["ttft_ms_p99"]


def test_serving_prompts_are_fresh():
    fake = FakeOpenAI()
    _run(fake, input_len=30, output_len=2)
    assert len(fake.prompts) == 5 and len(set(fake.prompts)) == 5  # warm-up + 4, all distinct
    heads = {p.split()[1] for p in fake.prompts}  # first random word after the index tag
    assert len(heads) == 5


def test_serving_without_tokenize_route_reports_usage_counts():
    fake = FakeOpenAI(tokenize=False)
    run = _run(fake, input_len=12, output_len=4)
    assert run["summary"]["completed"] == 4
    # sized one word per token; the report has the server's count (words + BOS)
    assert [r["prompt_tokens"] for r in run["requests"]] == [FakeOpenAI.count(fake.prompts[1])] * 4


def test_serving_without_usage_falls_back_to_chunks_and_says_so():
    run = _run(FakeOpenAI(usage=False), input_len=12, output_len=4)
    s = run["summary"]
    assert (s["completed"], s["chunk_counted"], s["total_output_tokens"]) == (4, 4, 4 * 2)


def test_fit_prompt_hits_the_length_exactly():
    fake = FakeOpenAI()

    async def fit(n: int) -> str:
        cfg = ServingConfig(base_url="http://fake", input_len=n, model="fake")
        transport = httpx.MockTransport(fake.handler)
        async with httpx.AsyncClient(base_url="http://fake", transport=transport) as client:
            return await fit_prompt(client, cfg, random.Random(n), tag=7)

    for n in (2, 17, 64):
        assert FakeOpenAI.count(asyncio.run(fit(n))) == n


def test_server_error_becomes_failed_request():
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":
            return httpx.Response(404)
        return httpx.Response(500, json={"error": {"message": "boom"}})

    cfg = ServingConfig(base_url="http://x", model="m", num_requests=3, concurrency=3, warmup=0)
    run = asyncio.run(run_serving_bench(cfg, transport=httpx.MockTransport(handler)))
    assert (run["summary"]["completed"], run["summary"]["failed"]) == (0, 3)
    assert "HTTP 500" in run["errors"][0]


# --- engine-level `mistralpy bench` ------------------------------------------------------------


class TwoTokenEngine:
    """AsyncEngine stand-in: every output carries two tokens (the second one's text empty, as a
    partial UTF-8 byte would be); records each prompt it was given."""

    def __init__(self):
        self.prompts: list[list[int]] = []

    async def generate(self, request_id, prompt, params):
        self.prompts.append(list(prompt.token_ids))
        out = CompletionOutput(0, [], "", "", [], None, None, None)
        metrics = RequestMetrics(0.0)
        while len(out.token_ids) < params.max_tokens:
            await asyncio.sleep(0.001)
            new = [500, 501][: params.max_tokens - len(out.token_ids)]
            out.token_ids += new
            out.delta_token_ids, out.delta_text = new, "a"
            out.finish_reason = "length" if len(out.token_ids) >= params.max_tokens else None
            done = out.finish_reason is not None
            yield RequestOutput(request_id, prompt.token_ids, [out], done, metrics)

    def shutdown(self) -> None:
        pass


def _bench_args(flags: str = "") -> Namespace:
    """`mistralpy bench` flags as the CLI parses them (its defaults included)."""
    return cli.build_parser().parse_args(["bench", *f"--prompt-len 24 --gen-len 6 {flags}".split()])


def _fake_opened(monkeypatch) -> TwoTokenEngine:
    engine = TwoTokenEngine()
    tokenizer = SimpleNamespace(vocab_size=4000, special_token_ids=frozenset(range(1000)))
    opened = SimpleNamespace(engine=engine, tokenizer=tokenizer)
    # what the bench used before it drove the engine itself: the chat service over it
    fake_tok = FakeTokenizer()
    fake_tok.vocab_size = 4000
    opened.service = lambda _policy: ChatService(engine, fake_tok, FakePrompts(fake_tok), "m", 4096)

    async def load(_options):
        return opened

    monkeypatch.setattr(cli, "load_with_progress", load)
    return engine


def test_engine_bench_counts_tokens_not_outputs(monkeypatch):
    _fake_opened(monkeypatch)
    rows = asyncio.run(cli.bench_async(None, _bench_args()))
    assert rows[0]["completed"] == 3
    assert rows[0]["total_output_tokens"] == 3 * 6  # 3 outputs of 2 tokens per request


def test_engine_bench_sends_fresh_prompts(monkeypatch):
    engine = _fake_opened(monkeypatch)
    asyncio.run(cli.bench_async(None, _bench_args("--prompt-len 24 40 --concurrency 4")))
    assert len(engine.prompts) == 2 * (1 + 4)  # per length: warm-up + 4 timed
    assert len({tuple(p) for p in engine.prompts}) == len(engine.prompts)
    assert sorted({len(p) for p in engine.prompts}) == [24, 40]
    assert all(1000 <= t < 4000 for p in engine.prompts for t in p)  # no special tokens
