"""Speculative decoding with a draft model, on fresh random tiny checkpoints (CPU).

Oracles: the target's plain greedy decoding (a greedy request decoded speculatively must emit
exactly its tokens, whatever the draft), and, for the drafter's own KV reuse and roll-back, a
fresh drafter that prefills everything from scratch. The target as its own draft accepts every
draft (the same weights propose the target's greedy tokens).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest

from mistralpy.engine.config import EngineConfig
from mistralpy.engine.draft_model import DraftModelDrafter, Vocabulary, check_same_vocabulary
from mistralpy.engine.engine import LLMEngine
from mistralpy.engine.speculative import SpeculativeConfig
from mistralpy.params import InvalidParameter, SamplingParams
from mistralpy.testing import tiny_checkpoint
from tests.engine.test_speculative_engine import assert_no_leak, prompt_of, run

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
N2 = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, n=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(target, another draft): two tiny checkpoints of different random seeds."""
    seed = random.randrange(1 << 30)
    target = tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("target"), seed=seed)
    other = tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("draft"), seed=seed + 1)
    return target, other


def engine_of(target, draft=None, k=4, **overrides):
    spec = None if draft is None else SpeculativeConfig("draft_model", k, model=str(draft))
    options = dict(
        model=str(target), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=96,
        block_size=16, max_num_batched_tokens=32, speculative_config=spec,
    )  # fmt: skip
    return LLMEngine.from_config(EngineConfig(**{**options, **overrides}))


def drafter_of(engine) -> DraftModelDrafter:
    drafter = engine.default_speculation.drafter
    assert isinstance(drafter, DraftModelDrafter)
    return drafter


def assert_draft_cache_free(engine):
    drafter = drafter_of(engine)
    assert drafter.num_free_blocks == drafter.runner.num_blocks and not drafter.seqs


def requests_of(rng):
    """Two requests (one with n=2) of 50-token prompts: prefills in several chunks."""
    return [(prompt_of(rng, 50), GREEDY), (prompt_of(rng, 45), N2)]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_target_as_its_own_draft_equals_plain_greedy(ckpts, prefix_caching):
    target, _ = ckpts
    requests = requests_of(random.Random())
    plain = run(engine_of(target), [(p, params, None) for p, params in requests])
    engine = engine_of(target, target, enable_prefix_caching=prefix_caching)
    outs = run(engine, [(p, params, None) for p, params in requests])
    for got, want in zip(outs, plain):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        m = got.metrics
        assert m.num_drafts > 0 and m.num_accepted_tokens == m.num_draft_tokens  # rate 1.0
    assert_no_leak(engine)
    assert_draft_cache_free(engine)


def test_another_draft_still_gives_plain_greedy(ckpts):
    target, other = ckpts
    requests = requests_of(random.Random())
    plain = run(engine_of(target), [(p, params, None) for p, params in requests])
    engine = engine_of(target, other, k=3)
    # every step verifies (no trial: a drafter this wrong would never earn a verify step)
    engine.default_speculation = dataclasses.replace(engine.default_speculation, max_pause=0)
    outs = run(engine, [(p, params, None) for p, params in requests])
    for got, want in zip(outs, plain):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert engine.stats.num_draft_tokens > 0
    assert engine.stats.num_accepted_tokens < engine.stats.num_draft_tokens
    assert_no_leak(engine)
    assert_draft_cache_free(engine)


def test_aborted_requests_free_the_draft_cache(ckpts):
    target, other = ckpts
    engine = engine_of(target, other)
    rng = random.Random()
    for i, (prompt, params) in enumerate(requests_of(rng)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert drafter_of(engine).seqs  # drafting has begun
    engine.abort_request("r1")
    engine.abort_all()
    engine.step()
    assert_no_leak(engine)
    assert_draft_cache_free(engine)


def test_drafter_reuses_and_rolls_back_its_kv(ckpts):
    """Proposals after accepted / rejected drafts equal a fresh drafter's on the same ids."""
    target, other = ckpts
    drafter = drafter_of(engine_of(target, other, k=4))
    fresh = drafter_of(engine_of(target, other, k=4))
    ids = prompt_of(random.Random(), 40).token_ids
    first = drafter.propose("s", ids, 4)
    assert len(first) == 4
    for step in ([first[0], first[1]], [(first[0] + 1) % 1000 + 1000], [7, 8, 9]):
        ids = ids + step
        got = drafter.propose("s", ids, 4)
        fresh.release("s")
        assert got == fresh.propose("s", ids, 4)
    drafter.release("s")
    fresh.release("s")
    assert drafter.num_free_blocks == drafter.runner.num_blocks


def test_vocabulary_mismatch_is_refused(ckpts, tmp_path):
    target, _ = ckpts
    draft = shutil.copytree(target, tmp_path / "small-vocab")
    config = json.loads((draft / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1000
    (draft / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidParameter, match=r"small-vocab.*vocab_size 1000.*131072"):
        engine_of(target, draft)
    a = Vocabulary("a", 100, 1, 2)
    check_same_vocabulary(a, Vocabulary("b", 100, 1, 2))
    with pytest.raises(InvalidParameter, match="'b' has eos_token_id 3, the target 'a' has 2"):
        check_same_vocabulary(a, Vocabulary("b", 100, 1, 3))
