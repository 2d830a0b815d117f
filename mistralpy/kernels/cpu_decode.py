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


@functools.cache
def layer_kernels() -> SimpleNamespace | None:
    """The format-independent parts of the step (rms_norm, rope, attention) compiled by
    numba, or None without numba."""
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

    return SimpleNamespace(rms_norm=rms_norm, rope=rope, attention=attention)


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
