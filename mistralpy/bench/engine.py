"""Engine-level benchmark: `mistralpy bench MODEL` (no HTTP, no chat service).

Requests go straight to the AsyncEngine, each with a fresh random prompt of token ids (so a
prefix cache never serves a timed prompt), greedy with ignore_eos.
Tokens are counted from the engine's outputs (`delta_token_ids`), so a step that delivers
several tokens, or a token whose text is empty, is counted as what it is.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

from mistralpy.bench.metrics import RequestResult, spread_itl, summarize
from mistralpy.params import SamplingParams
from mistralpy.processing.chat_template import ProcessedPrompt

if TYPE_CHECKING:
    from mistralpy.engine.engine import AsyncEngine
    from mistralpy.processing.tokenizer import Tokenizer


def fresh_prompts(
    tokenizer: Tokenizer, rng: random.Random, n_prompts: int, length: int
) -> list[list[int]]:
    """`n_prompts` prompts of uniform random regular-token ids (no BOS/EOS/[IMG] ...): over a
    131k vocabulary no two share even one KV block's worth of leading tokens, so the prefix
    cache serves none of them."""
    special = frozenset(tokenizer.special_token_ids)
    regular = [i for i in range(tokenizer.vocab_size) if i not in special]
    return [rng.choices(regular, k=length) for _ in range(n_prompts)]


async def engine_request(
    engine: AsyncEngine, request_id: str, ids: list[int], max_tokens: int
) -> RequestResult:
    """One greedy request through AsyncEngine.generate, timed per engine output."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    times: list[float] = []
    counts: list[int] = []
    cached = 0
    async for out in engine.generate(request_id, ProcessedPrompt(token_ids=ids, images=[]), params):
        k = sum(len(o.delta_token_ids) for o in out.outputs)
        if k:
            times.append(time.perf_counter())
            counts.append(k)
        cached = out.metrics.num_cached_tokens
    end = time.perf_counter()
    return RequestResult(
        prompt_tokens=len(ids),
        output_tokens=sum(counts),
        ttft_s=times[0] - start if times else None,
        e2e_s=end - start,
        itl_s=spread_itl(times, [float(c) for c in counts]),
        cached_tokens=cached,
    )


async def run_engine_load(
    engine: AsyncEngine, prompts: list[list[int]], max_tokens: int, concurrency: int, tag: str
) -> tuple[list[RequestResult], float]:
    """All prompts, at most `concurrency` in flight; (results, wall seconds)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int, ids: list[int]) -> RequestResult:
        async with gate:
            return await engine_request(engine, f"bench-{tag}-{i}", ids, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*[gated(i, p) for i, p in enumerate(prompts)])
    return list(results), time.perf_counter() - start


async def bench_prompt_len(
    engine: AsyncEngine,
    tokenizer: Tokenizer,
    rng: random.Random,
    prompt_len: int,
    gen_len: int,
    num_requests: int,
    concurrency: int,
    warmup: int,
) -> dict[str, Any]:
    """One row: `warmup` short untimed requests, then the timed ones, all on fresh prompts."""
    prompts = fresh_prompts(tokenizer, rng, warmup + num_requests, prompt_len)
    if warmup:
        await run_engine_load(
            engine, prompts[:warmup], min(gen_len, 8), concurrency, f"w{prompt_len}"
        )
    results, wall = await run_engine_load(
        engine, prompts[warmup:], gen_len, concurrency, f"{prompt_len}"
    )
    row: dict[str, Any] = {
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "concurrency": concurrency,
        **summarize(results, wall),
    }
    ttft_mean = row["ttft_ms_mean"] / 1e3
    row["prefill_tok_per_s"] = prompt_len / ttft_mean if ttft_mean > 0 else 0.0
    row["decode_tok_per_s"] = 1e3 / row["tpot_ms_mean"] if row["tpot_ms_mean"] > 0 else 0.0
    return row


async def bench_engine(
    engine: AsyncEngine,
    tokenizer: Tokenizer,
    prompt_lens: list[int],
    gen_len: int,
    num_requests: int,
    concurrency: int,
    warmup: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A row per prompt length (see bench_prompt_len); one seeded RNG for every prompt."""
    rng = random.Random(seed)
    return [
        await bench_prompt_len(
            engine, tokenizer, rng, n, gen_len, num_requests, concurrency, warmup
        )
        for n in prompt_lens
    ]
