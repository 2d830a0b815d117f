"""Load test of any OpenAI-compatible server over HTTP: `mistralpy bench --url URL`.

N streaming requests, at most C in flight, each a fresh random prompt (no two share a prefix,
so a prefix cache cannot turn the run into cache hits), `max_tokens` = output length with
`ignore_eos`. Token counts are the server's: prompts are fitted to the asked length with its
`/tokenize` route when it has one, and every stream asks for `stream_options.include_usage`,
so output tokens are `usage.completion_tokens`, never a count of SSE chunks (a chunk may
carry several tokens, or none).

Talks HTTP only (httpx + asyncio); imports nothing else of mistralpy but the shared metrics.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from mistralpy.bench.metrics import RequestResult, first_errors, spread_itl, summarize

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Letters only, 2–7 long: most become one or two tokens in a BPE vocabulary, and none is a
# special token's spelling.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
FILLER = " a"  # pads a fitted prompt token by token: one pre-token, one token in BPE vocabularies


@dataclass(frozen=True)
class ServingConfig:
    """One load run against `base_url`."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    input_len: int = 1024  # prompt tokens per request (fitted with /tokenize when available)
    output_len: int = 128  # max_tokens, with ignore_eos so every request generates all of them
    num_requests: int = 32
    concurrency: int = 32  # requests in flight at once
    endpoint: str = "completions"  # key of ENDPOINTS
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    ignore_eos: bool = True  # a vLLM/mistralpy extra field; OpenAI proper rejects it
    seed: int = 0
    request_timeout_s: float = 600.0
    warmup: int = 1  # short requests before the timed run (their results are dropped)


# --- prompts ---------------------------------------------------------------------------------


def random_words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(_ALPHABET, k=rng.randint(2, 7))) for _ in range(n)]


def prompt_text(words: list[str], tag: int) -> str:
    """The request's index leads the text: prompts differ from their first token on."""
    return f"{tag} " + " ".join(words)


async def count_tokens(client: httpx.AsyncClient, cfg: ServingConfig, text: str) -> int | None:
    """Tokens the server makes of `text` as this endpoint would send it; None if it has no
    /tokenize route (then the prompt is sized by a words-per-token guess)."""
    body: dict[str, Any] = {"model": cfg.model}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    try:
        r = await client.post("/tokenize", json=body)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    data = r.json()
    return int(data["count"]) if "count" in data else len(data["tokens"])


async def fit_prompt(
    client: httpx.AsyncClient, cfg: ServingConfig, rng: random.Random, tag: int
) -> str:
    """A fresh random prompt of `cfg.input_len` tokens: the longest prefix of a random word
    list that fits (bisection over /tokenize counts), then one-token fillers up to the length.
    Without /tokenize: one word per token, as asked (the usage block reports the truth)."""
    words = random_words(rng, 2 * cfg.input_len + 8)
    if await count_tokens(client, cfg, prompt_text(words[:1], tag)) is None:
        return prompt_text(words[: max(cfg.input_len - 1, 1)], tag)
    lo, hi = 0, len(words)  # count(words[:lo]) <= input_len (lo = 0: only the tag)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = await count_tokens(client, cfg, prompt_text(words[:mid], tag))
        if n is not None and n <= cfg.input_len:
            lo = mid
        else:
            hi = mid - 1
    text = prompt_text(words[:lo], tag)
    have = await count_tokens(client, cfg, text) or 0
    padded = text + FILLER * max(cfg.input_len - have, 0)
    return padded if await count_tokens(client, cfg, padded) == cfg.input_len else text


# --- one streaming request --------------------------------------------------------------------


def request_body(cfg: ServingConfig, text: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a stream chunk carries (either protocol), "" for role/usage chunks."""
    parts = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            parts.append(choice.get("text") or "")
        else:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


@dataclass
class _Stream:
    """What one SSE stream delivered: arrival times of text chunks and the usage block."""

    chunk_times: list[float]
    usage: dict[str, Any] | None
    error: str | None


async def read_stream(response: httpx.Response) -> _Stream:
    times: list[float] = []
    usage, error = None, None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            break
        now = time.perf_counter()
        chunk = json.loads(payload)
        if "error" in chunk:
            error = str(chunk["error"].get("message", chunk["error"]))
            break
        if chunk_text(chunk):
            times.append(now)
        usage = chunk.get("usage") or usage
    return _Stream(times, usage, error)


def result_from_stream(s: _Stream, start: float, end: float, asked_prompt: int) -> RequestResult:
    """Real counts from usage (chunk counts only if the server sent none, flagged); ITL spreads
    each chunk gap over the tokens per chunk."""
    usage = s.usage or {}
    n_out = int(usage.get("completion_tokens", len(s.chunk_times)))
    per_chunk = n_out / len(s.chunk_times) if s.chunk_times else 0.0
    return RequestResult(
        prompt_tokens=int(usage.get("prompt_tokens", asked_prompt)),
        output_tokens=n_out,
        ttft_s=s.chunk_times[0] - start if s.chunk_times else None,
        e2e_s=end - start,
        itl_s=spread_itl(s.chunk_times, [per_chunk] * len(s.chunk_times)),
        error=s.error,
        counted=s.usage is not None,
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
    )


def failed(start: float, message: str) -> RequestResult:
    return RequestResult(0, 0, None, time.perf_counter() - start, error=message)


async def one_request(
    client: httpx.AsyncClient, cfg: ServingConfig, text: str, max_tokens: int
) -> RequestResult:
    """Send one streaming request and time it; failures become a result with `error`."""
    start = time.perf_counter()
    body = request_body(cfg, text, max_tokens)
    try:
        async with client.stream("POST", ENDPOINTS[cfg.endpoint], json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                return failed(start, f"HTTP {response.status_code}: {detail}")
            stream = await read_stream(response)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return failed(start, f"{type(e).__name__}: {e}")
    return result_from_stream(stream, start, time.perf_counter(), cfg.input_len)


# --- the run ----------------------------------------------------------------------------------


async def served_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_requests(
    client: httpx.AsyncClient, cfg: ServingConfig, prompts: list[str], max_tokens: int
) -> tuple[list[RequestResult], float]:
    """All prompts, at most cfg.concurrency in flight; (results in order, wall seconds)."""
    gate = asyncio.Semaphore(cfg.concurrency)

    async def gated(text: str) -> RequestResult:
        async with gate:
            return await one_request(client, cfg, text, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*[gated(p) for p in prompts])
    return list(results), time.perf_counter() - start


def make_client(
    cfg: ServingConfig, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(
        max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4
    )
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    return httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"),
        headers=headers,
        limits=limits,
        timeout=timeout,
        transport=transport,
    )


async def run_serving_bench(
    cfg: ServingConfig, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Any]:
    """Prompts first (fitting talks to /tokenize, untimed), then a short warm-up, then the timed
    run. Returns the config, the summary (metrics.summarize) and the per-request figures."""
    async with make_client(cfg, transport) as client:
        if cfg.model is None:
            cfg = ServingConfig(**{**cfg.__dict__, "model": await served_model(client)})
        rng = random.Random(cfg.seed)
        total = cfg.warmup + cfg.num_requests
        prompts = [await fit_prompt(client, cfg, rng, tag) for tag in range(total)]
        if cfg.warmup:
            await run_requests(client, cfg, prompts[: cfg.warmup], min(cfg.output_len, 8))
        results, wall = await run_requests(client, cfg, prompts[cfg.warmup :], cfg.output_len)
    return {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "api_key"},
        "summary": summarize(results, wall),
        "errors": first_errors(results),
        "requests": [
            {
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft_s,
                "e2e_s": r.e2e_s,
                "error": r.error,
            }
            for r in results
        ],
    }
