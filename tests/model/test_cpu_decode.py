"""The fused CPU decode step (kernels.cpu_decode via runner.cpu_decode) against the
layer-by-layer torch path of the same quantized model, on fresh random weights and prompts."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from mistralpy.checkpoint.loader import load_dummy_model
from mistralpy.engine.config import EngineConfig
from mistralpy.engine.engine import runner_config
from mistralpy.kernels import cpu_gguf
from mistralpy.model.config import mistral_small_3_1_config
from mistralpy.params import SamplingParams
from mistralpy.runner.batch import SampleSpec, ScheduledBatch, SeqWork, build_forward_batch
from mistralpy.runner.cpu_decode import FusedCpuDecode, fused_format
from mistralpy.runner.model_runner import ModelRunner
from tests.seeds import fresh_seeds

BLOCK = 16
FORMATS = [
    pytest.param("q8_0", marks=pytest.mark.skipif(not cpu_gguf.available(), reason="no numba")),
    pytest.param(
        "q4k", marks=pytest.mark.skipif(not cpu_gguf.q4k_available(), reason="no AVX-512 VNNI")
    ),
]


def _config(layers: int = 2, heads: int = 8):
    """Real-architecture config with small, block-aligned shapes (K multiples of 256); 8 query
    heads of 32 on 2 KV heads take `attention4` (4 per KV head, as the real model), 4 heads
    of 64 the generic attention; heads * head_dim stays 256 (q4k's block)."""
    cfg = mistral_small_3_1_config()
    text = dataclasses.replace(
        cfg.text_config,
        vocab_size=3000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=256 // heads,
    )
    return dataclasses.replace(cfg, text_config=text)


def _runner(fmt: str, seed: int, eager: bool = False, heads: int = 8) -> ModelRunner:
    cfg = _config(heads=heads)
    model = load_dummy_model(cfg, torch.float32, "cpu", isq=fmt, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    lm = model.language_model
    with torch.no_grad():  # O(1) activations and non-trivial norm weights
        lm.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
        for norm in [lm.norm] + [n for ly in lm.layers for n in (ly.input_layernorm, ly.post_attention_layernorm)]:  # fmt: skip
            norm.weight.uniform_(0.5, 1.5, generator=gen)
    cfg = runner_config(
        EngineConfig(block_size=BLOCK, max_num_batched_tokens=512, max_num_seqs=4,
                     num_kv_blocks=64, enforce_eager=eager)
    )  # fmt: skip
    return ModelRunner(model, cfg, torch.device("cpu"), torch.float32)


def _seq(sid: str, ids: list[int], start: int, table: list[int]) -> SeqWork:
    spec = SampleSpec(SamplingParams(max_tokens=4, temperature=0.0), [], [], None)
    return SeqWork(sid, ids, start, table, [], spec)


def _torch_logits(runner: ModelRunner, seqs: list[SeqWork]) -> torch.Tensor:
    """The same step through the layer-by-layer model (the reference path)."""
    fb = build_forward_batch(ScheduledBatch(seqs), BLOCK, runner.device)
    hidden = runner.model(fb.input_ids, fb.positions, fb.attn, runner.kv_caches, None)
    return runner.model.compute_logits(hidden[fb.logits_rows])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "seed,heads", [(s, h) for s, h in zip(fresh_seeds(3, "cpu-decode"), (8, 8, 4))]
)
def test_fused_decode_equals_layer_by_layer(fmt, seed, heads):
    rng = random.Random(seed)
    runner = _runner(fmt, seed, heads=heads)
    assert runner.cpu_decode is not None and runner.cpu_decode.fmt == fmt
    # two sequences with prompts in scattered (non-consecutive) blocks
    blocks = list(range(64))
    rng.shuffle(blocks)
    lens = [rng.randrange(1, 60), rng.randrange(17, 90)]
    tables = [blocks[:8], blocks[8:16]]
    prompts = [[rng.randrange(3000) for _ in range(n)] for n in lens]
    loose = []
    with torch.inference_mode():
        prefill = [_seq(f"s{i}", p, 0, t) for i, (p, t) in enumerate(zip(prompts, tables))]
        _torch_logits(runner, prefill)  # fills the KV cache
        for step in range(3):
            rows = [
                _seq(f"s{i}", [rng.randrange(3000)], lens[i] + step, tables[i]) for i in range(2)
            ]
            for batch in (rows, rows[1:]):  # two rows, then one
                fused = runner.cpu_decode(batch, BLOCK)
                kv_fused = [c.clone() for c in runner.kv_caches]
                ref = _torch_logits(runner, batch)  # rewrites the same K/V slots
                err = float((fused - ref).abs().max() / ref.abs().max())
                kv_err = max(float((a - b).abs().max()) for a, b in zip(kv_fused, runner.kv_caches))
                # Only float32 summation orders differ (~1e-7 relative), except when an
                # activation lands on a rounding tie of the kernels' int8 activation codes:
                # the two paths' last-ulp differences then pick neighbouring codes, one
                # code step (amax / 127) moves that dot product, and later layers carry it
                # (seen: 2e-3 of the largest logit). Ties are rare: most steps stay tight.
                assert err <= 2e-2 and kv_err <= 2e-2, (err, kv_err)
                loose.append(err > 1e-5 or kv_err > 1e-5)
    assert sum(loose) <= 2, loose  # one tie at one step shows in both of its batches


class _Counting:
    """Wraps a FusedCpuDecode, counting the steps it ran."""

    def __init__(self, inner: FusedCpuDecode):
        self.inner, self.calls = inner, 0

    def accepts(self, seqs):
        return self.inner.accepts(seqs)

    def __call__(self, seqs, block_size):
        self.calls += 1
        return self.inner(seqs, block_size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_routes_decode_steps_through_the_fused_step(fmt):
    seed = fresh_seeds(1, "cpu-decode-runner")[0]
    rng = random.Random(seed)
    fused, eager = _runner(fmt, seed), _runner(fmt, seed, eager=True)
    assert eager.cpu_decode is None
    assert fused.cpu_decode._step.signatures  # compiled when built, not in a first request
    counting = fused.cpu_decode = _Counting(fused.cpu_decode)
    prompt = [rng.randrange(3000) for _ in range(rng.randrange(5, 40))]
    ids, tokens = list(prompt), []
    for _ in range(4):
        start = len(ids) - (1 if tokens else len(ids))
        seq = _seq("s", ids[start:], start, list(range(8)))
        token = fused.execute(ScheduledBatch([seq])).sampled["s"].token_id
        assert 0 <= token < 3000
        tokens.append(token)
        ids.append(token)
    assert counting.calls == 3  # the prefill took the torch path, every decode step the fused one
    # a prefill chunk of several tokens or a step with an image never reaches it
    assert not counting.inner.accepts([_seq("s", [1, 2], 0, [0])])


def test_fused_format_needs_one_gguf_format_and_float32():
    model = load_dummy_model(_config(1), torch.float32, "cpu")
    caches = [torch.zeros(2, 4, BLOCK, 2, 32)]
    assert fused_format(model, caches) is None  # float linears
    if cpu_gguf.available():
        q8 = load_dummy_model(_config(1), torch.float32, "cpu", isq="q8_0")
        assert fused_format(q8, caches) == "q8_0"
        assert fused_format(q8, [caches[0].bfloat16()]) is None
        q8.language_model.layers[0].mlp.down_proj = model.language_model.layers[0].mlp.down_proj
        assert fused_format(q8, caches) is None  # one float linear left
        assert FusedCpuDecode.build(q8, caches) is None
    q4_0 = load_dummy_model(_config(1), torch.float32, "cpu", isq="q4_0")
    assert fused_format(q4_0, caches) is None  # no fused GEMV for this format


def _attention_reference(qkv, cache, tables, pos, n_heads, n_kv, d, scale):
    """Decode attention in float64 numpy, K/V gathered through the block tables."""
    import numpy as np

    bs = cache.shape[2]
    out = np.zeros((qkv.shape[0], n_heads * d))
    for i in range(qkv.shape[0]):
        ctx = int(pos[i]) + 1
        slots = [(tables[i, t // bs], t % bs) for t in range(ctx)]
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            k = np.array([cache[0, b, o, g] for b, o in slots], np.float64)
            v = np.array([cache[1, b, o, g] for b, o in slots], np.float64)
            s = k @ qkv[i, h * d : (h + 1) * d].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[i, h * d : (h + 1) * d] = (p / p.sum()) @ v
    return out


@pytest.mark.skipif(not cpu_gguf.available(), reason="no numba")
@pytest.mark.parametrize("d", [32, 64, 128])
def test_group4_attention_equals_reference(d):
    """attention4 (IR block kernels, vectorized exp, next block prefetched) and the generic
    attention against float64 numpy, with scattered block tables and contexts on and around
    block edges."""
    import numpy as np

    from mistralpy.kernels.cpu_decode import fits_attention4, layer_kernels

    seed = fresh_seeds(1, f"attention4-{d}")[0]
    rng = np.random.default_rng(seed)
    kernels = layer_kernels()
    n_kv, n_heads, n_blocks = 2, 8, 48
    assert fits_attention4(n_heads, n_kv, d) and not fits_attention4(4, n_kv, d)
    cache = rng.standard_normal((2, n_blocks, BLOCK, n_kv, d), dtype=np.float32) * 2
    tables = np.stack([rng.permutation(n_blocks) for _ in range(2)]).astype(np.int32)
    scale = d**-0.5
    contexts = (1, BLOCK - 1, BLOCK, BLOCK + 1, int(rng.integers(2, n_blocks * BLOCK)))
    # query scale 40: scores spread over hundreds, most probabilities underflow (exp clamping)
    for ctx, q_scale in [(c, 2.0) for c in contexts] + [(contexts[-1], 40.0)]:
        pos = np.array([ctx - 1, int(rng.integers(0, ctx))])
        qkv = rng.standard_normal((2, (n_heads + 2 * n_kv) * d), dtype=np.float32) * q_scale
        ref = _attention_reference(qkv, cache, tables, pos, n_heads, n_kv, d, scale)
        for kernel in (kernels.attention4, kernels.attention):
            out = np.full((2, n_heads * d), np.nan, np.float32)
            kernel(qkv, cache, tables, pos, n_heads, n_kv, d, scale, out)
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.skipif(not cpu_gguf.available(), reason="no numba")
def test_softmax4_matches_float64():
    """The IR softmax of attention4 (4 heads interleaved, vectorized exp) against numpy in
    float64, for short and odd lengths (-inf padding) and score spreads up to 300."""
    import numba
    import numpy as np

    from mistralpy.kernels.cpu_decode import _SOFTMAX4_IR

    softmax4 = cpu_gguf.ir_intrinsic("mistralpy_softmax4", _SOFTMAX4_IR, 4)

    @numba.njit
    def run(scores, nq):  # pragma: no cover - compiled
        softmax4(scores.ctypes.data, nq, 0, 0)

    rng = np.random.default_rng(fresh_seeds(1, "softmax4")[0])
    for spread in (0.5, 3.0, 100.0):
        for n in (1, 3, 4, 5, 64, int(rng.integers(100, 400))):
            x = (rng.standard_normal(n * 4) * spread).astype(np.float32)
            nq = (n + 3) // 4
            scores = np.full(nq * 16, -np.inf, np.float32)
            scores[: n * 4] = x
            run(scores, nq)
            xr = x.reshape(n, 4).astype(np.float64)
            ref = np.exp(xr - xr.max(0))
            ref /= ref.sum(0)
            got = scores[: n * 4].reshape(n, 4)
            assert np.abs(got - ref).max() < 1e-6
            if spread < 5:  # inputs exact in float32: the error is the kernel's own
                np.testing.assert_allclose(got, ref, rtol=4e-6)
            assert np.all(scores[n * 4 :] < 1e-37)  # padding: ~0, never NaN
    scores = np.zeros(16, np.float32)
    scores[4] = np.nan  # head 0 of position 1
    run(scores, 1)
    assert np.isnan(scores[0::4]).all() and np.isfinite(scores[1::4]).all()  # NaN stays NaN
