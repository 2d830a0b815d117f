"""Soak `mistralpy serve demo` under hostile load for a few minutes (issue #17) and report.

All at once, against one server on loopback, until `--duration` seconds are up:
- rounds of 64 greedy streams of which ~30% disconnect after 1-5 events; every survivor must
  get exactly the text it gets alone (anything else, an error or a missing finish is "lost");
- stalled readers: streams with top-20 logprobs whose client never reads a byte;
- a slow-loris batch: connections that drip their headers one byte a second;
- a large-prompt batch: 10 MB prompts to /v1/completions, /v1/chat/completions, /tokenize.
Meanwhile, once a second: the server's RSS and open file descriptors, and /health latency.
Target: RSS flat, /health under 1 s, nothing lost. Prints a table; `--json` writes the figures.

    PYTHONPATH=. python benchmarks/hostile_soak.py --duration 180 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from mistralpy.testing import server_process

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"


@dataclass
class Figures:
    """What the soak measured (all counts over the whole run)."""

    duration_s: float = 0.0
    rounds: int = 0
    streams: int = 0
    disconnected: int = 0
    survivors: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    stalled_opened: int = 0
    loris_opened: int = 0
    loris_closed_by_server: int = 0
    big_prompts: int = 0
    big_prompt_statuses: dict[str, int] = field(default_factory=dict)
    big_prompt_max_s: float = 0.0
    health_checks: int = 0
    health_failures: int = 0
    health_p50_ms: float = 0.0
    health_p99_ms: float = 0.0
    health_max_ms: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # one sample a second
    fds: list[int] = field(default_factory=list)


# --- the server -------------------------------------------------------------------------


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    args = ["-m", "mistralpy.server.cli", "serve", "demo", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--device", "cpu", "--max-model-len", "512"]
    return server_process.start_server(
        [*args, "--max-num-seqs", "16", *extra], port, ROOT, timeout=300, quiet=True
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- the attackers ----------------------------------------------------------------------


def stream_body(prompt: str, max_tokens: int = 24) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
    }


async def stream_text(client: httpx.AsyncClient, base: str, body: dict, cut: int | None):
    """(text, finish_reason) of a stream, or None when we cut it after `cut` events."""
    text, reason, events = "", None, 0
    async with client.stream("POST", base + CHAT, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            events += 1
            if cut is not None and events >= cut:
                return None
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                reason = choice.get("finish_reason") or reason
    return text, reason


async def disconnect_rounds(base: str, end: float, figs: Figures, rng: random.Random) -> None:
    prompts = [f"question number {i}" for i in range(8)]
    # idle connections are dropped before the server's 5 s keep-alive timeout would close
    # them under a request being sent (a client-side race, not a server loss)
    limits = httpx.Limits(max_connections=80, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        alone = {p: await stream_text(client, base, stream_body(p), None) for p in prompts}
        while time.monotonic() < end:
            chosen = [prompts[i % 8] for i in range(64)]
            cuts = [rng.randint(1, 5) if rng.random() < 0.3 else None for _ in chosen]
            results = await asyncio.gather(
                *[stream_text(client, base, stream_body(p), c) for p, c in zip(chosen, cuts)],
                return_exceptions=True,
            )
            figs.rounds += 1
            for p, cut, got in zip(chosen, cuts, results):
                figs.streams += 1
                if cut is not None and not isinstance(got, BaseException):
                    figs.disconnected += 1
                    continue
                figs.survivors += 1
                if isinstance(got, BaseException) or got != alone[p]:
                    figs.lost += 1
                    if len(figs.lost_examples) < 5:
                        figs.lost_examples.append(repr(got)[:200])


async def stalled_readers(port: int, end: float, figs: Figures, count: int = 3) -> None:
    """Streams whose client sends its request and then never reads."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "go on"}],
            "stream": True,
            "max_tokens": 480,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 20,
        }
    ).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
    request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    while time.monotonic() < end:
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            socks.append(sock)
            figs.stalled_opened += 1
        await asyncio.sleep(min(60.0, max(0.0, end - time.monotonic())))
        for sock in socks:
            sock.close()


async def slow_loris(port: int, end: float, figs: Figures, count: int = 50) -> None:
    """Connections that send one header byte a second; reopened when the server closes them."""
    request = f"POST {CHAT} HTTP/1.1\r\nHost: soak\r\nContent-Length: 10\r\n\r\n".encode()

    async def one() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(1)
                continue
            figs.loris_opened += 1
            closed = await drip(reader, writer, request, end)  # (not `+= await`: it races)
            figs.loris_closed_by_server += closed
            writer.close()

    await asyncio.gather(*[one() for _ in range(count)])


async def drip(reader, writer, data: bytes, end: float) -> bool:
    """Send `data` one byte a second until `end`; True if the server closed the connection."""
    try:
        for byte in data:
            if time.monotonic() >= end:
                return False
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    return True
            except asyncio.TimeoutError:
                pass
        return await reader.read(1) == b""  # all sent: wait for the body deadline
    except OSError:
        return True


async def big_prompts(base: str, end: float, figs: Figures, period_s: float = 15.0) -> None:
    big = "lorem ipsum " * (10_000_000 // 12)
    bodies = [  # encoded once: json.dumps of 10 MB would stall this (the attackers') loop
        (path, json.dumps(body).encode())
        for path, body in [
            ("/v1/completions", {"prompt": big, "max_tokens": 2}),
            (CHAT, {"messages": [{"role": "user", "content": big}], "max_tokens": 2}),
            ("/tokenize", {"prompt": big}),
        ]
    ]
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=300) as client:
        while time.monotonic() < end:
            for path, body in bodies:
                start = time.monotonic()
                try:
                    reply = await client.post(base + path, content=body, headers=headers)
                    status = str(reply.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                figs.big_prompts += 1
                figs.big_prompt_statuses[status] = figs.big_prompt_statuses.get(status, 0) + 1
                figs.big_prompt_max_s = max(figs.big_prompt_max_s, time.monotonic() - start)
            await asyncio.sleep(period_s)


def monitor(base: str, pid: int, end: float, figs: Figures) -> list[float]:
    """RSS, fds and /health latency once a second; returns the latencies (ms). Runs in a
    thread of its own, with a blocking client: the attackers' event loop, busy with 64
    streams, must not delay (and so inflate) the latency it measures."""
    latencies = []
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            figs.rss_mib.append(round(rss_mib(pid), 1))
            figs.fds.append(open_fds(pid))
            start = time.monotonic()
            try:
                ok = client.get(base + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.monotonic() - start) * 1000)
            figs.health_checks += 1
            figs.health_failures += not ok
            time.sleep(1.0)
    return latencies


async def soak(port: int, pid: int, duration: float, seed: int) -> Figures:
    figs, base = Figures(), f"http://127.0.0.1:{port}"
    start = time.monotonic()
    end = start + duration
    rng = random.Random(seed)
    latencies, *_ = await asyncio.gather(
        asyncio.to_thread(monitor, base, pid, end, figs),
        disconnect_rounds(base, end, figs, rng),
        stalled_readers(port, end, figs),
        slow_loris(port, end, figs),
        big_prompts(base, end, figs),
    )
    figs.duration_s = round(time.monotonic() - start, 1)
    latencies.sort()
    figs.health_p50_ms = round(statistics.median(latencies), 1)
    figs.health_p99_ms = round(latencies[int(0.99 * (len(latencies) - 1))], 1)
    figs.health_max_ms = round(latencies[-1], 1)
    return figs


# --- report -----------------------------------------------------------------------------


def table(figs: Figures) -> str:
    rss, fds = figs.rss_mib, figs.fds
    tail = rss[len(rss) // 2 :]
    rows = [
        ("duration", f"{figs.duration_s} s"),
        ("64-stream rounds", f"{figs.rounds} ({figs.streams} streams, {figs.disconnected} cut)"),
        ("survivors / lost", f"{figs.survivors} / {figs.lost}"),
        ("stalled readers opened", str(figs.stalled_opened)),
        (
            "slow-loris conns opened / closed by server",
            f"{figs.loris_opened} / {figs.loris_closed_by_server}",
        ),
        (
            "10 MB prompts: statuses, slowest",
            f"{figs.big_prompt_statuses}, {figs.big_prompt_max_s:.1f} s",
        ),
        (
            "/health p50 / p99 / max",
            f"{figs.health_p50_ms} / {figs.health_p99_ms} / "
            f"{figs.health_max_ms} ms ({figs.health_failures} failed)",
        ),
        ("RSS first / max / last", f"{rss[0]} / {max(rss)} / {rss[-1]} MiB"),
        ("RSS second half min / max", f"{min(tail)} / {max(tail)} MiB"),
        ("open fds first / max / last", f"{fds[0]} / {max(fds)} / {fds[-1]}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of attack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag")
    args = ap.parse_args()
    port = server_process.free_port()
    proc = start_server(port, args.server_arg)
    try:
        figs = asyncio.run(soak(port, proc.pid, args.duration, args.seed))
    finally:
        server_process.stop_server(proc, timeout=30)
    print(table(figs))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(figs), indent=2))
    ok = figs.lost == 0 and figs.health_max_ms < 1000 and figs.health_failures == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
