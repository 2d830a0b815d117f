"""Fixtures that start real server subprocesses on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, timeout: float = 120.0) -> subprocess.Popen:
    """Start `python args...` and wait until GET /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    """Base URL of a fake-engine server (no auth), one per test module."""
    port = free_port()
    proc = start_server(
        ["-m", "tests.server.fake_stack", "--port", str(port), "--delay", "0.002"], port
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def fake_server_with_key() -> Iterator[str]:
    port = free_port()
    proc = start_server(
        ["-m", "tests.server.fake_stack", "--port", str(port), "--api-key", "sekret"], port
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)
