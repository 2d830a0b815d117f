"""CPU GEMV / skinny GEMM straight on q8_0 and q4k GGUF bytes, compiled with numba.

Decode on the CPU streams every weight once per token, so it is bound by memory bandwidth and
by the instructions each weight costs. torch's int4 CPU kernel can hold 8-bit codes only as two
int4 passes with bf16 activations and a repacked copy (slower, and a second copy of the
weight); these kernels read the layer's own GGUF blocks
(`QuantizedLinear.qweight`, no second copy) at about the host's memory bandwidth.

q8_0 numerics, two kernels. Where the host has AVX-512 VNNI (checked as for q4k), GGML's
q8_0 x q8_0 scheme: the activation row is rounded, once per call, to int8 codes per 32-block
with step amax / 127 (`q8_0_round_activations`), int8 x int8 block sums are exact in int32
(vpdpbusd), then scaled by d * dx — faster than float activations (the float kernel was
bound by its int8-to-float conversions, not by memory; BENCHMARKS.md, section 4),
at the price of that rounding (|error| <= step / 2 per element, tests bound it). The same
numerics serve prefill-sized batches through a four-row kernel (each pair of weight blocks
loaded once for four activation rows: faster than torch's two int4 passes, and no repacked
copy of the weight), so on such hosts a
q8_0 layer needs no other kernel (`any_batch_matmul`). Elsewhere each
weight is dequantized exactly as gguf does (fp16 block scale widened to float32, times the int8
code) and multiplied by the float32 activation with float32 accumulation: only the float32
summation order differs from the dequantize-then-matmul reference.

q4k numerics (GGML's q4_K x q8_K, AVX-512 VNNI only): the activation row *is* rounded, once per
call, to int8 codes per 256-block with step amax / 127 (`q8k_round_activations`, |error| <=
step / 2 per element: an extra error of at most sum_i |w_i| * step / 2 per output, relative
~2^-8 of a block's largest activation, far below q4k's own weight error). On those codes
the result equals the dequantize-then-matmul reference up to float32 rounding: the 4-bit x
int8 products and their 6-bit-scaled sums per super-block are exact int32 (vpdpbusd), then
scaled by d * dx, minus dmin * dx * sum(m * code sums). float32 activations spent ~4x more
instructions per weight (nibble -> float, fma) and ran well below memory bandwidth.

How: numba's loop vectorizer cannot be steered into per-lane vector accumulators (it reduces
horizontally per 32-weight block or vectorizes the block loop with gathers, ~15x slower), so
each row's dot product is a small LLVM IR function (`q8_0_row.ll`, `q8_0_vnni_row.ll`,
`q4k_row.ll` beside this file; vector accumulators, `half` scale loads,
one horizontal sum per row) that numba links into an `@njit(parallel=True)` driver looping
over rows with `prange`. LLVM picks the instructions for the host; the q8_0 IR is generic
(AVX-512 on Zen 4, AVX2 elsewhere), the q4k IR calls `llvm.x86.avx512.vpdpbusd.512` and is
used only when LLVM reports avx512f/bw/vnni on the host (LLVM does not form VNNI from generic
IR); elsewhere q4k keeps torch's int4 kernel. numba's OpenMP layer links the system libgomp,
a second thread pool beside torch's (seen in /proc/self/maps on torch 2.13): interleaving
torch ops with these kernels makes the two pools take turns on the cores, one reason a decode
step of a q4k/q8_0 model runs whole in numba (`kernels.cpu_decode`). Only functions that
close over no numba object are cached on disk (`cache=True`): numba keys a closure's cache
entry on the pickles of its closure variables, and an intrinsic's or a dispatcher's pickle
holds a per-process UUID, so such entries never hit again and only pile up. The drivers
therefore compile in each process (~1-3 s each); `available()` / `q4k_available()` /
`q8_0_vnni_gemm_available()` compile when the first layer is built, never on the first
request. (Moving the kernels to closure-free module-level functions would make them
cacheable.)

numba is imported lazily: without it (or if compiling fails) the checks are False and the
caller keeps its pure-PyTorch kernel.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ROWS_PER_TASK = 16  # output rows per prange task: a 512-row layer still splits over threads
# Each row kernel prefetches the weight bytes it will read, twice: PREFETCH_FAR_BYTES ahead into
# L2 (prefetcht1) and PREFETCH_NEAR_BYTES ahead into L1 (prefetcht0). A decode step reads more
# weight bytes than the last-level cache keeps, so most come from DRAM; the far L2 prefetch
# keeps many more line requests in flight than L1's few fill buffers allow. These distances
# timed best of the variants tried (BENCHMARKS.md, section 4: ISQ on CPU).
PREFETCH_FAR_BYTES = 8192
PREFETCH_NEAR_BYTES = 1024


def _expand_prefetch(ir_text: str) -> str:
    """`ir_text` with each line `PREFETCH(%ptr: off off ...)` replaced by IR prefetching the
    bytes at %ptr + off for each offset, far into L2 and near into L1 (see
    PREFETCH_FAR_BYTES); the constants are read now, when a kernel is compiled."""

    def expand(match: re.Match) -> str:
        return _prefetch_ir(match[1], tuple(int(o) for o in match[2].split()))

    return re.sub(r"^PREFETCH\((%\w+): ([\d ]+)\)$", expand, ir_text, flags=re.M)


def _prefetch_ir(ptr: str, line_offsets: tuple[int, ...]) -> str:
    lines = []
    tag = ptr.lstrip("%")
    for i, off in enumerate(line_offsets):
        for dist, level, kind in (
            (PREFETCH_FAR_BYTES, 2, "far"),
            (PREFETCH_NEAR_BYTES, 3, "near"),
        ):
            name = f"%pf_{tag}_{kind}{i}"
            lines.append(f"  {name} = getelementptr i8, ptr {ptr}, i64 {dist + off}")
            lines.append(f"  call void @llvm.prefetch.p0(ptr {name}, i32 0, i32 {level}, i32 1)")
    return "\n".join(lines)


def read_ir(name: str) -> str:
    """The LLVM IR text of kernels/<name>.ll (read when a kernel is compiled)."""
    return resources.files(__package__).joinpath(f"{name}.ll").read_text()


def ir_intrinsic(name: str, ir_text: str, nargs: int) -> Any:
    """numba intrinsic name(i64 x nargs) -> float32 calling the IR function `name` in
    `ir_text` (3 to 6 integer or address arguments), which is compiled as its own library and
    linked into each caller (numba marks it linkonce_odr there, so LLVM may inline it into the
    driver loop). `PREFETCH(...)` lines in the text are expanded first (`_expand_prefetch`)."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    def codegen(context, builder, signature, args):
        lib = context.codegen().create_library(name)
        lib.add_llvm_module(llvm.parse_assembly(_expand_prefetch(ir_text)))
        context.active_code_library.add_linking_library(lib)
        fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(64)] * nargs)
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
        return builder.call(fn, args)

    sig = types.float32(*[types.int64] * nargs)
    # numba types an intrinsic through its Python signature: one named argument per operand.
    typers = {
        3: lambda typingctx, a, b, c: (sig, codegen),
        4: lambda typingctx, a, b, c, d: (sig, codegen),
        5: lambda typingctx, a, b, c, d, e: (sig, codegen),
        6: lambda typingctx, a, b, c, d, e, f: (sig, codegen),
    }
    return intrinsic(typers[nargs])


@functools.cache
def _q8_0_driver() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) filling y = x @ dequant(w).T (compiled on first call), or None
    without numba."""
    try:
        from numba import njit, prange
    except ImportError:
        return None
    q8_0_row = ir_intrinsic("mistralpy_q8_0_row", read_ir("q8_0_row"), 3)

    # not cached on disk: closes over numba objects, whose pickles differ per process
    @njit(parallel=True)
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


def _q8_0_vnni_row4_ir() -> str:
    """IR of mistralpy_q8_0_vnni_row4 (see _Q8_0_VNNI_ROW4_IR), written by a loop."""
    f16, i16 = "<16 x float>", "<16 x i32>"
    lo_hi = ", ".join(f"i32 {i}" for i in range(64))
    bcast2 = ", ".join(["i32 0"] * 8 + ["i32 1"] * 8)
    rows = range(4)
    lines = [
        "define float @mistralpy_q8_0_vnni_row4(i64 %rowa, i64 %xqa, i64 %dxa, i64 %csa, i64 %nb, i64 %ya) {",
        "entry:",
        "  %row = inttoptr i64 %rowa to ptr",
        "  %xq = inttoptr i64 %xqa to ptr",
        "  %dx = inttoptr i64 %dxa to ptr",
        "  %cs = inttoptr i64 %csa to ptr",
        "  %y = inttoptr i64 %ya to ptr",
        "  %npairs = lshr i64 %nb, 1",
        "  %xs = mul i64 %nb, 32",  # bytes per activation row of codes
        "  %vs = mul i64 %nb, 32",  # bytes per row of dx16 / cs16: nb / 2 vectors of 64 bytes
        "  br label %pairs",
        "pairs:",
        "  %i = phi i64 [0, %entry], [%i1, %pairs]",
    ]
    lines += [f"  %acc{r} = phi {f16} [zeroinitializer, %entry], [%acc{r}n, %pairs]" for r in rows]
    lines += [
        "  %b = shl i64 %i, 1",
        "  %off = mul i64 %b, 34",
        "  %p0 = getelementptr i8, ptr %row, i64 %off",
        "  %p1 = getelementptr i8, ptr %p0, i64 34",
        "PREFETCH(%p0: 0)",
        "  %dh0 = load half, ptr %p0, align 1",
        "  %d0 = fpext half %dh0 to float",
        "  %dh1 = load half, ptr %p1, align 1",
        "  %d1 = fpext half %dh1 to float",
        "  %pq0 = getelementptr i8, ptr %p0, i64 2",
        "  %q0 = load <32 x i8>, ptr %pq0, align 1",
        "  %pq1 = getelementptr i8, ptr %p1, i64 2",
        "  %q1 = load <32 x i8>, ptr %pq1, align 1",
        f"  %q = shufflevector <32 x i8> %q0, <32 x i8> %q1, <64 x i32> <{lo_hi}>",
        "  %qu = xor <64 x i8> %q, splat (i8 -128)",
        f"  %qi = bitcast <64 x i8> %qu to {i16}",
        "  %dp0 = insertelement <2 x float> poison, float %d0, i64 0",
        "  %dp = insertelement <2 x float> %dp0, float %d1, i64 1",
        f"  %dv = shufflevector <2 x float> %dp, <2 x float> poison, <16 x i32> <{bcast2}>",
        "  %xo = mul i64 %b, 32",  # code byte offset of the pair in a row
        "  %vo = mul i64 %i, 64",  # byte offset of the pair's dx16 / cs16 vectors
    ]
    for r in rows:
        lines += [
            f"  %xr{r} = mul i64 %xs, {r}",
            f"  %xa{r} = add i64 %xr{r}, %xo",
            f"  %px{r} = getelementptr i8, ptr %xq, i64 %xa{r}",
            f"  %x{r} = load <64 x i8>, ptr %px{r}, align 1",
            f"  %xi{r} = bitcast <64 x i8> %x{r} to {i16}",
            f"  %t{r} = call {i16} @llvm.x86.avx512.vpdpbusd.512({i16} zeroinitializer, {i16} %qi, {i16} %xi{r})",
            f"  %vr{r} = mul i64 %vs, {r}",
            f"  %va{r} = add i64 %vr{r}, %vo",
            f"  %pc{r} = getelementptr i8, ptr %cs, i64 %va{r}",
            f"  %c{r} = load {i16}, ptr %pc{r}, align 4",
            f"  %ts{r} = sub {i16} %t{r}, %c{r}",
            f"  %tf{r} = sitofp {i16} %ts{r} to {f16}",
            f"  %pd{r} = getelementptr i8, ptr %dx, i64 %va{r}",
            f"  %dxv{r} = load {f16}, ptr %pd{r}, align 4",
            f"  %sc{r} = fmul {f16} %dxv{r}, %dv",
            f"  %acc{r}n = call {f16} @llvm.fma.v16f32({f16} %tf{r}, {f16} %sc{r}, {f16} %acc{r})",
        ]
    lines += [
        "  %i1 = add i64 %i, 1",
        "  %done = icmp eq i64 %i1, %npairs",
        "  br i1 %done, label %exit, label %pairs",
        "exit:",
    ]
    for r in rows:
        lines += [
            f"  %s{r} = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, {f16} %acc{r}n)",
            f"  %py{r} = getelementptr float, ptr %y, i64 {r}",
            f"  store float %s{r}, ptr %py{r}, align 4",
        ]
    lines += [
        "  ret float 0.0",
        "}",
        f"declare {i16} @llvm.x86.avx512.vpdpbusd.512({i16}, {i16}, {i16})",
        "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)",
        f"declare {f16} @llvm.fma.v16f32({f16}, {f16}, {f16})",
        f"declare float @llvm.vector.reduce.fadd.v16f32(float, {f16})",
    ]
    return "\n".join(lines) + "\n"


# One q8_0 row against FOUR q8_0 activation rows (AVX-512 VNNI; prefill-sized batches): as
# q8_0_vnni_row.ll, but each pair of weight blocks is loaded and flipped to unsigned once
# for the four rows, and each activation row's per-pair block scales and 128 * code sums come
# pre-spread over the 16 lanes (dx16: dx[b] in lanes 0-7, dx[b + 1] in 8-15; cs16: the sums in
# lanes 0 and 8, zeros elsewhere), so a row costs one load, one vpdpbusd, a subtract, a
# conversion and two multiply-adds per 64 weights. nb (blocks per row) must be even; the four
# sums are stored at %ya.
_Q8_0_VNNI_ROW4_IR = _q8_0_vnni_row4_ir()


# Where each 32-code run of an activation block is stored, for `_activation_codes`: q4k_row.ll
# reads a 256-block's runs in nibble order; q8_0's 32-blocks are one run each.
_Q4K_X_ORDER = np.array((0, 2, 1, 3, 4, 6, 5, 7), np.int64)
_Q8_0_X_ORDER = np.zeros(1, np.int64)


def _int8_activation_driver(
    row_name: str, row_ir: str, block: int, order: np.ndarray, sum_scale: int
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) filling y = x8 @ dequant(w).T, where `_activation_codes` (block, order,
    sum_scale) rounds the activation rows once per call to (int8 codes, per-block scales,
    code sums per 32) and the IR row kernel `row_name(row, codes, scales, sums, K / block)`
    dots one GGUF weight row with one such activation row; None without numba."""
    codes = _activation_codes()
    if codes is None:
        return None
    from numba import njit, prange

    row_fn = ir_intrinsic(row_name, row_ir, 5)

    # not cached on disk: closes over numba objects, whose pickles differ per process
    @njit(parallel=True)
    def driver_fn(w, x, y):  # pragma: no cover - compiled
        # w (N, bytes per row) uint8 GGUF rows; x (M, K) float32; y (M, N) float32, C-contiguous.
        n, row_bytes = w.shape
        m, k = x.shape
        nb = k // block
        xq, dx, sums = codes(x, block, order, sum_scale)
        tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for t in prange(tasks):  # x rows inner: a task's weight rows stay in L1 across them
            stop = min(n, (t + 1) * ROWS_PER_TASK)
            for i in range(m):
                xa = xq.ctypes.data + i * k
                da = dx.ctypes.data + i * nb * 4
                sa = sums.ctypes.data + i * sums.shape[1] * 4
                for r in range(t * ROWS_PER_TASK, stop):
                    y[i, r] = row_fn(w.ctypes.data + r * row_bytes, xa, da, sa, nb)

    return driver_fn


def _four_row_driver(
    row_name: str, row_ir: str, quantize4: Callable[[np.ndarray], tuple], block: int
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """driver(w, x, y) filling y = x8 @ dequant(w).T for prefill-sized batches, four
    activation rows per pass over a weight row: `quantize4(x)` (numba) rounds the rows to
    (int8 codes, scales, sums) as the one-row kernel's activation does, with the rows padded
    to a multiple of 4 (zeros), and the IR kernel `row_name(row, codes, scales, sums,
    K / block, out)` stores one weight row's dot products with four such rows at out."""
    from numba import njit, prange

    row4 = ir_intrinsic(row_name, row_ir, 6)

    # not cached on disk: closes over numba objects, whose pickles differ per process
    @njit(parallel=True)
    def driver_fn(w, x, y):  # pragma: no cover - compiled
        # w (N, bytes per row) uint8 GGUF rows; x (M, K) float32; y (M, N) float32, C-contiguous.
        n, row_bytes = w.shape
        m, k = x.shape
        nb = k // block
        xq, scales, sums = quantize4(x)
        groups = xq.shape[0] // 4
        tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
        for t in prange(tasks):  # activation groups inner: the task's weight rows stay in L1
            out = np.empty(4, np.float32)
            stop = min(n, (t + 1) * ROWS_PER_TASK)
            for g in range(groups):
                xa = xq.ctypes.data + 4 * g * xq.strides[0]
                da = scales.ctypes.data + 4 * g * scales.strides[0]
                sa = sums.ctypes.data + 4 * g * sums.strides[0]
                rows = min(4, m - 4 * g)
                for r in range(t * ROWS_PER_TASK, stop):
                    row4(w.ctypes.data + r * row_bytes, xa, da, sa, nb, out.ctypes.data)
                    for j in range(rows):
                        y[4 * g + j, r] = out[j]

    return driver_fn


@functools.cache
def _activation_codes() -> Callable[..., tuple] | None:
    """numba codes(x, block, order, sum_scale) -> (int8 codes (M, K), scales amax / 127 (M,
    K / block) float32, sum_scale * code sums per 32 (M, K / 32) int32): GGML's rounding of
    activation rows to int8 per `block` (q8_K: 256, q8_0: 32), the k-th 32-code run of a
    block stored at run order[k] (q4k_row.ll's nibble order; identity for q8_0), or None
    without numba."""
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(cache=True)
    def codes(x, block, order, sum_scale):  # pragma: no cover - compiled
        m, k = x.shape
        nb = k // block
        runs = block // 32
        xq = np.empty((m, k), np.int8)
        dx = np.empty((m, nb), np.float32)
        sums = np.empty((m, k // 32), np.int32)
        for i in range(m):
            for b in range(nb):
                amax = np.float32(0.0)
                for j in range(b * block, b * block + block):
                    amax = max(amax, abs(x[i, j]))
                inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
                dx[i, b] = amax / np.float32(127.0)
                for s in range(runs):
                    src = b * block + s * 32
                    dst = b * block + order[s] * 32
                    total = 0
                    for j in range(32):
                        q = np.int32(np.rint(x[i, src + j] * inv))
                        xq[i, dst + j] = q
                        total += q
                    sums[i, b * runs + s] = sum_scale * total
        return xq, dx, sums

    return codes


@functools.cache
def _q4k_driver() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) filling y = x8 @ dequant(w).T with x8 the activation rounded to int8
    per 256-block (`q8k_round_activations`), or None without numba."""
    return _int8_activation_driver("mistralpy_q4k_row", read_ir("q4k_row"), 256, _Q4K_X_ORDER, 1)


@functools.cache
def _q8_0_vnni_driver() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) filling y = x8 @ dequant(w).T with x8 the activation rounded to int8
    per 32-block (`q8_0_round_activations`), or None without numba."""
    ir_text = read_ir("q8_0_vnni_row")
    return _int8_activation_driver("mistralpy_q8_0_vnni_row", ir_text, 32, _Q8_0_X_ORDER, 128)


@functools.cache
def _q8_0_vnni_gemm_driver() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """driver(w, x, y) as `_q8_0_vnni_driver`'s (same numerics, y = x8 @ dequant(w).T) for
    prefill-sized batches: four activation rows per pass over a weight row
    (`_Q8_0_VNNI_ROW4_IR`); K must be a multiple of 64. None without numba."""
    codes = _activation_codes()
    if codes is None:
        return None
    from numba import njit

    # not cached on disk: closes over numba objects, whose pickles differ per process
    @njit
    def q8_0_codes4(x):  # pragma: no cover - compiled
        # q8_0's codes, rows padded to a multiple of 4 (zero codes and scales); per pair of
        # blocks the two scales spread over 16 lanes (dx16) and the two sums in lanes 0 and 8
        m, k = x.shape
        nb = k // 32
        xq1, dx, cs = codes(x, 32, _Q8_0_X_ORDER, 128)
        mp = (m + 3) // 4 * 4
        xq = np.zeros((mp, k), np.int8)
        xq[:m] = xq1
        dx16 = np.zeros((mp, nb // 2, 16), np.float32)
        cs16 = np.zeros((mp, nb // 2, 16), np.int32)
        for i in range(m):
            for b in range(nb):
                lane = (b % 2) * 8
                dx16[i, b // 2, lane : lane + 8] = dx[i, b]
                cs16[i, b // 2, lane] = cs[i, b]
        return xq, dx16, cs16

    return _four_row_driver("mistralpy_q8_0_vnni_row4", _Q8_0_VNNI_ROW4_IR, q8_0_codes4, 32)


@functools.cache
def available() -> bool:
    """True when numba imports and the kernel compiles (or loads from cache) and gives the
    right answer on one block whose scale is 0 (fp16 bytes 00 00): y must be 0."""
    w = np.zeros((1, 34), np.uint8)
    return _self_check("q8_0", _q8_0_driver(), w, np.ones((1, 32), np.float32), 0.0, 0.0)


def _self_check(
    name: str, driver_fn: Any, w: np.ndarray, x: np.ndarray, expected: float, tol: float
) -> bool:
    """Whether `driver_fn` (None without numba) compiles, or loads from numba's cache, and
    gives y[0, 0] within `tol` of `expected` for one weight row `w` against `x` (1, K)."""
    if driver_fn is None:
        return False
    y = np.full((1, 1), np.nan, np.float32)
    try:
        driver_fn(w, x, y)
    except Exception as e:  # e.g. a host LLVM cannot target: keep the other kernels
        log.warning("numba %s kernel unavailable (%s: %s)", name, type(e).__name__, e)
        return False
    return bool(abs(y[0, 0] - expected) <= tol)


def _gguf_matmul(driver_fn: Any, w: Tensor, x: Tensor, block_bytes: int, block: int) -> Tensor:
    """y (M, N) float32 = `driver_fn` over GGUF rows w (N, K / block * block_bytes) uint8 and
    x (M, K) float (the torch-facing wrapper of every driver here)."""
    assert driver_fn is not None and w.shape[1] * block == x.shape[1] * block_bytes, (
        w.shape,
        x.shape,
    )
    xf = x.detach().to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    driver_fn(w.numpy(), xf.numpy(), y.numpy())
    return y


def q8_0_matmul(w: Tensor, x: Tensor) -> Tensor:
    """y = x @ dequant(w).T: w (N, K / 32 * 34) uint8 q8_0 GGUF rows on the CPU, x (M, K)
    float -> (M, N) float32 (see the module doc for the numerics). Needs `available()`."""
    return _gguf_matmul(_q8_0_driver(), w, x, 34, 32)


_Q4K_FEATURES = ("avx512f", "avx512bw", "avx512vnni")  # the IR's vpdpbusd, byte ops on zmm


def _host_has(features: tuple[str, ...]) -> bool:
    """True when LLVM reports every one of `features` on this CPU (numba compiles for it)."""
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    host = llvm.get_host_cpu_features()
    return all(host.get(f, False) for f in features)


def _q4k_check_block() -> np.ndarray:
    """One q4_K super-block with d = dmin = 1, every 6-bit scale and min 1 and every code 3:
    each weight is 1 * 1 * 3 - 1 * 1 = 2."""
    block = np.zeros((1, 144), np.uint8)
    block[0, 0:4] = (0x00, 0x3C, 0x00, 0x3C)  # fp16 1.0 twice
    block[0, 4:12] = 1  # sc[0:4], m[0:4]
    block[0, 12:16] = 0x11  # low nibbles sc[4:8], high nibbles m[4:8]
    block[0, 16:] = 0x33
    return block


@functools.cache
def q4k_available() -> bool:
    """True when the host has AVX-512 VNNI, numba imports and the q4k kernel compiles (or loads
    from cache) and gives 2 * 256 for one block of weights 2 against activations of ones."""
    if not _host_has(_Q4K_FEATURES):
        return False
    x = np.ones((1, 256), np.float32)
    return _self_check("q4k", _q4k_driver(), _q4k_check_block(), x, 512.0, 1e-3)


def q8k_round_activations(x: Tensor) -> Tensor:
    """x (M, K) float -> float32 (M, K): the activation `q4k_matmul` actually multiplies, each
    256-block rounded to int8 codes times amax / 127 (the plain-PyTorch reference of the
    kernel's quantizer, same float32 operations; |error| <= about amax / 254 per element)."""
    return _round_activations(x, 256)


def _round_activations(x: Tensor, block: int) -> Tensor:
    """x (M, K) float -> float32 (M, K), each `block` of a row rounded to int8 codes times
    amax / 127, with the float32 operations of the kernels' quantizers."""
    xb = x.detach().float().reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, 0.0)
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)


def q4k_matmul(w: Tensor, x: Tensor) -> Tensor:
    """y = x8 @ dequant(w).T: w (N, K / 256 * 144) uint8 q4_K GGUF rows on the CPU, x (M, K)
    float -> (M, N) float32, with x8 = `q8k_round_activations(x)` (see the module doc for
    the numerics). Needs `q4k_available()`."""
    return _gguf_matmul(_q4k_driver(), w, x, 144, 256)


_Q8_0_VNNI_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vnni")  # vpdpbusd on ymm


@functools.cache
def q8_0_vnni_available() -> bool:
    """True when the host has AVX-512 VNNI (with VL), numba imports and the q8_0 x q8_0 kernel
    compiles and gives 32 * 2 * 3 = 192 for one block of weights 2 (d = 1) against x = 3."""
    if not _host_has(_Q8_0_VNNI_FEATURES):
        return False
    x = np.full((1, 32), 3.0, np.float32)
    return _self_check("q8_0 VNNI", _q8_0_vnni_driver(), _q8_0_check_block(), x, 192.0, 1e-3)


def _q8_0_check_block() -> np.ndarray:
    """One q8_0 block with d = 1 and every code 2."""
    block = np.zeros((1, 34), np.uint8)
    block[0, 0:2] = (0x00, 0x3C)  # fp16 1.0
    block[0, 2:] = 2
    return block


def q8_0_round_activations(x: Tensor) -> Tensor:
    """x (M, K) float -> float32 (M, K): the activation `q8_0_vnni_matmul` multiplies, each
    32-block rounded to int8 codes times amax / 127 (GGML's q8_0 activation rounding; the same
    float32 operations as the kernel)."""
    return _round_activations(x, 32)


def q8_0_vnni_matmul(w: Tensor, x: Tensor) -> Tensor:
    """y = x8 @ dequant(w).T: w (N, K / 32 * 34) uint8 q8_0 GGUF rows on the CPU, x (M, K)
    float -> (M, N) float32, with x8 = `q8_0_round_activations(x)`: int8 x int8 products
    summed exactly in int32 per block, then scaled by d * dx. Needs `q8_0_vnni_available()`."""
    return _gguf_matmul(_q8_0_vnni_driver(), w, x, 34, 32)


@functools.cache
def q8_0_vnni_gemm_available() -> bool:
    """True when `q8_0_vnni_available()` and the four-row q8_0 x q8_0 kernel compiles and
    gives 64 * 2 * 3 = 384 for two blocks of weights 2 (d = 1) against x = 3, in each of
    five activation rows (one group of four and a padded one)."""
    if not q8_0_vnni_available():
        return False
    w = np.concatenate([_q8_0_check_block()] * 2, axis=1)
    driver_fn = _q8_0_vnni_gemm_driver()
    if driver_fn is None or not _self_check(
        "q8_0 VNNI GEMM", driver_fn, w, np.full((1, 64), 3.0, np.float32), 384.0, 1e-3
    ):
        return False
    y = np.zeros((5, 1), np.float32)
    driver_fn(w, np.full((5, 64), 3.0, np.float32), y)
    return bool(np.all(np.abs(y - 384.0) <= 1e-3))


# Batches of at least this many rows take the four-row kernel (`_Q8_0_VNNI_ROW4_IR`); smaller
# ones the one-row kernel, which has no padded rows (at 3 rows the two were level on the
# `small` preset's shapes).
FOUR_ROW_MIN_M = 3


def q8_0_vnni_any_matmul(w: Tensor, x: Tensor) -> Tensor:
    """`q8_0_vnni_matmul` for any batch: decode-sized batches through the one-row kernel,
    larger ones (prefill) through the four-row kernel, the same numerics. K must be a
    multiple of 64 and `q8_0_vnni_gemm_available()` true."""
    if x.shape[0] < FOUR_ROW_MIN_M:
        return q8_0_vnni_matmul(w, x)
    return _gguf_matmul(_q8_0_vnni_gemm_driver(), w, x, 34, 32)


def any_batch_matmul(fmt_name: str, in_features: int) -> Callable[[Tensor, Tensor], Tensor] | None:
    """A kernel (w_bytes, x) -> y for GGUF format `fmt_name` that serves every batch size,
    prefill included, from the layer's GGUF bytes alone; None where there is none (then
    `gemv` serves decode and torch's int4 GEMM prefill, over a second, repacked copy of the
    weight). Today q8_0 on AVX-512 VNNI with K a multiple of 64, faster than torch's two int4
    passes and with no int4 copy; a four-row q4k kernel gained nothing over torch's one-pass
    int4 GEMM and was not kept (figures: BENCHMARKS.md, section 4)."""
    if fmt_name == "q8_0" and in_features % 64 == 0 and q8_0_vnni_available():
        return q8_0_vnni_any_matmul if q8_0_vnni_gemm_available() else None
    return None


def _kernel(fmt_name: str) -> tuple[Callable, Callable] | None:
    """(numba driver, torch-facing matmul) this host runs for GGUF format `fmt_name`, or None.
    q8_0 takes the int8 VNNI kernel where the host has it (2x less time per weight than
    float activations)."""
    pair: tuple[Callable | None, Callable[[Tensor, Tensor], Tensor]]
    if fmt_name == "q8_0" and q8_0_vnni_available():
        pair = _q8_0_vnni_driver(), q8_0_vnni_matmul
    elif fmt_name == "q8_0" and available():
        pair = _q8_0_driver(), q8_0_matmul
    elif fmt_name == "q4k" and q4k_available():
        pair = _q4k_driver(), q4k_matmul
    else:
        return None
    driver, matmul = pair  # (the driver exists where the check above passed)
    return None if driver is None else (driver, matmul)


def gemv(fmt_name: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The decode kernel (w_bytes, x) -> y for GGUF format `fmt_name` when this host can run
    one (compiling it now, or loading it from numba's cache), else None."""
    kernel = _kernel(fmt_name)
    return None if kernel is None else kernel[1]


def driver(fmt_name: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """The compiled numba driver(w, x, y) behind `gemv(fmt_name)`, y = x @ dequant(w).T on
    numpy arrays (callable from other numba code, e.g. `cpu_decode`), or None where `gemv`
    would be None."""
    kernel = _kernel(fmt_name)
    return None if kernel is None else kernel[0]
