"""CUDA: correctness and speed of the quantized matmuls at Mistral-Small-24B shapes.

    PYTHONPATH=. python benchmarks/quant_gpu.py [--sections check,words,crossover,gemm,fp8,table]
        [--formats q4k,q8_0] [--batches 1,16] [--peak-gbs GBPS] [--json out.json]
        [--baseline OLD_TRITON_QUANT.py]

Sections (each independent; a failure prints its traceback and the others still run):
- check: every CUDA path (tinygemm q4k/q4_0/q4_1, W8A8 fp8 `_scaled_mm`, fused fp8 row
  quantizer, split-K q4k GEMV) against the dequantize + fp32 matmul oracle.
- words: the batch-1 q4k GEMV (every tuning candidate, or with --words-candidates dp4a a
  wider sweep; the load-time tuner's pick) vs tinygemm, each streaming its weight from HBM
  (timed over enough copies to defeat the 50 MB L2, as in a decode step).
- mma_check: the CUDA tensor-core q4k GEMM against the oracle (ragged shapes, splits, graphs).
- gemm: the q4k decode GEMMs (swap-AB tl.dot, CUDA mma up to 32 rows; --gemm-kernels and
  --gemm-layers pick) per M bucket vs
  tinygemm and bf16 cuBLAS, then dequantize + cuBLAS at prefill sizes.
- crossover: q4k tinygemm vs Triton GEMM vs bf16 by M; q4_0 tinygemm vs tiled dequant.
- fp8: W8A8 `_scaled_mm` (fused activation quantizer) vs the Triton weight-only kernel.
- table: the path QuantizedLinear picks, per format/shape/M, plus the batch-1 whole-model
  estimate (40 decoder layers + lm_head, weights only).
Times: triton.testing.do_bench_cudagraph (median); GB/s counts weight bytes as stored by
the format (GGUF bytes) + activations + output; % is of --peak-gbs, by default the copy
bandwidth (bytes read + written) measured at start. --baseline: an earlier
mistralpy/kernels/triton_quant.py (e.g. `git show REV:mistralpy/kernels/triton_quant.py`)
whose load-time q4k pick section words tunes and times too, for a same-run before/after.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time
import traceback

import torch
import triton.testing
from torch.nn import functional as F

from mistralpy.kernels import quant_matmul as qm
from mistralpy.kernels import triton_quant as tq
from mistralpy.quant.formats import fp8_parts, get_format
from mistralpy.quant.isq import QuantizedLinear, reference_matmul

SHAPES = {  # (out, in) of one Mistral-Small-3.1-24B decoder layer (fused projections)
    "qkv": (6144, 5120),
    "o": (5120, 4096),
    "gate_up": (65536, 5120),
    "down": (5120, 32768),
}
LM_HEAD = (131072, 5120)
LAYERS = 40


def bench_ms(fn, *args, rep: int = 100) -> float:
    """Median milliseconds of fn(*args) replayed in a CUDA graph."""
    fn = functools.partial(fn, *args)
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception:  # graph capture unsupported: fall back to plain launches
        return triton.testing.do_bench(fn, rep=rep, return_mode="median")


def copy_gbs(dev: torch.device) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * (1 << 30) / ms / 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class Ctx:
    def __init__(self, args):
        self.args, self.rows, self.dev = args, [], torch.device("cuda")
        self.weights: dict = {}
        self.baseline = None  # the --baseline triton_quant module, loaded on first use

    def weight(self, shape) -> torch.Tensor:
        if shape not in self.weights:
            g = torch.Generator(device=self.dev).manual_seed(hash(shape) % 1000)
            w = torch.randn(shape, device=self.dev, generator=g) * 0.02
            self.weights[shape] = w.to(torch.bfloat16)
        return self.weights[shape]

    def record(self, section, name, shape, fmt, m, ms, nbytes, err=None, kernel="", **extra):
        gbs = nbytes / ms / 1e6
        pct = 100 * gbs / self.args.peak_gbs
        e = "" if err is None else f"{err:9.2e}"
        print(
            f"{section:>9} {name:>8} {shape[0]:>6}x{shape[1]:<6} {fmt:>6} M={m:<4} "
            f"{ms * 1e3:9.1f} us {gbs:7.0f} GB/s {pct:5.1f}% {e:>9} {kernel} {extra or ''}",
            flush=True,
        )
        self.rows.append({"section": section, "layer": name, "shape": list(shape),
                          "format": fmt, "m": m, "us": ms * 1e3, "gbs": gbs, "pct_peak": pct,
                          "rel_err": err, "kernel": kernel, **extra})  # fmt: skip


def x_of(m, k, dev, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed + m)
    return torch.randn(m, k, device=dev, generator=g).to(dtype)


# --- sections -------------------------------------------------------------------------------


def check(ctx: Ctx) -> None:
    n, k = 512, 1024
    w = ctx.weight((n, k)).float()
    for name in ["q4k", "q4_0", "q4_1", "q8_0", "q6k", "fp8"]:
        layer = QuantizedLinear.from_float(w, None, name)
        ref_k = reference_matmul(layer.fmt, layer.packed_weight(), (n, k))
        for m in [1, 5, 17, 80]:
            x = x_of(m, k, ctx.dev)
            ref = ref_k(x.float())
            err = rel_err(layer(x), ref)
            print(f"CHECK {name:5} M={m:<3} {type(layer.kernel).__name__:22} rel_err {err:.2e}")
            ctx.rows.append({"section": "check", "format": name, "m": m, "rel_err": err,
                             "kernel": type(layer.kernel).__name__})  # fmt: skip
        if name == "fp8":
            full = x.float() @ w.T
            print(
                f"CHECK fp8 vs unquantized bf16-weight fp32 matmul: {rel_err(layer(x), full):.2e}"
            )
            sd = layer.state_dict()
            print("CHECK fp8 state_dict qweight", tuple(sd["qweight"].shape), layer.qweight)
    x = x_of(7, 4096, ctx.dev) * torch.logspace(-3, 1, 7, device=ctx.dev)[:, None].bfloat16()
    for fused, ref_fn in [
        (tq.fp8_quantize_rows, qm.fp8_quantize_rows),
        (tq.fp8_quantize_tensor, qm.fp8_quantize_tensor),
    ]:
        q, s = fused(x)
        q_ref, s_ref = ref_fn(x)
        same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        print(f"CHECK fused {fused.__name__} bit-equal to the torch reference: {same}")
    packed = get_format("fp8").quantize(w)
    codes, scale = fp8_parts(packed, k)
    ref_k = reference_matmul(get_format("fp8"), packed, (n, k))
    for tw, fast in itertools.product((0, 1 << 30), (False, True)):
        kern = qm.ScaledMMFp8Matmul(
            codes, scale, tq.fp8_quantize_rows, tq.fp8_quantize_tensor, tw, fast
        )
        for m in (1, 16):
            x = x_of(m, k, ctx.dev)
            err = rel_err(kern(x), ref_k(x.float()))
            print(f"CHECK fp8 tensorwise={bool(tw)} fast_accum={fast} M={m}: rel_err {err:.2e}")
    f = get_format("q4k")
    for shape in [(5120, 32768), (6144, 5120)]:
        packed = f.quantize(ctx.weight(shape))
        ref = reference_matmul(f, packed, shape)(x_of(1, shape[1], ctx.dev).float())
        for cfg in [
            tq.GemvConfig(4, 4, 2, split=4),
            tq.GemvConfig(8, 2, 2, split=2, stages=3),
            tq.GemvConfig(8, 1, 1, split=4, x_inline=True),
        ]:
            y = tq.TritonQ4KMatmul(packed, shape, cfg)(x_of(1, shape[1], ctx.dev))
            print(f"CHECK q4k gemv {shape} {cfg}: rel_err {rel_err(y, ref):.2e}")


def bench_stream_ms(make, packed: torch.Tensor, x: torch.Tensor, rep: int = 30) -> float:
    """Milliseconds per call of make(packed copy)(x), cycling through enough copies of the
    weight (>= 256 MB together) that each call streams it from HBM, not from L2."""
    copies = max(1, min(16, -(-(256 << 20) // packed.numel())))
    kernels = [make(packed if i == 0 else packed.clone()) for i in range(copies)]
    return bench_ms(lambda: [k(x) for k in kernels], rep=rep) / copies


# --words-candidates: the load-time tuner's list, or a wider sweep of the dp4a kernel, or
# the tuner's list beside the CUDA GEMV's launch shapes
WORDS_CANDIDATES = {
    "tuner": tq.Q4K_GEMV_CANDIDATES,
    "cuda": tq.Q4K_GEMV_CANDIDATES
    + tq.Q4K_GEMV_CUDA_CANDIDATES
    + tuple(
        tq.GemvConfig(rw * warps, unroll, warps, cuda=True)
        for rw, unroll, warps in (
            (1, 2, 4),
            (1, 4, 4),
            (2, 4, 4),
            (1, 8, 4),
            (2, 5, 4),
            (4, 4, 4),
            (1, 4, 8),
            (2, 4, 8),
            (2, 5, 2),
            (1, 8, 8),
        )
    ),  # fmt: skip
    "dp4a": tuple(
        tq.GemvConfig(bn, bb, warps, split=split, stages=stages, x_inline=inline)
        for inline in (False, True)
        for bn, bb, warps in (
            (4, 1, 1),
            (8, 1, 1),
            (8, 2, 1),
            (16, 1, 1),
            (16, 1, 2),
            (16, 2, 2),
            (32, 1, 2),
            (32, 1, 4),
            (64, 1, 4),
        )
        for split in (1, 4)
        for stages in ((1, 2) if (bn, split) == (16, 1) else (1,))
        if not (inline and bn < 16)
    ),
}


def words(ctx: Ctx) -> None:
    total: dict[str, float] = {}
    layer: dict[str, float] = {}  # one decoder layer's four GEMVs, ms
    layer_bytes = 0
    for name, shape in {**SHAPES, "lm_head": LM_HEAD}.items():
        times = _words_shape(ctx, name, shape)
        for key, t in times.items():
            total[key] = total.get(key, 0.0) + (LAYERS if name != "lm_head" else 1) * t
            if name != "lm_head":
                layer[key] = layer.get(key, 0.0) + t
        if name != "lm_head":
            layer_bytes += _q4k_gemv_bytes(shape)
        del ctx.weights[shape]
    for key, ms in layer.items():
        pct = layer_bytes / ms / 1e6 / ctx.args.peak_gbs * 100
        print(f"LAYER q4k GEMVs ({key}): {layer_bytes / 1e6:.1f} MB in {ms * 1e3:.1f} us = "
              f"{pct:.1f}% of {ctx.args.peak_gbs:.0f} GB/s", flush=True)  # fmt: skip
        ctx.rows.append({"section": "words_layer", "kernel": key, "us": ms * 1e3,
                         "bytes": layer_bytes, "pct_peak": pct})  # fmt: skip
    for key, ms in total.items():
        print(f"ESTIMATE q4k linears per decode step ({key}): {ms:.2f} ms -> "
              f"{1000 / ms:.0f} tok/s (linear layers only)", flush=True)  # fmt: skip
        ctx.rows.append({"section": "words_estimate", "kernel": key, "ms": ms})


def _q4k_gemv_bytes(shape: tuple[int, int]) -> int:
    """Bytes a batch-1 q4_K GEMV must move: the GGUF weight (144 B per 256) + bf16 x and y."""
    n, k = shape
    return n * k // 256 * 144 + k * 2 + n * 2


def _baseline_module(path: str):
    """An earlier triton_quant.py loaded as its own module (its kernels compile separately)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_triton_quant", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _words_baseline(ctx: Ctx, name, shape, packed, x, ref, nbytes) -> dict[str, float]:
    """The --baseline module's load-time pick for this shape, tuned and timed as ours."""
    if not ctx.args.baseline:
        return {}
    old = ctx.baseline or _baseline_module(ctx.args.baseline)
    ctx.baseline = old
    t0 = time.perf_counter()
    cfg = old.tune_q4k_gemv(packed, shape)
    tune_s = time.perf_counter() - t0
    t = bench_stream_ms(lambda p: old.TritonQ4KMatmul(p, shape, cfg), packed, x)
    err = rel_err(old.TritonQ4KMatmul(packed, shape, cfg)(x), ref)
    ctx.record("words", name, shape, "q4k", 1, t, nbytes, err, f"baseline {cfg}",
               tune_s=tune_s)  # fmt: skip
    return {"baseline": t}


def _words_shape(ctx: Ctx, name: str, shape: tuple[int, int]) -> dict[str, float]:
    """One weight shape of section `words`; returns ms per kernel kind at M = 1."""
    f = get_format("q4k")
    packed = f.quantize(ctx.weight(shape))
    n, k = shape
    x = x_of(1, k, ctx.dev)
    ref = reference_matmul(f, packed, shape)(x.float())
    nbytes = _q4k_gemv_bytes(shape)

    def tiny(p):
        ga = f.group_affine(p, shape)
        return qm.TinyGemmInt4Matmul(ga.codes, ga.scale, ga.offset, None, 1 << 30)

    t_tiny = bench_stream_ms(tiny, packed, x)
    ctx.record("words", name, shape, "q4k", 1, t_tiny, nbytes, rel_err(tiny(packed)(x), ref),
               "tinygemm")  # fmt: skip
    best = (float("inf"), None)
    for cfg in WORDS_CANDIDATES[ctx.args.words_candidates]:
        kern = tq.TritonQ4KMatmul(packed, shape, cfg)
        try:
            y = kern(x)
            err, same = rel_err(y, ref), torch.equal(y, kern(x))  # split-K: counters reset
            t = bench_stream_ms(lambda p, c=cfg: tq.TritonQ4KMatmul(p, shape, c), packed, x)
        except Exception as e:  # noqa: BLE001 - a config that does not compile
            print("words", name, cfg, "failed:", str(e)[:300])
            continue
        ctx.record("words", name, shape, "q4k", 1, t, nbytes, err, f"words {cfg}",
                   repeat_equal=same)  # fmt: skip
        best = min(best, (t, cfg), key=lambda b: b[0])
    t0 = time.perf_counter()
    tuned = tq.tune_q4k_gemv(packed, shape)
    tune_s = time.perf_counter() - t0
    t_tuned = bench_stream_ms(lambda p: tq.TritonQ4KMatmul(p, shape, tuned), packed, x)
    ctx.record("words", name, shape, "q4k", 1, t_tuned, nbytes, None, f"tuned {tuned}",
               tune_s=tune_s)  # fmt: skip
    print(f"WORDS BEST {name}: {best[1]} {best[0] * 1e3:.1f} us "
          f"{nbytes / best[0] / 1e6 / ctx.args.peak_gbs * 100:.1f}% of peak; tinygemm "
          f"{t_tiny * 1e3:.1f} us, tuned pick {tuned} "
          f"{t_tuned * 1e3:.1f} us (tuning {tune_s:.1f} s)", flush=True)  # fmt: skip
    ctx.rows.append({"section": "words_best", "layer": name, "us": best[0] * 1e3,
                     "config": str(best[1]), "tinygemm_us": t_tiny * 1e3,
                     "tuned_us": t_tuned * 1e3,
                     "tuned": str(tuned), "pct_peak": nbytes / best[0] / 1e6 /
                     ctx.args.peak_gbs * 100})  # fmt: skip
    base = _words_baseline(ctx, name, shape, packed, x, ref, nbytes)
    return {"tinygemm": t_tiny, "words": best[0], "tuned": t_tuned, **base}


def crossover(ctx: Ctx) -> None:
    for fmt_name in ctx.args.crossover_formats.split(","):
        f = get_format(fmt_name)
        for name, shape in SHAPES.items():
            if fmt_name == "q4_0" and name not in ("qkv", "gate_up"):
                continue
            w = ctx.weight(shape)
            packed = f.quantize(w)
            ga = f.group_affine(packed, shape)
            tiny = qm.TinyGemmInt4Matmul(ga.codes, ga.scale, ga.offset, None, 1 << 30)
            del ga
            other = (
                tq.TritonQ4KMatmul(packed, shape)
                if fmt_name == "q4k"
                else qm.DequantMatmul(_dequant_rows(f, packed, shape[1]), *shape)
            )
            for m in [int(b) for b in ctx.args.crossover_m.split(",")]:
                x = x_of(m, shape[1], ctx.dev)
                nbytes = packed.numel() + x.numel() * 2 + m * shape[0] * 2
                t_tiny = bench_ms(tiny, x, rep=30)
                t_other = bench_ms(other, x, rep=30)
                t_bf16 = bench_ms(F.linear, x, w, rep=30)
                ctx.record("crossover", name, shape, fmt_name, m, t_tiny, nbytes,
                           kernel="tinygemm", other_us=t_other * 1e3,
                           other=type(other).__name__, bf16_us=t_bf16 * 1e3)  # fmt: skip


def _kind(cfg) -> str:
    return "mma" if cfg.mma else "swap"


def _gemm_sweep(n: int, k: int, bm: int, best16: dict, kinds: set[str]) -> list:
    """Configs the sweep times at bucket bm for each kernel kind in `kinds`: the swap
    kernel's tuner candidates from 16 rows up (below, it pads to 16: only its best 16-row
    config), and the CUDA mma kernel's up to Q4K_MMA_MAX_M."""
    out = []
    if "swap" in kinds:
        out += [best16["swap"]] if bm < 16 and "swap" in best16 else tq.q4k_gemm_candidates(n, k)
    if "mma" in kinds and bm <= tq.Q4K_MMA_MAX_M:
        out += tq.q4k_gemm_mma_candidates(n, k)
    return out


def _q4k_gemm_kernel_of(packed, shape, gemm):
    kern = tq.TritonQ4KMatmul(packed, shape, gemm=gemm)
    if 1 in gemm:  # a 1-row bucket times the GEMM kernel, not the GEMV
        kern.gemv = dataclasses.replace(kern.gemv, max_m=0)
    return kern


def gemm(ctx: Ctx) -> None:
    """q4k decode GEMM (swap-AB tl.dot over the GGUF bytes) per shape and M bucket: every
    sweep config, streaming from HBM, vs tinygemm (the old small-batch path, a second copy
    of the weight) and bf16 cuBLAS at the same M; then prefill-sized M: dequantize + dense
    GEMM vs bf16 (and the swap kernel with a 128-row bucket at M = 128)."""
    f = get_format("q4k")
    buckets = tuple(int(b) for b in ctx.args.gemm_buckets.split(","))
    tq.Q4K_GEMM_BUCKETS = buckets  # the sweep may try a 128 bucket
    best: dict = {}
    kinds = set(ctx.args.gemm_kernels.split(","))
    layers = {**SHAPES, "lm_head": LM_HEAD}
    for name in ctx.args.gemm_layers.split(","):
        shape = layers[name]
        w = ctx.weight(shape)
        packed = f.quantize(w)
        ref_w = f.dequantize(packed, shape, torch.float32)
        ga = f.group_affine(packed, shape)
        tiny = qm.TinyGemmInt4Matmul(ga.codes, ga.scale, ga.offset, None, 1 << 30)
        del ga
        n, k = shape
        for bm in sorted(buckets, key=lambda b: (b < 16, -b)):  # 16 before the smaller
            x = x_of(bm, k, ctx.dev)
            ref = x.float() @ ref_w.T
            nbytes = packed.numel() + x.numel() * 2 + bm * n * 2
            t_tiny = bench_ms(tiny, x, rep=30)
            t_bf16 = bench_stream_ms(lambda p: functools.partial(F.linear, weight=p), w, x)
            ctx.record("gemm", name, shape, "tinygemm", bm, t_tiny, nbytes, kernel="tinygemm")
            ctx.record("gemm", name, shape, "bf16", bm, t_bf16, w.numel() * 2, kernel="cublas")
            results = []
            best16 = best.get((name, "best16"), {})
            for cfg in _gemm_sweep(n, k, bm, best16, kinds):
                make = functools.partial(_q4k_gemm_kernel_of, shape=shape, gemm={bm: cfg})
                try:
                    err = rel_err(make(packed)(x), ref)
                    t = bench_stream_ms(make, packed, x)
                except Exception as exc:  # noqa: BLE001
                    print(f"gemm {name} bm={bm} {cfg}: {type(exc).__name__}: {exc}"[:300])
                    continue
                results.append((t, cfg, err))
                ctx.record("gemm", name, shape, "q4k", bm, t, nbytes, err, str(cfg))
            for kind in kinds:  # each kernel's best, then the overall best
                mine = [r for r in results if _kind(r[1]) == kind]
                if mine:
                    t, cfg, err = min(mine, key=lambda r: r[0])
                    if bm == 16:
                        best.setdefault((name, "best16"), {})[kind] = cfg
                    print(f"GEMM {kind} {name} bm={bm}: {cfg} {t * 1e3:.1f} us", flush=True)
                    ctx.rows.append({"section": "gemm_kind_best", "layer": name, "bm": bm,
                                     "kind": kind, "us": t * 1e3, "config": str(cfg)})  # fmt: skip
            t, cfg, err = min(results, key=lambda r: r[0])
            best[(name, bm)] = (t, cfg, err, t_tiny, t_bf16)
            print(f"GEMM BEST {name} bm={bm}: {cfg} {t * 1e3:.1f} us "
                  f"({nbytes / t / 1e6 / ctx.args.peak_gbs * 100:.0f}% of peak, err {err:.1e}); "
                  f"tinygemm {t_tiny * 1e3:.1f} us, bf16 {t_bf16 * 1e3:.1f} us", flush=True)  # fmt: skip
            ctx.rows.append({"section": "gemm_best", "layer": name, "bm": bm, "us": t * 1e3,
                             "config": str(cfg), "rel_err": err, "tinygemm_us": t_tiny * 1e3,
                             "bf16_us": t_bf16 * 1e3})  # fmt: skip
        for m in (128, 512, 2048, 8192) if ctx.args.gemm_prefill else ():
            if m in buckets:
                continue
            x = x_of(m, k, ctx.dev)
            kern = tq.TritonQ4KMatmul(packed, shape)
            err = rel_err(kern(x), x.float() @ ref_w.T)
            t_deq = bench_ms(kern, x, rep=30)
            t_bf16 = bench_ms(F.linear, x, w, rep=30)
            ctx.record("prefill", name, shape, "q4k", m, t_deq, packed.numel(), err,
                       "dequant+cublas", bf16_us=t_bf16 * 1e3)  # fmt: skip
        del packed, ref_w, tiny
        torch.cuda.empty_cache()
        if ctx.args.json:  # per shape: a sweep cut off by a time limit keeps what it measured
            with open(ctx.args.json, "w") as out:
                json.dump(ctx.rows, out, indent=1)
    print("\nGEMM summary (us per call, streaming): shape bm best tinygemm bf16 config")
    for (name, bm), (t, cfg, _err, t_tiny, t_bf16) in (
        (key, v) for key, v in best.items() if key[1] != "best16"
    ):
        print(f"  {name:>8} {bm:>4} {t * 1e3:8.1f} {t_tiny * 1e3:8.1f} {t_bf16 * 1e3:8.1f} {cfg}")


def _dequant_rows(fmt, packed, k):
    return lambda a, b, dt: fmt.dequantize(packed[a:b], (b - a, k), dt)


def fp8(ctx: Ctx) -> None:
    f = get_format("fp8")
    for name, shape in {**SHAPES, "lm_head": LM_HEAD}.items():
        w = ctx.weight(shape)
        packed = f.quantize(w)
        codes, scale = fp8_parts(packed, shape[1])
        ref_k = reference_matmul(f, packed, shape)
        quant = (tq.fp8_quantize_rows, tq.fp8_quantize_tensor)
        kernels = {
            "tensorwise_fast": qm.ScaledMMFp8Matmul(codes, scale, *quant, 1 << 30, True),
            "tensorwise": qm.ScaledMMFp8Matmul(codes, scale, *quant, 1 << 30, False),
            "rowwise_fast": qm.ScaledMMFp8Matmul(codes, scale, *quant, 0, True),
            "rowwise": qm.ScaledMMFp8Matmul(codes, scale, *quant, 0, False),
        }
        for m in [1, 4, 16, 64]:
            x = x_of(m, shape[1], ctx.dev)
            ref = ref_k(x.float())
            nbytes = codes.numel() + x.numel() * 2 + m * shape[0] * 2
            for kname, kern in kernels.items():
                ms = bench_ms(kern, x, rep=30)
                ctx.record("fp8", name, shape, "fp8", m, ms, nbytes, rel_err(kern(x), ref), kname)
            ms = bench_ms(tq.fp8_quantize_tensor, x, rep=30)
            ctx.record("fp8", name, shape, "fp8", m, ms, x.numel() * 3, kernel="act_quant_tensor")


def table(ctx: Ctx) -> None:
    batches = [int(b) for b in ctx.args.batches.split(",")]
    est = {}
    for name, shape in {**SHAPES, "lm_head": LM_HEAD}.items():
        w = ctx.weight(shape)
        for m in batches:
            x = x_of(m, shape[1], ctx.dev)
            ms = bench_ms(F.linear, x, w)
            ctx.record("table", name, shape, "bf16", m, ms, w.numel() * 2, kernel="cublas")
            est.setdefault(("bf16", m), []).append((name, ms))
        for fmt_name in ctx.args.formats.split(","):
            fmt = get_format(fmt_name)
            torch.cuda.synchronize()
            t = time.perf_counter()
            layer = QuantizedLinear.from_float(w, None, fmt)
            torch.cuda.synchronize()
            print(f"  quantize+build {name} {fmt.name}: {time.perf_counter() - t:.2f} s")
            ref_kernel = reference_matmul(fmt, layer.packed_weight(), shape)
            wbytes = layer.packed_weight().numel()
            for m in batches:
                x = x_of(m, shape[1], ctx.dev)
                err = rel_err(layer(x), ref_kernel(x.float())) if name != "lm_head" else None
                ms = bench_ms(layer, x)
                nbytes = wbytes + x.numel() * 2 + m * shape[0] * 2
                kern = type(layer.kernel).__name__
                ctx.record("table", name, shape, fmt.name, m, ms, nbytes, err, kern)
                est.setdefault((fmt.name, m), []).append((name, ms))
            del layer, ref_kernel
        del ctx.weights[shape]
    for (fmt_name, m), parts in est.items():
        d = dict(parts)
        if len(d) < 5:
            continue
        total = LAYERS * sum(d[n] for n in SHAPES) + d["lm_head"]
        print(f"ESTIMATE {fmt_name:5} M={m}: {total:.2f} ms per step -> {1000 / total:.0f} tok/s "
              "(linear layers only)")  # fmt: skip
        ctx.rows.append({"section": "estimate", "format": fmt_name, "m": m, "ms": total})


def mma_check(ctx: Ctx) -> None:
    """The CUDA tensor-core q4_K GEMM (`cuda_q4k`) against dequantize + matmul: ragged row
    counts, every x-tile count, split-K with its counters reset, bf16 and fp16, eager and
    in a CUDA graph; prints the NVRTC compile time of the first shape."""
    f = get_format("q4k")
    worst = 0.0
    for n, k in [(100, 768), (48, 512), (6144, 5120), (5120, 32768)]:
        w = ctx.weight((n, k))
        packed = f.quantize(w)
        ref_w = f.dequantize(packed, (n, k), torch.float32)
        cfgs = tq.q4k_gemm_mma_candidates(n, k)
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 2, 3, 8, 9, 16, 17, 31, 32):
                x = x_of(m, k, ctx.dev, dtype)
                ref = x.float() @ ref_w.T
                for cfg in cfgs if m in (3, 17) else cfgs[:: max(1, len(cfgs) // 3)]:
                    kern = tq.TritonQ4KMatmul(
                        packed, (n, k), gemm={b: cfg for b in tq.Q4K_GEMM_BUCKETS}
                    )
                    kern.gemv = dataclasses.replace(kern.gemv, max_m=0)
                    t0 = time.perf_counter()
                    y1 = kern(x)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    y2 = kern(x)
                    err = rel_err(y1, ref)
                    same = torch.equal(y1, y2)
                    worst = max(worst, err)
                    if err > 1e-2 or not same or dt > 0.5:
                        print(
                            f"CHECK mma {n}x{k} m={m} {dtype} {cfg}: err {err:.2e} repeat-equal {same} first call {dt:.2f} s"
                        )
        g = torch.cuda.CUDAGraph()
        x = x_of(9, k, ctx.dev)
        kern = tq.TritonQ4KMatmul(packed, (n, k), gemm={16: cfgs[-1]})
        kern(x)
        with torch.cuda.graph(g):
            y = kern(x)
        x.copy_(x_of(9, k, ctx.dev, seed=5))
        g.replay()
        err = rel_err(y, x.float() @ ref_w.T)
        print(f"CHECK mma {n}x{k} graph replay {cfgs[-1]}: err {err:.2e}", flush=True)
        worst = max(worst, err)
    print(f"CHECK mma worst rel err {worst:.2e}", flush=True)
    ctx.rows.append({"section": "mma_check", "worst_rel_err": worst})


SECTIONS = {
    "check": check,
    "mma_check": mma_check,
    "words": words,
    "crossover": crossover,
    "gemm": gemm,
    "fp8": fp8,
    "table": table,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="check,table")
    ap.add_argument("--formats", default="q4k,fp8,q8_0,q6k")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--crossover-formats", default="q4k,q4_0")
    ap.add_argument("--crossover-m", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--peak-gbs", type=float, default=None, help="default: measured copy")
    ap.add_argument("--baseline", default=None, help="an earlier triton_quant.py (words)")
    ap.add_argument("--words-candidates", choices=sorted(WORDS_CANDIDATES), default="tuner")
    ap.add_argument("--gemm-buckets", default="2,4,8,16,32,64")
    ap.add_argument("--gemm-kernels", default="swap,mma")
    ap.add_argument("--gemm-layers", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--gemm-prefill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    ctx = Ctx(args)
    device = torch.cuda.get_device_name()
    print(device, torch.__version__, triton.__version__, time.strftime("%Y-%m-%d %H:%M:%S"),
          flush=True)  # fmt: skip
    if args.peak_gbs is None:
        args.peak_gbs = copy_gbs(ctx.dev)
    print(f"peak (copy, read + write): {args.peak_gbs:.0f} GB/s", flush=True)
    ctx.rows.append({"section": "device", "device": device, "torch": torch.__version__,
                     "triton": triton.__version__, "peak_gbs": args.peak_gbs,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
    for sec in args.sections.split(","):
        t = time.perf_counter()
        try:
            SECTIONS[sec](ctx)
        except Exception:
            traceback.print_exc()
        print(f"== section {sec}: {time.perf_counter() - t:.1f} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(ctx.rows, f, indent=1)


if __name__ == "__main__":
    main()
