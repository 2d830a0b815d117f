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
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout)
    except TimeoutError:
        proc.kill()
        raise RuntimeError("server did not become healthy") from None
    return proc


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Until GET /health answers 200; raises if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /health answered")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
