"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors vs the dequantize-matmul oracle.

The interpreter must be switched on before Triton decorates the kernels, so the kernels run
in a fresh subprocess that reports one JSON line per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = [
    (fmt, m, n, k)
    for fmt in ["q4k", "q8_0", "q6k", "q4_0", "q5k", "q2k", "fp8"]
    for m, n, k in [(1, 20, 768), (3, 20, 512), (17, 36, 256)]
]

SCRIPT = r"""
import json, sys
import torch
from mistralpy.kernels import triton_quant
from mistralpy.quant.formats import get_format
from mistralpy.quant.isq import reference_matmul

for fmt, m, n, k in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    f = get_format(fmt)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g)
    packed = f.quantize(w)
    affine = None if fmt in triton_quant.NATIVE_FORMATS else f.group_affine(packed, (n, k))
    kernel = triton_quant.build(fmt, packed, (n, k), affine)
    y = kernel(x)
    ref = reference_matmul(f, packed, (n, k))(x)
    err = (y - ref).abs().max().item()
    print(json.dumps({"case": [fmt, m, n, k], "err": err, "scale": ref.abs().max().item(),
                      "kernel": type(kernel).__name__, "shape": list(y.shape)}))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {tuple(r["case"]): r for r in rows}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_kernel_matches_reference(results, case):
    r = results[case]
    fmt, m, n, _ = case
    assert r["shape"] == [m, n]
    # The interpreter computes in float32: only summation order differs from the oracle.
    assert r["err"] <= 1e-5 * max(1.0, r["scale"]), r
    native = {"q4k": "TritonQ4KMatmul", "q8_0": "TritonQ8_0Matmul"}
    assert r["kernel"] == native.get(fmt, "TritonAffineMatmul")
