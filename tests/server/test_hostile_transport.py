"""Issue #17, transport items, on an in-process fake-engine server (loopback, bounded)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

from mistralpy.server.app import ServerSettings
from mistralpy.server.connections import ConnectionLimits, RepeatFilter, guarded_h11
from mistralpy.server.protocol import MAX_BODY_BYTES
from tests.server.hostile import (
    json_request,
    port_of,
    raw_request,
    read_response,
    serve_fake,
    wait_until,
)

LONG = {
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 400,
    "ignore_eos": True,
}


def test_non_streaming_request_is_aborted_when_its_client_leaves():
    """Item 3: before, the request ran to its end for nobody."""
    with serve_fake(delay=0.02) as (base, service, _):
        engine = service.engine
        for path in ("/v1/chat/completions", "/v1/completions"):
            payload = dict(LONG)
            if path == "/v1/completions":
                payload = {"prompt": "go on", "max_tokens": 400, "ignore_eos": True}
            sock = socket.create_connection(("127.0.0.1", port_of(base)))
            sock.sendall(json_request(path, payload))
            assert wait_until(lambda: engine.active, 5)
            sock.close()
            assert wait_until(lambda: not engine.active, 3), "still generating for nobody"
        assert not engine.finished_ids  # both stopped early: cancelled and aborted


def test_tokenize_error_keeps_the_connection_alive():
    """Item 8: an error on /tokenize or /detokenize closed the keep-alive connection."""
    with serve_fake() as (base, _, _), httpx.Client(base_url=base, timeout=10) as client:
        bad = [
            ("/tokenize", {"model": "nope", "prompt": "x"}),
            ("/detokenize", {"tokens": [10**9]}),
            ("/tokenize", {}),
        ]
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        for path, payload in bad:
            sock.sendall(json_request(path, payload))
            status, body = read_response(sock)
            assert 400 <= status < 500 and "error" in json.loads(body)
        sock.sendall(json_request("/tokenize", {"prompt": "ok"}))
        status, body = read_response(sock)
        assert status == 200 and json.loads(body)["count"] > 0
        sock.close()
        assert client.get("/health").status_code == 200


def test_chunked_body_over_the_cap_is_refused():
    """Item 5: the cap read only Content-Length; a chunked body of any size was accepted."""
    with serve_fake() as (base, _, _):
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(raw_request("/v1/chat/completions", b"", {"Transfer-Encoding": "chunked"}))
        chunk = b"x" * (1 << 20)
        sent, status = 0, None
        sock.settimeout(10)
        try:
            while sent <= MAX_BODY_BYTES + (4 << 20):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending
        status, body = read_response(sock)
        sock.close()
        assert status == 413, body
        assert sent < MAX_BODY_BYTES + (4 << 20) or status == 413
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/health").status_code == 200


def test_small_chunked_body_is_served():
    with serve_fake() as (base, _, _):
        body = json.dumps({**LONG, "max_tokens": 3}).encode()
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(raw_request("/v1/chat/completions", b"", {"Transfer-Encoding": "chunked"}))
        sock.sendall(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        status, reply = read_response(sock)
        sock.close()
        assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] == 3


def test_streaming_client_that_leaves_is_aborted():
    with serve_fake(delay=0.02) as (base, service, _):
        engine = service.engine
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(json_request("/v1/chat/completions", {**LONG, "stream": True}))
        sock.settimeout(5)
        assert sock.recv(100)
        sock.close()
        start = time.monotonic()
        assert wait_until(lambda: not engine.active, 3)
        assert time.monotonic() - start < 3 and not engine.finished_ids


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes `sock` within `seconds` (reads until EOF or timeout)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the server: closed too
    return True


SHORT = ConnectionLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=30)


def test_idle_drip_and_partial_body_connections_are_closed():
    """Item 7: idle, header-drip and partial-body connections stayed open forever."""
    with serve_fake(http=guarded_h11(SHORT)) as (base, _, _):
        port = port_of(base)
        idle = socket.create_connection(("127.0.0.1", port))
        drip = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        request = raw_request("/v1/chat/completions", b"{}")
        partial.sendall(request.replace(b"Content-Length: 2", b"Content-Length: 200") + b"{")
        start = time.monotonic()
        drip_closed = False
        for byte in request[:20]:  # one byte every 0.1 s: the headers never complete in time
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                drip_closed = True
                break
            time.sleep(0.1)
        assert drip_closed or _closed_within(drip, 1.0)
        assert _closed_within(idle, 1.0) and _closed_within(partial, 1.0)
        assert time.monotonic() - start < 3.5
        for sock in (idle, drip, partial):
            sock.close()


def test_connections_beyond_the_cap_are_refused_and_health_answers():
    """Item 7: ~21,000 idle connections exhausted file descriptors; /health timed out."""
    with serve_fake(http=guarded_h11(SHORT)) as (base, _, _):
        port = port_of(base)
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        refused = sum(_closed_within(s, 0.2) for s in hogs[40:])
        assert refused == 20  # the last 20 went over the cap of 30 open connections
        time.sleep(0.6)  # the others hit their header deadline
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/health").status_code == 200
        for sock in hogs:
            sock.close()


def test_request_in_progress_is_not_timed_out():
    """The deadlines cover headers and body only, not a long generation."""
    with serve_fake(delay=0.02, http=guarded_h11(SHORT)) as (base, _, _):
        body = {**LONG, "max_tokens": 60}  # ~1.2 s, over both 0.5 s deadlines
        with httpx.Client(base_url=base, timeout=10) as client:
            first = client.post("/v1/chat/completions", json=body)
            second = client.post("/v1/chat/completions", json=body)  # same keep-alive conn
        assert first.status_code == second.status_code == 200


def test_repeat_filter_throttles_a_repeating_logger():
    import logging

    flt = RepeatFilter(burst=3, window_s=60)
    records = [
        logging.LogRecord("asyncio", logging.ERROR, "", 0, "accept failed: %s", ("EMFILE",), None)
        for _ in range(1000)
    ]
    assert sum(flt.filter(r) for r in records) == 3


def test_requests_beyond_the_queue_get_429_with_retry_after():
    """Item 12: with no admission control, 1,000 queued requests all waited. Two run, two
    wait, the other eight are refused."""
    settings = ServerSettings(max_queue_len=2)
    with serve_fake(delay=0.02, settings=settings, max_num_seqs=2) as (base, service, _):

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                body = {**LONG, "max_tokens": 40}
                replies = await asyncio.gather(
                    *[client.post("/v1/chat/completions", json=body) for _ in range(12)]
                )
                health = await client.get("/health")
                later = await client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                return replies, health, later

        replies, health, later = asyncio.run(go())
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 4 + [429] * 8
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
    assert health.status_code == 200 and later.status_code == 200


def test_queue_limit_counts_requests_waiting_beyond_the_running_batch():
    """--max-queue-len bounds the engine's waiting queue, as vLLM's name says: it counted
    requests in flight at the HTTP layer (max_num_seqs + queue), so with n=2 requests filling
    the batch at half as many requests, twice the queue waited. Here 4 sequence slots run
    two n=2 requests, two more wait, the next gets 429 and the running ones finish whole."""
    settings = ServerSettings(max_queue_len=2)
    with serve_fake(delay=0.02, settings=settings, max_num_seqs=4) as (base, service, _):
        engine = service.engine

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                body = {**LONG, "max_tokens": 30, "n": 2}
                post = lambda: client.post("/v1/chat/completions", json=body)  # noqa: E731
                running = [asyncio.ensure_future(post()) for _ in range(2)]
                await _until(lambda: len(engine.running) == 2)
                waiting = [asyncio.ensure_future(post()) for _ in range(2)]
                await _until(lambda: len(engine.active) == 4)
                refused = await post()
                return refused, await asyncio.gather(*running), await asyncio.gather(*waiting)

        refused, running, waiting = asyncio.run(go())
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    for resp in running + waiting:
        assert resp.status_code == 200, resp.text
        reasons = [c["finish_reason"] for c in resp.json()["choices"]]
        assert reasons == ["length", "length"]


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_shutdown_drains_then_ends_streams_with_an_error_event():
    """Item 12: a stream still running when the drain time is up ends with an error event
    and [DONE], not a cut connection; a new request during the drain gets a 503."""
    with serve_fake(delay=0.05, timeout_graceful_shutdown=1) as (base, service, server):
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(json_request("/v1/chat/completions", {**LONG, "stream": True}))
        sock.settimeout(10)
        received = sock.recv(65536)
        assert wait_until(lambda: service.engine.active, 5)
        server.should_exit = True
        start = time.monotonic()
        while b"data: [DONE]" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sock.close()
        assert time.monotonic() - start < 5
    events = [line for line in received.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]", events[-3:]
    assert b"server_shutdown" in events[-2]


def test_client_that_stops_reading_is_dropped_and_its_request_aborted():
    """Item 2 at the transport: a client that stays connected but reads nothing held its
    engine request and connection for as long as it liked."""
    settings = ServerSettings(send_stall_timeout_s=1.0)
    with serve_fake(settings=settings, max_model_len=100_000) as (base, service, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", port_of(base)))
        # ~10 MB of events: more than the socket buffers hold
        body = {**LONG, "max_tokens": 8_000, "stream": True, "logprobs": True, "top_logprobs": 20}
        sock.sendall(json_request("/v1/chat/completions", body))
        assert wait_until(lambda: service.engine.active, 5)
        assert wait_until(lambda: not service.engine.active, 8), "still generating"
        assert not service.engine.finished_ids  # cut off, not run to its end
        assert _closed_within(sock, 5)  # the server closed the connection
        sock.close()


def _asgi_call(guard, path: str) -> list[dict]:
    """Messages `guard` sends for a bodiless POST to `path`."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": [], "method": "POST"}
    asyncio.run(guard(scope, receive, send))
    return sent


def test_draining_server_refuses_new_work_but_answers_health():
    from mistralpy.server.transport import AdmissionState, TransportGuard, TransportLimits

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    admission = AdmissionState()
    admission.draining = True
    guard = TransportGuard(app, TransportLimits(max_body_bytes=10), admission, lambda e: (500, b""))
    refused = _asgi_call(guard, "/v1/chat/completions")
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert b"server_shutdown" in refused[1]["body"]
    assert _asgi_call(guard, "/health")[0]["status"] == 200
