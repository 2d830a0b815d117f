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


def real_stack_available() -> bool:
    """True once the engine, model and processing parts are merged into this tree."""
    import importlib.util

    needed = (
        "mistralpy.engine.engine",
        "mistralpy.runner.model_runner",
        "mistralpy.model.mistral3",
        "mistralpy.processing.chat_template",
        "mistralpy.processing.images",
        "mistralpy.testing.tiny_checkpoint",
    )
    try:
        return all(importlib.util.find_spec(m) is not None for m in needed)
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[str]:
    """A real `mistralpy serve demo` subprocess on the tiny checkpoint (CPU, float32)."""
    if not real_stack_available():
        pytest.skip("the engine/model stack is not merged into this tree yet")
    media = tmp_path_factory.mktemp("media")
    port = free_port()
    proc = start_server(
        [
            "-m",
            "mistralpy.server.cli",
            "serve",
            "demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "16",
            "--allowed-local-media-path",
            str(media),
        ],
        port,
        timeout=300,
    )
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)
