"""The one-kernel fp8 GEMV (decode at batch 1) under TRITON_INTERPRET=1 on CPU tensors, against
dequantize-then-matmul in float64, on fresh random weights and activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import torch
from mistralpy.kernels import triton_quant

seed = int(sys.argv[1])
gen = torch.Generator().manual_seed(seed)
out = []
for n, k in [(24, 1024), (37, 2048), (5, 3072)]:
    w = torch.randn(n, k, generator=gen) * 0.05
    scale = w.abs().amax(1) / 448.0
    codes = (w / scale[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(1, k, generator=gen)
    ref = x.double() @ (codes.double() * scale.double()[:, None]).T
    y = triton_quant.fp8_gemv(x, codes, scale.float(), (8, 4))
    err = ((y.double() - ref).norm() / ref.norm()).item()
    out.append({"shape": [n, k], "rel_err": err})
out.append({"unsupported": triton_quant.fp8_gemv(torch.randn(1, 100), codes[:, :100], scale) is None})
print(json.dumps(out))
"""


def test_fp8_gemv_matches_dequantized_reference():
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(seed)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in results[:-1]:
        assert case["rel_err"] < 1e-5, (seed, case)
    assert results[-1]["unsupported"]
