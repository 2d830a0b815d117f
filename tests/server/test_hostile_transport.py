"""Issue #17, transport items, on an in-process fake-engine server (loopback, bounded)."""

from __future__ import annotations

import json
import socket
import time

import httpx

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
    with serve_fake(delay=0.02) as (base, service):
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
    with serve_fake() as (base, _), httpx.Client(base_url=base, timeout=10) as client:
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
    with serve_fake() as (base, _):
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
    with serve_fake() as (base, _):
        body = json.dumps({**LONG, "max_tokens": 3}).encode()
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(raw_request("/v1/chat/completions", b"", {"Transfer-Encoding": "chunked"}))
        sock.sendall(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        status, reply = read_response(sock)
        sock.close()
        assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] == 3


def test_streaming_client_that_leaves_is_aborted():
    with serve_fake(delay=0.02) as (base, service):
        engine = service.engine
        sock = socket.create_connection(("127.0.0.1", port_of(base)))
        sock.sendall(json_request("/v1/chat/completions", {**LONG, "stream": True}))
        sock.settimeout(5)
        assert sock.recv(100)
        sock.close()
        start = time.monotonic()
        assert wait_until(lambda: not engine.active, 3)
        assert time.monotonic() - start < 3 and not engine.finished_ids
