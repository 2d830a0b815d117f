"""The engine on CPU with `kv_cache_dtype="fp8"` (e4m3 KV cache), tiny random checkpoint.

Oracles: the block count of a cache in the model dtype (fp8 holds twice bf16's tokens in the
same bytes), and transformers' logits (fp8-cache tokens must be its argmax up to the error
e4m3 storage adds, which the test bounds and prints).
"""

from __future__ import annotations

import random

import pytest
import torch

from mistralpy.api.runner import VisionModelBuilder
from mistralpy.checkpoint.loader import load_dummy_model
from mistralpy.engine.config import EngineConfig
from mistralpy.engine.engine import LLMEngine, runner_config
from mistralpy.kernels import cpu_gguf
from mistralpy.params import InvalidParameter, SamplingParams
from mistralpy.runner.batch import SampleSpec, SeqWork
from mistralpy.runner.cpu_decode import fused_format
from mistralpy.runner.model_runner import ModelRunner
from mistralpy.server.cli import build_parser, model_options

# the tiny checkpoint, transformers' model and ours: that module's fixtures, shared
from tests.engine.test_engine_tiny import ckpt, hf, hf_inputs, loaded, make_prompt  # noqa: F401
from tests.engine.test_engine_tiny import engine_config as tiny_config

# fp8 tokens may differ from transformers' argmax only where the two logits are this close,
# as a share of the row's logit range (e4m3 keeps 3 mantissa bits of each K/V value)
FP8_TIE = 0.05


def tiny_runner(model, path, kv_cache_dtype: str, dtype: torch.dtype, **overrides) -> ModelRunner:
    cfg = tiny_config(path, kv_cache_dtype=kv_cache_dtype, **overrides)
    return ModelRunner(model, runner_config(cfg), torch.device("cpu"), dtype)


def test_fp8_cache_holds_twice_the_bf16_tokens_in_the_same_bytes(ckpt, loaded):  # noqa: F811
    model, _ = loaded
    probe = tiny_runner(model, ckpt, "auto", torch.bfloat16)
    budget = 37 * probe.kv_spec.bytes_per_block
    blocks = {}
    for name in ("auto", "fp8", "fp8_e4m3"):
        runner = tiny_runner(
            model, ckpt, name, torch.bfloat16, num_kv_blocks=None, cpu_kv_cache_bytes=budget
        )
        blocks[name] = runner.num_blocks
        assert sum(c.numel() * c.element_size() for c in runner.kv_caches) <= budget
    assert blocks == {"auto": 37, "fp8": 74, "fp8_e4m3": 74}
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert runner.cpu_decode is None  # the fused numba step reads float32 rows only
    scales = [layer.self_attn.kv_scale for layer in model.language_model.layers]
    assert all(s is t for s, t in zip(scales, runner.kv_scales, strict=True))
    assert all(s.tolist() == [1.0, 1.0] and s.dtype == torch.float32 for s in scales)


@torch.no_grad()
def test_fp8_engine_generates_like_transformers(ckpt, hf, loaded):  # noqa: F811
    """A batch with a chunked prefill (its later chunks read the fp8 prefix) and decodes."""
    rng = random.Random()
    model, tokenizer = loaded
    cfg = tiny_config(ckpt, kv_cache_dtype="fp8", max_num_batched_tokens=24)
    runner = ModelRunner(model, runner_config(cfg), torch.device("cpu"), torch.float32)
    engine = LLMEngine(cfg, runner, tokenizer, cfg.max_model_len)
    prompts = [make_prompt(rng, n) for n in (40, 9, 17)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        ids = out.outputs[0].token_ids
        assert len(ids) == 6 and out.outputs[0].finish_reason == "length"
        logits = hf(**hf_inputs(prompt, ids)).logits[0, len(prompt.token_ids) - 1 :]
        for row, token in zip(logits, ids):
            gap = float(row.max() - row[token]) / float(row.max() - row.min())
            worst = max(worst, gap)
    print(f"fp8 KV: worst logit gap to transformers' argmax {worst:.4f} of the row's range")
    assert worst <= FP8_TIE


@pytest.mark.slow  # the q8_0 load JIT-compiles numba kernels (~30 s of CPU)
@pytest.mark.skipif(not cpu_gguf.available(), reason="no numba")
def test_fp8_cache_keeps_the_layer_path_where_fused_decode_would_run():
    """A q8_0 float32 model takes the fused numba decode with a float32 cache; that step reads
    float32 K/V rows, so an fp8 cache keeps the layer-by-layer path."""
    from tests.model.test_cpu_decode import _config

    model = load_dummy_model(_config(), torch.float32, "cpu", isq="q8_0").eval()
    cfg = runner_config(
        EngineConfig(max_num_batched_tokens=512, max_num_seqs=4, num_kv_blocks=8,
                     kv_cache_dtype="fp8")
    )  # fmt: skip
    runner = ModelRunner(model, cfg, torch.device("cpu"), torch.float32)
    assert runner.cpu_decode is None
    assert fused_format(model, runner.kv_caches) is None
    float_caches = [c.float() for c in runner.kv_caches]
    assert fused_format(model, float_caches) == "q8_0"  # what "auto" would have run


def test_kv_cache_dtype_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["serve", "demo", "--kv-cache-dtype", "fp8"])
    assert model_options(args).engine.kv_cache_dtype == "fp8"
    builder = VisionModelBuilder("demo").with_kv_cache_dtype("fp8_e4m3")
    assert builder._options.engine.kv_cache_dtype == "fp8_e4m3"
    assert VisionModelBuilder("demo")._options.engine.kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "demo", "--kv-cache-dtype", "int8"])
    with pytest.raises(InvalidParameter, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")


@pytest.mark.timeout(240)
@torch.no_grad()
def test_fp8_cache_under_tensor_parallelism(ckpt):  # noqa: F811
    """tp=2 workers build their own fp8 caches and scales from the runner config: a prefill and
    a decode step give tp=1's fp8 logits (each rank quantizes its own heads' K/V alike; a
    value may round to the other e4m3 neighbour where the ranks' float sums differ)."""
    from tests.engine.test_tensor_parallel import step_logits

    rng = random.Random()
    cfg = dict(kv_cache_dtype="fp8", max_num_batched_tokens=48)
    tp1 = LLMEngine.from_config(tiny_config(ckpt, **cfg))
    tp2 = LLMEngine.from_config(tiny_config(ckpt, tensor_parallel_size=2, **cfg))
    try:
        assert tp2.runner.kv_caches[0].dtype == torch.float8_e4m3fn
        assert tp2.runner.num_blocks == tp1.runner.num_blocks
        prompt = make_prompt(rng, 20).token_ids
        # any SampleSpec (no drafts) marks the sequence's last row for logits
        sample = SampleSpec(SamplingParams(), [], [], None)
        steps = [[SeqWork("a", prompt, 0, [0, 1], [], sample)],
                 [SeqWork("a", [rng.randrange(1000, 9000)], len(prompt), [0, 1], [], sample)]]  # fmt: skip
        for seqs in steps:
            want, got = step_logits(tp1.runner, seqs, None), step_logits(tp2.runner, seqs, None)
            assert ((got - want).norm() / want.norm()) < 1e-2
    finally:
        tp2.shutdown()
