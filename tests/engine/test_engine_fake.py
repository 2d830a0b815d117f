"""LLMEngine on a fake paged-attention model: outputs do not depend on batching, chunking,
prefix caching or preemption, and match a cache-free reference."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.engine.config import EngineConfig
from mistralpy.engine.engine import LLMEngine, runner_config
from mistralpy.engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    ImageTokenMismatchError,
    PromptTooLongError,
)
from mistralpy.params import SamplingParams
from mistralpy.runner.model_runner import ModelRunner
from tests.engine.fakes import EOS, IMG, FakeModel, FakeTokenizer, fake_image, image_prompt

MODEL = FakeModel()


def make_engine(
    budget=512, num_blocks=256, block_size=4, caching=True, max_seqs=8, max_model_len=256
):
    cfg = EngineConfig(
        model="fake",
        max_num_batched_tokens=budget,
        block_size=block_size,
        num_kv_blocks=num_blocks,
        enable_prefix_caching=caching,
        max_num_seqs=max_seqs,
        max_model_len=max_model_len,
    )
    runner_cfg = runner_config(replace(cfg, cpu_kv_cache_bytes=1 << 20, encoder_cache_size=64))
    runner = ModelRunner(MODEL, runner_cfg, torch.device("cpu"), torch.float64)
    return LLMEngine(cfg, runner, FakeTokenizer(), max_model_len)


def prompt(ids, images=()):
    return SimpleNamespace(token_ids=list(ids), images=list(images))


def workload(seed):
    """8 mixed requests: a shared system prompt, images, greedy and seeded sampling, n=2."""
    rng = random.Random(seed)
    system = [rng.randrange(20, 96) for _ in range(13)]
    reqs = []
    for i in range(8):
        body = [rng.randrange(20, 96) for _ in range(rng.randrange(1, 20))]
        images = []
        if i % 3 == 1:
            img = fake_image(seed * 10 + i % 2, rows=2, cols=3)  # two requests share an image
            images = [img]
            body = image_prompt(body[:3], img, body[3:])
        greedy = i % 2 == 0
        params = SamplingParams(
            max_tokens=rng.randrange(3, 12),
            temperature=0.0 if greedy else 0.9,
            seed=None if greedy else rng.randrange(1000),
            n=2 if i == 5 else 1,
            ignore_eos=i == 3,
        )
        reqs.append((f"r{i}", prompt(system + body, images), params, rng.randrange(0, 10)))
    return reqs


def run(engine, reqs):
    """Add each request at its arrival step; return final outputs by request id."""
    final, step = {}, 0
    pending = sorted(reqs, key=lambda r: r[3])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            rid, p, params, _ = pending.pop(0)
            engine.add_request(rid, p, params)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 2000
    return final


def tokens(out):
    return [c.token_ids for c in out.outputs]


SCENARIOS = {
    "batched": dict(),
    "chunked": dict(budget=7),
    "no-prefix-cache": dict(caching=False, budget=16),
    "preemption": dict(num_blocks=30, max_model_len=96, budget=64),
    "preemption-chunked": dict(
        num_blocks=30, max_model_len=60, budget=6, block_size=2, caching=False
    ),
    "one-seq-at-a-time": dict(max_seqs=1, budget=9),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_outputs_independent_of_scheduling(scenario):
    reqs = workload(seed=1)
    alone = {}
    for r in reqs:
        alone.update(run(make_engine(), [(r[0], r[1], r[2], 0)]))
    engine = make_engine(**SCENARIOS[scenario])
    together = run(engine, reqs)
    for rid, *_ in reqs:
        assert tokens(together[rid]) == tokens(alone[rid]), rid
        assert [c.text for c in together[rid].outputs] == [c.text for c in alone[rid].outputs]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.tables
    if scenario.startswith("preemption"):
        assert engine.stats.num_preemptions > 0


def test_greedy_matches_cache_free_reference():
    reqs = [r for r in workload(seed=2) if r[2].temperature == 0.0]
    final = run(make_engine(budget=8), reqs)
    for rid, p, params, _ in reqs:
        want = MODEL.reference_greedy(p.token_ids, p.images, params.max_tokens)
        got = final[rid].outputs[0].token_ids
        assert got[: len(want)] == want, rid


def test_repeated_system_prompt_is_not_recomputed():
    engine = make_engine(budget=64)
    system = list(range(20, 60))
    first = run(engine, [("a", prompt(system + [70, 71]), SamplingParams(max_tokens=2), 0)])
    second = run(engine, [("b", prompt(system + [80]), SamplingParams(max_tokens=2), 0)])
    assert first["a"].metrics.num_cached_tokens == 0
    assert second["b"].metrics.num_cached_tokens == 40


def test_n_children_share_the_prompt_blocks():
    engine = make_engine(budget=256)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=3, n=3)
    final = run(engine, [("x", prompt(list(range(20, 61))), params, 0)])
    outs = final["x"].outputs
    assert [c.index for c in outs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs}) > 1  # children draw different samples
    assert engine.stats.num_computed_tokens < 41 * 3


def test_abort_frees_blocks_at_once_and_reports_abort():
    engine = make_engine()
    engine.add_request("a", prompt(range(20, 50)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_user_errors_are_typed():
    engine = make_engine(max_model_len=32)
    with pytest.raises(PromptTooLongError):
        engine.add_request("a", prompt(range(20, 52)), SamplingParams())
    with pytest.raises(EmptyPromptError):
        engine.add_request("a", prompt([]), SamplingParams())
    with pytest.raises(ImageTokenMismatchError):
        engine.add_request("a", prompt([20, IMG, 21]), SamplingParams())
    # 31 + 1 fits; ignore_eos so that an unseeded sample of EOS cannot end it as "stop"
    engine.add_request("a", prompt(range(20, 51)), SamplingParams(ignore_eos=True))
    with pytest.raises(DuplicateRequestError):
        engine.add_request("a", prompt([20]), SamplingParams())
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 1


def test_max_tokens_none_runs_to_the_context_limit():
    engine = make_engine(max_model_len=40)
    final = run(engine, [("a", prompt(range(20, 30)), SamplingParams(ignore_eos=True), 0)])
    out = final["a"].outputs[0]
    assert len(out.token_ids) == 30 and out.finish_reason == "length"


def test_stop_token_eos_and_stop_string():
    engine = make_engine()
    base = run(
        engine,
        [
            (
                "a",
                prompt(range(30, 45)),
                SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                0,
            )
        ],
    )
    toks = base["a"].outputs[0].token_ids
    stop_tok = toks[3]
    final = run(
        engine,
        [
            (
                "b",
                prompt(range(30, 45)),
                SamplingParams(
                    max_tokens=8, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True
                ),
                0,
            )
        ],
    )
    out = final["b"].outputs[0]
    assert out.token_ids == toks[: toks.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    stop_str = f"w{toks[2]} w{toks[3]}"
    final = run(
        engine,
        [
            (
                "c",
                prompt(range(30, 45)),
                SamplingParams(max_tokens=8, temperature=0, stop=[stop_str], ignore_eos=True),
                0,
            )
        ],
    )
    out = final["c"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert stop_str not in out.text and base["a"].outputs[0].text.startswith(out.text)


def test_streamed_deltas_add_up():
    engine = make_engine(budget=5)
    engine.add_request(
        "a", prompt(range(20, 40)), SamplingParams(max_tokens=10, logprobs=True, top_logprobs=2)
    )
    text, ids = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            text += c.delta_text
            ids += c.delta_token_ids
    assert text == c.text and ids == c.token_ids
    assert len(c.logprobs) == len(ids) and all(len(lp.top_logprobs) == 2 for lp in c.logprobs)
    assert all(lp.logprob <= 0 for lp in c.logprobs)


def test_images_encoded_once_per_image():
    MODEL.encoded.clear()
    img = fake_image(7, rows=3, cols=2)
    reqs = [
        (
            f"i{k}",
            prompt(image_prompt([30 + k], img, [40, 41]), [img]),
            SamplingParams(max_tokens=3, temperature=0),
            0,
        )
        for k in range(3)
    ]
    final = run(make_engine(budget=5), reqs)  # chunks split the image span
    assert sum(MODEL.encoded) == 1
    for rid, p, _, _ in reqs:
        want = MODEL.reference_greedy(p.token_ids, p.images, 3)
        assert final[rid].outputs[0].token_ids[: len(want)] == want


def test_different_image_same_text_gives_no_prefix_hit():
    engine = make_engine(budget=64)
    a, b = fake_image(1, 2, 2), fake_image(2, 2, 2)
    ids = image_prompt(list(range(20, 30)), a, [50, 51])
    run(engine, [("a", prompt(ids, [a]), SamplingParams(max_tokens=1), 0)])
    out = run(engine, [("b", prompt(ids, [b]), SamplingParams(max_tokens=1), 0)])["b"]
    assert out.metrics.num_cached_tokens == 8  # the 10 text tokens: 2 full blocks of 4
    out = run(engine, [("c", prompt(ids, [a]), SamplingParams(max_tokens=1), 0)])["c"]
    assert out.metrics.num_cached_tokens == 16


def test_generated_image_token_is_an_ordinary_token():
    engine = make_engine()
    # A logit bias forces the model to emit [IMG] in a text-only request.
    params = SamplingParams(max_tokens=3, temperature=0, logit_bias={IMG: 100.0})
    final = run(engine, [("a", prompt(range(20, 30)), params, 0)])
    assert final["a"].outputs[0].token_ids == [IMG, IMG, IMG]


def test_failing_forward_fails_only_that_step(monkeypatch):
    engine = make_engine()
    engine.add_request("a", prompt(range(20, 30)), SamplingParams(max_tokens=3))
    real = engine.runner.execute
    monkeypatch.setattr(
        engine.runner, "execute", lambda b: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    (out,) = engine.step()
    assert out.finished and out.error and "boom" in out.error
    monkeypatch.setattr(engine.runner, "execute", real)
    final = run(engine, [("b", prompt(range(20, 30)), SamplingParams(max_tokens=3), 0)])
    assert final["b"].outputs[0].finish_reason in ("length", "stop")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_failing_token_fails_its_whole_request_once(monkeypatch):
    """A request with n = 2 whose first sequence fails at its token: the request fails once,
    its sibling's token of the same step is dropped, and the other request goes on."""
    engine = make_engine(caching=False)  # both siblings prefill in the first step
    real = engine._on_token

    def flaky(state, token):
        if state.request.request_id == "bad" and state.seq.index == 0:
            raise RuntimeError("detokenizer exploded")
        return real(state, token)

    monkeypatch.setattr(engine, "_on_token", flaky)
    engine.add_request("bad", prompt(range(20, 30)), SamplingParams(max_tokens=3, n=2))
    engine.add_request("good", prompt(range(30, 40)), SamplingParams(max_tokens=3))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in final  # one final output per request
            if out.finished:
                final[out.request_id] = out
    assert "detokenizer exploded" in final["bad"].error
    assert final["good"].error is None and len(final["good"].outputs[0].token_ids) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_random_add_abort_step_never_leaks(seed):
    rng = random.Random(seed)
    engine = make_engine(
        budget=rng.choice([3, 8, 64]), num_blocks=rng.choice([16, 40]), max_model_len=60
    )
    live = []
    for i in range(40):
        action = rng.random()
        if action < 0.3:
            ids = [rng.randrange(20, 40) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(
                max_tokens=rng.randrange(1, 10),
                temperature=rng.choice([0, 1]),
                n=rng.choice([1, 2]),
            )
            engine.add_request(f"q{i}", prompt(ids), params)
            live.append(f"q{i}")
        elif action < 0.45 and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        else:
            engine.step()
        bm = engine.block_manager
        assert all(r >= 0 for r in bm.ref_counts)
    for rid in live:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    bm = engine.block_manager
    assert (
        bm.num_free_blocks == bm.num_blocks and not bm.tables and all(r == 0 for r in bm.ref_counts)
    )
    assert EOS == 2
