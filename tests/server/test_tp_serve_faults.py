"""`mistralpy serve --tensor-parallel-size 2` on CPU (gloo) when a worker dies or cannot start:
the server says which rank failed and exits non-zero in bounded time; a request in flight
ends with an error, never a hang. Faults reach the worker only (see tp_faults_serve.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mistralpy.testing import tiny_checkpoint
from mistralpy.testing.server_process import free_port, wait_healthy

# a process stuck in a gloo wait holds a GIL-free C call: only the thread method ends it
pytestmark = pytest.mark.timeout(240, method="thread")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tp_faults_serve.py")
EXIT_S = 60  # the server must be gone this long after the fault


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-faults") / "model"
    return tiny_checkpoint.write_config_files(out, tiny_checkpoint.get_preset("tiny"), "float32")


def start_serve(model_dir: Path, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "serve", str(model_dir), "--load-format", "dummy",
           "--device", "cpu", "--dtype", "f32", "--tensor-parallel-size", "2",
           "--max-model-len", "512", "--port", str(port)]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the server
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=out)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stream_events(url: str, events: list[dict | str], first: threading.Event) -> None:
    """One streaming chat request; every SSE data payload appended to `events`."""
    body = {"messages": [{"role": "user", "content": "count"}], "stream": True,
            "max_tokens": 400, "ignore_eos": True, "temperature": 0}  # fmt: skip
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
            events.append(f"status {resp.status_code}")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    first.set()
    except httpx.HTTPError as exc:  # the connection may close as the server stops
        events.append(f"transport: {type(exc).__name__}")
    finally:
        first.set()


@pytest.mark.parametrize("in_flight", [True, False], ids=["in-flight", "idle"])
def test_killed_worker_stops_the_server_and_fails_the_request_in_flight(
    model_dir, tmp_path, in_flight
):
    port, log, pids = free_port(), tmp_path / "serve.log", tmp_path / "pids"
    pids.mkdir()
    proc = start_serve(model_dir, port, log, {"MISTRALPY_TEST_WORKER_PID_DIR": str(pids)})
    events: list[dict | str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 180)
        (worker,) = [int(p.name) for p in pids.iterdir()]
        first = threading.Event()
        client = threading.Thread(target=stream_events, args=(url, events, first), daemon=True)
        if in_flight:
            client.start()
            assert first.wait(60), "no first chunk"
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        if in_flight:
            client.join(EXIT_S)
            assert not client.is_alive(), "the request in flight hangs after the worker died"
        assert proc.wait(EXIT_S) == 1  # raises TimeoutExpired if the server keeps running
        assert time.monotonic() - killed < EXIT_S
    finally:
        stop(proc)
        print(log.read_text(errors="replace")[-4000:], events[-3:])  # shown on failure
    text = log.read_text(errors="replace")
    want = "error: the model runner died: tensor-parallel worker rank 1 failed (killed by SIGKILL)"
    assert want in text, text[-3000:]
    if not in_flight:
        return
    assert events[0] == "status 200" and isinstance(events[1], dict), events[:2]
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    finishes = [c["finish_reason"] for e in events if isinstance(e, dict)
                for c in e.get("choices", []) if c.get("finish_reason")]  # fmt: skip
    assert not finishes, events[-3:]  # it did not complete as if nothing happened
    assert errors and errors[-1]["error"]["type"] == "service_unavailable", events[-3:]


def test_worker_that_cannot_load_makes_serve_exit_with_its_error(model_dir, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    proc = start_serve(model_dir, port, log, {"MISTRALPY_TEST_WORKER_LOAD_FAILS": "1"})
    try:
        code = proc.wait(120)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    # one message naming the rank, with the worker's own error (not rank 0's traceback)
    assert "error: tensor-parallel worker rank 1 failed (exit code 1)" in text, text[-3000:]
    assert "RuntimeError: injected fault: this worker cannot load its shard" in text, text
    assert "[rank0]" not in text, text[-3000:]
    with pytest.raises(httpx.HTTPError):  # it never served
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
