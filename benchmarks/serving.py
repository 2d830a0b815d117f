"""HTTP serving benchmark: `mistralpy bench --url`'s load generator, optionally with the server
started here on loopback (and always stopped, within a bounded time).

    python benchmarks/serving.py --url http://127.0.0.1:8000 [--endpoint chat] ...
    python benchmarks/serving.py --serve "MODEL --load-format dummy -d bf16" \\
        --input-len 1024 --output-len 1024 --num-requests 32 --concurrency 32 --out DIR

Prints the summary (mistralpy.bench.metrics.summarize) and writes serving.json to --out.
`benchmarks/gpu_e2e.py --rows serving` uses `running_server` to compare with the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mistralpy.bench.serving import ServingConfig, run_serving_bench  # noqa: E402
from mistralpy.testing.server_process import wait_healthy  # noqa: E402

STOP_GRACE_S = 20.0  # SIGTERM, then SIGKILL after this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that has the child SIGTERMed when this process dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed benchmark never leaves a server holding the GPU. libc is
    loaded here, in the parent: no dlopen between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM (uvicorn shuts down, the engine with it), SIGKILL after STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)
    return proc.returncode


@contextlib.contextmanager
def running_server(
    serve_args: list[str], log_path: Path, start_timeout_s: float = 600.0
) -> Iterator[str]:
    """`mistralpy serve SERVE_ARGS --host 127.0.0.1 --port P` in a subprocess (output to
    `log_path`); yields its base URL once healthy; stops it on exit, whatever happened."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mistralpy.server.cli",
        "serve",
        *serve_args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent_hook(),
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(proc, url, start_timeout_s)
            yield url
        finally:
            stop(proc)


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def bench_config(args: argparse.Namespace, url: str) -> ServingConfig:
    return ServingConfig(
        base_url=url,
        input_len=args.input_len,
        output_len=args.output_len,
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        warmup=args.warmup,
    )


def run_bounded(cfg: ServingConfig, limit_s: float) -> dict:
    """run_serving_bench, cancelled after `limit_s` seconds (a hung server cannot hang us)."""
    return asyncio.run(asyncio.wait_for(run_serving_bench(cfg), timeout=limit_s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="an OpenAI-compatible server already running")
    where.add_argument("--serve", help="start `mistralpy serve` with these arguments on loopback")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--model", default=None, help="model name (default: GET /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-s", type=float, default=1800.0, help="the whole load run at most")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.url:
        run = run_bounded(bench_config(args, args.url), args.limit_s)
    else:
        with running_server(shlex.split(args.serve), out / "serve.log") as url:
            run = run_bounded(bench_config(args, url), args.limit_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(run, indent=1))
    for key, value in run["summary"].items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    for err in run["errors"]:
        print(f"error: {err}", file=sys.stderr)
    return 0 if run["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
