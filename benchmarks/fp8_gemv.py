"""fp8 decode GEMV on CUDA: one-kernel weight-only `fp8_gemv` vs W8A8 `_scaled_mm` (activation
quantization + GEMM + scale multiply) on one 24B decoder layer's shapes, batch 1.

    python benchmarks/fp8_gemv.py      # CUDA only; prints a table (us, % of 2.96 TB/s)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mistralpy.kernels import triton_quant  # noqa: E402
from mistralpy.kernels.quant_matmul import ScaledMMFp8Matmul  # noqa: E402

SHAPES = {"qkv": (6144, 5120), "o": (5120, 4096), "gate_up": (65536, 5120),
          "down": (5120, 32768), "lm_head": (131072, 5120)}  # fmt: skip


def main() -> None:
    import triton.testing

    dev = torch.device("cuda")
    print(f"{'layer':8} {'scaled_mm us':>12} {'gemv us':>9} {'gemv %bw':>9} {'rel err':>9}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        scale = w.abs().amax(1) / 448.0
        codes = (w / scale[:, None]).to(torch.float8_e4m3fn)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        quant = (triton_quant.fp8_quantize_rows, triton_quant.fp8_quantize_tensor)
        mm = ScaledMMFp8Matmul(codes, scale, *quant)
        ref = x.float() @ (codes.float() * scale[:, None]).T
        t_mm = triton.testing.do_bench_cudagraph(lambda mm=mm, x=x: mm(x), rep=200)
        for cfg in triton_quant.FP8_GEMV_CONFIGS:
            y = triton_quant.fp8_gemv(x, codes, scale, cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t_gv = triton.testing.do_bench_cudagraph(
                lambda x=x, c=codes, s=scale, cfg=cfg: triton_quant.fp8_gemv(x, c, s, cfg), rep=200
            )
            bw = (n * k + 4 * n) / (t_gv * 1e-3) / 2.96e12
            print(f"{name:8} {t_mm * 1e3:12.1f} {t_gv * 1e3:9.1f} {bw:9.1%} {err:9.2e} {cfg}")
        picked = triton_quant.tune_fp8_gemv(codes, mm.scale, mm)
        print(f"{name:8} tune_fp8_gemv picks {picked}")


if __name__ == "__main__":
    main()
