"""Helpers for the hostile-client tests: an in-process server on a loopback port whose fake
engine the test can inspect, and raw-socket clients that misbehave on purpose."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from mistralpy.server.app import ServerSettings, create_app
from mistralpy.server.connections import DrainingServer
from tests.server.conftest import free_port
from tests.server.fake_stack import make_fake_service


@contextlib.contextmanager
def serve_fake(
    delay: float = 0.0,
    settings: ServerSettings | None = None,
    max_model_len: int = 512,
    max_num_seqs: int = 10**6,
    **uvicorn_options,
) -> Iterator[tuple[str, object, DrainingServer]]:
    """(base URL, ChatService, server) of a fake-engine server in a thread; stopped on exit."""
    service = make_fake_service(max_model_len, delay, max_num_seqs)
    app = create_app(service, settings or ServerSettings(), service.engine.stats)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off", **uvicorn_options
    )
    drain_s = uvicorn_options.get("timeout_graceful_shutdown") or 10
    server = DrainingServer(config, app.state.admission, drain_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", service, server
    finally:
        server.should_exit = True
        thread.join(10)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def raw_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 POST with a JSON body, as bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_request(path: str, payload: dict) -> bytes:
    return raw_request(path, json.dumps(payload).encode())


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of one Content-Length response read from `sock`."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        rest += chunk
    return status, rest[:length]


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
