"""CUDA: correctness and speed of the Triton quantized matmuls at Mistral-Small-24B shapes.

    PYTHONPATH=. python benchmarks/quant_gpu.py [--formats q4k,q8_0] [--batches 1,16]
        [--peak-gbs 2960] [--json out.json]

For each decoder-layer shape (out, in) and format: quantize a random bf16 weight on the GPU
(timed), check the kernel against dequantize + fp32 matmul (relative max error), then time
it with triton.testing.do_bench_cudagraph (median) and print achieved GB/s (weight bytes
+ activations + output) and the share of the peak bandwidth; a bf16 F.linear row gives the
unquantized baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing
from torch.nn import functional as F

from mistralpy.quant.formats import get_format
from mistralpy.quant.isq import QuantizedLinear, reference_matmul

SHAPES = {  # (out, in) of one Mistral-Small-3.1-24B decoder layer (fused projections)
    "qkv": (6144, 5120),
    "o": (5120, 4096),
    "gate_up": (65536, 5120),
    "down": (5120, 32768),
}


def bench_ms(fn) -> float:
    """Median milliseconds of fn() replayed in a CUDA graph."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception:  # graph capture unsupported: fall back to plain launches
        return triton.testing.do_bench(fn, rep=200, return_mode="median")


def row(name, shape, fmt, m, ms, nbytes, peak, err=None, kernel=""):
    gbs = nbytes / ms / 1e6
    e = "" if err is None else f"{err:9.2e}"
    print(
        f"{name:>8} {shape[0]:>6}x{shape[1]:<6} {fmt:>6} M={m:<3} {ms * 1e3:9.1f} us "
        f"{gbs:8.0f} GB/s {100 * gbs / peak:5.1f}% {e:>9} {kernel}"
    )
    return {"layer": name, "shape": shape, "format": fmt, "m": m, "us": ms * 1e3,
            "gbs": gbs, "pct_peak": 100 * gbs / peak, "rel_err": err, "kernel": kernel}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4k,q8_0,q6k,fp8")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--layers", default=",".join(SHAPES))
    ap.add_argument("--peak-gbs", type=float, default=2960.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = []
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.layers.split(","):
        shape = SHAPES[name]
        w = (torch.randn(shape, device=dev) * 0.02).to(torch.bfloat16)
        for m in batches:
            x = torch.randn(m, shape[1], device=dev, dtype=torch.bfloat16)
            ms = bench_ms(lambda w=w, x=x: F.linear(x, w))
            out.append(row(name, shape, "bf16", m, ms, w.numel() * 2, args.peak_gbs))
        for fmt_name in args.formats.split(","):
            fmt = get_format(fmt_name)
            torch.cuda.synchronize()
            t = time.perf_counter()
            layer = QuantizedLinear.from_float(w, None, fmt)
            torch.cuda.synchronize()
            print(f"  quantize {name} {fmt.name}: {time.perf_counter() - t:.2f} s")
            ref_kernel = reference_matmul(fmt, layer.qweight, shape)
            kernel = type(layer.kernel).__name__
            wbytes = layer.qweight.numel()
            for m in batches:
                x = torch.randn(m, shape[1], device=dev, dtype=torch.bfloat16)
                ref = ref_kernel(x.float())
                err = ((layer(x).float() - ref).abs().max() / ref.abs().max()).item()
                ms = bench_ms(lambda layer=layer, x=x: layer(x))
                nbytes = wbytes + x.numel() * 2 + m * shape[0] * 2
                out.append(row(name, shape, fmt.name, m, ms, nbytes, args.peak_gbs, err, kernel))
            del layer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
