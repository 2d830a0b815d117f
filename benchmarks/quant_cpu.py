"""CPU GEMV (batch 1) time of QuantizedLinear per format vs a float32 nn.Linear.

    PYTHONPATH=. python benchmarks/quant_cpu.py [--formats q4k,q8_0] [--iters 50] [--json out.json]

Prints one row per (shape, format): median microseconds, the ratio to float32 (< 1 is
faster) and the kernel the layer picked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F

from mistralpy.quant.isq import QuantizedLinear

SHAPES = [(1536, 512), (512, 1536), (8192, 2048), (2048, 8192)]  # (out, in)
DEFAULT_FORMATS = "q4_0,q4_1,q5_0,q5_1,q8_0,q2k,q3k,q4k,q5k,q6k,q8k,fp8"


def median_us(fn, iters: int) -> float:
    """Median wall time of fn() in microseconds after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=DEFAULT_FORMATS)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    print(
        f"threads={torch.get_num_threads()}  {'shape':>11} {'format':>6} {'us':>9} {'vs f32':>7}  kernel"
    )
    for n, k in SHAPES:
        w, x = torch.randn(n, k) * 0.02, torch.randn(1, k)
        base = median_us(lambda x=x, w=w: F.linear(x, w), args.iters)
        print(f"{'':>10} {n}x{k:<6} {'f32':>6} {base:9.1f} {1.0:7.2f}")
        for name in args.formats.split(","):
            layer = QuantizedLinear.from_float(w, None, name)
            with torch.inference_mode():
                us = median_us(lambda layer=layer, x=x: layer(x), args.iters)
            kernel = type(layer.kernel).__name__
            print(f"{'':>10} {n}x{k:<6} {name:>6} {us:9.1f} {us / base:7.2f}  {kernel}")
            rows.append(
                {"out": n, "in": k, "format": name, "us": us, "f32_us": base, "kernel": kernel}
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
