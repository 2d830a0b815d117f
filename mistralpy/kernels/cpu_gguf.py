"""CPU GEMV / skinny GEMM straight on q8_0 GGUF bytes, compiled with numba.

Decode on the CPU streams every weight once per token, so it is bound by memory bandwidth and
by the instructions each weight costs. torch's int4 CPU kernel can hold 8-bit codes only as two
int4 passes with bf16 activations and a repacked copy (1.7-3.4x slower on the `small` preset's
131072 x 512 lm_head, by run); this kernel reads the layer's own GGUF blocks (`QuantizedLinear.qweight`,
no second copy) at about the host's memory bandwidth and takes float32 activations as they are.

Numerics: each weight is dequantized exactly as gguf does (fp16 block scale widened to float32,
times the int8 code) and multiplied by the float32 activation with float32 accumulation. Unlike
GGML's CPU path (and mistral.rs's), the activation is *not* rounded to int8 blocks (q8_0 x
q8_0), so the only difference from the dequantize-then-matmul reference is the float32
summation order.

How: numba's loop vectorizer cannot be steered into per-lane vector accumulators (it reduces
horizontally per 32-weight block or vectorizes the block loop with gathers, ~15x slower), so
each row's dot product is a small LLVM IR function (a `<32 x float>` accumulator, `half` scale
loads, one horizontal sum per row) that numba links into an `@njit(parallel=True)` driver
looping over rows with `prange`. LLVM picks the instructions for the host (AVX-512 on Zen 4,
AVX2 elsewhere); nothing here is x86-specific. numba's OpenMP layer ran on torch's own libgomp
pool when checked (no extra threads appeared), so the two share one set of workers. Compiled objects are
cached on disk (`cache=True`); `available()` compiles when the first layer is built, never on
the first request.

numba is imported lazily: without it (or if compiling fails) `available()` is False and the
caller keeps its pure-PyTorch kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ROWS_PER_TASK = 16  # output rows per prange task: a 512-row layer still splits over threads

# One q8_0 row: nb blocks of 34 bytes (fp16 d, 32 int8 codes; w = d * q). The 32 lanes of
# %acc each sum d * q * x over the blocks; one horizontal sum at the end of the row.
_Q8_0_ROW_IR = """
define float @mistralpy_q8_0_row(i64 %rowa, i64 %xa, i64 %nb) {
entry:
  %row = inttoptr i64 %rowa to ptr
  %x = inttoptr i64 %xa to ptr
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
  %acc = phi <32 x float> [zeroinitializer, %entry], [%acc1, %loop]
  %off = mul i64 %b, 34
  %dp = getelementptr i8, ptr %row, i64 %off
  %dh = load half, ptr %dp, align 1
  %d = fpext half %dh to float
  %qp = getelementptr i8, ptr %dp, i64 2
  %q = load <32 x i8>, ptr %qp, align 1
  %qf = sitofp <32 x i8> %q to <32 x float>
  %xo = mul i64 %b, 32
  %xp = getelementptr float, ptr %x, i64 %xo
  %xv = load <32 x float>, ptr %xp, align 4
  %p = fmul <32 x float> %qf, %xv
  %d0 = insertelement <32 x float> poison, float %d, i64 0
  %dv = shufflevector <32 x float> %d0, <32 x float> poison, <32 x i32> zeroinitializer
  %acc1 = call <32 x float> @llvm.fma.v32f32(<32 x float> %p, <32 x float> %dv, <32 x float> %acc)
  %b1 = add i64 %b, 1
  %done = icmp eq i64 %b1, %nb
  br i1 %done, label %exit, label %loop
exit:
  %s = call reassoc float @llvm.vector.reduce.fadd.v32f32(float 0.0, <32 x float> %acc1)
  ret float %s
}
declare <32 x float> @llvm.fma.v32f32(<32 x float>, <32 x float>, <32 x float>)
declare float @llvm.vector.reduce.fadd.v32f32(float, <32 x float>)
"""


def _q8_0_row_intrinsic() -> Any:
    """numba intrinsic q8_0_row(row_address, x_address, nb) -> float32 calling the IR above,
    which is compiled as its own library and linked into each caller (numba marks it
    linkonce_odr there, so LLVM may inline it into the driver loop)."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    name = "mistralpy_q8_0_row"

    def codegen(context, builder, signature, args):
        lib = context.codegen().create_library(name)
        lib.add_llvm_module(llvm.parse_assembly(_Q8_0_ROW_IR))
        context.active_code_library.add_linking_library(lib)
        fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(64)] * 3)
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
        return builder.call(fn, args)

    sig = types.float32(types.int64, types.int64, types.int64)
    return intrinsic(lambda typingctx, row, x, nb: (sig, codegen))


@functools.cache
def _q8_0_driver() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) filling y = x @ dequant(w).T (compiled on first call), or None
    without numba."""
    try:
        from numba import njit, prange
    except ImportError:
        return None
    q8_0_row = _q8_0_row_intrinsic()

    @njit(parallel=True, cache=True)
    def q8_0(w, x, y):  # pragma: no cover - compiled
        # w (N, K/32*34) uint8 GGUF rows; x (M, K) float32; y (M, N) float32, all C-contiguous.
        n, row_bytes = w.shape
        m, k = x.shape
        tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for t in prange(tasks):  # x rows inner: a task's weight rows stay in L1 across them
            stop = min(n, (t + 1) * ROWS_PER_TASK)
            for i in range(m):
                xa = x.ctypes.data + i * k * 4
                for r in range(t * ROWS_PER_TASK, stop):
                    y[i, r] = q8_0_row(w.ctypes.data + r * row_bytes, xa, k // 32)

    return q8_0


@functools.cache
def available() -> bool:
    """True when numba imports and the kernel compiles (or loads from cache) and gives the
    right answer on one block whose scale is 0 (fp16 bytes 00 00): y must be 0."""
    driver = _q8_0_driver()
    if driver is None:
        return False
    y = np.ones((1, 1), np.float32)
    try:
        driver(np.zeros((1, 34), np.uint8), np.ones((1, 32), np.float32), y)
    except Exception as e:  # e.g. a host LLVM cannot target: keep the torch kernels
        log.warning("numba q8_0 kernel unavailable (%s: %s)", type(e).__name__, e)
        return False
    return bool(y[0, 0] == 0.0)


def q8_0_matmul(w: Tensor, x: Tensor) -> Tensor:
    """y = x @ dequant(w).T: w (N, K / 32 * 34) uint8 q8_0 GGUF rows on the CPU, x (M, K)
    float -> (M, N) float32 (see the module doc for the numerics). Needs `available()`."""
    driver = _q8_0_driver()
    assert driver is not None and w.shape[1] * 32 == x.shape[1] * 34, (w.shape, x.shape)
    xf = x.detach().to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    driver(w.numpy(), xf.numpy(), y.numpy())
    return y
