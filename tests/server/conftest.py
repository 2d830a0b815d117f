"""Fixtures that start real server subprocesses on free ports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mistralpy.testing import server_process
from mistralpy.testing.server_process import free_port, stop_server

ROOT = Path(__file__).resolve().parents[2]


def start_server(args: list[str], port: int, timeout: float = 120.0) -> subprocess.Popen:
    """Start `python args...` in the repository and wait until GET /health answers."""
    return server_process.start_server(args, port, ROOT, timeout)


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


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[str]:
    """A real `mistralpy serve demo` subprocess on the tiny checkpoint (CPU, float32)."""
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
