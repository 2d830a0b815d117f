"""Issue #17 on the real stack: `mistralpy serve demo` (tiny checkpoint, CPU) attacked as a
hostile client would, loopback only, each test bounded in count and time."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time

import httpx
import pytest

from tests.server.hostile import json_request, port_of, wait_until

CHAT = "/v1/chat/completions"


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    names = ("mistralpy_num_requests_running", "mistralpy_num_requests_waiting")
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(names)
    }


def busy(base: str) -> float:
    return sum(gauges(base).values())


async def _stream_finish_reason(client: httpx.AsyncClient, base: str) -> str | None:
    body = {
        "messages": [{"role": "user", "content": "count"}],
        "stream": True,
        "max_tokens": 40,
        "ignore_eos": True,
    }
    reason = None
    async with client.stream("POST", base + CHAT, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    reason = choice.get("finish_reason") or reason
    return reason


BAD_BODIES = [
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "seed": 2**64}),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1}),
    ("/v1/completions", {"prompt": [1, 131072]}),
    ("/v1/completions", {"prompt": [1, 2**63]}),
    ("/v1/completions", {"prompt": [1, 2**64 + 5]}),
]


def test_bad_seed_or_token_id_is_a_400_and_harms_nobody(demo_server):
    """Item 1: these failed inside the model step and took the whole step down."""

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [
                asyncio.ensure_future(_stream_finish_reason(client, demo_server)) for _ in range(3)
            ]
            await asyncio.sleep(0.3)
            bad = await asyncio.gather(
                *[
                    client.post(demo_server + path, json={**body, "max_tokens": 4})
                    for path, body in BAD_BODIES
                ]
            )
            return bad, await asyncio.gather(*streams)

    bad, reasons = asyncio.run(go())
    for resp in bad:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] in ("seed", "prompt")
    assert reasons == ["length"] * 3


def test_abandoned_non_streaming_requests_stop(demo_server):
    """Item 3: non-streaming requests kept generating after their clients left."""
    assert wait_until(lambda: busy(demo_server) == 0, 30)
    payload = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 480,
        "ignore_eos": True,
    }
    socks = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", port_of(demo_server)))
        sock.sendall(json_request(CHAT, payload))
        socks.append(sock)
    assert wait_until(lambda: busy(demo_server) >= 4, 20)
    for sock in socks:
        sock.close()
    start = time.monotonic()
    assert wait_until(lambda: busy(demo_server) == 0, 5), gauges(demo_server)
    assert time.monotonic() - start < 5


def _nested_json(depth: int) -> str:
    """A schema nested `depth` deep, as JSON text (json.dumps itself would recurse too far)."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "object"}' + "}}" * depth


def post_raw(base: str, path: str, body: dict, marker: str, raw: str) -> httpx.Response:
    """POST `body` as JSON with the string `marker` replaced by the JSON text `raw`."""
    text = json.dumps(body).replace(json.dumps(marker), raw)
    headers = {"content-type": "application/json"}
    return httpx.post(base + path, content=text.encode(), headers=headers, timeout=30)


SURROGATE = '"a\\ud800b"'  # JSON text: a lone surrogate escape
USER_X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "path,body",
    [
        (CHAT, {"messages": [{"role": "user", "content": "S"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "S", "max_tokens": 2}),
        ("/tokenize", {"prompt": "S"}),
        (CHAT, {"messages": USER_X, "stop": ["S"]}),
        ("/v1/responses", {"input": "S", "max_output_tokens": 2}),
    ],
)
def test_lone_surrogate_is_a_400(demo_server, path, body):
    """Item 9: a lone surrogate reached the tokenizer and came back as a 500."""
    resp = post_raw(demo_server, path, body, "S", SURROGATE)
    assert resp.status_code == 400, resp.text
    assert "surrogate" in resp.json()["error"]["message"]
    if path == "/v1/responses":  # named as sent, not as the chat body it becomes
        assert resp.json()["error"]["param"] == "input"


@pytest.mark.parametrize("depth", [100, 500])
def test_deep_tool_schema_is_a_400(demo_server, depth):
    """Item 9: parameters nested 500 deep raised RecursionError (500)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": "P"}}
    body = {"messages": USER_X, "max_tokens": 2, "tools": [tool]}
    resp = post_raw(demo_server, CHAT, body, "P", _nested_json(depth))
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    assert "nested" in message or "parsing the body" in message  # the JSON parser's own limit


def test_error_messages_carry_no_object_reprs(demo_server):
    """Item 9: `<_io.BytesIO object at 0x…>` and raw exception text reached the client."""
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    content = [{"type": "image_url", "image_url": {"url": junk}}, {"type": "text", "text": "?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    resp = httpx.post(demo_server + CHAT, json=body, timeout=30)
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert " at 0x" not in message and "<_io" not in message, message


def test_huge_prompts_do_not_freeze_the_server(demo_server):
    """Item 4: three 10 MB prompts froze /health for 30 s (tokenized on the event loop, all
    of it, though a few KB already overflow the context)."""
    big = "lorem ipsum " * (10_000_000 // 12)
    bodies = [
        ("/tokenize", {"prompt": big}),
        ("/v1/completions", {"prompt": big, "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "user", "content": big}], "max_tokens": 2}),
    ]

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            start = time.monotonic()
            sent = [
                asyncio.ensure_future(client.post(demo_server + path, json=body))
                for path, body in bodies
            ]
            worst = 0.0
            while not all(task.done() for task in sent):
                t0 = time.monotonic()
                assert (await client.get(demo_server + "/health")).status_code == 200
                worst = max(worst, time.monotonic() - t0)
                await asyncio.sleep(0.05)
            return [task.result() for task in sent], worst, time.monotonic() - start

    replies, worst, total = asyncio.run(go())
    for resp in replies:
        assert resp.status_code == 400 and "context length" in resp.json()["error"]["message"]
    assert worst < 1.0, f"/health took {worst:.2f} s"
    assert total < 20, f"the 400s took {total:.1f} s"


def test_sigterm_drains_then_ends_running_streams_with_an_error_event():
    """Item 12 through the CLI: SIGTERM, a bounded drain, then an error event and [DONE]
    for the stream still running (not a cut connection), and the process exits."""
    from mistralpy.testing.server_process import free_port, start_server, stop_server
    from tests.server.conftest import ROOT

    port = free_port()
    args = ["-m", "mistralpy.server.cli", "serve", "demo", "--host", "127.0.0.1", "--port"]
    args += [str(port), "--device", "cpu", "--max-model-len", "1024", "--shutdown-timeout", "1"]
    proc = start_server(args, port, ROOT, timeout=300, quiet=True)
    try:
        body = {
            "messages": [{"role": "user", "content": "go on"}],
            "stream": True,
            "max_tokens": 1000,
            "ignore_eos": True,
        }
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}{CHAT}", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) == 3:
                    proc.terminate()  # SIGTERM while the stream runs
        assert events[-1] == "data: [DONE]"
        assert "server_shutdown" in events[-2], events[-2]
        assert proc.wait(timeout=30) is not None
    finally:
        stop_server(proc)
