"""Tensor parallelism on CPU (gloo): tp=2 against tp=1 on a fresh random tiny checkpoint.

Oracle: the single-device model/engine on the same checkpoint in the same run. The tiny preset
has 4 query / 2 KV heads, so tp=2 gives each rank 2 query heads and 1 KV head.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from mistralpy.engine.config import EngineConfig
from mistralpy.engine.engine import LLMEngine
from mistralpy.model.parallel import (
    ParallelConfig,
    TensorParallelSizeError,
    check_tensor_parallel,
    split_heads,
)
from mistralpy.params import SamplingParams
from mistralpy.runner.batch import SampleSpec, ScheduledBatch, SeqWork, build_forward_batch
from mistralpy.runner.distributed import TensorParallelError, tp_devices
from mistralpy.testing import tiny_checkpoint
from tests.engine.test_engine_tiny import engine_config as tiny_engine_config
from tests.engine.test_engine_tiny import make_prompt, random_image
from tests.seeds import fresh_seeds

pytestmark = pytest.mark.timeout(240)

LOGIT_TOL = 1e-4  # float32: only the all-reduce summation order differs
TIE = 1e-3  # log-probs closer than this are a tie that float noise may break either way
SEED = fresh_seeds(1, "tensor-parallel")[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("tiny-tp"), seed=SEED)


def engine_config(ckpt, **overrides):
    # prompts arrive in chunks: chunked prefill across ranks
    return tiny_engine_config(ckpt, **{"max_num_batched_tokens": 48, **overrides})


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@torch.inference_mode()
def step_logits(runner, seqs, pixel_values):
    """Logits (S, V) of one hand-built step on `runner`'s own KV cache."""
    fb = build_forward_batch(ScheduledBatch(seqs), 16, torch.device("cpu"))
    embeds = None
    if pixel_values is not None:
        embeds = runner.model.encode_images([pixel_values])[0]
        n = int((fb.input_ids == runner.model.config.image_token_index).sum())
        embeds = embeds[:n]
    hidden = runner.model(fb.input_ids, fb.positions, fb.attn, runner.kv_caches, embeds)
    return runner.model.compute_logits(hidden[fb.logits_rows])


def assert_same_logits(tp1, tp2, rng):
    """Prefill (a text and an image prompt in one batch), then a decode step on the cache."""
    image = random_image(rng, 2, 2)
    prompts = [make_prompt(rng, 9), make_prompt(rng, 6, image)]
    # any SampleSpec (no drafts) marks the sequence's last row for logits
    sample = SampleSpec(SamplingParams(), [], [], None)
    first = [
        SeqWork("a", prompts[0].token_ids, 0, [0], [], sample),
        SeqWork("b", prompts[1].token_ids, 0, [1, 2], [], sample),
    ]
    second = [
        SeqWork("a", [rng.randrange(1000, 9000)], len(prompts[0].token_ids), [0], [], sample),
        SeqWork("b", [rng.randrange(1000, 9000)], len(prompts[1].token_ids), [1, 2], [], sample),
    ]
    for seqs, px in ((first, image.pixel_values), (second, None)):
        want = step_logits(tp1.runner, seqs, px)
        got = step_logits(tp2.runner, seqs, px)
        assert got.shape == want.shape == (2, tp1.runner.vocab_size)
        torch.testing.assert_close(got, want, atol=LOGIT_TOL, rtol=0)


def run_requests(engine, reqs):
    final = {}
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return final


def assert_same_greedy(want, got):
    """Same tokens and log-probs, except that a near-tie may split the two runs apart."""
    for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids, strict=True)):
        la, lb = want.logprobs[i], got.logprobs[i]
        if a != b:  # tp=2 picked tp=1's runner-up: only fine if the two were tied
            alt = {t.token_id: t.logprob for t in la.top_logprobs}
            assert b in alt and la.logprob - alt[b] < TIE, (i, a, b, la)
            return
        assert abs(la.logprob - lb.logprob) < LOGIT_TOL, (i, la.logprob, lb.logprob)
    assert got.text == want.text


def test_tp2_engine_matches_tp1_and_shuts_down_cleanly(ckpt):
    rng = random.Random(SEED)
    tp1 = LLMEngine.from_config(engine_config(ckpt))
    tp2 = LLMEngine.from_config(engine_config(ckpt, tensor_parallel_size=2))
    pids = [p.pid for p in tp2.runner.workers.procs]
    try:
        assert tp2.runner.kv_spec.num_kv_heads == 1  # its own KV head only
        assert tp2.runner.model.lm_head.weight.shape[0] == tp1.runner.vocab_size // 2
        assert_same_logits(tp1, tp2, rng)
        params = SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
        )
        reqs = []
        for i in range(4):
            image = random_image(rng, 2, 3) if i % 2 else None
            reqs.append((f"r{i}", make_prompt(rng, rng.randrange(4, 30), image), params))
        want, got = run_requests(tp1, reqs), run_requests(tp2, reqs)
        for rid, _, _ in reqs:
            assert_same_greedy(want[rid].outputs[0], got[rid].outputs[0])
    finally:
        tp2.shutdown()
    assert not any(p.is_alive() for p in tp2.runner.workers.procs)
    assert all(gone(pid) for pid in pids)
    assert not torch.distributed.is_initialized()
    tp2.shutdown()  # idempotent
    with pytest.raises(TensorParallelError, match="shut down"):
        tp2.runner.workers.check()


def test_worker_crash_fails_requests_fast_with_a_clear_error(ckpt):
    engine = LLMEngine.from_config(engine_config(ckpt, tensor_parallel_size=2))
    try:
        rng = random.Random(SEED + 1)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        first = run_requests(engine, [("ok", make_prompt(rng, 5), params)])
        assert first["ok"].error is None and len(first["ok"].outputs[0].token_ids) == 4
        os.kill(engine.runner.workers.procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        # the runner is dead: the engine raises (no request-by-request retry, no hang)
        with pytest.raises(TensorParallelError, match=r"worker rank 1 failed \(killed by SIGKILL"):
            run_requests(engine, [("late", make_prompt(rng, 5), params)])
        assert time.monotonic() - start < 30
    finally:
        engine.shutdown()
    assert not torch.distributed.is_initialized()


def test_invalid_sizes_are_clear_errors(ckpt):
    with pytest.raises(TensorParallelSizeError, match="4 attention heads") as info:
        LLMEngine.from_config(engine_config(ckpt, tensor_parallel_size=3))
    assert info.value.param == "tensor_parallel_size"
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    if torch.cuda.device_count() < 8:
        with pytest.raises(TensorParallelSizeError, match="visible"):
            tp_devices(torch.device("cuda"), 8)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "heads, kv_heads, tp", [(4, 2, 2), (8, 2, 4), (8, 2, 8), (32, 8, 2), (32, 8, 16), (4, 1, 4)]
)
def test_head_split_follows_gqa_groups(heads, kv_heads, tp):
    """Every query head of a rank reads a KV head that the rank holds."""
    per_kv = heads // kv_heads
    for rank in range(tp):
        split = split_heads(heads, kv_heads, ParallelConfig(rank, tp, group=object()))
        q = range(split.q_start, split.q_start + split.num_heads)
        kv = range(split.kv_start, split.kv_start + split.num_kv_heads)
        assert split.num_heads * tp == heads
        assert {h // per_kv for h in q} <= set(kv)
        assert split.num_kv_heads == max(kv_heads // tp, 1)


@pytest.mark.parametrize(
    "heads, kv_heads, inter, tp", [(6, 2, 64, 4), (8, 8, 64, 3), (8, 4, 60, 8)]
)
def test_unsplittable_models_are_refused(heads, kv_heads, inter, tp):
    with pytest.raises(TensorParallelSizeError):
        check_tensor_parallel(heads, kv_heads, inter, tp)


@pytest.mark.slow  # 4 processes: ~16 s on 2 cores
def test_tp4_with_kv_head_copies_matches_tp1(ckpt):
    """4 ranks over 2 KV heads: ranks 0-1 and 2-3 each hold a copy of one KV head."""
    rng = random.Random(SEED + 2)
    tp1 = LLMEngine.from_config(engine_config(ckpt))
    tp4 = LLMEngine.from_config(engine_config(ckpt, tensor_parallel_size=4))
    try:
        assert tp4.runner.kv_spec.num_kv_heads == 1
        assert_same_logits(tp1, tp4, rng)
    finally:
        tp4.shutdown()
    assert not any(p.is_alive() for p in tp4.runner.workers.procs)


def test_cli_passes_the_size_through():
    from mistralpy.server.cli import build_parser, model_options

    args = build_parser().parse_args(["serve", "demo", "--tensor-parallel-size", "4"])
    assert model_options(args).engine.tensor_parallel_size == 4
