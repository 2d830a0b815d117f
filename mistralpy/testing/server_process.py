"""A server subprocess on a loopback port, for tests and benchmarks: start it, wait until
`/health` answers, stop it (terminate, then kill)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: list[str], port: int, root: Path, timeout: float = 120.0, quiet: bool = False
) -> subprocess.Popen:
    """Start `python args...` in `root` (on PYTHONPATH) and wait until GET /health answers."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, *args], cwd=root, env=env, stdout=out)
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


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
