"""A whole Mistral decode step on the CPU in one compiled call (numba), for quantized weights.

Why: on a small model a CPU decode step is dominated by dispatch, not arithmetic. On the
`small` preset with q4k (8 layers, hidden 512) the quantized matmuls take ~2.5 ms of a ~10 ms
engine step; the rest is ~700 torch ops and ~60 module calls at 2-4 us each, plus the cost of
two OpenMP pools (numba's GEMV regions on the system libgomp, torch's ops on its own) taking
turns on 2 cores. Here embedding, RMSNorm, RoPE, the paged-KV write, attention, SiLU-and-mul,
the residual adds, the final norm and lm_head run inside one numba function; the parallel
regions are the quantized GEMVs (`cpu_gguf` drivers) and attention over (row, head) pairs.

Numerics are those of the layer-by-layer CPU path (float32 throughout): RMSNorm as
transformers computes it (mean of squares in float32, times 1/sqrt, times the weight), RoPE
angles position * inv_freq in float32 with the rotate-half convention, softmax in float32, and
the same GGUF GEMV kernels (q4k rounds each activation row to int8 per 256 as GGML does).
Only summation orders differ (tests compare against the unfused path and transformers).

The step reads the engine's paged KV cache in place: layer l's cache is the float32 tensor
(2, num_blocks, block_size, kv_heads, head_dim) that `runner.kv_cache` allocates, passed as
a numpy view (no copy), and each row's block table maps its positions to blocks.

Attention with 4 query heads per KV head (the real model's 32 / 8) runs through small LLVM IR
block kernels (`attention4`): each K row is loaded once for the 4 heads and their 4 dot
products are reduced together, the P x V accumulators stay in registers across a block, and
the task's next block is prefetched from its table entry. After a step has streamed the
weights the KV cache is no longer in the CPU caches: on the `small` preset with q8_0 at
position 600 (Xeon host, 2026-12-05) attention took ~1.1-1.4 ms of the step with the numba
loops, 0.35-0.7 ms this way. Other head groupings keep the numba loops (`attention`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from mistralpy.kernels import cpu_gguf

# LLVM may reorder float sums (vectorized dot products); no other fast-math assumption (the
# softmax starts from -inf-free maxima but NaN/inf inputs must stay NaN/inf).
_REASSOC = {"reassoc", "contract"}


def _mask(lanes: list[int]) -> str:
    body = ", ".join(f"i32 {i}" for i in lanes)
    return f"<{len(lanes)} x i32> <{body}>"


def _reduce4_ir() -> str:
    """IR reducing the four <16 x float> sums %a0n..%a3n to %z = <4 x float> (their horizontal
    sums, in head order) with 8 shuffles and 4 adds instead of four separate reductions."""
    lo8, hi8 = list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))
    lo4 = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    hi4 = [i + 4 for i in lo4]
    lo2, hi2 = [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]
    f16 = "<16 x float>"
    return "\n".join(
        [
            f"  %h01a = shufflevector {f16} %a0n, {f16} %a1n, {_mask(lo8)}",
            f"  %h01b = shufflevector {f16} %a0n, {f16} %a1n, {_mask(hi8)}",
            f"  %h01 = fadd {f16} %h01a, %h01b",
            f"  %h23a = shufflevector {f16} %a2n, {f16} %a3n, {_mask(lo8)}",
            f"  %h23b = shufflevector {f16} %a2n, {f16} %a3n, {_mask(hi8)}",
            f"  %h23 = fadd {f16} %h23a, %h23b",
            f"  %ua = shufflevector {f16} %h01, {f16} %h23, {_mask(lo4)}",
            f"  %ub = shufflevector {f16} %h01, {f16} %h23, {_mask(hi4)}",
            f"  %u = fadd {f16} %ua, %ub",
            f"  %wa = shufflevector {f16} %u, {f16} poison, {_mask(lo2)}",
            f"  %wb = shufflevector {f16} %u, {f16} poison, {_mask(hi2)}",
            "  %w = fadd <8 x float> %wa, %wb",
            f"  %za = shufflevector <8 x float> %w, <8 x float> poison, {_mask([0, 2, 4, 6])}",
            f"  %zb = shufflevector <8 x float> %w, <8 x float> poison, {_mask([1, 3, 5, 7])}",
            "  %z = fadd <4 x float> %za, %zb",
        ]
    )


def _pv4_ir() -> str:
    """IR of mistralpy_attn_pv4 (see _PV4_IR): written by a loop, eight accumulators."""
    f16 = "<16 x float>"
    heads, halves = range(4), range(2)
    acc = [(r, h) for r in heads for h in halves]
    lines = [
        "define float @mistralpy_attn_pv4(i64 %va, i64 %pa, i64 %aa, i64 %n, i64 %stride, i64 %nc) {",
        "entry:",
        "  %v0 = inttoptr i64 %va to ptr",
        "  %p = inttoptr i64 %pa to ptr",
        "  %acc = inttoptr i64 %aa to ptr",
        "  %hs = mul i64 %nc, 16",
        "  %npair = lshr i64 %nc, 1",
        "  br label %grp",
        "grp:",
        "  %g = phi i64 [0, %entry], [%g1, %store]",
        "  %go = mul i64 %g, 32",
    ]
    for r in heads:  # this chunk pair's accumulators of head r: acc + r * hs + go (+ 16)
        lines.append(f"  %ho{r} = mul i64 %hs, {r}")
        lines.append(f"  %off{r} = add i64 %ho{r}, %go")
        lines.append(f"  %ap{r}0 = getelementptr float, ptr %acc, i64 %off{r}")
        lines.append(f"  %ap{r}1 = getelementptr float, ptr %ap{r}0, i64 16")
        lines += [f"  %x{r}{h} = load {f16}, ptr %ap{r}{h}, align 4" for h in halves]
    lines += ["  br label %pos", "pos:", "  %t = phi i64 [0, %grp], [%t1, %pos]"]
    for r, h in acc:
        lines.append(f"  %y{r}{h} = phi {f16} [%x{r}{h}, %grp], [%y{r}{h}n, %pos]")
    lines += [
        "  %voff = mul i64 %t, %stride",
        "  %vr = getelementptr i8, ptr %v0, i64 %voff",
        "  %vp0 = getelementptr float, ptr %vr, i64 %go",
        f"  %v0v = load {f16}, ptr %vp0, align 4",
        "  %vp1 = getelementptr float, ptr %vp0, i64 16",
        f"  %v1v = load {f16}, ptr %vp1, align 4",
        "  %po = mul i64 %t, 4",
        "  %pp = getelementptr float, ptr %p, i64 %po",
        "  %p4 = load <4 x float>, ptr %pp, align 4",
    ]
    for r in heads:
        lines.append(
            f"  %b{r} = shufflevector <4 x float> %p4, <4 x float> poison, {_mask([r] * 16)}"
        )
    for r, h in acc:
        lines.append(
            f"  %y{r}{h}n = call {f16} @llvm.fma.v16f32({f16} %b{r}, {f16} %v{h}v, {f16} %y{r}{h})"
        )
    lines += [
        "  %t1 = add i64 %t, 1",
        "  %td = icmp eq i64 %t1, %n",
        "  br i1 %td, label %store, label %pos",
        "store:",
    ]
    for r, h in acc:
        lines.append(f"  store {f16} %y{r}{h}n, ptr %ap{r}{h}, align 4")
    lines += [
        "  %g1 = add i64 %g, 1",
        "  %gd = icmp eq i64 %g1, %npair",
        "  br i1 %gd, label %exit, label %grp",
        "exit:",
        "  ret float 0.0",
        "}",
        f"declare {f16} @llvm.fma.v16f32({f16}, {f16}, {f16})",
    ]
    return "\n".join(lines) + "\n"


# Probabilities times V of one KV block, accumulated in place for 4 query heads: for each of
# the n positions t, V row t at %va + t * %stride bytes (d = 16 * %nc floats, %nc even) is
# added, times the 4 probabilities at %pa + 16 t bytes (position-major, as attn_qk4.ll writes
# scores), into the 4 x d accumulator at %aa (head-major). Walks d in pairs of 16-float
# chunks so that the 8 accumulators of a pair stay in registers across the block's rows.
_PV4_IR = _pv4_ir()


def _f32(value: float) -> str:
    """An LLVM IR float constant: the double spelling of `value` rounded to float32."""
    import struct

    (rounded,) = struct.unpack("f", struct.pack("f", value))
    (bits,) = struct.unpack("<Q", struct.pack("<d", rounded))
    return f"0x{bits:016X}"


def _softmax4_ir() -> str:
    """IR of mistralpy_softmax4 (see _SOFTMAX4_IR)."""
    f16, f4 = "<16 x float>", "<4 x float>"

    def splat(value: float) -> str:
        return f"splat (float {_f32(value)})"

    def lanes4(src: str, dst: str, op: str) -> list[str]:
        """`dst` = <4 x float> combining the 4 positions' lanes of `src` (16) per head with
        `op` ("max" or "add")."""

        def combine(n: int, a: str, b: str) -> str:
            t = f"<{n} x float>"
            if op == "max":
                return f"call {t} @llvm.maxnum.v{n}f32({t} {a}, {t} {b})"
            return f"fadd {t} {a}, {b}"

        f8 = "<8 x float>"
        return [
            f"  {dst}a = shufflevector {f16} {src}, {f16} poison, {_mask(list(range(8)))}",
            f"  {dst}b = shufflevector {f16} {src}, {f16} poison, {_mask(list(range(8, 16)))}",
            f"  {dst}c = {combine(8, f'{dst}a', f'{dst}b')}",
            f"  {dst}d = shufflevector {f8} {dst}c, {f8} poison, {_mask([0, 1, 2, 3])}",
            f"  {dst}e = shufflevector {f8} {dst}c, {f8} poison, {_mask([4, 5, 6, 7])}",
            f"  {dst} = {combine(4, f'{dst}d', f'{dst}e')}",
        ]

    rep4 = _mask([0, 1, 2, 3] * 4)
    # exp(x) for x <= 0 (Cephes expf): x clamped at -87.34 (results below are under 2^-126,
    # nothing next to a softmax's largest term 1), n = round(x / ln 2), r = x - n ln 2 in two
    # parts, exp(r) by a degree-7 polynomial, times 2^n built in the exponent bits.
    poly = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
            1.6666665459e-1, 5.0000001201e-1]  # fmt: skip
    exp_lines = [
        f"  %low = fcmp olt {f16} %xs, {splat(-87.3365447505531)}",  # false for NaN: kept
        f"  %xc = select <16 x i1> %low, {f16} {splat(-87.3365447505531)}, {f16} %xs",
        f"  %nf0 = fmul {f16} %xc, {splat(1.44269504088896341)}",
        f"  %nf = call {f16} @llvm.rint.v16f32({f16} %nf0)",
        f"  %r0 = call {f16} @llvm.fma.v16f32({f16} %nf, {f16} {splat(-0.693359375)}, {f16} %xc)",
        f"  %r = call {f16} @llvm.fma.v16f32({f16} %nf, {f16} {splat(2.12194440e-4)}, {f16} %r0)",
        f"  %r2 = fmul {f16} %r, %r",
    ]
    prev = splat(poly[0])
    for i, c in enumerate(poly[1:], 1):
        exp_lines.append(
            f"  %y{i} = call {f16} @llvm.fma.v16f32({f16} {prev}, {f16} %r, {f16} {splat(c)})"
        )
        prev = f"%y{i}"
    last = len(poly) - 1
    exp_lines += [
        f"  %ya = call {f16} @llvm.fma.v16f32({f16} %y{last}, {f16} %r2, {f16} %r)",
        f"  %yb = fadd {f16} %ya, {splat(1.0)}",
        "  %ni = fptosi <16 x float> %nf to <16 x i32>",
        "  %nb = add <16 x i32> %ni, splat (i32 127)",
        "  %nbits = shl <16 x i32> %nb, splat (i32 23)",
        f"  %pow = bitcast <16 x i32> %nbits to {f16}",
        f"  %e = fmul {f16} %yb, %pow",
    ]
    lines = [
        "define float @mistralpy_softmax4(i64 %sa, i64 %nq, i64 %unused0, i64 %unused1) {",
        "entry:",
        "  %s = inttoptr i64 %sa to ptr",
        "  br label %maxl",
        "maxl:",
        "  %i = phi i64 [0, %entry], [%i1, %maxl]",
        f"  %m = phi {f16} [{splat(float('-inf'))}, %entry], [%m1, %maxl]",
        "  %io = mul i64 %i, 16",
        "  %ip = getelementptr float, ptr %s, i64 %io",
        f"  %xv = load {f16}, ptr %ip, align 4",
        f"  %m1 = call {f16} @llvm.maxnum.v16f32({f16} %m, {f16} %xv)",
        "  %i1 = add i64 %i, 1",
        "  %id = icmp eq i64 %i1, %nq",
        "  br i1 %id, label %maxdone, label %maxl",
        "maxdone:",
        *lanes4("%m1", "%best", "max"),
        f"  %best16 = shufflevector {f4} %best, {f4} poison, {rep4}",
        "  br label %expl",
        "expl:",
        "  %j = phi i64 [0, %maxdone], [%j1, %expl]",
        f"  %acc = phi {f16} [zeroinitializer, %maxdone], [%acc1, %expl]",
        "  %jo = mul i64 %j, 16",
        "  %jp = getelementptr float, ptr %s, i64 %jo",
        f"  %xj = load {f16}, ptr %jp, align 4",
        f"  %xs = fsub {f16} %xj, %best16",
        *exp_lines,
        f"  store {f16} %e, ptr %jp, align 4",
        f"  %acc1 = fadd {f16} %acc, %e",
        "  %j1 = add i64 %j, 1",
        "  %jd = icmp eq i64 %j1, %nq",
        "  br i1 %jd, label %expdone, label %expl",
        "expdone:",
        *lanes4("%acc1", "%tot", "add"),
        f"  %inv = fdiv {f4} {splat(1.0)}, %tot",
        f"  %inv16 = shufflevector {f4} %inv, {f4} poison, {rep4}",
        "  br label %scl",
        "scl:",
        "  %k = phi i64 [0, %expdone], [%k1, %scl]",
        "  %ko = mul i64 %k, 16",
        "  %kp = getelementptr float, ptr %s, i64 %ko",
        f"  %xk = load {f16}, ptr %kp, align 4",
        f"  %pk = fmul {f16} %xk, %inv16",
        f"  store {f16} %pk, ptr %kp, align 4",
        "  %k1 = add i64 %k, 1",
        "  %kd = icmp eq i64 %k1, %nq",
        "  br i1 %kd, label %exit, label %scl",
        "exit:",
        "  ret float 0.0",
        "}",
        f"declare {f16} @llvm.fma.v16f32({f16}, {f16}, {f16})",
        f"declare {f16} @llvm.maxnum.v16f32({f16}, {f16})",
        "declare <8 x float> @llvm.maxnum.v8f32(<8 x float>, <8 x float>)",
        f"declare {f4} @llvm.maxnum.v4f32({f4}, {f4})",
        f"declare {f16} @llvm.rint.v16f32({f16})",
    ]
    return "\n".join(lines) + "\n"


# Softmax in place over the scores of 4 heads, position-major ([t * 4 + head], as attn_qk4.ll
# writes them), %nq vectors of 4 positions: per-head maximum, exp(score - max) (a vectorized
# Cephes expf; probabilities within ~1e-6 relative of float64, tests bound it), sum, scale by
# 1 / sum. Positions past the context
# in the last vector must hold -inf (they come out as ~0).
_SOFTMAX4_IR = _softmax4_ir()


def fits_attention4(n_heads: int, n_kv: int, d: int) -> bool:
    """Whether `attention4` serves these head counts (Mistral Small 3.1: 32 / 8 heads of 128)."""
    return n_heads == 4 * n_kv and d % 32 == 0


@functools.cache
def layer_kernels() -> SimpleNamespace | None:
    """The format-independent parts of the step (rms_norm, rope, attention, attention4)
    compiled by numba, or None without numba."""
    try:
        from numba import njit, prange
    except ImportError:
        return None

    @njit(cache=True, fastmath=_REASSOC)
    def rms_norm(x, w, eps, out):  # pragma: no cover - compiled
        # x, out (M, H) float32; w (H,)
        m, h = x.shape
        for i in range(m):
            ss = np.float32(0.0)
            for j in range(h):
                ss += x[i, j] * x[i, j]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(h) + np.float32(eps))
            for j in range(h):
                out[i, j] = w[j] * (x[i, j] * inv)

    @njit(cache=True)
    def rope(x, i, start, heads, d, cos, sin):  # pragma: no cover - compiled
        # in place on heads of d features at x[i, start:]: rotate-half RoPE, cos/sin (d,)
        half = d // 2
        for hh in range(heads):
            base = start + hh * d
            for j in range(half):
                a = x[i, base + j]
                b = x[i, base + half + j]
                x[i, base + j] = a * cos[j] - b * sin[j]
                x[i, base + half + j] = b * cos[half + j] + a * sin[half + j]

    @njit(parallel=True, cache=True, fastmath=_REASSOC)
    def attention(qkv, cache, tables, pos, n_heads, n_kv, d, scale, out):  # pragma: no cover
        # qkv (M, (n_heads + 2 n_kv) d) after RoPE; cache (2, NB, BS, n_kv, d); out (M, n_heads d).
        # One task per (row, KV head): its `group` query heads share each K/V row read; K and
        # V are walked block by block (one view per block, not per token).
        m = qkv.shape[0]
        bs = cache.shape[2]
        group = n_heads // n_kv
        for task in prange(m * n_kv):
            i = task // n_kv
            g = task % n_kv
            ctx = pos[i] + 1
            nblk = (ctx + bs - 1) // bs
            qs = np.empty((group, d), np.float32)  # the group's queries, pre-scaled
            for r in range(group):
                for j in range(d):
                    qs[r, j] = qkv[i, (g * group + r) * d + j] * np.float32(scale)
            scores = np.empty((group, ctx), np.float32)
            for bi in range(nblk):
                kb = cache[0, tables[i, bi]]
                t0 = bi * bs
                for off in range(min(bs, ctx - t0)):
                    k = kb[off, g]
                    for r in range(group):
                        s = np.float32(0.0)
                        for j in range(d):
                            s += qs[r, j] * k[j]
                        scores[r, t0 + off] = s
            for r in range(group):
                best = scores[r, 0]
                for t in range(1, ctx):
                    best = max(best, scores[r, t])
                total = np.float32(0.0)
                for t in range(ctx):
                    e = np.exp(scores[r, t] - best)
                    scores[r, t] = e
                    total += e
                inv = np.float32(1.0) / total
                for t in range(ctx):
                    scores[r, t] *= inv
            acc = np.zeros((group, d), np.float32)
            for bi in range(nblk):
                vb = cache[1, tables[i, bi]]
                t0 = bi * bs
                for off in range(min(bs, ctx - t0)):
                    v = vb[off, g]
                    for r in range(group):
                        p = scores[r, t0 + off]
                        for j in range(d):
                            acc[r, j] += p * v[j]
            for r in range(group):
                for j in range(d):
                    out[i, (g * group + r) * d + j] = acc[r, j]

    qk4_ir = cpu_gguf.read_ir("attn_qk4").replace("REDUCE4", _reduce4_ir())
    qk4 = cpu_gguf.ir_intrinsic("mistralpy_attn_qk4", qk4_ir, 6)
    pv4 = cpu_gguf.ir_intrinsic("mistralpy_attn_pv4", _PV4_IR, 6)
    prefetch_rows = cpu_gguf.ir_intrinsic(
        "mistralpy_prefetch_rows", cpu_gguf.read_ir("prefetch_rows"), 4
    )
    softmax4 = cpu_gguf.ir_intrinsic("mistralpy_softmax4", _SOFTMAX4_IR, 4)

    @njit
    def prefetch_block(head, table, b, ctx, bs, row_floats, lines):  # pragma: no cover
        # into L1, the K or V rows (from address `head`, rows of `row_floats` floats) of
        # block b of a task's table that hold positions below ctx; nothing past the last
        if b * bs < ctx:
            rows = min(bs, ctx - b * bs)
            prefetch_rows(head + table[b] * bs * row_floats * 4, rows, row_floats * 4, lines)

    # not cached on disk: closes over the IR intrinsics (see kernels.cpu_gguf's module doc)
    @njit(parallel=True, fastmath=_REASSOC)
    def attention4(qkv, cache, tables, pos, n_heads, n_kv, d, scale, out):  # pragma: no cover
        # As `attention`, for 4 query heads per KV head and d % 32 == 0 (`fits_attention4`);
        # `cache` C-contiguous. K and V rows are read through the IR block kernels, and the next
        # block of the task is prefetched while one is computed (after a decode step's weight
        # stream the cache has left the CPU caches; the table, not the hardware, knows where
        # the next block lies).
        m = qkv.shape[0]
        bs = cache.shape[2]
        row_bytes = n_kv * d * 4
        block_bytes = bs * row_bytes
        lines = d * 4 // 64
        nc = d // 16
        v_base = cache.ctypes.data + cache.shape[1] * block_bytes
        for task in prange(m * n_kv):
            i = task // n_kv
            g = task % n_kv
            ctx = pos[i] + 1
            nblk = (ctx + bs - 1) // bs
            qs = np.empty(4 * d, np.float32)  # the group's 4 queries, pre-scaled, head-major
            for r in range(4):
                for j in range(d):
                    qs[r * d + j] = qkv[i, (g * 4 + r) * d + j] * np.float32(scale)
            # position-major ([t * 4 + head]), room for a last partial vector of 4
            scores = np.empty((nblk * bs + 3) * 4, np.float32)
            k_head = cache.ctypes.data + g * d * 4
            prefetch_block(k_head, tables[i], 0, ctx, bs, n_kv * d, lines)
            for bi in range(nblk):
                prefetch_block(k_head, tables[i], bi + 1, ctx, bs, n_kv * d, lines)
                n = min(bs, ctx - bi * bs)
                k_blk = k_head + tables[i, bi] * block_bytes
                qk4(k_blk, qs.ctypes.data, scores.ctypes.data + bi * bs * 16, n, row_bytes, nc)
            v_head = v_base + g * d * 4
            prefetch_block(v_head, tables[i], 0, ctx, bs, n_kv * d, lines)
            nq = (ctx + 3) // 4  # softmax4 works on 4 positions at a time
            for t in range(ctx * 4, nq * 16):
                scores[t] = -np.inf
            softmax4(scores.ctypes.data, nq, 0, 0)
            acc = np.zeros(4 * d, np.float32)
            for bi in range(nblk):
                prefetch_block(v_head, tables[i], bi + 1, ctx, bs, n_kv * d, lines)
                n = min(bs, ctx - bi * bs)
                v_blk = v_head + tables[i, bi] * block_bytes
                pv4(v_blk, scores.ctypes.data + bi * bs * 16, acc.ctypes.data, n, row_bytes, nc)
            for r in range(4):
                for j in range(d):
                    out[i, (g * 4 + r) * d + j] = acc[r * d + j]

    return SimpleNamespace(rms_norm=rms_norm, rope=rope, attention=attention, attention4=attention4)


@functools.cache
def step_function(fmt_name: str) -> Callable[..., None] | None:
    """The compiled decode step for linears in GGUF format `fmt_name` ('q4k' or 'q8_0'), or
    None when numba or that format's GEMV is unavailable on this host."""
    matvec = cpu_gguf.driver(fmt_name)
    kernels = layer_kernels()
    if matvec is None or kernels is None:
        return None
    from numba import njit

    rms_norm, rope, attention = kernels.rms_norm, kernels.rope, kernels.attention
    attention4 = kernels.attention4
    fits4 = njit(fits_attention4)

    # not cached on disk: numba keys a closure's cache on this file only, so a cached step
    # could call a stale GEMV driver after cpu_gguf changes (compiling takes ~1 s at load).
    # nogil: the server's event loop thread keeps running while a step computes.
    @njit(nogil=True)
    def step(
        ids, pos, tables, embed, inv_freq, in_norms, post_norms, final_norm,
        qkv_w, o_w, gate_up_w, down_w, lm_w, caches,
        n_heads, n_kv, d, inter, eps, scale, logits,
    ):  # fmt: skip  # pragma: no cover - compiled
        m = ids.shape[0]
        hidden = embed.shape[1]
        q_size = n_heads * d
        kv_size = n_kv * d
        residual = np.empty((m, hidden), np.float32)
        for i in range(m):
            residual[i] = embed[ids[i]]
        h = np.empty((m, hidden), np.float32)
        qkv = np.empty((m, q_size + 2 * kv_size), np.float32)
        att = np.empty((m, q_size), np.float32)
        proj = np.empty((m, hidden), np.float32)
        gate_up = np.empty((m, 2 * inter), np.float32)
        act = np.empty((m, inter), np.float32)
        cos = np.empty((m, d), np.float32)
        sin = np.empty((m, d), np.float32)
        half = d // 2
        for i in range(m):
            p = np.float32(pos[i])
            for j in range(half):
                angle = p * inv_freq[j]
                cos[i, j] = np.cos(angle)
                cos[i, half + j] = cos[i, j]
                sin[i, j] = np.sin(angle)
                sin[i, half + j] = sin[i, j]
        bs = caches[0].shape[2]
        group4 = fits4(n_heads, n_kv, d)
        for layer in range(len(qkv_w)):
            cache = caches[layer]
            rms_norm(residual, in_norms[layer], eps, h)
            matvec(qkv_w[layer], h, qkv)
            for i in range(m):
                rope(qkv, i, 0, n_heads, d, cos[i], sin[i])
                rope(qkv, i, q_size, n_kv, d, cos[i], sin[i])
                blk = tables[i, pos[i] // bs]
                off = pos[i] % bs
                for g in range(n_kv):
                    for j in range(d):
                        cache[0, blk, off, g, j] = qkv[i, q_size + g * d + j]
                        cache[1, blk, off, g, j] = qkv[i, q_size + kv_size + g * d + j]
            if group4:
                attention4(qkv, cache, tables, pos, n_heads, n_kv, d, scale, att)
            else:
                attention(qkv, cache, tables, pos, n_heads, n_kv, d, scale, att)
            matvec(o_w[layer], att, proj)
            residual += proj
            rms_norm(residual, post_norms[layer], eps, h)
            matvec(gate_up_w[layer], h, gate_up)
            for i in range(m):
                for j in range(inter):
                    gt = gate_up[i, j]
                    act[i, j] = gt / (np.float32(1.0) + np.exp(-gt)) * gate_up[i, inter + j]
            matvec(down_w[layer], act, proj)
            residual += proj
        rms_norm(residual, final_norm, eps, h)
        matvec(lm_w, h, logits)

    return step


def typed_list(arrays: list[np.ndarray]) -> Any:
    """A numba typed List of `arrays` (all of one dtype and ndim), as the step function takes."""
    from numba.typed import List

    out = List()
    for a in arrays:
        out.append(a)
    return out
