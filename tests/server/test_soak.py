"""64 concurrent streaming clients with random disconnects; survivors get the greedy text
they would get alone, and the server stays healthy."""

import asyncio
import json
import random

import httpx


async def stream_text(
    client: httpx.AsyncClient, base: str, body: dict, cut: int | None
) -> str | None:
    """Stream a chat completion; drop the connection after `cut` events (None: read all)."""
    text = ""
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        events = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            if cut is not None and events >= cut:
                return None
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else ""
    return text


def soak(base: str, clients: int = 64, max_tokens: int = 24, seed: int = 0) -> None:
    rng = random.Random(seed)
    prompts = [f"question number {i % 8}" for i in range(clients)]
    bodies = [
        {
            "messages": [{"role": "user", "content": p}],
            "stream": True,
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        for p in prompts
    ]

    async def go():
        limits = httpx.Limits(max_connections=clients + 8)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            alone = {}
            for p, b in zip(prompts, bodies):
                if p not in alone:
                    alone[p] = await stream_text(client, base, b, None)
            cuts = [rng.randint(1, 5) if rng.random() < 0.3 else None for _ in bodies]
            results = await asyncio.gather(
                *[stream_text(client, base, b, c) for b, c in zip(bodies, cuts)]
            )
            for p, cut, got in zip(prompts, cuts, results):
                if cut is None:
                    assert got == alone[p]
            health = await client.get(base + "/health")
            assert health.status_code == 200
            after = await stream_text(client, base, bodies[0], None)
            assert after == alone[prompts[0]]

    asyncio.run(go())


def test_soak_fake_engine(fake_server):
    soak(fake_server)
