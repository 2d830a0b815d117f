"""End-to-end GPU benchmark of the engine on the real Mistral Small 3.1 (24B) shapes.

    python benchmarks/gpu_e2e.py [--rows check,decode,ttft,prefill,concurrent,vision,long,isq,
                                         kv_logits]
                                 [--concurrent-out 1024] [--out DIR] [--budget-s 470]
                                 [--kv-cache-dtypes auto,fp8]
    python benchmarks/gpu_e2e.py --quick      # CPU smoke run on a tiny config (tests call it)
    python benchmarks/gpu_e2e.py --rows serving  # opt-in: engine vs `mistralpy serve` over HTTP
    python benchmarks/gpu_e2e.py --rows tp [--tp-size 2]  # opt-in, 2+ GPUs: tensor parallel

--rows tp: tensor parallel against one device, same dummy model (each rank holds its slice of
the tp=1 weights), same run: batch-1 decode and the concurrent row at tp=1 and tp=N, batch-1
decode with isq q4k at tp=N, and tp=N vs tp=1 on the check prompt (greedy tokens; logits rel.
error beside what one-ulp noise on the embeddings does to tp=1). Engines are built one after
the other by `LLMEngine.from_config` (workers spawned on cuda:1.. as `mistralpy serve` does).

--kv-cache-dtypes auto,fp8: after the rows on a cache in the model dtype, the decode and
concurrent rows run again on a second engine with an fp8 (e4m3) KV cache, same weights, named
"... kv=fp8". The kv_logits row compares fp8 KV with bf16 KV on one 4k-token prompt.

Random weights (load_format="dummy", initialised on the GPU), bf16. Checks correctness first
(fused ops and attention backends vs the references; engine greedy tokens vs a plain eager
forward with the reference ops), then measures each row, prints a table (value, target, ratio
to the bandwidth / compute limit measured on this device) and writes gpu_e2e.json to --out
(default $OUT, else the current directory). Rows past --budget-s seconds are skipped.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mistralpy.checkpoint.loader import load_dummy_model  # noqa: E402
from mistralpy.engine.config import KV_CACHE_DTYPES, EngineConfig  # noqa: E402
from mistralpy.engine.engine import LLMEngine, runner_config  # noqa: E402
from mistralpy.model.config import (  # noqa: E402
    Mistral3Config,
    TextConfig,
    VisionConfig,
    mistral_small_3_1_config,
)
from mistralpy.params import SamplingParams  # noqa: E402
from mistralpy.processing.chat_template import ProcessedPrompt  # noqa: E402
from mistralpy.processing.tokenizer import Tokenizer  # noqa: E402
from mistralpy.runner.model_runner import ModelRunner  # noqa: E402

ALL_ROWS = ("check", "vision", "kv_logits", "decode", "batch", "ttft", "prefill", "concurrent",
            "long", "isq")  # fmt: skip
BATCHES = (1, 2, 4, 8, 32)  # decode-step rows per format (`batch`)
OPT_IN_ROWS = ("serving", "tp")  # only when named: a server (FastAPI, uvicorn...); 2+ GPUs
KV_DTYPE_ROWS = ("decode", "concurrent")  # rows run again per extra --kv-cache-dtypes entry
NUM_SPECIAL = 1000  # ids below are special tokens in the Tekken layout; prompts avoid them


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (the full GPU run, or the tiny CPU smoke run)."""

    decode_ctx: int = 1024
    decode_steps: int = 128
    ttft_prompt: int = 1024
    prefill_prompt: int = 8192
    concurrent: int = 32
    concurrent_in: int = 1024
    concurrent_out: int = 1024
    image_side: int = 1540
    long_prompt: int = 131072 - 16
    max_num_batched_tokens: int = 8192
    check_prompt: int = 64
    check_tokens: int = 8
    repeats: int = 5
    kv_logits_prompt: int = 4096  # context of the fp8-vs-bf16 KV logits row
    kv_logits_tokens: int = 32  # decode positions compared after it (top-1 agreement)


QUICK = Sizes(64, 8, 48, 200, 4, 32, 8, 56, 480, 128, 16, 4, 2, 160, 4)


@dataclass
class Row:
    name: str
    value: float | None
    unit: str
    target: str
    ok: bool | None
    limit: float | None = None  # the bandwidth / compute limit in the same unit
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ set-up


def tiny_config() -> Mistral3Config:
    """A small mistral3 config with the real one's structure (GQA, head_dim != hidden/heads)."""
    text = TextConfig(2048, 64, 128, 2, 4, 2, 32, 1e-5, 1e9, 4096)
    vision = VisionConfig(32, 64, 2, 2, 16, 3, 56, 14, 1e4, "silu")
    return Mistral3Config(text, vision, 2, 10, "gelu", False, dtype="float32")


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A Tekken-shaped tokenizer over raw ids (dummy weights need no real vocabulary): ids
    below NUM_SPECIAL are special, the others decode to short ASCII words."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "[IMG]": 10, "[IMG_BREAK]": 12, "[IMG_END]": 13}
    specials.update(
        {f"<SPECIAL_{i}>": i for i in range(NUM_SPECIAL) if i not in (0, 1, 2, 10, 12, 13)}
    )
    table = [b"" if i < NUM_SPECIAL else f" w{i:x}".encode() for i in range(vocab_size)]
    return Tokenizer(lambda text: [NUM_SPECIAL + len(w) for w in text.split()], table, specials)


def random_prompt(n: int, vocab: int, gen: torch.Generator) -> ProcessedPrompt:
    ids = torch.randint(NUM_SPECIAL, vocab, (n,), generator=gen).tolist()
    return ProcessedPrompt(token_ids=ids, images=[])


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def build_engine(
    model: Any, sizes: Sizes, device: torch.device, util: float, kv_cache_dtype: str = "auto"
) -> LLMEngine:
    """LLMEngine over an already-loaded model (no checkpoint directory needed)."""
    cfg = EngineConfig(
        max_num_seqs=sizes.concurrent,
        max_num_batched_tokens=sizes.max_num_batched_tokens,
        gpu_memory_utilization=util,
        enable_prefix_caching=True,
        kv_cache_dtype=kv_cache_dtype,
    )
    rcfg = runner_config(replace(cfg, cpu_kv_cache_bytes=256 << 20))
    dtype = model.language_model.norm.weight.dtype
    runner = ModelRunner(model, rcfg, device, dtype)
    text = model.config.text_config
    max_len = min(text.max_position_embeddings, runner.num_blocks * cfg.block_size)
    return LLMEngine(cfg, runner, synthetic_tokenizer(text.vocab_size), max_len)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on GPU, host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_limits(device: torch.device) -> dict[str, float]:
    """Measured copy bandwidth (bytes read + written per s) and bf16 matmul FLOP/s."""
    if device.type != "cuda":
        return {"bandwidth": float("nan"), "flops": float("nan")}
    return {"bandwidth": _copy_bandwidth(device), "flops": _matmul_flops(device)}


def _copy_bandwidth(device: torch.device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_fn(lambda: dst.copy_(src), device, 10)


def _matmul_flops(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / time_fn(lambda: a @ b, device, 10)


def text_weight_bytes(model: Any) -> int:
    """Bytes of every weight a decode step reads (language model + lm_head); quantized layers
    keep their weights in buffers, so those count too (all of them: an upper bound when a
    layer holds two layouts of one weight)."""
    parts = [model.language_model, model.lm_head]
    tensors = [t for m in parts for t in (*m.parameters(), *m.buffers())]
    emb = model.language_model.embed_tokens
    table = [*emb.parameters(), *emb.buffers()]  # a step reads a few rows of it, not all
    return sum(t.numel() * t.element_size() for t in tensors) - sum(
        t.numel() * t.element_size() for t in table
    )


def text_flops_per_token(model: Any, context: int) -> float:
    """Matmul FLOPs of one token: 2 * linear params + causal attention over `context` keys."""
    text = model.config.text_config
    lin = sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (n.startswith("language_model") or n == "lm_head")
    )  # fmt: skip
    attn = 4 * text.num_attention_heads * text.head_dim * context * text.num_hidden_layers
    return 2 * lin + attn


# ------------------------------------------------------------------------------ checks


def check_kernels(model: Any, device: torch.device, gen: torch.Generator) -> dict[str, float]:
    """Relative errors of the CUDA backends vs the references at small sizes, real head shapes."""
    from mistralpy.kernels import attention as ref_attn
    from mistralpy.kernels import fused_ops as ref_ops

    if device.type != "cuda":
        return {}
    from mistralpy.kernels.cuda_attention import cuda_paged_attention, sdpa_varlen_attention

    fast = ref_ops.triton_layer_ops()
    text = model.config.text_config
    dtype = model.language_model.norm.weight.dtype
    errs: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

    x = torch.randn(37, text.hidden_size, device=device, dtype=dtype)
    r = torch.randn_like(x)
    w = 1 + 0.1 * torch.randn(text.hidden_size, device=device, dtype=dtype)
    errs["rms_norm"] = rel(fast.rms_norm(x, w, 1e-5), ref_ops.rms_norm(x, w, 1e-5))
    errs["add_rms_norm"] = rel(
        fast.add_rms_norm(x, r, w, 1e-5)[0], ref_ops.add_rms_norm(x, r, w, 1e-5)[0]
    )
    gu = torch.randn(37, 2 * text.intermediate_size, device=device, dtype=dtype)
    errs["silu_and_mul"] = rel(fast.silu_and_mul(gu), ref_ops.silu_and_mul(gu))
    hq, hk, d = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    q = torch.randn(37, hq, d, device=device, dtype=dtype)
    k = torch.randn(37, hk, d, device=device, dtype=dtype)
    ang = torch.rand(37, d // 2, device=device) * 1000
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    errs["rope_qk"] = rel(fast.rope_qk(q, k, cos, sin)[0], ref_ops.rope_qk(q, k, cos, sin)[0])
    # paged attention: a decode step, a fresh prefill (flash SDPA), a chunk after a prefix
    bs, blocks = 16, 64
    for name, q_lens, s_lens in (
        ("attn_decode", [1, 1, 1], [700, 33, 1]),
        ("attn_fresh_prefill", [300, 17], [300, 17]),
        ("attn_chunked_prefill", [100, 1], [260, 90]),
    ):
        cache = torch.randn(2, blocks * 3, bs, hk, d, device=device, dtype=dtype)
        perm = torch.randperm(blocks * 3, generator=gen).tolist()  # 1024 tokens per table
        tables = [perm[i * blocks : (i + 1) * blocks] for i in range(len(q_lens))]
        attn = ref_attn.build_metadata(q_lens, s_lens, tables, bs, device)
        t = sum(q_lens)
        q = torch.randn(t, hq, d, device=device, dtype=dtype)
        kn = torch.randn(t, hk, d, device=device, dtype=dtype)
        vn = torch.randn(t, hk, d, device=device, dtype=dtype)
        want = ref_attn.paged_attention(q, kn, vn, cache.clone(), attn, d**-0.5)
        got = cuda_paged_attention(q, kn, vn, cache.clone(), attn, d**-0.5)
        errs[name] = rel(got, want)
        # the same step on an e4m3 cache (scales != 1): Triton vs the reference reading it
        scales = torch.tensor([0.5, 2.0], device=device)
        cache8 = ref_attn.quantize_kv(cache, scales.view(2, 1, 1, 1, 1))
        want = ref_attn.paged_attention(q, kn, vn, cache8.clone(), attn, d**-0.5, scales)
        got = cuda_paged_attention(q, kn, vn, cache8.clone(), attn, d**-0.5, scales)
        errs[f"{name}_fp8"] = rel(got, want)
    vq = torch.randn(200, 16, 64, device=device, dtype=dtype)
    vk, vv = torch.randn_like(vq), torch.randn_like(vq)
    cu = [0, 144, 200]
    errs["vision_varlen"] = rel(
        sdpa_varlen_attention(vq, vk, vv, cu, 0.125),
        ref_attn.varlen_attention(vq, vk, vv, cu, 0.125),
    )
    return errs


def check_engine(engine: LLMEngine, sizes: Sizes, gen: torch.Generator) -> dict[str, Any]:
    """(1) logits of an eager forward with the fast kernels vs the reference ops and attention,
    on the first 2 layers (a deep random-weight model amplifies bf16 rounding chaotically, so
    the full depth is reported but not judged); (2) a replayed decode graph vs the same step
    run eagerly; (3) engine greedy tokens vs `greedy_generate` on the reference path (info)."""
    from mistralpy.kernels.attention import (
        KVCacheSpec,
        allocate_kv_caches,
        build_metadata,
        paged_attention,
        varlen_attention,
    )
    from mistralpy.kernels.fused_ops import REFERENCE_OPS
    from mistralpy.model.mistral3 import greedy_generate

    model = engine.runner.model
    device = model.language_model.norm.weight.device
    text = model.config.text_config
    prompt = random_prompt(sizes.check_prompt, text.vocab_size, gen)
    out = engine.generate([prompt], greedy(sizes.check_tokens))[0].outputs[0].token_ids
    ids = list(prompt.token_ids) + list(out)
    layers = model.language_model.layers

    def forward_logits(depth: int) -> torch.Tensor:
        nb = -(-len(ids) // 16)
        spec = KVCacheSpec.of_text(text, 16, model.language_model.norm.weight.dtype)
        caches = allocate_kv_caches(spec, nb, device)[:depth]
        attn = build_metadata([len(ids)], [len(ids)], [list(range(nb))], 16, device)
        model.language_model.layers = layers[:depth]
        try:
            with torch.inference_mode():
                hidden = model(torch.tensor(ids, device=device),
                               torch.arange(len(ids), device=device), attn, caches, None)  # fmt: skip
                return model.compute_logits(hidden)
        finally:
            model.language_model.layers = layers

    depths = (2, len(layers))
    fast = [forward_logits(d) for d in depths]
    model.set_attention_backend(paged_attention, varlen_attention)
    model.set_layer_ops(REFERENCE_OPS)
    try:
        ref = [forward_logits(d) for d in depths]
        hook = model.language_model.embed_tokens.register_forward_hook(ulp_noise(gen))
        try:
            noisy = [forward_logits(d) for d in depths]
        finally:
            hook.remove()
        ref_tokens = greedy_generate(model, list(prompt.token_ids), sizes.check_tokens)
    finally:
        if device.type == "cuda":
            from mistralpy.kernels.cuda_attention import sdpa_varlen_attention
            from mistralpy.kernels.fused_ops import triton_layer_ops

            backend = engine.runner.cuda_attention
            model.set_attention_backend(backend, sdpa_varlen_attention, backend.rope_and_attend)
            model.set_layer_ops(triton_layer_ops())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    errs = [rel(f, r) for f, r in zip(fast, ref)]
    noise = [rel(n, r) for n, r in zip(noisy, ref)]
    agree = next((i for i, (a, b) in enumerate(zip(out, ref_tokens)) if a != b), len(out))
    result = {"logits_rel_err_2_layers": errs[0], "logits_rel_err_all_layers": errs[1],
              "ref_vs_ulp_noise_2_layers": noise[0], "ref_vs_ulp_noise_all_layers": noise[1],
              "tokens_agree_prefix": agree, "of": len(out)}  # fmt: skip
    result["graph_vs_eager_rel_err"] = check_graph_replay(engine, gen)
    # the fast path may differ from the reference by rounding, not by more than the reference
    # itself moves under one-ulp noise on its input (a random 40-layer model amplifies both)
    result["ok"] = (
        errs[0] <= max(3 * noise[0], 1e-3)
        and errs[1] <= max(3 * noise[1], 1e-3)
        and result["graph_vs_eager_rel_err"] < 1e-3
    )
    return result


def ulp_noise(gen: torch.Generator) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """A forward hook that perturbs its module's output by ~ one bf16 rounding step."""

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=gen).to(output.device, output.dtype)
        return output * (1 + 2**-8 * noise)

    return hook


def check_graph_replay(engine: LLMEngine, gen: torch.Generator) -> float:
    """Rel. error of a captured decode step (3 rows, padded to a bucket) vs the same step run
    eagerly through the same kernels, over K/V written by an eager prefill (0.0 on CPU)."""
    runner = engine.runner
    graphs = runner.decode_graphs
    if graphs is None:
        return 0.0
    from mistralpy.kernels.attention import build_metadata

    model, device, bs = runner.model, runner.device, runner.cfg.block_size
    vocab = model.config.text_config.vocab_size
    lens = [100, 37, 300]
    tables, start = [], 0
    for n in lens:
        tables.append(list(range(start, start + n // bs + 1)))
        start += n // bs + 1
    with torch.inference_mode():
        prompts = [random_prompt(n, vocab, gen).token_ids for n in lens]
        attn = build_metadata(lens, lens, tables, bs, device)
        flat = torch.tensor([t for p in prompts for t in p], device=device)
        pos = torch.cat([torch.arange(n, device=device) for n in lens])
        model(flat, pos, attn, runner.kv_caches, None)
        nxt = [NUM_SPECIAL + 7] * len(lens)
        bucket = graphs.load(nxt, lens, tables)
        graph_logits = graphs.replay(bucket)[: len(lens)].clone()
        bucket = graphs.load(nxt, lens, tables)
        inputs = graphs.inputs
        eager = runner._decode_forward(inputs.tokens[0, :bucket], inputs.tokens[1, :bucket],
                                       inputs.metadata(bucket))[: len(lens)]  # fmt: skip
    runner.discard_lookahead()
    engine.block_manager.reset_prefix_cache()  # those blocks were written outside the engine
    return float((graph_logits - eager).norm() / eager.norm())


# ------------------------------------------------------------------------------ rows


def run_until_first_token(engine: LLMEngine, rid: str) -> None:
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                return


def row_decode(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, limits: dict) -> Row:
    model = engine.runner.model
    vocab = model.config.text_config.vocab_size
    warm = 8
    engine.add_request("decode", random_prompt(sizes.decode_ctx, vocab, gen),
                       greedy(sizes.decode_steps + warm + 2))  # fmt: skip
    run_until_first_token(engine, "decode")
    for _ in range(warm):
        engine.step()
    times = []
    for _ in range(sizes.decode_steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.abort_all()
    step = statistics.median(times)
    tok_s = 1.0 / step
    bytes_step = text_weight_bytes(model) + _kv_bytes(engine, sizes.decode_ctx + warm)
    limit = limits["bandwidth"] / bytes_step  # bytes per s that a copy moves (read + write)
    extra = {"step_ms_median": step * 1e3, "step_ms_mean": 1e3 * sum(times) / len(times),
             "weight_gb": bytes_step / 1e9}  # fmt: skip
    extra.update(decode_breakdown(engine, 1, sizes.decode_ctx, step))
    return Row("decode bs1 @1k ctx", tok_s, "tok/s", ">= 58", tok_s >= 58, limit, extra=extra)


def batches(sizes: Sizes) -> list[int]:
    """The batch rows' sizes, capped at the engine's max_num_seqs (the quick run's 4)."""
    return sorted({min(b, sizes.concurrent) for b in BATCHES})


def row_batch(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, batch: int,
              label: str) -> Row:  # fmt: skip
    """Median decode step with `batch` sequences of decode_ctx-token prompts, all decoding:
    per-sequence tok/s = 1 / step (the table of the quantized-serving issue)."""
    vocab = engine.runner.model.config.text_config.vocab_size
    warm, steps = 4, max(8, sizes.decode_steps // 4)
    ids = [f"b{batch}_{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, random_prompt(sizes.decode_ctx, vocab, gen),
                           greedy(steps + warm + 2))  # fmt: skip
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    for _ in range(warm):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.abort_all()
    step = statistics.median(times)
    return Row(f"decode step bs{batch} {label}", 1.0 / step, "tok/s per seq", "", None,
               extra={"step_ms_median": step * 1e3, "batch": batch})  # fmt: skip


def _kv_bytes(engine: LLMEngine, tokens: int) -> int:
    """KV-cache bytes `tokens` tokens take in the engine's cache (half for fp8 vs bf16)."""
    spec = engine.runner.kv_spec
    return spec.bytes_per_block * tokens // spec.block_size


def load_synthetic_step(runner: Any, graphs: Any, batch: int, ctx: int) -> int:
    """Load the decode graphs with `batch` rows at position ctx - 1, each over its own run of
    blocks (contents whatever they hold), and return the bucket to replay. Any step launched
    ahead is dropped first: its graph inputs are overwritten here."""
    runner.discard_lookahead()
    nb = -(-ctx // runner.cfg.block_size)
    tables = [list(range(i * nb, (i + 1) * nb)) for i in range(batch)]
    return graphs.load([NUM_SPECIAL] * batch, [ctx - 1] * batch, tables)


def decode_breakdown(engine: LLMEngine, batch: int, ctx: int, step_s: float) -> dict[str, float]:
    """GPU time of one captured decode step of `batch` rows at `ctx` tokens each, split into
    linears, attention and the rest; host = measured engine step minus GPU step."""
    runner = engine.runner
    graphs = runner.decode_graphs
    device = runner.device
    if graphs is None or device.type != "cuda":
        return {}

    model = runner.model
    bucket = load_synthetic_step(runner, graphs, batch, ctx)
    t_graph = time_fn(lambda: graphs.replay(bucket), device, 20)
    engine.block_manager.reset_prefix_cache()  # those blocks were written: forget any keys
    text = model.config.text_config
    dtype = model.language_model.norm.weight.dtype
    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and (n.startswith("language_model") or n == "lm_head")]  # fmt: skip
    xs = {
        m.in_features: torch.randn(bucket, m.in_features, device=device, dtype=dtype) for m in lin
    }
    t_lin = _graph_time(lambda: [m(xs[m.in_features]) for m in lin], device)
    gemv = gemv_variants(lin, xs, device) if batch == 1 else {}
    q = torch.randn(bucket, text.num_attention_heads, text.head_dim, device=device, dtype=dtype)
    attn = graphs.inputs.metadata(bucket)

    plan = runner.cuda_attention.decode_plans.get((bucket, graphs.width))

    scales = runner.kv_scales or [None] * len(runner.kv_caches)

    def attention() -> None:
        for cache, kv_scale in zip(runner.kv_caches, scales):
            runner.cuda_attention.decode(
                q, cache, attn.block_tables, attn.seq_lens, text.head_dim**-0.5, kv_scale, plan
            )

    t_attn = _graph_time(attention, device)
    return {"gpu_step_ms": t_graph * 1e3, "linears_ms": t_lin * 1e3, "attention_ms": t_attn * 1e3,
            "other_gpu_ms": (t_graph - t_lin - t_attn) * 1e3,
            "host_ms": (step_s - t_graph) * 1e3, "host_share": max(0.0, 1 - t_graph / step_s),
            "decode_plan": str(plan),
            **gemv}  # fmt: skip


def decode_profile(engine: LLMEngine, batch: int, ctx: int, top: int = 30) -> list[dict]:
    """GPU time per kernel name in one captured decode step of `batch` rows at `ctx` tokens
    (torch.profiler over graph replays): where a step's time goes, largest first."""
    runner = engine.runner
    graphs = runner.decode_graphs
    if graphs is None or runner.device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    bucket = load_synthetic_step(runner, graphs, batch, ctx)
    replays = 10
    graphs.replay(bucket)
    sync(runner.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.replay(bucket)
        sync(runner.device)
    engine.block_manager.reset_prefix_cache()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name[:90], []).append(ev.device_time_total)
    rows = [
        {"kernel": name, "us_per_step": sum(ts) / replays, "calls_per_step": len(ts) / replays}
        for name, ts in kernels.items()
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return [
        {
            "kernel": "TOTAL",
            "us_per_step": total,
            "calls_per_step": sum(r["calls_per_step"] for r in rows),
        }
    ] + rows[:top]


def gemv_variants(lin: list[Any], xs: dict[int, torch.Tensor], device: torch.device) -> dict:
    """Per weight shape: GB/s of F.linear (what the model runs) and of torch.mv, at M = 1."""
    out = {}
    shapes = {}
    for m in lin:
        shapes.setdefault(tuple(m.weight.shape), m)
    for shape, m in shapes.items():
        x = xs[m.in_features][:1]
        gb = m.weight.numel() * m.weight.element_size() / 1e9
        t_lin = _graph_time(lambda m=m, x=x: [m(x) for _ in range(10)], device) / 10
        t_mv = (
            _graph_time(lambda m=m, x=x: [torch.mv(m.weight, x[0]) for _ in range(10)], device) / 10
        )
        out[f"gemv_{shape[0]}x{shape[1]}"] = {"linear_GBps": gb / t_lin, "mv_GBps": gb / t_mv}
    return out


def _graph_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Median replay time of `fn` captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_fn(graph.replay, device, 20)


def row_ttft(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, limits: dict) -> Row:
    model = engine.runner.model
    vocab = model.config.text_config.vocab_size
    times = []
    for i in range(sizes.repeats + 1):
        rid = f"ttft{i}"
        prompt = random_prompt(sizes.ttft_prompt, vocab, gen)
        sync(engine.runner.device)
        t0 = time.perf_counter()
        engine.add_request(rid, prompt, greedy(1))
        run_until_first_token(engine, rid)
        times.append(time.perf_counter() - t0)
    ttft = statistics.median(times[1:])
    limit = (
        text_flops_per_token(model, sizes.ttft_prompt // 2) * sizes.ttft_prompt / limits["flops"]
    )
    return Row("TTFT 1k prompt", ttft * 1e3, "ms", "<= 100", ttft <= 0.100, limit * 1e3,
               extra={"all_ms": [t * 1e3 for t in times]})  # fmt: skip


def row_prefill(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, limits: dict) -> Row:
    model = engine.runner.model
    vocab = model.config.text_config.vocab_size
    n = sizes.prefill_prompt
    times = []
    for i in range(max(2, sizes.repeats // 2 + 1)):
        rid = f"prefill{i}"
        engine.add_request(rid, random_prompt(n, vocab, gen), greedy(1))
        sync(engine.runner.device)
        t0 = time.perf_counter()
        run_until_first_token(engine, rid)
        times.append(time.perf_counter() - t0)
    tok_s = n / statistics.median(times[1:])
    limit = limits["flops"] / text_flops_per_token(model, n // 2)
    return Row("prefill 8k prompt", tok_s, "tok/s", ">= 10000", tok_s >= 10_000, limit,
               extra={"all_s": times})  # fmt: skip


def row_concurrent(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, limits: dict) -> Row:
    model = engine.runner.model
    vocab = model.config.text_config.vocab_size
    n, out_len = sizes.concurrent, sizes.concurrent_out
    prompts = [random_prompt(sizes.concurrent_in, vocab, gen) for _ in range(n)]
    sync(engine.runner.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"conc{i}", p, greedy(out_len))
    add_s = time.perf_counter() - t0
    steps: list[tuple[float, int, int]] = []  # per step: (seconds, generated, computed)
    generated = 0
    stats = engine.stats
    while engine.has_unfinished_requests():
        gen0, comp0 = stats.num_generated_tokens, stats.num_computed_tokens
        s0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - s0
        steps.append((dt, stats.num_generated_tokens - gen0, stats.num_computed_tokens - comp0))
        generated += sum(len(o.outputs[0].delta_token_ids) for o in outs)
    elapsed = time.perf_counter() - t0
    tok_s = generated / elapsed
    decode_steps = [dt for dt, g, c in steps if g == c == n]
    step = statistics.median(decode_steps) if decode_steps else float("nan")
    ctx = sizes.concurrent_in + out_len // 2
    bytes_step = text_weight_bytes(model) + n * _kv_bytes(engine, ctx)
    limit = n * limits["bandwidth"] / bytes_step
    extra = {"elapsed_s": elapsed, "generated": generated, "steps": len(steps),
             "decode_step_ms_median": step * 1e3, "output_len": out_len,
             **step_kinds(steps, n, elapsed, add_s)}  # fmt: skip
    if decode_steps:
        extra.update(decode_breakdown(engine, n, ctx, step))
        # host time of the full-decode steps, at the median step's host share
        extra["decode_host_s_est"] = extra.get("host_share", 0.0) * sum(decode_steps)
    return Row(f"{n} x ({sizes.concurrent_in} in / {out_len} out)", tok_s, "out tok/s",
               ">= 1300", tok_s >= 1300, limit, extra=extra)  # fmt: skip


def step_kind(generated: int, computed: int, n: int) -> str:
    """decode: all n rows decode (n tokens generated, n computed); decode_partial: decode
    only, fewer rows (requests done); prefill: no token generated; mixed: prefill chunks and
    decodes (or prompts finishing their prefill) in one step; empty: nothing scheduled."""
    if computed == 0:
        return "empty"
    if generated == 0:
        return "prefill"
    if generated == computed:
        return "decode" if generated == n else "decode_partial"
    return "mixed"


def step_kinds(steps: list[tuple[float, int, int]], n: int, elapsed: float, add_s: float) -> dict:
    """Where the wall time of a concurrent run went: seconds, count and computed tokens per
    step kind (`step_kind`), the slowest steps, the time outside `engine.step()`, and the
    full-decode steps' mean vs median."""
    kinds: dict[str, dict[str, float]] = {}
    for dt, g, c in steps:
        k = kinds.setdefault(step_kind(g, c, n), {"s": 0.0, "count": 0, "tokens": 0})
        k["s"] += dt
        k["count"] += 1
        k["tokens"] += c
    in_steps = sum(dt for dt, _, _ in steps)
    slowest = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:10]
    decode = [dt for dt, g, c in steps if g == c == n]
    out = {"by_kind": kinds, "in_step_s": in_steps, "outside_step_s": elapsed - in_steps,
           "add_requests_s": add_s, "outside_step_share": (elapsed - in_steps) / elapsed,
           "slowest_steps": [{"index": i, "ms": steps[i][0] * 1e3, "generated": steps[i][1],
                              "computed": steps[i][2], "kind": step_kind(*steps[i][1:], n)}
                             for i in slowest]}  # fmt: skip
    if decode:
        out["decode_step_ms_mean"] = 1e3 * sum(decode) / len(decode)
        out["decode_step_ms_p90"] = 1e3 * sorted(decode)[int(0.9 * (len(decode) - 1))]
        out["decode_excess_over_median_s"] = sum(decode) - len(decode) * statistics.median(decode)
    return out


def row_kv_logits(model: Any, sizes: Sizes, device: torch.device, gen: torch.Generator) -> Row:
    """fp8 (e4m3) KV cache vs one in the model dtype: same weights, same prompt. value: the
    rel. error ||a - b|| / ||b|| of the logits at the prompt's final position, computed by a
    decode step that reads the whole context from the cache (`kv_run_logits`); extra: the same
    at each next position (both runs fed the bf16 run's greedy tokens, so positions match),
    top-1 agreement over them, and the bf16 run against itself with one-ulp noise on the
    embeddings (a random-weight model amplifies any rounding: that says what the error is
    worth)."""
    text = model.config.text_config
    ids = random_prompt(sizes.kv_logits_prompt, text.vocab_size, gen).token_ids
    steps = sizes.kv_logits_tokens
    base = kv_run_logits(model, ids, "auto", steps, None)
    forced = base.argmax(-1).tolist()
    fp8 = kv_run_logits(model, ids, "fp8", steps, forced)
    hook = model.language_model.embed_tokens.register_forward_hook(ulp_noise(gen))
    try:
        noisy = kv_run_logits(model, ids, "auto", steps, forced)
    finally:
        hook.remove()

    def rel(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()

    errs, noise = rel(fp8, base), rel(noisy, base)
    top1 = (fp8.argmax(-1) == base.argmax(-1)).float().mean().item()
    extra = {"prompt_tokens": len(ids), "positions": steps + 1, "top1_agreement": top1,
             "rel_err_per_position": errs, "rel_err_mean": statistics.mean(errs),
             "bf16_ulp_noise_rel_err_final": noise[0],
             "bf16_ulp_noise_rel_err_mean": statistics.mean(noise),
             "ulp_noise_top1_agreement": (noisy.argmax(-1) == base.argmax(-1)).float().mean().item()}  # fmt: skip
    return Row(f"fp8 KV logits vs bf16 KV @{len(ids)} ctx", errs[0], "rel err", "reported",
               None, extra=extra)  # fmt: skip


@torch.inference_mode()
def kv_run_logits(
    model: Any, ids: list[int], kv_cache_dtype: str, steps: int, forced: list[int] | None
) -> torch.Tensor:
    """Logits (steps + 1, V) float32: the prompt's first n - 1 tokens prefilled into a fresh
    cache of `kv_cache_dtype`, then its last token and `steps` more run as decode steps (each
    reads the whole context from the cache: on CUDA the Triton decode kernel, which reads fp8
    directly; the prefill itself attends over the fresh K/V). Step i + 1 is fed forced[i], or
    the argmax of step i."""
    from mistralpy.kernels.attention import KVCacheSpec, allocate_kv_caches, build_metadata
    from mistralpy.runner import kv_cache as kvc

    weight = model.language_model.norm.weight  # (the embedding may be quantized)
    device, text, bs = weight.device, model.config.text_config, 16
    spec = KVCacheSpec.of_text(text, bs, kvc.resolve_kv_cache_dtype(kv_cache_dtype, weight.dtype))
    nb = -(-(len(ids) + steps) // bs)
    caches, scales = allocate_kv_caches(spec, nb, device), kvc.allocate_kv_scales(spec, device)
    if scales is not None:
        model.set_kv_scales(scales)
    table = [list(range(nb))]
    n = len(ids) - 1
    attn = build_metadata([n], [n], table, bs, device)
    model(torch.tensor(ids[:n], device=device), torch.arange(n, device=device), attn, caches, None)
    rows, token = [], ids[-1]
    for i in range(steps + 1):
        attn = build_metadata([1], [n + i + 1], table, bs, device)
        pos = torch.tensor([n + i], device=device)
        logits = model.compute_logits(model(torch.tensor([token], device=device), pos, attn,
                                            caches, None))[0]  # fmt: skip
        rows.append(logits)
        token = forced[i] if forced is not None and i < len(forced) else int(logits.argmax())
    return torch.stack(rows)


def row_long(engine: LLMEngine, sizes: Sizes, gen: torch.Generator) -> Row:
    model = engine.runner.model
    vocab = model.config.text_config.vocab_size
    device = engine.runner.device
    n = sizes.long_prompt
    capacity = engine.runner.num_blocks * engine.config.block_size
    extra: dict[str, Any] = {"prompt_tokens": n, "kv_capacity_tokens": capacity,
                             "max_model_len": engine.max_model_len}  # fmt: skip
    if n >= engine.max_model_len:
        return Row("128k prompt", None, "s", "completes", False, notes="does not fit", extra=extra)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine.add_request("long", random_prompt(n, vocab, gen), greedy(2))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    elapsed = time.perf_counter() - t0
    ok = final is not None and len(final.outputs[0].token_ids) == 2
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        extra.update(peak_allocated_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                     used_gb=(total - free) / 1e9, total_gb=total / 1e9)  # fmt: skip
    extra["prefill_tok_s"] = n / elapsed
    return Row("128k prompt", elapsed, "s", "completes", ok, extra=extra)


def row_vision(model: Any, sizes: Sizes, device: torch.device, limits: dict) -> Row:
    """Our encoder + projector on one image vs transformers' eager (and sdpa) modules holding
    the same weights."""
    side = sizes.image_side - sizes.image_side % 28
    pixels = torch.randn(3, side, side, device=device, dtype=model.language_model.norm.weight.dtype)
    with torch.inference_mode():
        ours_out = model.encode_images([pixels])[0]
        t_ours = time_fn(lambda: model.encode_images([pixels]), device, sizes.repeats)
    extra: dict[str, Any] = {"image_tokens": ours_out.shape[0], "ours_ms": t_ours * 1e3}
    try:
        extra.update(time_transformers(model, pixels, ours_out, max(2, sizes.repeats // 2)))
    except Exception as exc:  # noqa: BLE001 - the oracle's API may differ by version
        extra["transformers_error"] = f"{type(exc).__name__}: {exc}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    speedup = extra.get("transformers_eager_ms", float("nan")) / (t_ours * 1e3)
    extra["speedup_vs_eager"] = speedup
    ok = t_ours <= 0.060 and speedup >= 3
    limit = vision_flops(model, side) / limits["flops"] * 1e3
    return Row(f"vision {side}^2 encoder+projector", t_ours * 1e3, "ms", "<= 60, >= 3x eager",
               ok, limit, extra=extra)  # fmt: skip


def time_transformers(
    model: Any, pixels: torch.Tensor, ours: torch.Tensor, repeats: int
) -> dict[str, float]:
    """transformers' eager and sdpa encoders on the same image: times and errors vs ours."""
    hf = hf_vision(model, pixels.device)
    extra = {}
    for impl in ("sdpa", "eager"):
        hf_set_attn(hf, impl)
        with torch.inference_mode():
            hf_out = hf_encode(hf, pixels)
            t = time_fn(lambda: hf_encode(hf, pixels), pixels.device, repeats, 1)
        extra[f"transformers_{impl}_ms"] = t * 1e3
        extra[f"rel_err_vs_{impl}"] = float(
            (ours.float() - hf_out.float()).norm() / hf_out.float().norm()
        )
    return extra


def vision_flops(model: Any, side: int) -> float:
    v = model.config.vision_config
    n = (side // v.patch_size) ** 2
    lin = sum(
        m.weight.numel() for m in model.vision_tower.modules() if isinstance(m, torch.nn.Linear)
    )
    return 2 * lin * n + 4 * n * n * v.hidden_size * v.num_hidden_layers


def hf_vision(model: Any, device: torch.device) -> tuple[Any, Any]:
    """transformers' PixtralVisionModel + Mistral3MultiModalProjector with our weights."""
    import transformers

    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    vision = dict(model_type="pixtral", hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, head_dim=v.head_dim,
                  num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                  rope_theta=v.rope_theta, hidden_act=v.hidden_act)  # fmt: skip
    text = dict(model_type="mistral", hidden_size=t.hidden_size, vocab_size=t.vocab_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=1,
                num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                rms_norm_eps=t.rms_norm_eps)  # fmt: skip
    hf_cfg = transformers.Mistral3Config(
        text_config=text, vision_config=vision, spatial_merge_size=cfg.spatial_merge_size,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.multimodal_projector_bias,
    )  # fmt: skip
    dtype = model.language_model.norm.weight.dtype
    with torch.device(device):
        tower = transformers.PixtralVisionModel(hf_cfg.vision_config).to(dtype).eval()
        proj = transformers.models.mistral3.modeling_mistral3.Mistral3MultiModalProjector(hf_cfg)
        proj = proj.to(dtype).eval()
    tower.load_state_dict(_unfuse(model.vision_tower.state_dict()))
    proj.load_state_dict(model.multi_modal_projector.state_dict())
    return tower, proj


def _unfuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused qkv_proj / gate_up_proj weights -> transformers' separate projections."""
    out = {}
    for key, value in state.items():
        if key.endswith("qkv_proj.weight"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[key.replace("qkv_proj", name)] = part
        elif key.endswith("gate_up_proj.weight"):
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2)):
                out[key.replace("gate_up_proj", name)] = part
        else:
            out[key] = value
    return out


def hf_set_attn(hf: tuple[Any, Any], impl: str) -> None:
    tower = hf[0]
    tower.config._attn_implementation = impl
    for module in tower.modules():
        if hasattr(module, "config") and module.config is not tower.config:
            module.config._attn_implementation = impl


def hf_encode(hf: tuple[Any, Any], pixels: torch.Tensor) -> torch.Tensor:
    tower, proj = hf
    side = pixels.shape[-1]
    feats = tower(pixels[None], image_sizes=[(pixels.shape[-2], side)]).last_hidden_state
    sizes = torch.tensor([[pixels.shape[-2], side]], device=pixels.device)
    return proj(feats.squeeze(0), sizes)


def row_isq(fmt: str, sizes: Sizes, device: torch.device, config: Mistral3Config,
            gen: torch.Generator, limits: dict, extra_rows: tuple[str, ...] = (),
            kv_dtypes: tuple[str, ...] = ("auto",)) -> list[Row]:  # fmt: skip
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = load_dummy_model(config, torch.bfloat16, device, isq=fmt)
    load_s = time.perf_counter() - t0
    weights_gb = load_peak_gb = 0.0
    if device.type == "cuda":
        weights_gb = torch.cuda.memory_allocated(device) / 1e9
        load_peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    engine = build_engine(model, sizes, device, 0.9)
    row = row_decode(engine, sizes, gen, limits)
    target = {"q4k": 160, "fp8": 100}.get(fmt, 0)
    row.name, row.target, row.ok = f"decode bs1 @1k isq={fmt}", f">= {target}", row.value >= target
    row.limit = None
    row.extra.update(load_s=load_s, weights_gb=weights_gb, load_peak_gb=load_peak_gb,
                     bits_per_weight=8e9 * weights_gb / model_params(model),
                     kernel_configs=chosen_kernel_configs(model))  # fmt: skip
    if engine.runner.cuda_attention is not None:
        plans = engine.runner.cuda_attention.decode_plans
        row.extra["decode_plans"] = {str(k): str(v) for k, v in plans.items()}
    rows = [row]
    if "batch" in extra_rows:
        rows += [row_batch(engine, sizes, gen, b, f"isq={fmt}") for b in batches(sizes)]
    if "profile" in extra_rows:
        prof = {f"bs{b}": decode_profile(engine, b, sizes.decode_ctx) for b in (1, 8)}
        for name, kernels in prof.items():
            print(f"profile isq={fmt} {name}:")
            for k in kernels:
                print(f"  {k['us_per_step']:9.1f} us {k['calls_per_step']:6.1f}x  {k['kernel']}")
        rows.append(Row(f"decode profile isq={fmt}", 0.0, "", "", None, extra=prof))
    if "concurrent" in extra_rows:
        conc = row_concurrent(engine, sizes, gen, limits)
        conc.name += f" isq={fmt}"
        conc.target, conc.ok = ">= 1400", conc.value >= 1400
        rows.append(conc)
    if "budget" in extra_rows and device.type == "cuda":
        del engine  # its KV cache and graphs go before the budget engine is built
        gc.collect()
        torch.cuda.empty_cache()
        for kv_dtype in kv_dtypes:
            for batched in (sizes.max_num_batched_tokens, BUDGET_BATCHED_TOKENS):
                budget_sizes = replace(sizes, max_num_batched_tokens=batched)
                rows.append(row_budget(model, budget_sizes, device, gen, fmt, kv_dtype))
                gc.collect()
                torch.cuda.empty_cache()
    return rows


def chosen_kernel_configs(model: Any) -> dict[str, str]:
    """The launch configs the load-time tuner chose, per weight shape (one entry per shape:
    every layer of a shape gets the same choice)."""
    out = {}
    for module in model.modules():
        kern = getattr(module, "kernel", None)
        gemv, gemm = getattr(kern, "gemv", None), getattr(kern, "gemm", None)
        shape = (getattr(kern, "out_features", None), getattr(kern, "in_features", None))
        if gemv is not None and isinstance(gemm, dict):
            out[f"{shape[0]}x{shape[1]}"] = f"gemv {gemv}; " + "; ".join(
                f"m<={bm}: {cfg}" for bm, cfg in sorted(gemm.items())
            )
    return out


BUDGET_GIB = 22  # a 24 GB card, less what a desktop and the CUDA context keep
# the budget rows again with this many tokens a step (`--max-num-batched-tokens`, vLLM's
# serving default): a smaller prefill chunk leaves its activations' memory to the KV cache
BUDGET_BATCHED_TOKENS = 2048


def row_budget(model: Any, sizes: Sizes, device: torch.device, gen: torch.Generator,
               fmt: str, kv_dtype: str = "auto") -> Row:  # fmt: skip
    """The model on a 22 GiB budget (gpu_memory_utilization = 22 GiB / this card): the KV
    tokens that fit beside it, and a short greedy run that proves it serves."""
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    util = BUDGET_GIB * 2**30 / total
    small = build_engine(model, sizes, device, util, kv_dtype)
    kv_tokens = small.runner.num_blocks * small.config.block_size
    vocab = model.config.text_config.vocab_size
    small.add_request("budget", random_prompt(sizes.decode_ctx, vocab, gen), greedy(16))
    while small.has_unfinished_requests():
        small.step()
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    name = f"{BUDGET_GIB} GiB budget isq={fmt} kv={kv_dtype} batched={sizes.max_num_batched_tokens}"
    return Row(f"{name}: KV tokens", kv_tokens, "tokens",
               ">= 32768", kv_tokens >= 32768,
               extra={"util": util, "peak_gib": peak, "served": True})  # fmt: skip


def model_params(model: Any) -> int:
    """Parameters of the model as built in full precision (quantized linears count their
    logical in x out weights), for bits per weight."""
    from mistralpy.quant.isq import QuantizedEmbedding, QuantizedLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.in_features * mod.out_features
        elif isinstance(mod, QuantizedEmbedding):
            total += mod.num_embeddings * mod.embedding_dim
        else:
            total += sum(p.numel() for p in mod.parameters(recurse=False))
            total += sum(b.numel() for b in mod.buffers(recurse=False) if b.is_floating_point())
    return total


# ------------------------------------------------------------------------------ serving


def row_serving_engine(engine: LLMEngine, sizes: Sizes, gen: torch.Generator, limits: dict) -> Row:
    """The engine-level figure the HTTP row is held to: row_concurrent, after the same warm-up
    the HTTP run gets (one request, 8 tokens)."""
    vocab = engine.runner.model.config.text_config.vocab_size
    engine.add_request("serving-warm", random_prompt(sizes.concurrent_in, vocab, gen), greedy(8))
    while engine.has_unfinished_requests():
        engine.step()
    row = row_concurrent(engine, sizes, gen, limits)
    row.name = f"serving: engine {row.name}"
    return row


def release_device(device: torch.device) -> int:
    """Free what this process cached on the GPU; returns the bytes still in use on it (by any
    process), for the report."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def serving_flags(model_dir: Path, sizes: Sizes, device: torch.device) -> list[str]:
    """`mistralpy serve` flags for the engine build_engine makes: dummy weights of the same
    shapes and dtype, the same batch limits and memory share, prefix caching on (the bench's
    prompts are fresh, so it serves none of them)."""
    flags = [str(model_dir), "--load-format", "dummy", "--max-num-seqs", str(sizes.concurrent),
             "--max-num-batched-tokens", str(sizes.max_num_batched_tokens)]  # fmt: skip
    if device.type == "cuda":
        return [*flags, "--dtype", "bf16", "--gpu-memory-utilization", "0.95"]
    return [*flags, "--device", "cpu", "--dtype", "f32", "--max-model-len", "512"]


def row_serving(engine_row: Row, sizes: Sizes, device: torch.device, out: str) -> Row:
    """The same load through HTTP: `mistralpy serve` of a config-only directory (the real 24B
    shapes; the tiny preset on CPU) on loopback, `sizes.concurrent` streaming requests of fresh
    prompts; output tok/s vs the engine's, TTFT and ITL p50/p99. The server is always stopped."""
    from benchmarks.serving import log_tail, run_bounded, running_server
    from mistralpy.bench.serving import ServingConfig

    log = Path(out) / "serve.log"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = config_only_dir(Path(tmp) / "model", device)
        t0 = time.perf_counter()
        try:
            # bounded: start-up (load, GEMV tuning, graph capture) and the load run must fit
            # one 10-minute device command with the engine row before them
            with running_server(serving_flags(model_dir, sizes, device), log, 300.0) as url:
                start_s = time.perf_counter() - t0
                cfg = ServingConfig(url, sizes.concurrent_in, sizes.concurrent_out,
                                    sizes.concurrent, sizes.concurrent)  # fmt: skip
                run = run_bounded(cfg, 240.0)
        except Exception as exc:
            raise RuntimeError(f"{exc}; server log tail:\n{log_tail(log)}") from exc
    s = run["summary"]
    engine_tok_s = engine_row.value
    ratio = s["output_tok_per_s"] / engine_tok_s if engine_tok_s else None
    keys = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tpot_ms_mean", "completed",
            "failed", "total_output_tokens", "wall_s")  # fmt: skip
    extra = {"http_over_engine": ratio, "engine_out_tok_s": engine_tok_s, "server_start_s": start_s,
             **{k: s[k] for k in keys}, "summary": s, "errors": run["errors"]}  # fmt: skip
    ok = ratio is not None and ratio >= 0.95 and s["failed"] == 0
    return Row(f"serving HTTP {sizes.concurrent} x ({sizes.concurrent_in} in / "
               f"{sizes.concurrent_out} out)", s["output_tok_per_s"], "out tok/s",
               ">= 0.95 x engine", ok, engine_tok_s, extra=extra,
               notes="limit = the engine-level figure above; ratio = HTTP / engine")  # fmt: skip


def config_only_dir(out: Path, device: torch.device) -> Path:
    """A checkpoint directory without weights for `load_format="dummy"`: the real 24B shapes
    in bf16 on CUDA, the tiny preset in float32 on CPU."""
    from mistralpy.testing.tiny_checkpoint import REAL_SHAPES, get_preset, write_config_files

    if device.type == "cuda":
        return write_config_files(out, REAL_SHAPES, "bfloat16")
    return write_config_files(out, get_preset("tiny"), "float32")


# ------------------------------------------------------------------------------ tensor parallel

TP_SPEEDUP = 1.7  # batch-1 decode at tp=2 vs tp=1 (issue 19)


@dataclass
class TpRun:
    """What one tensor-parallel size gave: its rows and its view of the check prompt."""

    rows: dict[str, Row]  # by kind: "decode", "concurrent"
    tokens: list[int]  # greedy tokens of the check prompt
    logits: torch.Tensor  # (T, V) float32 of the check prompt + tp=1's tokens, on the CPU
    noise_logits: torch.Tensor | None = None  # tp=1 only: the same with one-ulp input noise


def tp_engine(model_dir: Path, sizes: Sizes, device: torch.device, tp: int,
              isq: str | None = None) -> LLMEngine:  # fmt: skip
    """`LLMEngine.from_config` of the config-only dir at tensor parallel size `tp`: the path
    `mistralpy serve --load-format dummy -tp N` takes (rank 0 here, the others spawned)."""
    cfg = EngineConfig(model=str(model_dir), load_format="dummy", tensor_parallel_size=tp,
                       isq=isq, device=device.type,
                       dtype="bfloat16" if device.type == "cuda" else "float32",
                       max_num_seqs=sizes.concurrent,
                       max_num_batched_tokens=sizes.max_num_batched_tokens,
                       gpu_memory_utilization=0.9, cpu_kv_cache_bytes=256 << 20)  # fmt: skip
    return LLMEngine.from_config(cfg)


@torch.inference_mode()
def sequence_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) float32 (CPU) of one eager forward over `ids` through the engine's own
    runner (under tensor parallelism: announced to the workers, vocab gathered), written into
    the first KV blocks (the engine is idle; its prefix cache is reset after)."""
    from mistralpy.kernels.attention import build_metadata

    runner = engine.runner
    device, bs = runner.device, runner.cfg.block_size
    table = [list(range(-(-len(ids) // bs)))]
    attn = build_metadata([len(ids)], [len(ids)], table, bs, device)
    hidden = runner.model(torch.tensor(ids, device=device),
                          torch.arange(len(ids), device=device), attn, runner.kv_caches, None)  # fmt: skip
    logits = runner.model.compute_logits(hidden).cpu()
    engine.block_manager.reset_prefix_cache()  # those blocks were written outside the engine
    return logits


def tp_run(model_dir: Path, sizes: Sizes, device: torch.device, tp: int, check: list[int],
           ref_tokens: list[int] | None, limits: dict, log: Callable[[str], None]) -> TpRun:  # fmt: skip
    """Build the engine at size `tp`, run the check prompt (greedy tokens; logits over the
    prompt + `ref_tokens`, else its own), then the batch-1 decode and concurrent rows."""
    gen = torch.Generator().manual_seed(4321)  # the same prompts at every size
    t0 = time.perf_counter()
    engine = tp_engine(model_dir, sizes, device, tp)
    log(f"tp={tp}: engine built in {time.perf_counter() - t0:.1f}s "
        f"({engine.runner.num_blocks} KV blocks, graphs {engine.runner.decode_graphs is not None})")  # fmt: skip
    try:
        prompt = ProcessedPrompt(token_ids=check, images=[])
        tokens = list(engine.generate([prompt], greedy(sizes.check_tokens))[0].outputs[0].token_ids)
        ids = check + (ref_tokens if ref_tokens is not None else tokens)
        run = TpRun({}, tokens, sequence_logits(engine, ids))
        if tp == 1:
            model = engine.runner.model
            hook = model.language_model.embed_tokens.register_forward_hook(ulp_noise(gen))
            try:
                run.noise_logits = sequence_logits(engine, ids)
            finally:
                hook.remove()
        run.rows["decode"] = row_decode(engine, sizes, gen, limits)
        run.rows["concurrent"] = row_concurrent(engine, sizes, gen, limits)
        for row in run.rows.values():
            row.name = f"tp={tp} {row.name}"
            row.extra["engine_build_s"] = time.perf_counter() - t0
        return run
    finally:
        engine.shutdown()


def tp_compare(one: TpRun, many: TpRun, tp: int) -> list[Row]:
    """tp=N rows judged against tp=1's: decode speed-up, concurrent ratio, check prompt."""
    rows = []
    for kind, target in (("decode", TP_SPEEDUP), ("concurrent", None)):
        a, b = one.rows[kind], many.rows[kind]
        ratio = b.value / a.value
        b.extra["vs_tp1"] = ratio
        if target is not None and tp == 2:
            b.target, b.ok = f">= {target} x tp=1", ratio >= target
        else:
            b.target, b.ok = "vs tp=1 (reported)", None
        b.notes = f"{ratio:.2f} x tp=1"
        rows += [a, b]

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    err, noise = rel(many.logits, one.logits), rel(one.noise_logits, one.logits)
    agree = next((i for i, (x, y) in enumerate(zip(many.tokens, one.tokens)) if x != y),
                 len(one.tokens))  # fmt: skip
    n = len(one.tokens)
    top1 = float((many.logits[-n:].argmax(-1) == one.logits[-n:].argmax(-1)).float().mean())
    extra = {"tokens_tp1": one.tokens, f"tokens_tp{tp}": many.tokens, "tokens_agree_prefix": agree,
             "of": n, "last_position_rel_err": rel(many.logits[-1], one.logits[-1]),
             "tp1_vs_ulp_noise_rel_err": noise, "top1_agreement_generated": top1}  # fmt: skip
    # equal tokens, or a divergence no larger than what bf16 rounding noise alone gives
    ok = agree == n or err <= max(3 * noise, 1e-3)
    rows.append(Row(f"tp={tp} vs tp=1 check prompt logits", err, "rel err",
                    "tokens equal or <= 3 x ulp noise", ok, extra=extra,
                    notes=f"greedy tokens agree {agree}/{n}"))  # fmt: skip
    return rows


def tp_rows(sizes: Sizes, device: torch.device, tp: int, limits: dict,
            log: Callable[[str], None]) -> list[Row]:  # fmt: skip
    """Every tensor-parallel row (see the module doc), engines built one at a time."""
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise RuntimeError(f"--rows tp needs {tp} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = config_only_dir(Path(tmp) / "model", device)
        vocab = json.loads((model_dir / "config.json").read_text())["text_config"]["vocab_size"]
        check = random_prompt(sizes.check_prompt, vocab, torch.Generator().manual_seed(99))
        one = tp_run(model_dir, sizes, device, 1, check.token_ids, None, limits, log)
        release_device(device)
        many = tp_run(model_dir, sizes, device, tp, check.token_ids, one.tokens, limits, log)
        release_device(device)
        rows = tp_compare(one, many, tp)
        rows.extend(
            _guard(f"tp={tp} isq q4k", lambda: tp_q4k(model_dir, sizes, device, tp, limits), log)
        )
    return rows


def tp_q4k(model_dir: Path, sizes: Sizes, device: torch.device, tp: int, limits: dict) -> Row:
    """Batch-1 decode with every rank's shard quantized to q4k at load."""
    t0 = time.perf_counter()
    engine = tp_engine(model_dir, sizes, device, tp, isq="q4k")
    try:
        row = row_decode(engine, sizes, torch.Generator().manual_seed(4322), limits)
    finally:
        engine.shutdown()
        release_device(device)
    row.name, row.target, row.ok = f"tp={tp} decode bs1 @1k isq=q4k", "reported", None
    row.extra["engine_build_s"] = time.perf_counter() - t0
    return row


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ALL_ROWS))
    ap.add_argument("--quick", action="store_true", help="tiny config on CPU (smoke test)")
    ap.add_argument("--concurrent-out", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=470.0)
    ap.add_argument("--isq-formats", default="q4k,fp8",
                    help="formats of the isq rows")  # fmt: skip
    ap.add_argument("--isq-rows", default="decode",
                    help="rows per isq format: decode (always), batch, concurrent, budget")  # fmt: skip
    ap.add_argument("--tp-size", type=int, default=2, help="tensor parallel size of --rows tp")
    ap.add_argument("--kv-cache-dtypes", default="auto",
                    help=f"KV caches of the engine rows, in order; entries after the first rerun "
                         f"{'/'.join(KV_DTYPE_ROWS)} (e.g. auto,fp8)")  # fmt: skip
    args = ap.parse_args(argv)
    rows_wanted = [r for r in args.rows.split(",") if r]
    unknown = set(rows_wanted) - set(ALL_ROWS) - set(OPT_IN_ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {ALL_ROWS + OPT_IN_ROWS}")
    kv_dtypes = [k for k in args.kv_cache_dtypes.split(",") if k]
    if not kv_dtypes or set(kv_dtypes) - set(KV_CACHE_DTYPES):
        ap.error(f"--kv-cache-dtypes: a list of {KV_CACHE_DTYPES}")
    t_start = time.perf_counter()
    if args.quick:
        device, config, sizes, dtype = torch.device("cpu"), tiny_config(), QUICK, torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --quick for the CPU smoke run)")
        device, config, sizes, dtype = (torch.device("cuda"), mistral_small_3_1_config(), Sizes(),
                                        torch.bfloat16)  # fmt: skip
    if args.concurrent_out:
        sizes = Sizes(**{**sizes.__dict__, "concurrent_out": args.concurrent_out})
    gen = torch.Generator().manual_seed(1234)
    report: dict[str, Any] = {"device": _device_name(device), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": sizes.__dict__}  # fmt: skip
    rows: list[Row] = []

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def over_budget(name: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(Row(name, None, "", "", None, notes="skipped: time budget"))
            return True
        return False

    limits = device_limits(device)
    report["limits"] = limits
    log(f"limits: {limits}")
    engine = model = None  # the bf16 model, only for rows other than isq and tp
    if any(r not in ("isq", "tp") for r in rows_wanted):
        t0 = time.perf_counter()
        model = load_dummy_model(config, dtype, device)
        sync(device)
        report["load_s"] = time.perf_counter() - t0
        log(f"dummy model loaded in {report['load_s']:.1f}s")
        if device.type == "cuda":
            from mistralpy.runner.model_runner import use_cuda_kernels

            use_cuda_kernels(model)
        if "check" in rows_wanted:
            report["kernel_errors"] = check_kernels(model, device, gen)
            log(f"kernel errors: {report['kernel_errors']}")
        if "vision" in rows_wanted and not over_budget("vision"):
            rows.extend(_guard("vision", lambda: row_vision(model, sizes, device, limits), log))
        if "kv_logits" in rows_wanted and not over_budget("kv_logits"):  # before an engine
            # takes the memory
            rows.extend(_guard("kv_logits", lambda: row_kv_logits(model, sizes, device, gen), log))
        t0 = time.perf_counter()
        util = 0.95 if device.type == "cuda" else 0.9
        engine = build_engine(model, sizes, device, util, kv_dtypes[0])
        report["engine_build_s"] = time.perf_counter() - t0
        report["kv_blocks"] = engine.runner.num_blocks
        report["kv_cache_dtype"] = str(engine.runner.kv_spec.dtype)
        report["cuda_graphs"] = engine.runner.decode_graphs is not None
        report["gemv_tuning"] = engine.runner.gemv_report
        if engine.runner.cuda_attention is not None:
            plans = engine.runner.cuda_attention.decode_plans
            report["decode_plans"] = {str(k): str(v) for k, v in plans.items()}
        log(f"gemv tuning: {report['gemv_tuning']}")
        log(f"decode plans: {report.get('decode_plans')}")
        log(
            f"engine built in {report['engine_build_s']:.1f}s, {engine.runner.num_blocks} KV blocks"
        )
        if "check" in rows_wanted:
            report["engine_check"] = check_engine(engine, sizes, gen)
            log(f"engine check: {report['engine_check']}")
        steps: list[tuple[str, Callable[[], Row | list[Row]]]] = [
            ("decode", lambda: row_decode(engine, sizes, gen, limits)),
            ("batch", lambda: [row_batch(engine, sizes, gen, b, "bf16") for b in batches(sizes)]),
            ("ttft", lambda: row_ttft(engine, sizes, gen, limits)),
            ("prefill", lambda: row_prefill(engine, sizes, gen, limits)),
            ("concurrent", lambda: row_concurrent(engine, sizes, gen, limits)),
            ("long", lambda: row_long(engine, sizes, gen)),
        ]
        for i, kv_dtype in enumerate(kv_dtypes):
            if i > 0:  # the same rows on a fresh engine with this KV cache
                engine = None  # frees the last engine's cache before the next one sizes its own
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                engine = build_engine(model, sizes, device, util, kv_dtype)
                report[f"kv={kv_dtype}"] = {
                    "kv_blocks": engine.runner.num_blocks,
                    "kv_capacity_tokens": engine.runner.num_blocks * engine.config.block_size,
                    "graph_vs_eager_rel_err": check_graph_replay(engine, gen),
                }
                log(f"engine kv={kv_dtype}: {report[f'kv={kv_dtype}']}")
            suffix = "" if kv_dtype == "auto" else f" kv={kv_dtype}"
            for name, fn in steps:
                wanted = name in rows_wanted and (i == 0 or name in KV_DTYPE_ROWS)
                if wanted and not over_budget(name + suffix):
                    for row in _guard(name + suffix, fn, log):
                        row.name += "" if row.name.endswith(suffix) else suffix
                        rows.append(row)
                    engine.abort_all()
                    _write(report, rows, args.out)
        if "serving" in rows_wanted and not over_budget("serving"):
            engine_fn = lambda: row_serving_engine(engine, sizes, gen, limits)  # noqa: E731
            rows.extend(_guard("serving: engine", engine_fn, log))
            engine = model = None  # the server below needs this GPU memory
            report["serving_parent_gpu_bytes"] = release_device(device)
            rows.extend(_guard("serving", lambda: row_serving(rows[-1], sizes, device, args.out),
                               log))  # fmt: skip
            _write(report, rows, args.out)
    if "isq" in rows_wanted and importlib.util.find_spec("mistralpy.quant.isq") is not None:
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        isq_rows = tuple(
            r for r in ("batch", "profile", "concurrent", "budget") if r in args.isq_rows
        )
        for fmt in args.isq_formats.split(","):
            if not over_budget(f"isq {fmt}"):
                rows.extend(_guard(f"isq {fmt}", lambda f=fmt: row_isq(
                    f, sizes, device, config, gen, limits, isq_rows, tuple(kv_dtypes)), log))  # fmt: skip
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "tp" in rows_wanted and not over_budget("tp"):
        engine = model = None  # every rank's device for the tensor-parallel engines
        report["tp_parent_gpu_bytes"] = release_device(device)
        rows.extend(_guard("tp", lambda: tp_rows(sizes, device, args.tp_size, limits, log), log))
    report["total_s"] = time.perf_counter() - t_start
    _write(report, rows, args.out)
    print(_table(report, rows), flush=True)
    return 0


def _guard(name: str, fn: Callable[[], Row | list[Row]], log: Callable[[str], None]) -> list[Row]:
    """Run one row (or a group of rows); an exception becomes a failed row (the other rows
    still run)."""
    log(f"row {name} ...")
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        return [Row(name, None, "", "", False, notes=f"error: {type(exc).__name__}: {exc}")]
    rows = got if isinstance(got, list) else [got]
    for row in rows:
        log(f"row {row.name}: {row.value} {row.unit} {row.extra}")
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _write(report: dict[str, Any], rows: list[Row], out: str) -> None:
    path = Path(out) / "gpu_e2e.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**report, "rows": [r.__dict__ for r in rows]}
    path.write_text(json.dumps(data, indent=1, default=str))


def _table(report: dict[str, Any], rows: list[Row]) -> str:
    lines = [f"device: {report['device']}  torch {report['torch']}  {report['date']}",
             f"{'row':40} {'value':>12} {'unit':10} {'target':20} {'limit':>10} {'ratio':>6} ok"]  # fmt: skip
    for r in rows:
        value = (
            "-"
            if r.value is None
            else f"{r.value:.4f}"
            if r.unit == "rel err"
            else f"{r.value:.1f}"
        )
        limit = f"{r.limit:.1f}" if r.limit else "-"
        ratio = "-"
        if r.value and r.limit:
            ratio = f"{(r.value / r.limit if r.unit not in ('ms', 's') else r.limit / r.value):.2f}"
        lines.append(f"{r.name:40} {value:>12} {r.unit:10} {r.target:20} {limit:>10} {ratio:>6} "
                     f"{r.ok} {r.notes}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
