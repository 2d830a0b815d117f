"""`mistralpy bench` on the real stack (tiny demo checkpoint, CPU): over HTTP against a real
`mistralpy serve demo` subprocess, and in-process against the engine."""

from __future__ import annotations

import asyncio
import json

from mistralpy.bench.serving import ServingConfig, run_serving_bench
from mistralpy.server.cli import main


def test_serving_bench_against_demo_server(demo_server):
    cfg = ServingConfig(
        base_url=demo_server, input_len=32, output_len=8, num_requests=4, concurrency=4
    )
    run = asyncio.run(run_serving_bench(cfg))
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (4, 0), run["errors"]
    assert [r["prompt_tokens"] for r in run["requests"]] == [32] * 4  # fitted with /tokenize
    assert [r["output_tokens"] for r in run["requests"]] == [8] * 4  # ignore_eos honoured
    assert all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in run["requests"])
    for key in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tpot_ms_mean"):
        assert s[key] > 0, key


def test_bench_url_cli_chat_endpoint(demo_server, tmp_path):
    out = tmp_path / "bench.json"
    flags = "--endpoint chat --input-len 40 --output-len 6 --num-requests 3 --concurrency 2"
    argv = ["bench", "--url", demo_server, *flags.split(), "-o", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["completed"], row["total_output_tokens"]) == (3, 18)
    assert row["total_input_tokens"] == 3 * 40  # the chat template's tokens included


def test_engine_bench_cli_demo(tmp_path):
    out = tmp_path / "bench.json"
    flags = "--device cpu --max-model-len 256 --prompt-len 40 --gen-len 4 --iterations 2"
    argv = ["bench", "demo", *flags.split(), "-o", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["completed"], row["total_output_tokens"], row["total_input_tokens"]) == (2, 8, 80)
    assert row["ttft_ms_p50"] > 0 and row["itl_ms_p50"] > 0
    assert row["cached_prompt_tokens"] == 0  # prefix caching is on; every prompt is new
